// Package netstack is agentd's egress data path: a gVisor network stack bound to a tun device
// that is the guest's default route. Every TCP connection and UDP association the guest opens
// ends in this stack, which asks the egress service at SYN time (or at the first datagram),
// dials the destination itself (through the uplink's dialer), and completes the guest's
// handshake only once the upstream connect has succeeded: a denied or unreachable destination
// gets a RST (refused UDP an ICMP port unreachable), never "connected, then reset". The stack
// also owns the gateway addresses, where the guest's DNS resolver answers.
package netstack

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
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
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
)

// DNS answers one DNS message from the guest (the resolver package).
type DNS interface {
	Answer(ctx context.Context, src netip.AddrPort, query []byte, proto policy.Protocol) ([]byte, error)
}

// Options configure the stack. Zero fields take DefaultOptions' values.
type Options struct {
	// TunName is the tun device agentd creates (IFF_TUN|IFF_NO_PI).
	TunName string
	// MTU of the tun and the stack: 65520 lets the guest send 64 KiB segments, which is what
	// made the tun path fast in measurement (MTU 1500 was about 10x slower per byte).
	MTU uint32
	// Queues opens the tun multi-queue with this many fds, each with its own dispatcher
	// (measured: 2 queues help several parallel flows a little, one flow not at all).
	Queues int
	// Egress decides and records flows (nil: allow everything, record nothing).
	Egress *egress.Service
	// DNS answers queries sent to a gateway address on port 53 (nil: refused).
	DNS DNS
	// Gateways are the addresses the stack owns (the guest's resolver); they are never dialed.
	Gateways []netip.Addr
	// Dial opens upstream connections (default: kernel sockets in agentd's namespace).
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// MaxInFlight bounds TCP handshakes being decided and dialed at once; more SYNs are
	// dropped (the guest retransmits) and counted.
	MaxInFlight int
	// MaxFlows bounds open TCP and UDP flows in all; MaxFlowsPerDest bounds them per
	// destination address and port. Flows beyond either are refused and counted.
	MaxFlows, MaxFlowsPerDest int
	// MaxBuffers bounds the relay buffers (BufferSize each) in use by all TCP flows at once;
	// a flow with data waits for one. It caps the relays' memory whatever the guest does.
	MaxBuffers int
	// ConnectTimeout bounds one upstream dial.
	ConnectTimeout time.Duration
	// UDPIdleTimeout ends a UDP association with no traffic either way for this long.
	UDPIdleTimeout time.Duration
	// SNIWait bounds how long a TLS flow's ClientHello may take to arrive in full before
	// it is judged without its SNI.
	SNIWait time.Duration
	// ReceiveWindow is the forwarder's initial receive window (0: gVisor's default).
	ReceiveWindow int
	Log           *slog.Logger
}

// DefaultOptions are the settings measured best on a tun (see docs/egress.md).
var DefaultOptions = Options{
	TunName: "agentd0", MTU: 65520, Queues: 1, MaxInFlight: 1024,
	MaxFlows: 16384, MaxFlowsPerDest: 8192, MaxBuffers: 256, // 64 MiB of relay buffers
	ConnectTimeout: 30 * time.Second, UDPIdleTimeout: 60 * time.Second, SNIWait: 5 * time.Second,
}

// Counters are the stack's data-path statistics, one per outcome and drop reason. What the
// policy decided (allowed, denied, SNI refusals, revocations) is counted once, by the egress
// service.
type Counters struct {
	DialFailed, Active, UDPActive atomic.Int64
	// Refused for capacity: all flows, per destination, handshake failures.
	FlowCapDrop, DestCapDrop, HandshakeFailed atomic.Int64
	DNSQueries, GatewayRefused                atomic.Int64
}

// Stack is a running netstack.
type Stack struct {
	opts     Options
	s        *stack.Stack
	fds      []int
	log      *slog.Logger
	eg       *egress.Service
	Counters Counters
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc

	bufTokens chan struct{} // one per relay buffer in use (MaxBuffers)

	mu    sync.Mutex
	flows int
	dests map[netip.AddrPort]int
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
	if o.Queues <= 0 {
		o.Queues = d.Queues
	}
	setDefault(&o.MaxInFlight, d.MaxInFlight)
	setDefault(&o.MaxFlows, d.MaxFlows)
	setDefault(&o.MaxFlowsPerDest, d.MaxFlowsPerDest)
	setDefault(&o.MaxBuffers, d.MaxBuffers)
	setDefault(&o.ConnectTimeout, d.ConnectTimeout)
	setDefault(&o.UDPIdleTimeout, d.UDPIdleTimeout)
	setDefault(&o.SNIWait, d.SNIWait)
	if o.Dial == nil {
		o.Dial = (&net.Dialer{}).DialContext
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Egress == nil {
		o.Egress = egress.New(&policy.Policy{DefaultEgress: policy.Allow, DefaultIngress: policy.Allow}, egress.Options{HostAddrs: o.Gateways})
	}
	fds, err := openTun(o.TunName, o.Queues)
	if err != nil {
		return nil, err
	}
	closeFDs := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	ep, err := fdbased.New(&fdbased.Options{
		FDs: fds,
		MTU: o.MTU,
		// The guest kernel computes full checksums on a tun without offloads, so checking
		// them again is wasted work; with it off, GRO's coalesced packets were dropped.
		RXChecksumOffload: true,
	})
	if err != nil {
		closeFDs()
		return nil, fmt.Errorf("netstack: link endpoint: %w", err)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	ctx, cancel := context.WithCancel(context.Background())
	st := &Stack{opts: o, s: s, fds: fds, log: o.Log, eg: o.Egress, ctx: ctx, cancel: cancel, dests: map[netip.AddrPort]int{},
		bufTokens: make(chan struct{}, o.MaxBuffers)}
	if err := st.configure(ep); err != nil {
		s.Close()
		closeFDs()
		cancel()
		return nil, err
	}
	return st, nil
}

// openTun opens the device with IFF_NO_PI (and IFF_MULTI_QUEUE for more than one queue).
func openTun(name string, queues int) ([]int, error) {
	if queues == 1 {
		fd, err := tun.Open(name)
		if err != nil {
			return nil, fmt.Errorf("netstack: open tun %s: %w", name, err)
		}
		return []int{fd}, nil
	}
	var fds []int
	for i := 0; i < queues; i++ {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			var ifr *unix.Ifreq
			if ifr, err = unix.NewIfreq(name); err == nil {
				ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE)
				err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
			}
			if err == nil {
				err = unix.SetNonblock(fd, true)
			}
			if err != nil {
				unix.Close(fd)
			}
		}
		if err != nil {
			for _, f := range fds {
				unix.Close(f)
			}
			return nil, fmt.Errorf("netstack: open tun %s queue %d: %w", name, i, err)
		}
		fds = append(fds, fd)
	}
	return fds, nil
}

func (st *Stack) configure(ep stack.LinkEndpoint) error {
	s := st.s
	// Protocol options and the forwarders go in before the NIC exists: creating it starts
	// packet delivery, and the transport handlers are not safe to install under traffic.
	sack := tcpip.TCPSACKEnabled(true) // recovers from loss without resending whole windows
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	moderate := tcpip.TCPModerateReceiveBufferOption(true) // grow receive buffers with the flow
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &moderate)
	// Buffer ranges measured best on a tun (1 MiB default, up to 16 MiB for fast flows); an
	// idle connection holds none of it, only what is queued.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 16 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 16 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	fwd := tcp.NewForwarder(s, st.opts.ReceiveWindow, st.opts.MaxInFlight, st.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	ufwd := udp.NewForwarder(s, st.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, ufwd.HandlePacket)
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
	for _, a := range st.opts.Gateways {
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if err := s.AddProtocolAddress(1, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("netstack: gateway address %s: %s", a, err)
		}
	}
	return nil
}

// Close stops the stack and waits for its flows to end.
func (st *Stack) Close() {
	st.cancel()
	st.s.Close() // aborts every endpoint: the relays end
	st.wg.Wait()
	st.s.Wait() // removes the NIC, which stops the tun dispatchers and releases their eventfds
	for _, fd := range st.fds {
		unix.Close(fd)
	}
}

// Endpoints returns the stack's registered transport endpoints (for leak checks).
func (st *Stack) Endpoints() int { return len(st.s.RegisteredEndpoints()) }

// Stats returns gVisor's own counters (drops inside the stack, e.g. ForwardMaxInFlightDrop).
func (st *Stack) Stats() tcpip.Stats { return st.s.Stats() }

func (st *Stack) isGateway(a netip.Addr) bool {
	for _, g := range st.opts.Gateways {
		if g == a {
			return true
		}
	}
	return false
}

// reserve takes a slot for a flow to dst, or counts which cap refused it.
func (st *Stack) reserve(dst netip.AddrPort) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.flows >= st.opts.MaxFlows {
		st.Counters.FlowCapDrop.Add(1)
		return false
	}
	if st.dests[dst] >= st.opts.MaxFlowsPerDest {
		st.Counters.DestCapDrop.Add(1)
		return false
	}
	st.flows++
	st.dests[dst]++
	return true
}

// runFlow runs an admitted flow's relay in its own goroutine, counted in active, and releases
// its slot and closes its egress record when the relay ends.
func (st *Stack) runFlow(active *atomic.Int64, dst netip.AddrPort, flow *egress.Flow, relay func()) {
	active.Add(1)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		defer active.Add(-1)
		defer st.release(dst)
		defer flow.Close()
		relay()
	}()
}

func (st *Stack) release(dst netip.AddrPort) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.flows--
	if st.dests[dst]--; st.dests[dst] == 0 {
		delete(st.dests, dst)
	}
}

func addrOf(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

func endpoints(id stack.TransportEndpointID) (src, dst netip.AddrPort) {
	return netip.AddrPortFrom(addrOf(id.RemoteAddress), id.RemotePort), netip.AddrPortFrom(addrOf(id.LocalAddress), id.LocalPort)
}

func setDefault[T int | time.Duration](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// DialContext connects to address through the stack itself: the connection leaves through the
// tun into the guest, from the gateway address, as a peer outside the guest would reach a
// guest service. It is the "netstack" dialer for core.tcp destinations (relay.Dialer); address
// is an IP literal and port.
func (st *Stack) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("netstack dial %s: unsupported network %q", address, network)
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("netstack dial %s: %w", address, err)
	}
	dst := ap.Addr().Unmap()
	var local netip.Addr
	for _, g := range st.opts.Gateways {
		if g.Is4() == dst.Is4() {
			local = g
			break
		}
	}
	if !local.IsValid() {
		return nil, fmt.Errorf("netstack dial %s: no gateway address of that family", address)
	}
	proto := ipv4.ProtocolNumber
	if dst.Is6() {
		proto = ipv6.ProtocolNumber
	}
	c, err := gonet.DialTCPWithBind(ctx, st.s,
		tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(local.AsSlice())},
		tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(dst.AsSlice()), Port: ap.Port()}, proto)
	if err != nil {
		return nil, fmt.Errorf("netstack dial %s: %w", address, err)
	}
	return c, nil
}
