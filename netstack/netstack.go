// Package netstack is agentd's egress data path: a gVisor network stack bound to a tun device
// that is the guest's default route. Every TCP connection the guest opens ends in this stack,
// which asks the policy at SYN time, dials the destination itself (kernel sockets, from wherever
// agentd's uplink is), and completes the guest's handshake only once the upstream connect has
// succeeded: a denied or unreachable destination gets a RST, never "connected, then reset".
package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/link/tun"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/agentd/agentd/policy"
)

// Options configure the stack. Zero fields take DefaultOptions' values.
type Options struct {
	// TunName is the tun device agentd creates (IFF_TUN|IFF_NO_PI).
	TunName string
	// MTU of the tun and the stack: 65520 lets the guest send 64 KiB segments, which is what
	// made the tun path fast in measurement (0.3 of kernel loopback at 1500 bytes was far worse).
	MTU uint32
	// Decide rules on each new flow (nil: allow everything).
	Decide func(policy.Flow) policy.Decision
	// Dial opens upstream connections (default: kernel sockets).
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// MaxInFlight bounds handshakes being decided and dialed at once; more SYNs are dropped
	// (the guest retransmits).
	MaxInFlight int
	// ConnectTimeout bounds one upstream dial.
	ConnectTimeout time.Duration
	// ReceiveWindow is the forwarder's initial receive window (0: gVisor's default).
	ReceiveWindow int
	Log           *slog.Logger
}

// DefaultOptions are the settings measured best on a tun (see docs).
var DefaultOptions = Options{TunName: "agentd0", MTU: 65520, MaxInFlight: 1024, ConnectTimeout: 30 * time.Second}

// Counters are the stack's flow statistics.
type Counters struct {
	Allowed, Denied, DialFailed, Active atomic.Int64
}

// Stack is a running netstack.
type Stack struct {
	opts     Options
	s        *stack.Stack
	fd       int
	log      *slog.Logger
	Counters Counters
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc
}

// New creates the tun device and starts the stack on it. The caller moves the device into the
// guest's view (another network namespace, or the guest itself) and routes through it.
func New(o Options) (*Stack, error) {
	d := DefaultOptions
	if o.TunName == "" {
		o.TunName = d.TunName
	}
	if o.MTU == 0 {
		o.MTU = d.MTU
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = d.MaxInFlight
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = d.ConnectTimeout
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{}).DialContext
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	fd, err := tun.Open(o.TunName)
	if err != nil {
		return nil, fmt.Errorf("netstack: open tun %s: %w", o.TunName, err)
	}
	ep, err := fdbased.New(&fdbased.Options{
		FDs: []int{fd},
		MTU: o.MTU,
		// The guest kernel hands the tun packets whose checksums it may leave to "hardware";
		// without this every such packet would be dropped as corrupt.
		RXChecksumOffload: true,
	})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netstack: link endpoint: %w", err)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	ctx, cancel := context.WithCancel(context.Background())
	st := &Stack{opts: o, s: s, fd: fd, log: o.Log, ctx: ctx, cancel: cancel}
	if err := st.configure(ep); err != nil {
		s.Close()
		unix.Close(fd)
		cancel()
		return nil, err
	}
	return st, nil
}

func (st *Stack) configure(ep stack.LinkEndpoint) error {
	s := st.s
	// Protocol options and the forwarder go in before the NIC exists: creating it starts packet
	// delivery, and the transport handler is not safe to install under traffic.
	sack := tcpip.TCPSACKEnabled(true) // recovers from loss without resending whole windows
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	moderate := tcpip.TCPModerateReceiveBufferOption(true) // grow receive buffers with the flow
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &moderate)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 16 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 16 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	fwd := tcp.NewForwarder(s, st.opts.ReceiveWindow, st.opts.MaxInFlight, st.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}, {Destination: header.IPv6EmptySubnet, NIC: 1}})
	if err := s.CreateNIC(1, ep); err != nil {
		return fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Accept packets for any address and send from any address: the stack stands in for every
	// destination the guest talks to.
	if err := s.SetPromiscuousMode(1, true); err != nil {
		return fmt.Errorf("netstack: promiscuous mode: %s", err)
	}
	if err := s.SetSpoofing(1, true); err != nil {
		return fmt.Errorf("netstack: spoofing: %s", err)
	}
	return nil
}

// Close stops the stack and waits for its relays to end.
func (st *Stack) Close() {
	st.cancel()
	st.s.Close()
	st.wg.Wait()
	unix.Close(st.fd)
}

// Endpoints returns the stack's registered transport endpoints (for leak checks).
func (st *Stack) Endpoints() int { return len(st.s.RegisteredEndpoints()) }

func addrOf(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

// handleTCP runs for each SYN (in its own goroutine, at most MaxInFlight at once).
func (st *Stack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst, port := addrOf(id.LocalAddress), id.LocalPort
	if st.opts.Decide != nil {
		d := st.opts.Decide(policy.Flow{Direction: policy.Egress, Protocol: policy.TCP, Addr: dst, Port: port})
		if d.Action != policy.Allow {
			st.Counters.Denied.Add(1)
			st.log.Debug("tcp denied", "dst", dst, "port", port, "rule", d.RuleID)
			r.Complete(true) // RST: the guest sees ECONNREFUSED at once
			return
		}
	}
	ctx, cancel := context.WithTimeout(st.ctx, st.opts.ConnectTimeout)
	up, err := st.opts.Dial(ctx, "tcp", net.JoinHostPort(dst.String(), strconv.Itoa(int(port))))
	cancel()
	if err != nil {
		st.Counters.DialFailed.Add(1)
		st.log.Debug("tcp upstream dial failed", "dst", dst, "port", port, "error", err)
		r.Complete(true) // never "connected, then reset"
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		up.Close()
		r.Complete(true)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)
	st.Counters.Allowed.Add(1)
	st.Counters.Active.Add(1)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		defer st.Counters.Active.Add(-1)
		relay(gonet.NewTCPConn(&wq, ep), up)
	}()
}

// halfCloser is a connection whose write side can be shut on its own.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// relay copies both ways, passing each side's FIN on as a half-close, then closes both.
func relay(guest *gonet.TCPConn, up net.Conn) {
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 64<<10)
		_, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf)
		if hc, ok := dst.(halfCloser); ok && (err == nil || errors.Is(err, io.EOF)) {
			hc.CloseWrite()
		} else {
			dst.Close()
			src.Close()
		}
		done <- struct{}{}
	}
	go pipe(up, guest)
	go pipe(guest, up)
	<-done
	<-done
	guest.Close()
	up.Close()
}
