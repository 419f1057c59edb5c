package tunlink

import (
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// maxPacket is the largest packet a tun hands over or takes: a 64 KiB super-packet (the
// kernel's GSO limit on a tun), which is also gVisor's largest pooled chunk.
const maxPacket = 1 << 16

// maxHead bounds the headers (IP and TCP/UDP) put into a small chunk of their own in front
// of the payload's: the stack parses headers in place, and when the chunk they sit in is
// shared (it is, while the IP layer holds a view of its header) it copies that chunk whole
// first: a chunk of a hundred bytes instead of 64 KiB. And the payload starts a chunk of its
// own, so the relay can send it to the upstream socket in one piece.
const maxHead = 128

// copyBelow: a payload up to this size is copied out of the reader's 64 KiB buffer into a
// chunk of its own size, and the buffer is reused; a larger one takes the buffer with it (and
// a fresh one is made). So a small packet queued in a receive buffer never pins 64 KiB, and
// the common case of the guest's TSO super-packets costs no copy.
const copyBelow = 16 << 10

// maxIovs bounds the pieces of one outbound packet written in one writev (the virtio header,
// the headers, the payload's chunks); a packet in more pieces is flattened first.
const maxIovs = 32

// endpoint is the offload link endpoint: a gVisor LinkEndpoint on tun queues opened with
// IFF_VNET_HDR and TUNSETOFFLOAD. Inbound, the guest kernel's TSO super-packets go to the stack
// whole (one large segment each, no split, no checksum), and USO super-packets are split into
// their datagrams. Outbound, the stack builds segments of up to 64 KiB (host GSO), which go out
// with a virtio header telling the guest kernel the segment size and that the TCP checksum is
// partial: the guest takes them as one large receive, like GRO's output.
type endpoint struct {
	files []*os.File // one per queue; reads go through the runtime poller
	fds   []int      // the same descriptors, for writes (valid until Close)
	mtu   atomic.Uint32

	mu         sync.Mutex
	dispatcher stack.NetworkDispatcher
	stopped    atomic.Bool    // Attach(nil) was called: readers deliver nothing more
	wg         sync.WaitGroup // the readers and the SYN writer

	// syns are TCP SYN and SYN-ACK segments, written by a goroutine of their own (see
	// WritePackets).
	syns chan *stack.PacketBuffer

	stats struct{ superTCP, superUDP, dropped, syns atomic.Uint64 }
}

var _ stack.LinkEndpoint = (*endpoint)(nil)
var _ stack.GSOEndpoint = (*endpoint)(nil)

func newEndpoint(fds []int, mtu uint32) *endpoint {
	e := &endpoint{fds: fds, syns: make(chan *stack.PacketBuffer, synQueue)}
	for _, fd := range fds {
		e.files = append(e.files, os.NewFile(uintptr(fd), "tun"))
	}
	e.mtu.Store(mtu)
	return e
}

// Attach starts one reader per queue, or with nil (the NIC going away) tells them to stop.
// It does not wait for them: the stack calls it, and Wait, holding its own lock, which a
// reader in the middle of delivering a packet may be waiting for. closeFiles waits.
func (e *endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if d == nil {
		e.stopped.Store(true)
		for _, f := range e.files {
			f.SetReadDeadline(time.Unix(1, 0)) // wakes the reader, which then returns
		}
		e.dispatcher = nil
		return
	}
	if e.dispatcher != nil || e.stopped.Load() {
		return
	}
	e.dispatcher = d
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for pkt := range e.syns {
			e.writePacket(pkt)
			pkt.DecRef()
		}
	}()
	for _, f := range e.files {
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			e.readLoop(f, d)
		}()
	}
}

func (e *endpoint) IsAttached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dispatcher != nil
}

// readLoop reads packets from one queue and hands them to the stack on this goroutine.
func (e *endpoint) readLoop(f *os.File, d stack.NetworkDispatcher) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	var vh [vnetHdrLen]byte
	var segHdr [maxUDPSegHeader]byte
	v := buffer.NewViewSize(maxPacket)
	defer func() { v.Release() }()
	var iov [2]unix.Iovec
	var n int
	var errno unix.Errno
	read := func(fd uintptr) bool {
		iov[0].Base = &vh[0]
		iov[0].SetLen(vnetHdrLen)
		iov[1].Base = v.BasePtr()
		iov[1].SetLen(maxPacket)
		for {
			r, _, en := unix.Syscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&iov[0])), 2)
			if en == unix.EINTR {
				continue
			}
			n, errno = int(r), en
			return en != unix.EAGAIN
		}
	}
	for {
		err := rc.Read(read)
		if err != nil || e.stopped.Load() { // the deadline Attach(nil) sets, or the file closed
			return
		}
		if errno != 0 || n <= vnetHdrLen {
			if errno == unix.EBADFD || errno == unix.EIO { // the device is gone
				return
			}
			continue
		}
		v = e.deliver(d, decodeVnetHdr(vh[:]), v, n-vnetHdrLen, &segHdr)
	}
}

// deliver hands the packet in the first n bytes of v to the stack and returns the buffer for
// the next read (v itself, or a fresh one when the packet kept v).
func (e *endpoint) deliver(d stack.NetworkDispatcher, h vnetHdr, v *buffer.View, n int, segHdr *[maxUDPSegHeader]byte) *buffer.View {
	b := v.AsSlice()[:n]
	kind := classifyInbound(h, b)
	first := b[0] // the IP version (kept: b's chunk may go up with the packet)
	switch kind {
	case onePacket:
		if h.gsoType != 0 {
			e.stats.superTCP.Add(1)
		}
		hl := headLen(b, maxHead)
		buf := buffer.MakeWithView(buffer.NewViewWithData(b[:hl]))
		var rest buffer.Buffer
		if len(b)-hl <= copyBelow {
			rest = buffer.MakeWithData(b[hl:])
		} else {
			v.CapLength(n)
			v.TrimFront(hl)
			rest = buffer.MakeWithView(v)
			v = buffer.NewViewSize(maxPacket)
		}
		buf.Merge(&rest) // links the views, no copy (Append would fill the head's chunk)
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buf})
		dispatchPacket(d, pkt, first)
		return v
	case udpSegments:
		e.stats.superUDP.Add(1)
		splitUDP(h, b, segHdr, func(hdr, payload []byte) {
			sv := buffer.NewView(len(hdr) + len(payload))
			sv.Write(hdr)
			sv.Write(payload)
			dispatch(d, sv)
		})
		return v
	default:
		e.stats.dropped.Add(1)
		return v
	}
}

// dispatch gives one IP packet (owned by v) to the stack.
func dispatch(d stack.NetworkDispatcher, v *buffer.View) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithView(v)})
	dispatchPacket(d, pkt, v.AsSlice()[0])
}

// dispatchPacket gives one IP packet to the stack (first is its first byte, the IP version).
func dispatchPacket(d stack.NetworkDispatcher, pkt *stack.PacketBuffer, first byte) {
	proto := header.IPv4ProtocolNumber
	if first>>4 == 6 {
		proto = header.IPv6ProtocolNumber
	}
	pkt.NetworkProtocolNumber = proto
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}

// synQueue bounds the SYN writer's queue (beyond it, SYNs are written in place).
const synQueue = 256

// WritePackets writes each packet with its virtio header in one writev on the queue its flow
// hashes to. A packet the tun refuses is dropped, as a NIC would.
//
// A SYN or SYN-ACK is handed to the SYN writer instead. gVisor sends it holding the new
// endpoint's lock, and the guest kernel answers inside the write: its ACK can reach the stack
// while that lock is still held, and the stack then leaves it queued until the next segment
// (or the SYN-ACK's retransmission a second later) comes. Written from another goroutine, the
// SYN-ACK goes out after the lock is released (measured: the handshake's completion came
// ~370 us after the guest's ACK, rescued by its first data, and 45 us after it with this).
func (e *endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	sent := 0
	for _, pkt := range pkts.AsSlice() {
		if isSYN(pkt) {
			e.stats.syns.Add(1)
			select {
			case e.syns <- pkt.IncRef():
				sent++
				continue
			default: // the queue is full: in place
			}
		}
		if err := e.writePacket(pkt); err != nil {
			if sent == 0 {
				return 0, err
			}
			break
		}
		sent++
	}
	return sent, nil
}

// isSYN reports whether pkt is a TCP segment with the SYN flag.
func isSYN(pkt *stack.PacketBuffer) bool {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return false
	}
	th := pkt.TransportHeader().Slice()
	return len(th) >= header.TCPMinimumSize && header.TCP(th).Flags()&header.TCPFlagSyn != 0
}

func (e *endpoint) writePacket(pkt *stack.PacketBuffer) tcpip.Error {
	var vh [vnetHdrLen]byte
	if gso := pkt.GSOOptions; gso.Type == stack.GSOTCPv4 || gso.Type == stack.GSOTCPv6 {
		h := vnetHdr{hdrLen: uint16(pkt.HeaderSize())}
		if gso.NeedsCsum { // the stack summed only the pseudo-header: the guest does the rest
			h.flags = unix.VIRTIO_NET_HDR_F_NEEDS_CSUM
			h.csumStart = uint16(len(pkt.NetworkHeader().Slice()))
			h.csumOffset = gso.CsumOffset
		}
		if pkt.Data().Size() > int(gso.MSS) {
			h.gsoType = unix.VIRTIO_NET_HDR_GSO_TCPV4
			if gso.Type == stack.GSOTCPv6 {
				h.gsoType = unix.VIRTIO_NET_HDR_GSO_TCPV6
			}
			h.gsoSize = gso.MSS
		}
		h.encode(vh[:])
	}
	var iovs [maxIovs]unix.Iovec
	iovs[0].Base = &vh[0]
	iovs[0].SetLen(vnetHdrLen)
	n := 1
	views, off := pkt.AsViewList()
	for v := views.Front(); v != nil; v = v.Next() {
		s := v.AsSlice()
		if off >= len(s) {
			off -= len(s)
			continue
		}
		s, off = s[off:], 0
		if n == maxIovs { // too many pieces: write a flat copy instead
			return e.writeFlat(pkt, vh[:])
		}
		iovs[n].Base = &s[0]
		iovs[n].SetLen(len(s))
		n++
	}
	fd := e.fds[pkt.Hash%uint32(len(e.fds))]
	for {
		_, _, en := unix.Syscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iovs[0])), uintptr(n))
		switch en {
		case 0:
			return nil
		case unix.EINTR:
			continue
		default:
			return tcpip.TranslateErrno(en)
		}
	}
}

func (e *endpoint) writeFlat(pkt *stack.PacketBuffer, vh []byte) tcpip.Error {
	buf := pkt.ToBuffer()
	defer buf.Release()
	b := append(append(make([]byte, 0, vnetHdrLen+int(buf.Size())), vh...), buf.Flatten()...)
	fd := e.fds[pkt.Hash%uint32(len(e.fds))]
	for {
		_, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return tcpip.TranslateErrno(err.(unix.Errno))
		}
		return nil
	}
}

func (e *endpoint) MTU() uint32                             { return e.mtu.Load() }
func (e *endpoint) SetMTU(mtu uint32)                       { e.mtu.Store(mtu) }
func (e *endpoint) MaxHeaderLength() uint16                 { return 0 }
func (e *endpoint) LinkAddress() tcpip.LinkAddress          { return "" }
func (e *endpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (e *endpoint) Wait()                                   {} // see Attach and closeFiles
func (e *endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (e *endpoint) AddHeader(*stack.PacketBuffer)           {}
func (e *endpoint) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (e *endpoint) Close()                                  {}
func (e *endpoint) SetOnCloseAction(func())                 {}

// Capabilities: received packets' checksums are not checked (the guest kernel leaves them
// partial on a tun with TUN_F_CSUM, and a packet on a tun cannot be corrupted in transit).
func (e *endpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// GSOMaxSize and SupportedGSO make the stack's TCP build segments of up to 64 KiB with a
// partial checksum (host GSO): the virtio header carries them to the guest whole.
func (e *endpoint) GSOMaxSize() uint32               { return maxPacket }
func (e *endpoint) SupportedGSO() stack.SupportedGSO { return stack.HostGSOSupported }

// closeFiles stops the readers, waits for them, and closes the queues (after the stack has
// stopped using the endpoint, outside its locks).
func (e *endpoint) closeFiles() {
	e.Attach(nil)
	close(e.syns) // nothing writes any more: the stack has stopped
	e.wg.Wait()
	for _, f := range e.files {
		f.Close()
	}
}
