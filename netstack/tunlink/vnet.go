package tunlink

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// vnetHdrLen is the size of struct virtio_net_hdr, which the kernel puts before every packet
// on a tun opened with IFF_VNET_HDR (the size TUNSETVNETHDRSZ sets).
const vnetHdrLen = 10

// vnetHdr is struct virtio_net_hdr. A tun uses the host's byte order for it (legacy virtio)
// unless TUNSETVNETLE/BE says otherwise, which we never do.
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16 // length of the headers (IP + transport) before the payload
	gsoSize    uint16 // payload bytes per segment of a super-packet
	csumStart  uint16 // where the partial checksum's coverage starts (the transport header)
	csumOffset uint16 // where in the transport header the checksum field is
}

func decodeVnetHdr(b []byte) vnetHdr {
	return vnetHdr{
		flags:      b[0],
		gsoType:    b[1],
		hdrLen:     binary.NativeEndian.Uint16(b[2:]),
		gsoSize:    binary.NativeEndian.Uint16(b[4:]),
		csumStart:  binary.NativeEndian.Uint16(b[6:]),
		csumOffset: binary.NativeEndian.Uint16(b[8:]),
	}
}

func (h *vnetHdr) encode(b []byte) {
	b[0] = h.flags
	b[1] = h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

// inboundKind says what to do with one read from the tun.
type inboundKind int

const (
	dropPacket  inboundKind = iota // malformed: not an IP packet we can hand on
	onePacket                      // a packet, or a TCP super-packet the stack takes whole
	udpSegments                    // a UDP super-packet (USO): split into datagrams
)

// classifyInbound checks one packet read from the tun (b, after the virtio header h) and fixes
// what the stack needs: a TCP super-packet (the guest's TSO) goes up whole, as one large
// segment, so its IP length field is made to cover all of it. Its checksums are left as the
// guest's kernel wrote them (partial): the endpoint declares RX checksum offload, and the
// packet never left this machine. Everything the guest sends is hostile input: lengths are
// checked against b, never trusted.
func classifyInbound(h vnetHdr, b []byte) inboundKind {
	if len(b) < 1 {
		return dropPacket
	}
	v := b[0] >> 4
	switch v {
	case 4:
		if len(b) < 20 || int(b[0]&0xf)*4 < 20 || int(b[0]&0xf)*4 > len(b) {
			return dropPacket
		}
	case 6:
		if len(b) < 40 {
			return dropPacket
		}
	default:
		return dropPacket
	}
	switch h.gsoType &^ unix.VIRTIO_NET_HDR_GSO_ECN {
	case unix.VIRTIO_NET_HDR_GSO_NONE:
		return onePacket
	case unix.VIRTIO_NET_HDR_GSO_TCPV4, unix.VIRTIO_NET_HDR_GSO_TCPV6:
		if len(b) > 0xffff+40 {
			return dropPacket
		}
		if v == 4 {
			if len(b) > 0xffff {
				return dropPacket
			}
			if int(binary.BigEndian.Uint16(b[2:])) != len(b) {
				binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
				ihl := int(b[0]&0xf) * 4
				putIPv4Checksum(b[:ihl])
			}
		} else {
			if len(b)-40 > 0xffff {
				return dropPacket
			}
			binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
		}
		return onePacket
	case unix.VIRTIO_NET_HDR_GSO_UDP_L4:
		if _, ok := udpSuper(h, b); ok && len(b) <= 0xffff+40 {
			return udpSegments
		}
		return dropPacket
	default:
		return dropPacket
	}
}

// udpGeometry describes a UDP super-packet: where the UDP header starts and how big each
// datagram's payload is.
type udpGeometry struct {
	ipLen, gsoSize int
}

// udpSuper validates a USO super-packet: a plain IPv4 (any header length) or IPv6 (no
// extension headers) UDP packet whose UDP header starts at csumStart, with a segment size.
func udpSuper(h vnetHdr, b []byte) (udpGeometry, bool) {
	var ipLen int
	switch b[0] >> 4 {
	case 4:
		ipLen = int(b[0]&0xf) * 4
		if b[9] != unix.IPPROTO_UDP {
			return udpGeometry{}, false
		}
	case 6:
		ipLen = 40
		if b[6] != unix.IPPROTO_UDP {
			return udpGeometry{}, false
		}
	}
	if int(h.csumStart) != ipLen || ipLen+8 > len(b) || h.gsoSize == 0 {
		return udpGeometry{}, false
	}
	return udpGeometry{ipLen: ipLen, gsoSize: int(h.gsoSize)}, true
}

// maxUDPSegHeader is room for the rebuilt headers of one datagram (IPv4 with options + UDP).
const maxUDPSegHeader = 60 + 8

// splitUDP calls fn for each datagram of a UDP super-packet b (as classifyInbound accepted it)
// with its rebuilt IP and UDP headers (in hdr, reused between calls) and its payload (a part
// of b). Lengths, the IPv4 identification and header checksum are set per datagram; the UDP
// checksum is left out (zero on IPv4, partial on IPv6): the stack was told not to check it.
func splitUDP(h vnetHdr, b []byte, hdr *[maxUDPSegHeader]byte, fn func(hdr, payload []byte)) {
	g, ok := udpSuper(h, b)
	if !ok {
		return
	}
	hl := g.ipLen + 8
	v4 := b[0]>>4 == 4
	var id uint16
	if v4 {
		id = binary.BigEndian.Uint16(b[4:])
	}
	off := hl
	for i := 0; ; i++ {
		end := min(off+g.gsoSize, len(b))
		payload := b[off:end]
		out := hdr[:hl]
		copy(out, b[:hl])
		udpLen := 8 + len(payload)
		if v4 {
			binary.BigEndian.PutUint16(out[2:], uint16(hl+len(payload)))
			binary.BigEndian.PutUint16(out[4:], id+uint16(i))
			putIPv4Checksum(out[:g.ipLen])
			binary.BigEndian.PutUint16(out[g.ipLen+6:], 0)
		} else {
			binary.BigEndian.PutUint16(out[4:], uint16(udpLen))
		}
		binary.BigEndian.PutUint16(out[g.ipLen+4:], uint16(udpLen))
		fn(out, payload)
		if off = end; off >= len(b) {
			return
		}
	}
}

// headLen is the length of an IP packet's IP and TCP or UDP headers (at most limit; for other
// transports and IPv6 extension headers, min(len(b), limit)). b passed classifyInbound.
func headLen(b []byte, limit int) int {
	var ipLen int
	var proto byte
	if b[0]>>4 == 4 {
		ipLen, proto = int(b[0]&0xf)*4, b[9]
	} else {
		ipLen, proto = 40, b[6]
	}
	n := min(len(b), limit)
	switch proto {
	case unix.IPPROTO_TCP:
		if len(b) >= ipLen+13 {
			n = min(n, ipLen+int(b[ipLen+12]>>4)*4)
		}
	case unix.IPPROTO_UDP:
		n = min(n, ipLen+8)
	}
	return max(n, min(len(b), ipLen))
}

// putIPv4Checksum computes an IPv4 header's checksum in place.
func putIPv4Checksum(h []byte) {
	h[10], h[11] = 0, 0
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(h[10:], ^uint16(sum))
}
