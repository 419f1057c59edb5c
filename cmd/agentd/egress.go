package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
	"github.com/agentd/agentd/hostdial"
	"github.com/agentd/agentd/internal/resolvconf"
	"github.com/agentd/agentd/namespace"
	"github.com/agentd/agentd/netstack"
)

// egressOptions are the --egress-* flags.
type egressOptions struct {
	mode       string // off or netstack
	policyFile string
	floorFile  string
	auditPath  string
	guestNetns string // standalone: the namespace the tun goes into (default: agentd's own)
	uplink     string // interfaces moved into agentd's private uplink namespace
	dns        string // upstream resolvers
	tunName    string
	mtu        uint
	queues     int
	// initial is the policy main read to check it before any side effect (nil: not read yet).
	initial *policy.Policy
}

func (e *egressOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&e.mode, "egress", "off", "guest egress: off; netstack (the tun becomes the guest's default route, every flow passes the policy, agentd dials out); or channel (the same, but each allowed flow is a stream over the agent channel that the host dials: for a guest with no network device)")
	fs.StringVar(&e.policyFile, "egress-policy", "", "egress policy `FILE` (microsandbox's format, JSON or YAML); reloaded on SIGHUP. Without one, netstack egress allows everything but the floor")
	fs.StringVar(&e.floorFile, "egress-floor", "", "policy `FILE` whose rules come before the policy's and cannot be widened by it (default: deny the metadata address)")
	fs.StringVar(&e.auditPath, "egress-audit", "", "append one JSON line per egress decision and per closed flow to `FILE` (- for stderr)")
	fs.StringVar(&e.guestNetns, "egress-guest-netns", "", "move the tun into the network namespace at `PATH` (/var/run/netns/NAME) and route that namespace through it")
	fs.StringVar(&e.uplink, "egress-uplink", "", "comma-separated `INTERFACES` moved into a namespace only agentd uses, so workloads have no path around the tun")
	fs.StringVar(&e.dns, "egress-dns", "", "comma-separated upstream resolvers `ADDR[:PORT]` (default: the nameservers of /etc/resolv.conf at start)")
	fs.StringVar(&e.tunName, "egress-tun", netstack.DefaultOptions.TunName, "tun device `NAME`")
	fs.UintVar(&e.mtu, "egress-mtu", uint(netstack.DefaultOptions.MTU), "tun MTU")
	fs.IntVar(&e.queues, "egress-queues", netstack.DefaultOptions.Queues, "tun queues (IFF_MULTI_QUEUE when more than 1)")
}

func (e *egressOptions) check() error {
	switch e.mode {
	case "off", "netstack", "channel":
	default:
		return fmt.Errorf("--egress %q: want off, netstack or channel", e.mode)
	}
	if e.mtu < 1280 || e.mtu > 65520 {
		return fmt.Errorf("--egress-mtu %d: must be between 1280 and 65520", e.mtu)
	}
	if e.queues < 1 || e.queues > 16 {
		return fmt.Errorf("--egress-queues %d: must be between 1 and 16", e.queues)
	}
	_, err := e.upstreams()
	return err
}

// upstreams parses --egress-dns ("" means: read /etc/resolv.conf when egress starts).
func (e *egressOptions) upstreams() ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, s := range strings.Split(e.dns, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, fmt.Errorf("--egress-dns %q: not an address or address:port", s)
			}
			ap = netip.AddrPortFrom(a, 53)
		}
		out = append(out, ap)
	}
	return out, nil
}

// loadPolicyFile reads a policy file (JSON or YAML); errors name the file and the field.
func loadPolicyFile(flagName, path string) (*policy.Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	p, err := policy.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", flagName, path, err)
	}
	return p, nil
}

// loadEgressPolicy is the policy in force: the floor, then the file's rules (or, with no
// file, allow everything the floor does not deny).
func (e *egressOptions) loadPolicy() (*policy.Policy, error) {
	floor := policy.DefaultFloor
	if e.floorFile != "" {
		f, err := loadPolicyFile("--egress-floor", e.floorFile)
		if err != nil {
			return nil, err
		}
		floor = f.Rules
	}
	p := &policy.Policy{DefaultEgress: policy.Allow, DefaultIngress: policy.Allow}
	if e.policyFile != "" {
		var err error
		if p, err = loadPolicyFile("--egress-policy", e.policyFile); err != nil {
			return nil, err
		}
	}
	return policy.WithFloor(floor, p)
}

// egressRuntime is the running egress path.
type egressRuntime struct {
	svc   *egress.Service
	stack *netstack.Stack
	audit *egress.Audit
	res   *resolver.Resolver
	// streams carries flows to the host in channel mode (handed to the agent loop).
	streams *hostdial.Endpoint
	up      *namespace.NS
	stop    func()
}

// startEgress builds the egress service and, for --egress netstack, the uplink namespace,
// the resolver and the netstack on the guest's tun. It returns nil when there is nothing to
// run (no netstack and no policy file).
func startEgress(e egressOptions, log *slog.Logger) (*egressRuntime, error) {
	if e.mode == "off" && e.policyFile == "" {
		return nil, nil
	}
	pol, err := e.initial, error(nil)
	if pol == nil {
		if pol, err = e.loadPolicy(); err != nil {
			return nil, err
		}
	}
	rt := &egressRuntime{}
	switch e.auditPath {
	case "":
	case "-":
		rt.audit = egress.NewAudit(os.Stderr, log)
	default:
		f, err := os.OpenFile(e.auditPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("--egress-audit: %w", err)
		}
		rt.audit = egress.NewAudit(f, log)
	}
	gw := netstack.DefaultGuestNet
	rt.svc = egress.New(pol, egress.Options{HostAddrs: gw.Gateways(), Audit: rt.audit})
	rt.stop = func() { rt.audit.Close() }
	if e.mode == "off" {
		return rt, nil
	}
	if e.mode == "netstack" && e.guestNetns == "" && e.uplink == "" {
		rt.audit.Close()
		return nil, fmt.Errorf("--egress netstack needs --egress-uplink (as PID 1: MSB_NET) or --egress-guest-netns: " +
			"otherwise agentd's own upstream sockets would route back into the tun")
	}
	ups, _ := e.upstreams()
	if len(ups) == 0 {
		ups = resolvconf.Servers(resolvconf.Path) // read before the guest's is rewritten
	}
	dial := (&net.Dialer{}).DialContext
	resDial := dial
	if e.mode == "channel" {
		// Every flow is a stream the host dials; DNS goes to the host's resolver as datagrams.
		rt.streams = hostdial.New(hostdial.Options{})
		dial = rt.streams.DialContext
		ups = []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:53")} // stands for the host's resolver
		resDial = func(ctx context.Context, network, address string) (net.Conn, error) {
			if network != "udp" {
				return nil, fmt.Errorf("dns over %s is not carried over the channel", network)
			}
			return rt.streams.DialContext(ctx, "dns", address)
		}
	} else if e.uplink != "" {
		if rt.up, err = isolateUplink(strings.Split(e.uplink, ",")); err != nil {
			return nil, err
		}
		dial = rt.up.DialContext
		resDial = dial
	}
	rt.res = resolver.New(rt.svc, resolver.Options{Upstreams: ups, Dial: resDial})
	st, err := netstack.New(netstack.Options{TunName: e.tunName, MTU: uint32(e.mtu), Queues: e.queues, Egress: rt.svc,
		DNS: rt.res, Gateways: gw.Gateways(), Dial: dial, Log: log.With("component", "netstack")})
	if err != nil {
		return nil, err
	}
	rt.stack = st
	nsFD, h := -1, &netlink.Handle{}
	if e.guestNetns != "" {
		fd, err := syscall.Open(e.guestNetns, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			st.Close()
			return nil, fmt.Errorf("--egress-guest-netns: %w", err)
		}
		defer syscall.Close(fd)
		nsFD = fd
		if h, err = netlink.NewHandleAt(vnetns.NsHandle(fd), unix.NETLINK_ROUTE); err != nil {
			st.Close()
			return nil, fmt.Errorf("--egress-guest-netns: netlink: %w", err)
		}
		defer h.Close()
	}
	if err := netstack.AttachGuest(h, e.tunName, nsFD, uint32(e.mtu), gw); err != nil {
		st.Close()
		return nil, err
	}
	rt.stop = func() {
		st.Close()
		rt.logCounters(log)
		rt.audit.Close()
		if rt.up != nil {
			rt.up.Close()
		}
	}
	log.Info("egress netstack up", "tun", e.tunName, "mtu", e.mtu, "resolver", gw.Gateway4, "upstream_dns", fmt.Sprint(ups),
		"uplink_isolated", e.uplink != "", "rules", len(pol.Rules))
	return rt, nil
}

// logCounters logs the egress totals and the per-destination counters (at most 20, the most
// denied first) when agentd stops.
func (rt *egressRuntime) logCounters(log *slog.Logger) {
	c, n := &rt.svc.Counters, &rt.stack.Counters
	log.Info("egress totals", "allowed", c.Allowed.Load(), "denied", c.Denied.Load(), "revoked", c.Revoked.Load(),
		"sni_denied", c.SNIDenied.Load(), "dns_queries", c.Queries.Load(), "dns_denied", c.QueriesDenied.Load(),
		"dial_failed", n.DialFailed.Load(), "handshake_failed", n.HandshakeFailed.Load(), "flow_cap_drops", n.FlowCapDrop.Load(),
		"dest_cap_drops", n.DestCapDrop.Load(), "inflight_drops", rt.stack.Stats().TCP.ForwardMaxInFlightDrop.Value(),
		"udp_allowed", n.UDPAllowed.Load(), "udp_denied", n.UDPDenied.Load())
	type dest struct {
		a netip.Addr
		s egress.DestStats
	}
	var ds []dest
	for a, s := range rt.svc.Destinations() {
		ds = append(ds, dest{a, s})
	}
	slices.SortFunc(ds, func(x, y dest) int { return int(y.s.Denied - x.s.Denied) })
	for _, d := range ds[:min(len(ds), 20)] {
		log.Info("egress destination", "addr", d.a, "allowed", d.s.Allowed, "denied", d.s.Denied, "bytes_up", d.s.BytesUp, "bytes_down", d.s.BytesDown)
	}
}

// isolateUplink moves the named interfaces into a new network namespace that only agentd's
// upstream sockets use: workloads, left with the tun, cannot bind to them, route to them or
// send raw packets out of them. The interfaces keep their addresses and routes are added
// again there (a move drops them).
func isolateUplink(names []string) (*namespace.NS, error) {
	ns, err := namespace.New()
	if err != nil {
		return nil, fmt.Errorf("--egress-uplink: %w", err)
	}
	h, err := netlink.NewHandleAt(vnetns.NsHandle(ns.FD()), unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("--egress-uplink: netlink: %w", err)
	}
	defer h.Close()
	if lo, err := h.LinkByName("lo"); err == nil {
		h.LinkSetUp(lo)
	}
	for _, name := range names {
		name = strings.TrimSpace(name)
		l, err := netlink.LinkByName(name)
		if err != nil {
			ns.Close()
			return nil, fmt.Errorf("--egress-uplink %s: %w", name, err)
		}
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
		routes, _ := netlink.RouteList(l, netlink.FAMILY_ALL)
		if err := netlink.LinkSetNsFd(l, ns.FD()); err != nil {
			ns.Close()
			return nil, fmt.Errorf("--egress-uplink %s: move into the uplink namespace: %w", name, err)
		}
		nl, err := h.LinkByName(name)
		if err != nil {
			ns.Close()
			return nil, fmt.Errorf("--egress-uplink %s: %w", name, err)
		}
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() {
				continue
			}
			a := a
			a.Label = ""
			if err := h.AddrAdd(nl, &a); err != nil {
				ns.Close()
				return nil, fmt.Errorf("--egress-uplink %s: address %s: %w", name, a.IPNet, err)
			}
		}
		if err := h.LinkSetUp(nl); err != nil {
			ns.Close()
			return nil, fmt.Errorf("--egress-uplink %s: up: %w", name, err)
		}
		for _, r := range routes {
			if r.Protocol == netlink.RouteProtocol(2) { // kernel routes come back with the address
				continue
			}
			r := r
			r.LinkIndex = nl.Attrs().Index
			h.RouteReplace(&r)
		}
	}
	return ns, nil
}

// watchReload reloads the policy file on SIGHUP until ctx ends. A bad file keeps the policy in
// force and says why.
func (rt *egressRuntime) watchReload(ctx context.Context, e egressOptions, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				p, err := e.loadPolicy()
				if err != nil {
					log.Error("egress policy not reloaded; the previous one stays in force", "error", err)
					continue
				}
				n := rt.svc.Reload(p)
				log.Info("egress policy reloaded", "rules", len(p.Rules), "flows_revoked", n)
			}
		}
	}()
}
