package tunlink

import (
	"bytes"
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// ipv4Packet builds an IPv4 packet: header (20 bytes), then a transport header of thl bytes
// with protocol proto, then payload.
func ipv4Packet(proto uint8, thl int, payload []byte, totLen int) []byte {
	b := make([]byte, 20+thl+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(totLen))
	binary.BigEndian.PutUint16(b[4:], 0x1234)
	b[8], b[9] = 64, proto
	copy(b[12:], []byte{10, 87, 0, 2, 198, 18, 0, 10})
	putIPv4Checksum(b[:20])
	copy(b[20+thl:], payload)
	return b
}

func ipv6Packet(proto uint8, thl int, payload []byte) []byte {
	b := make([]byte, 40+thl+len(payload))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(thl+len(payload)))
	b[6], b[7] = proto, 64
	b[8], b[39] = 0xfd, 1
	copy(b[40+thl:], payload)
	return b
}

func TestVnetHdrRoundTrip(t *testing.T) {
	h := vnetHdr{flags: 1, gsoType: 4, hdrLen: 72, gsoSize: 1428, csumStart: 40, csumOffset: 16}
	var b [vnetHdrLen]byte
	h.encode(b[:])
	if got := decodeVnetHdr(b[:]); got != h {
		t.Fatalf("decode(encode(%+v)) = %+v", h, got)
	}
}

func TestClassifyInbound(t *testing.T) {
	big := bytes.Repeat([]byte{7}, 60000)
	tso4 := vnetHdr{flags: unix.VIRTIO_NET_HDR_F_NEEDS_CSUM, gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 52, gsoSize: 1448, csumStart: 20, csumOffset: 16}
	tso6 := vnetHdr{flags: unix.VIRTIO_NET_HDR_F_NEEDS_CSUM, gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV6, hdrLen: 72, gsoSize: 1428, csumStart: 40, csumOffset: 16}
	uso4 := vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, hdrLen: 28, gsoSize: 1000, csumStart: 20, csumOffset: 6}
	cases := []struct {
		name string
		h    vnetHdr
		pkt  []byte
		want inboundKind
	}{
		{"plain ipv4", vnetHdr{}, ipv4Packet(6, 20, []byte("x"), 41), onePacket},
		{"plain ipv6", vnetHdr{}, ipv6Packet(17, 8, []byte("x")), onePacket},
		{"tso ipv4", tso4, ipv4Packet(6, 32, big, 20+32+len(big)), onePacket},
		{"tso ipv4 with a short length field (fixed up)", tso4, ipv4Packet(6, 32, big, 1500), onePacket},
		{"tso ipv6", tso6, ipv6Packet(6, 32, big), onePacket},
		{"tso with the ECN flag", vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV4 | unix.VIRTIO_NET_HDR_GSO_ECN}, ipv4Packet(6, 20, big, 1), onePacket},
		{"uso ipv4", uso4, ipv4Packet(17, 8, big[:2500], 0), udpSegments},
		{"uso on a tcp packet", uso4, ipv4Packet(6, 8, big[:2500], 0), dropPacket},
		{"uso with segment size 0", vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, csumStart: 20}, ipv4Packet(17, 8, big[:100], 0), dropPacket},
		{"uso with the udp header elsewhere", vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, gsoSize: 10, csumStart: 24}, ipv4Packet(17, 8, big[:100], 0), dropPacket},
		{"legacy ufo", vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP}, ipv4Packet(17, 8, nil, 28), dropPacket},
		{"empty", vnetHdr{}, nil, dropPacket},
		{"not ip", vnetHdr{}, []byte{0x10, 0, 0, 0}, dropPacket},
		{"short ipv4", vnetHdr{}, []byte{0x45, 0, 0, 10}, dropPacket},
		{"ipv4 header longer than the packet", vnetHdr{}, append([]byte{0x4f}, make([]byte, 30)...), dropPacket},
		{"short ipv6", vnetHdr{}, append([]byte{0x60}, make([]byte, 20)...), dropPacket},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := classifyInbound(c.h, c.pkt); got != c.want {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
	// A TSO super-packet's length field covers all of it afterwards, with a valid checksum.
	p := ipv4Packet(6, 32, big, 1500)
	classifyInbound(tso4, p)
	if h := header.IPv4(p); int(h.TotalLength()) != len(p) || !h.IsChecksumValid() {
		t.Fatalf("ipv4 length %d (packet %d), checksum valid %v", h.TotalLength(), len(p), h.IsChecksumValid())
	}
	p6 := ipv6Packet(6, 32, big)
	binary.BigEndian.PutUint16(p6[4:], 1)
	classifyInbound(tso6, p6)
	if int(header.IPv6(p6).PayloadLength()) != len(p6)-40 {
		t.Fatalf("ipv6 payload length %d, want %d", header.IPv6(p6).PayloadLength(), len(p6)-40)
	}
}

func TestSplitUDP(t *testing.T) {
	payload := make([]byte, 2500)
	for i := range payload {
		payload[i] = byte(i)
	}
	for _, v6 := range []bool{false, true} {
		pkt := ipv4Packet(17, 8, payload, 0)
		h := vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, hdrLen: 28, gsoSize: 1000, csumStart: 20, csumOffset: 6}
		ipLen := 20
		if v6 {
			pkt = ipv6Packet(17, 8, payload)
			h.hdrLen, h.csumStart, ipLen = 48, 40, 40
		}
		var got []byte
		var sizes []int
		var seg [maxUDPSegHeader]byte
		splitUDP(h, pkt, &seg, func(hdr, p []byte) {
			if len(hdr) != ipLen+8 {
				t.Fatalf("header length %d", len(hdr))
			}
			if v6 {
				if int(binary.BigEndian.Uint16(hdr[4:])) != 8+len(p) {
					t.Fatalf("ipv6 payload length %d for %d bytes", binary.BigEndian.Uint16(hdr[4:]), len(p))
				}
			} else {
				ip := header.IPv4(hdr)
				if int(ip.TotalLength()) != len(hdr)+len(p) || !ip.IsChecksumValid() || ip.ID() != 0x1234+uint16(len(sizes)) {
					t.Fatalf("ipv4 header: length %d for %d, checksum %v, id %#x", ip.TotalLength(), len(hdr)+len(p), ip.IsChecksumValid(), ip.ID())
				}
			}
			if int(binary.BigEndian.Uint16(hdr[ipLen+4:])) != 8+len(p) {
				t.Fatalf("udp length %d for %d bytes", binary.BigEndian.Uint16(hdr[ipLen+4:]), len(p))
			}
			got = append(got, p...)
			sizes = append(sizes, len(p))
		})
		if !bytes.Equal(got, payload) || len(sizes) != 3 || sizes[2] != 500 {
			t.Fatalf("v6 %v: segments %v, payload intact %v", v6, sizes, bytes.Equal(got, payload))
		}
	}
}

// FuzzInbound: whatever the guest's kernel (or a root workload with a packet socket) puts on
// the tun, classifying and splitting never panics, and every datagram split out has headers
// whose lengths match what is delivered.
func FuzzInbound(f *testing.F) {
	var hb [vnetHdrLen]byte
	seed := func(h vnetHdr, pkt []byte) {
		h.encode(hb[:])
		f.Add(append(append([]byte{}, hb[:]...), pkt...))
	}
	seed(vnetHdr{}, ipv4Packet(6, 20, []byte("hello"), 45))
	seed(vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV4, flags: 1, hdrLen: 40, gsoSize: 100, csumStart: 20, csumOffset: 16}, ipv4Packet(6, 20, make([]byte, 1000), 300))
	seed(vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV6, hdrLen: 60, gsoSize: 100, csumStart: 40, csumOffset: 16}, ipv6Packet(6, 20, make([]byte, 1000)))
	seed(vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, hdrLen: 28, gsoSize: 7, csumStart: 20, csumOffset: 6}, ipv4Packet(17, 8, make([]byte, 50), 0))
	seed(vnetHdr{gsoType: unix.VIRTIO_NET_HDR_GSO_UDP_L4, hdrLen: 48, gsoSize: 9, csumStart: 40, csumOffset: 6}, ipv6Packet(17, 8, make([]byte, 50)))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < vnetHdrLen {
			return
		}
		h := decodeVnetHdr(b)
		pkt := b[vnetHdrLen:]
		switch classifyInbound(h, pkt) {
		case onePacket:
			if hl := headLen(pkt, 128); hl > len(pkt) || hl < 1 {
				t.Fatalf("head length %d of a %d-byte packet", hl, len(pkt))
			}
			if len(pkt) > 0xffff+40 {
				t.Fatalf("%d-byte packet accepted", len(pkt))
			}
		case udpSegments:
			var seg [maxUDPSegHeader]byte
			total := 0
			splitUDP(h, pkt, &seg, func(hdr, p []byte) {
				ipLen := len(hdr) - 8
				if int(binary.BigEndian.Uint16(hdr[ipLen+4:])) != 8+len(p) || len(p) > int(h.gsoSize) {
					t.Fatalf("datagram of %d bytes, udp length %d, segment size %d", len(p), binary.BigEndian.Uint16(hdr[ipLen+4:]), h.gsoSize)
				}
				total += len(p)
			})
			if total != len(pkt)-int(h.csumStart)-8 {
				t.Fatalf("split %d payload bytes out of %d", total, len(pkt)-int(h.csumStart)-8)
			}
		}
	})
}
