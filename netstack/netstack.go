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
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/netstack/tunlink"
)

// DNS answers one DNS message from the guest (the resolver package).
type DNS interface {
	Answer(ctx context.Context, src netip.AddrPort, query []byte, proto policy.Protocol) ([]byte, error)
}

// Options configure the stack. Zero fields take DefaultOptions' values.
type Options struct {
	// TunName is the tun device agentd creates (IFF_TUN|IFF_NO_PI).
	TunName string
	// Link chooses the tun's link endpoint (tunlink.Auto: with virtio-net header offloads when
	// the kernel has them, else the plain one; the choice is logged).
	Link tunlink.Mode
	// MTU of the tun and the stack. With the offload endpoint the guest's TSO and the stack's
	// GSO move 64 KiB per packet whatever the MTU; on the plain endpoint the MTU is the packet
	// size, and 65520 is what made it fast in measurement (1500 was about 10x slower per byte).
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
	// MaxBuffers bounds the relay's staging buffers (BufferSize each) in use by all TCP flows
	// at once; a flow with small pieces of data in hand waits for one (the offload endpoint's
	// large segments go from gVisor's buffers to the socket without one).
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
	// ReceiveBufferMax bounds what gVisor holds per connection of the guest's data not yet
	// relayed, SendBufferMax what it holds toward the guest (sent, not yet acknowledged): both
	// start at 1 MiB and are tuned up to these as a flow goes. With MaxBuffers, they bound the
	// memory busy flows hold: per busy connection at most ReceiveBufferMax + SendBufferMax.
	ReceiveBufferMax, SendBufferMax int
	// ReleaseAfter: once the stack has been quiet this long after a burst that left more than
	// releaseSlack of freed memory with the Go runtime, that memory goes back to the OS (two
	// collections, so that pooled packet chunks go too, and a scavenge). Negative: never.
	ReleaseAfter time.Duration
	Log          *slog.Logger
}

// DefaultOptions are the settings measured best on a tun (make bench-egress; docs/egress.md).
var DefaultOptions = Options{
	TunName: "agentd0", MTU: 65520, Queues: 1, MaxInFlight: 1024,
	MaxFlows: 16384, MaxFlowsPerDest: 8192, MaxBuffers: 256, // 16 MiB of staging buffers
	ConnectTimeout: 30 * time.Second, UDPIdleTimeout: 60 * time.Second, SNIWait: 5 * time.Second,
	ReceiveBufferMax: 4 << 20, SendBufferMax: 4 << 20, ReleaseAfter: time.Second,
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
	link     *tunlink.Link
	log      *slog.Logger
	eg       *egress.Service
	Counters Counters
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc

	bufTokens chan struct{}  // one per relay buffer in use (MaxBuffers)
	reactor   *reactor       // wakes parked TCP flows on upstream readiness
	pool      *pool          // goroutines for SYNs and flow directions
	bg        sync.WaitGroup // releaseMemory
	closeOnce sync.Once

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
	setDefault(&o.ReceiveBufferMax, d.ReceiveBufferMax)
	setDefault(&o.SendBufferMax, d.SendBufferMax)
	if o.ReleaseAfter == 0 {
		o.ReleaseAfter = d.ReleaseAfter
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{}).DialContext
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Egress == nil {
		o.Egress = egress.New(&policy.Policy{DefaultEgress: policy.Allow, DefaultIngress: policy.Allow}, egress.Options{HostAddrs: o.Gateways})
	}
	link, err := tunlink.Open(tunlink.Options{Name: o.TunName, MTU: o.MTU, Queues: o.Queues, Mode: o.Link})
	if err != nil {
		return nil, fmt.Errorf("netstack: %w", err)
	}
	o.Log.Info("netstack tun link", "tun", o.TunName, "endpoint", link.String(), "mtu", o.MTU, "queues", o.Queues)
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	re, err := newReactor()
	if err != nil {
		link.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	st := &Stack{reactor: re, pool: newPool(), opts: o, s: s, link: link, log: o.Log, eg: o.Egress, ctx: ctx, cancel: cancel, dests: map[netip.AddrPort]int{},
		bufTokens: make(chan struct{}, o.MaxBuffers)}
	if err := st.configure(link.Endpoint); err != nil {
		s.Close()
		s.Wait()
		link.Close()
		re.close()
		cancel()
		return nil, err
	}
	if o.ReleaseAfter > 0 {
		st.bg.Add(1)
		go st.releaseMemory()
	}
	return st, nil
}

func (st *Stack) configure(ep stack.LinkEndpoint) error {
	s := st.s
	// Protocol options and the forwarders go in before the NIC exists: creating it starts
	// packet delivery, and the transport handlers are not safe to install under traffic.
	sack := tcpip.TCPSACKEnabled(true) // recovers from loss without resending whole windows
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	// RACK off: on the tun, round trips take microseconds, and its probe timer (twice the
	// smoothed RTT) fires whenever an ACK waits for a goroutine to run, so it resent data the
	// guest had (spurious recoveries in gVisor's counters); classic SACK recovery has no such
	// timer. The tun never reorders. Measured: 4 streams toward the guest 12.3 against 8.9
	// Gbit/s, 0.69 against 1.18 CPU-s/GB; upload unchanged. (Tailscale turned it off for the
	// same reason, issue 9707.)
	recovery := tcpip.TCPRecovery(0)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &recovery)
	moderate := tcpip.TCPModerateReceiveBufferOption(true) // grow receive buffers with the flow
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &moderate)
	// Buffer sizes (Options): an idle connection holds none of it, only what is queued.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: min(1<<20, st.opts.ReceiveBufferMax), Max: st.opts.ReceiveBufferMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: min(1<<20, st.opts.SendBufferMax), Max: st.opts.SendBufferMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	fwd := tcp.NewForwarder(s, st.opts.ReceiveWindow, st.opts.MaxInFlight, func(r *tcp.ForwarderRequest) {
		st.pool.run(func() { st.handleTCP(r) }) // on a goroutine with a grown stack (pool)
	})
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
	st.closeOnce.Do(st.close)
}

func (st *Stack) close() {
	st.cancel()
	st.bg.Wait()
	st.s.Close() // aborts every endpoint: the relays end
	st.wg.Wait()
	st.s.Wait() // removes the NIC, which stops the tun readers
	st.link.Close()
	st.reactor.close()
	st.pool.close()
}

// releaseSlack is how much memory a burst may leave with the Go heap (garbage not yet
// collected, free spans not yet returned, pooled chunks) before releaseMemory gives it back.
const releaseSlack = 4 << 20

// releaseMemory gives memory back to the OS after bursts (Options.ReleaseAfter). The runtime
// keeps what a burst freed (gVisor's pooled packet chunks, relay buffers, garbage) and would
// return it only slowly; an agent in a small VM should shrink back within seconds.
func (st *Stack) releaseMemory() {
	defer st.bg.Done()
	tick := time.NewTicker(st.opts.ReleaseAfter)
	defer tick.Stop()
	activity := func() uint64 {
		ip := st.s.Stats().IP
		return ip.PacketsReceived.Value() + ip.PacketsSent.Value()
	}
	// Checked once per burst, when it is over: a heap grown past its floor (the least it held
	// after a release or while quiet) or holding much beyond its live objects. Pooled chunks
	// count as live until two collections clear them, hence the first test.
	last, burst := activity(), false
	floor, _ := heapMemory()
	for {
		select {
		case <-st.ctx.Done():
			return
		case <-tick.C:
		}
		if a := activity(); a != last { // busy: wait for a quiet interval
			last, burst = a, true
			continue
		}
		held, live := heapMemory()
		floor = min(floor, held)
		if !burst {
			continue
		}
		burst = false
		if held > floor+releaseSlack || held > live+releaseSlack {
			runtime.GC() // pools keep their contents one collection longer
			debug.FreeOSMemory()
			floor, _ = heapMemory()
			st.log.Debug("netstack memory released", "heap_mib", held>>20, "live_mib", live>>20, "after_mib", floor>>20)
		}
	}
}

// heapMemory is the Go heap's memory held from the OS (spans mapped and not released) and its
// live objects at the last collection.
func heapMemory() (held, live uint64) {
	m := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"}, {Name: "/gc/heap/live:bytes"}}
	metrics.Read(m)
	return m[0].Value.Uint64() + m[1].Value.Uint64() + m[2].Value.Uint64(), m[3].Value.Uint64()
}

// Link describes the tun's link endpoint ("offload csum tso4 tso6 ..." or "plain ...").
func (st *Stack) Link() *tunlink.Link { return st.link }

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

// runFlow runs an admitted flow's relay in its own goroutine (flowStarted, then flowEnded
// when relay returns).
func (st *Stack) runFlow(active *atomic.Int64, dst netip.AddrPort, flow *egress.Flow, relay func()) {
	st.flowStarted(active)
	go func() {
		defer st.flowEnded(active, dst, flow)
		relay()
	}()
}

// flowStarted counts an admitted flow in active (and for Close).
func (st *Stack) flowStarted(active *atomic.Int64) {
	active.Add(1)
	st.wg.Add(1)
}

// flowEnded releases a flow's slot and closes its egress record.
func (st *Stack) flowEnded(active *atomic.Int64, dst netip.AddrPort, flow *egress.Flow) {
	flow.Close()
	st.release(dst)
	active.Add(-1)
	st.wg.Done()
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
