package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/gateway"
	"github.com/agentd/agentd/netstack"
	"github.com/agentd/agentd/netstack/tunlink"
)

// egressOptions are the --egress-* flags.
type egressOptions struct {
	mode       string // off, netstack or channel
	policyFile string
	floorFile  string
	auditPath  string
	guestNetns string // standalone: the namespace the tun goes into (default: agentd's own)
	uplink     string // interfaces moved into agentd's private uplink namespace
	dns        string // upstream resolvers
	tunName    string
	link       string // tun link endpoint: auto, offload or plain
	mtu        uint
	queues     int
	advisory   bool // workloads keep full privileges: the policy is only advisory
	// initial is the policy main read to check it before any side effect (nil: not read yet).
	initial *policy.Policy
	// ref names a flag and its value as given (flagRef); nil: as a flag.
	ref func(name string, value any) string
}

func (e *egressOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&e.mode, "egress", "off", "guest egress: off; netstack (the tun becomes the guest's default route, every flow passes the policy, agentd dials out); or channel (the same, but each allowed flow is a stream over the agent channel that the host dials: for a guest with no network device)")
	fs.StringVar(&e.policyFile, "egress-policy", "", "egress policy `FILE` (microsandbox's format, JSON or YAML), read once at start; after that only the host changes the policy (agentctl policy reload). Without one, netstack egress allows everything but the floor")
	fs.BoolVar(&e.advisory, "egress-advisory", false, "let workloads keep full privileges while egress is on (they are confined otherwise: docs/security.md); the policy is then only advisory, since a root workload with every capability can get around it. agentd warns at start and reports egress-advisory in core.ready")
	fs.StringVar(&e.floorFile, "egress-floor", "", "policy `FILE` whose rules come before the policy's and cannot be widened by it (default: deny the metadata address)")
	fs.StringVar(&e.auditPath, "egress-audit", "", "append one JSON line per egress decision and per closed flow to `FILE` (- for stderr; virtio:NAME for the virtio-serial port NAME, which agentd then holds so that no workload can open it)")
	fs.StringVar(&e.guestNetns, "egress-guest-netns", "", "move the tun into the network namespace at `PATH` (/var/run/netns/NAME) and route that namespace through it")
	fs.StringVar(&e.uplink, "egress-uplink", "", "comma-separated `INTERFACES` moved into a namespace only agentd uses, so workloads have no path around the tun")
	fs.StringVar(&e.dns, "egress-dns", "", "comma-separated upstream resolvers `ADDR[:PORT]` (default: the nameservers of /etc/resolv.conf at start)")
	fs.StringVar(&e.tunName, "egress-tun", netstack.DefaultOptions.TunName, "tun device `NAME`")
	fs.UintVar(&e.mtu, "egress-mtu", uint(netstack.DefaultOptions.MTU), "tun MTU")
	fs.StringVar(&e.link, "egress-link", string(tunlink.Auto), "tun link endpoint: auto (virtio-net header offloads when the kernel has them, else plain; logged at start), offload, or plain")
	fs.IntVar(&e.queues, "egress-queues", netstack.DefaultOptions.Queues, "tun queues (IFF_MULTI_QUEUE when more than 1)")
}

// name is ref, or the flag's own name when there is none.
func (e *egressOptions) name(flag string, value any) string {
	if e.ref == nil {
		return flagRef(flag, value, nil)
	}
	return e.ref(flag, value)
}

func (e *egressOptions) check() error {
	ref := e.name
	switch e.mode {
	case "off", "netstack", "channel":
	default:
		return fmt.Errorf("%s: want off, netstack or channel", ref("egress", strconv.Quote(e.mode)))
	}
	if e.mtu < 1280 || e.mtu > 65520 {
		return fmt.Errorf("%s: must be between 1280 and 65520", ref("egress-mtu", e.mtu))
	}
	if _, err := tunlink.ParseMode(e.link); err != nil {
		return fmt.Errorf("%s: %w", ref("egress-link", e.link), err)
	}
	if e.queues < 1 || e.queues > 16 {
		return fmt.Errorf("%s: must be between 1 and 16", ref("egress-queues", e.queues))
	}
	if _, err := e.upstreams(); err != nil {
		return fmt.Errorf("%s: %w", ref("egress-dns", strconv.Quote(e.dns)), err)
	}
	return nil
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
				return nil, fmt.Errorf("%q is not an address or address:port", s)
			}
			ap = netip.AddrPortFrom(a, 53)
		}
		out = append(out, ap)
	}
	return out, nil
}

// loadPolicy is the policy in force: the floor, then the file's rules (policy.Load).
func (e *egressOptions) loadPolicy() (*policy.Policy, error) {
	p, err := policy.Load(e.policyFile, e.floorFile)
	if err != nil {
		return nil, fmt.Errorf("egress policy (%s): %w", e.name("egress-policy", e.policyFile), err)
	}
	return p, nil
}

// confined says whether workloads run confined (confine.Confined): with egress on unless the
// operator made the policy advisory, and always under MSB_SECURITY_PROFILE=restricted.
func (e *egressOptions) confined(restricted bool) bool {
	return restricted || e.mode != "off" && !e.advisory
}

// privatePaths are agentd's own files, masked in the workloads' view.
func (e *egressOptions) privatePaths() []string {
	var out []string
	for _, p := range []string{e.policyFile, e.floorFile, e.auditPath} {
		if p != "" && p != "-" && !strings.HasPrefix(p, "virtio:") {
			out = append(out, p)
		}
	}
	return out
}

// floor is the rules every policy is put behind: --egress-floor's, or the default.
func (e *egressOptions) floor() ([]policy.Rule, error) {
	if e.floorFile == "" {
		return policy.DefaultFloor, nil
	}
	f, _, err := policy.ReadFile(e.floorFile)
	if err != nil {
		return nil, fmt.Errorf("egress floor: %w", err)
	}
	return f.Rules, nil
}

// privateDir holds agentd's runtime files as the guest's init (the pinned uplink namespace);
// it is masked in the workloads' view.
const privateDir = "/run/agentd"

// startEgress starts the egress path the flags describe (nil when there is nothing to run: no
// netstack and no policy file). uplink, when set, is an interface to isolate besides
// --egress-uplink's (as PID 1: the MSB_NET interface, configured already); pin, when set, is
// where the uplink namespace is pinned so it outlives agentd.
func startEgress(e egressOptions, uplink, pin string, log *slog.Logger) (*gateway.Gateway, error) {
	if e.mode == "off" && e.policyFile == "" {
		return nil, nil
	}
	if e.advisory && e.mode != "off" {
		log.Warn("egress is advisory (--egress-advisory): workloads keep full privileges and can get around the policy")
	}
	pol := e.initial
	if pol == nil {
		var err error
		if pol, err = e.loadPolicy(); err != nil {
			return nil, err
		}
	}
	floor, err := e.floor()
	if err != nil {
		return nil, err
	}
	c := gateway.Config{Mode: gateway.Mode(e.mode), Policy: pol, Floor: floor, GuestNetns: e.guestNetns, TunName: e.tunName,
		MTU: uint32(e.mtu), Queues: e.queues, Guest: egress.DefaultGuestNet, Log: log}
	c.Link, _ = tunlink.ParseMode(e.link)
	c.Upstreams, _ = e.upstreams()
	for _, name := range strings.Split(e.uplink, ",") {
		if name = strings.TrimSpace(name); name != "" {
			c.Uplink = append(c.Uplink, name)
		}
	}
	if e.mode == "netstack" && len(c.Uplink) == 0 && uplink != "" {
		c.Uplink = []string{uplink}
	}
	c.PinUplink = pin
	switch audit := e.auditPath; {
	case audit == "":
	case audit == "-":
		c.Audit = os.Stderr
	case strings.HasPrefix(audit, "virtio:"):
		f, err := openAuditPort(strings.TrimPrefix(audit, "virtio:"), 10*time.Second)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.name("egress-audit", audit), err)
		}
		c.Audit = f
	default:
		f, err := os.OpenFile(audit, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.name("egress-audit", audit), err)
		}
		c.Audit = f
	}
	return gateway.Start(c)
}

// openAuditPort opens the virtio-serial port named name for the audit records, waiting for it
// to appear (its node comes shortly after virtio_console binds). The host keeps what it gets;
// a virtio port has one opener at a time, so while agentd holds it no workload (root in the
// guest or not) can write forged records into it or read it.
func openAuditPort(name string, wait time.Duration) (*os.File, error) {
	deadline := time.Now().Add(wait)
	for {
		dev, err := channel.DiscoverNamed(channel.VirtioPortsDir, name)
		if err == nil {
			return os.OpenFile(dev, os.O_WRONLY|unix.O_NOCTTY, 0)
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(10 * time.Millisecond) // the kernel gives no event for a port appearing
	}
}
