// Package gateway assembles agentd's egress path and runs it: the policy point (egress) with
// its audit log, the guest's resolver, the netstack on the guest's tun, and the way out (an
// uplink moved into a namespace only agentd uses, or in channel mode the host, over the agent
// channel). Its TCPDialer and Resolver serve core.tcp too, so agentd's own connections pass
// the same policy point, once. cmd/agentd turns flags into a Config; everything here is
// mechanism.
package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"

	"github.com/agentd/agentd/confine"
	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
	"github.com/agentd/agentd/hostdial"
	"github.com/agentd/agentd/internal/resolvconf"
	"github.com/agentd/agentd/namespace"
	"github.com/agentd/agentd/netstack"
	"github.com/agentd/agentd/netstack/tunlink"
	"github.com/agentd/agentd/protocol"
)

// Mode is how the guest's flows leave.
type Mode string

const (
	// Off: no netstack; a policy, if any, filters only core.tcp destinations.
	Off Mode = "off"
	// Netstack: the tun is the guest's only route; allowed flows are dialed by agentd through
	// its private uplink.
	Netstack Mode = "netstack"
	// Channel: as Netstack, but each allowed flow is a stream over the agent channel that the
	// host dials (for a guest with no network device).
	Channel Mode = "channel"
)

// Config is one egress path.
type Config struct {
	Mode   Mode
	Policy *policy.Policy // with its floor (policy.Load)
	// Floor is the rules every policy the host sets later is put behind (policy.DefaultFloor
	// unless the operator gave another).
	Floor []policy.Rule
	// Audit receives one JSON line per decision and per closed flow (nil: none).
	Audit io.Writer
	// GuestNetns is the network namespace the tun moves into ("": agentd's own, the guest
	// when agentd is its init).
	GuestNetns string
	// Uplink names the interfaces moved into agentd's private namespace (netstack mode).
	Uplink []string
	// PinUplink, when set, is a file the uplink namespace is pinned on, so that it outlives
	// agentd: as the guest's init, the uplink then never comes back into the guest's view.
	PinUplink string
	// Upstreams are the resolvers the guest's DNS goes to (empty: resolv.conf's, read at
	// start); unused in channel mode, where the host resolves.
	Upstreams []netip.AddrPort
	TunName   string
	Link      tunlink.Mode // the tun's link endpoint (netstack.Options.Link)
	MTU       uint32
	Queues    int
	Guest     egress.GuestNet
	Log       *slog.Logger
}

// Gateway is a running egress path.
type Gateway struct {
	cfg     Config
	Service *egress.Service
	// Audit records every decision: to Config.Audit's file, if any, and to the host once the
	// agent attaches it (Audit.Host).
	Audit    *egress.Audit
	Resolver *resolver.Resolver // the guest's resolver, core.tcp's too; nil in Off mode
	Stack    *netstack.Stack    // nil in Off mode
	Streams  *hostdial.Endpoint // channel mode: handed to the agent loop
	uplink   *namespace.NS
	upstream func(ctx context.Context, network, address string) (net.Conn, error)
	log      *slog.Logger

	policyMu   sync.Mutex // one policy change at a time
	generation atomic.Uint64
}

// ErrUplinkNeeded is Start's answer to a netstack path with nowhere to go: agentd's own
// upstream sockets would route back into the tun.
var ErrUplinkNeeded = errors.New("--egress netstack needs --egress-uplink (as PID 1: MSB_NET) or --egress-guest-netns: " +
	"otherwise agentd's own upstream sockets would route back into the tun")

// Start builds the path. On error nothing it made is left running.
func Start(c Config) (g *Gateway, err error) {
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.Mode == "" {
		c.Mode = Off
	}
	if c.Mode == Netstack && c.GuestNetns == "" && len(c.Uplink) == 0 {
		return nil, ErrUplinkNeeded
	}
	g = &Gateway{cfg: c, log: c.Log}
	defer func() {
		if err != nil {
			g.Stop()
			g = nil
		}
	}()
	if c.Floor == nil {
		c.Floor = policy.DefaultFloor
	}
	g.cfg.Floor = c.Floor
	g.Audit = egress.NewAudit(c.Audit, c.Log)
	g.Service = egress.New(c.Policy, egress.Options{HostAddrs: c.Guest.Gateways(), Audit: g.Audit})
	g.generation.Store(1)
	if c.Mode == Off {
		return g, nil
	}
	var up resolver.Upstream
	upNames := "the host's resolver"
	switch c.Mode {
	case Channel:
		// Every flow is a stream the host dials; DNS goes to the host's resolver.
		g.Streams = hostdial.New(hostdial.Options{})
		g.upstream = g.Streams.DialContext
		up = g.Streams
	case Netstack:
		g.upstream = (&net.Dialer{}).DialContext
		if len(c.Uplink) > 0 {
			if g.uplink, err = namespace.IsolateUplink(c.Uplink); err != nil {
				return g, fmt.Errorf("--egress-uplink: %w", err)
			}
			if c.PinUplink != "" {
				if err := g.uplink.Pin(c.PinUplink); err != nil {
					return g, err
				}
			}
			g.upstream = g.uplink.DialContext
		}
		ups := c.Upstreams
		if len(ups) == 0 {
			ups = resolvconf.Servers(resolvconf.Path) // before the guest's is rewritten
		}
		up = resolver.Servers{Addrs: ups, Dial: g.upstream}
		upNames = fmt.Sprint(ups)
	default:
		return g, fmt.Errorf("egress mode %q: want off, netstack or channel", c.Mode)
	}
	g.Resolver = resolver.New(g.Service, resolver.Options{Upstream: up})
	if g.Stack, err = netstack.New(netstack.Options{TunName: c.TunName, Link: c.Link, MTU: c.MTU, Queues: c.Queues, Egress: g.Service,
		DNS: g.Resolver, Gateways: c.Guest.Gateways(), Dial: g.upstream, Log: c.Log.With("component", "netstack")}); err != nil {
		return g, err
	}
	if err := g.attachGuest(); err != nil {
		return g, err
	}
	// gVisor opens the tun and its eventfds without O_CLOEXEC: a child agentd starts must not
	// inherit them.
	confine.CloseOnExec(3)
	c.Log.Info("egress netstack up", "mode", c.Mode, "tun", c.TunName, "mtu", c.MTU, "resolver", c.Guest.Gateway4,
		"upstream_dns", upNames, "uplink_isolated", g.uplink != nil, "rules", len(c.Policy.Rules))
	return g, nil
}

// attachGuest makes the tun the guest's route, in the guest's namespace.
func (g *Gateway) attachGuest() error {
	if g.cfg.GuestNetns == "" {
		return netstack.AttachGuest(&netlink.Handle{}, g.cfg.TunName, -1, g.cfg.MTU, g.cfg.Guest) // this namespace
	}
	ns, err := namespace.Open(g.cfg.GuestNetns)
	if err != nil {
		return fmt.Errorf("--egress-guest-netns: %w", err)
	}
	defer ns.Close()
	h, err := ns.Netlink()
	if err != nil {
		return fmt.Errorf("--egress-guest-netns: %w", err)
	}
	defer h.Close()
	return netstack.AttachGuest(h, g.cfg.TunName, ns.FD(), g.cfg.MTU, g.cfg.Guest)
}

// WriteResolvConf points the guest's resolv.conf at the netstack's resolver.
func (g *Gateway) WriteResolvConf(path string) error {
	if err := os.WriteFile(path, []byte(g.cfg.Guest.ResolvConf()), 0o644); err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	return nil
}

// TCPDialer is core.tcp's way out with this path: through the policy point (decided once,
// tracked, audited), to egress destinations by the same upstream as the guest's flows, and to
// the guest itself (a forward to a guest service) by local, decided as ingress.
func (g *Gateway) TCPDialer(local egress.DialFunc) *egress.Dialer {
	d := &egress.Dialer{Service: g.Service, Upstream: g.upstream, Local: local}
	if g.cfg.Mode == Off {
		d.Upstream = local // no uplink of agentd's own: its namespace is the way out
	} else {
		guest := g.cfg.Guest
		d.Guest = &guest
	}
	return d
}

// Reload swaps in a new policy; flows it no longer allows are revoked. It returns how many.
func (g *Gateway) Reload(p *policy.Policy) int {
	g.policyMu.Lock()
	defer g.policyMu.Unlock()
	n := g.Service.Reload(p)
	g.generation.Add(1)
	return n
}

// SetPolicy applies a policy document the host sent (agentd.policy.set): parsed, put behind
// the floor and swapped in. A bad document changes nothing; the state says why, with the
// field path, and what stays in force.
func (g *Gateway) SetPolicy(doc []byte) protocol.PolicyState {
	p, err := policy.Parse(doc)
	if err == nil {
		p, err = policy.WithFloor(g.cfg.Floor, p)
	}
	if err != nil {
		st := g.PolicyState(false)
		st.Error = err.Error()
		g.log.Warn("egress policy from the host refused; the previous one stays in force", "error", err)
		return st
	}
	n := g.Reload(p)
	st := g.PolicyState(false)
	g.log.Info("egress policy set by the host", "generation", st.Generation, "rules", st.Rules, "flows_revoked", n)
	return st
}

// PolicyState is the live policy's generation and rule count, and with doc its normalized
// JSON (agentd.policy.get).
func (g *Gateway) PolicyState(doc bool) protocol.PolicyState {
	g.policyMu.Lock()
	defer g.policyMu.Unlock()
	p := g.Service.Policy()
	st := protocol.PolicyState{Generation: g.generation.Load(), Rules: uint32(len(p.Rules))}
	if doc {
		st.Document, _ = json.Marshal(p)
	}
	return st
}

// Stop ends the path: flows, the stack, the uplink namespace, the audit log (after the totals).
func (g *Gateway) Stop() {
	if g.Stack != nil {
		g.Stack.Close()
	}
	if g.Service != nil {
		g.logTotals()
	}
	if g.uplink != nil {
		g.uplink.Close()
	}
	if g.Audit != nil {
		g.Audit.Close()
	}
}

// logTotals logs the decisions, the data path's and the resolver's counters, and the
// per-destination counters (at most 20, the most denied first).
func (g *Gateway) logTotals() {
	c := &g.Service.Counters
	attrs := []any{"allowed", c.Allowed(), "denied", c.Denied(), "revoked", c.Revoked.Load(),
		"sni_denied", c.SNIDenied.Load(), "dns_queries", c.Queries.Load(), "dns_denied", c.QueriesDenied.Load(),
		"udp_allowed", c.UDPAllowed.Load(), "udp_denied", c.UDPDenied.Load()}
	if n := g.Stack; n != nil {
		attrs = append(attrs, "dial_failed", n.Counters.DialFailed.Load(), "handshake_failed", n.Counters.HandshakeFailed.Load(),
			"flow_cap_drops", n.Counters.FlowCapDrop.Load(), "dest_cap_drops", n.Counters.DestCapDrop.Load(),
			"inflight_drops", n.Stats().TCP.ForwardMaxInFlightDrop.Value(), "gvisor_endpoints_left", n.Endpoints())
	}
	if g.Resolver != nil {
		r := g.Resolver.Counters()
		attrs = append(attrs, "dns_forwarded", r.Forwarded, "dns_rebinding", r.Rebinding, "dns_failed", r.Failed,
			"dns_malformed", r.Malformed, "dns_busy", r.Busy)
	}
	g.log.Info("egress totals", attrs...)
	type dest struct {
		a netip.Addr
		s egress.DestStats
	}
	var ds []dest
	for a, s := range g.Service.Destinations() {
		ds = append(ds, dest{a, s})
	}
	slices.SortFunc(ds, func(x, y dest) int { return int(y.s.Denied - x.s.Denied) })
	for _, d := range ds[:min(len(ds), 20)] {
		g.log.Info("egress destination", "addr", d.a, "allowed", d.s.Allowed, "denied", d.s.Denied, "bytes_up", d.s.BytesUp, "bytes_down", d.s.BytesDown)
	}
}
