package gateway_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/gateway"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/relay"
	"golang.org/x/sys/unix"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

const allowNamed = `{"default_egress": "deny", "rules": [
  {"id": "named", "destination": {"domain": "named.test"}, "protocols": ["tcp"], "action": "allow"},
  {"id": "suffix", "destination": {"domain_suffix": "rebind.test"}, "protocols": ["tcp"], "action": "allow"},
  {"id": "dns", "destination": {"group": "host"}, "protocols": ["udp"], "ports": [{"start": 53}], "action": "allow"}
]}`

func mustPolicy(t *testing.T, doc string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if p, err = policy.WithFloor(policy.DefaultFloor, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// records parses the audit lines written so far.
func records(t *testing.T, b *testutil.Buffer) []egress.Record {
	t.Helper()
	var out []egress.Record
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	for sc.Scan() {
		var r egress.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

// TestCoreTCPDecidedOnce drives core.tcp through a real agent on a real egress path (a guest
// namespace behind the netstack, test hosts on a veth, an upstream DNS server): a connect by
// name is resolved by the guest resolver, decided and audited exactly once (not a second time
// by the netstack), and revoked by a reload that no longer allows it; a name whose answer
// rebinds to a private address is refused before anything is dialed.
func TestCoreTCPDecidedOnce(t *testing.T) {
	tp := nettest.New(t)
	nettest.Hosts(t)
	dns := nettest.DNSServer(t, nettest.Good, map[string][]netip.Addr{
		"named.test.":  {nettest.Named},
		"rebind.test.": {netip.MustParseAddr("10.9.9.9")},
	})
	srv := testutil.ServeOn(t, nettest.Named.String(), testutil.Echo)
	audit := &testutil.Buffer{}
	g, err := gateway.Start(gateway.Config{Mode: gateway.Netstack, Policy: mustPolicy(t, allowNamed), Audit: audit,
		GuestNetns: "/var/run/netns/" + tp.Name, Upstreams: []netip.AddrPort{dns}, TunName: "agtun" + tp.ID,
		MTU: 65520, Queues: 1, Guest: egress.DefaultGuestNet, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			g.Stop() // flushes the audit log
		}
	}
	t.Cleanup(stop)

	agentEnd, hostEnd := testutil.SocketPair(t)
	a := agent.New(agent.Config{Port: agentEnd, Log: quiet,
		Relay: relay.Options{Dialer: g.TCPDialer((&net.Dialer{}).DialContext), Resolver: g.Resolver}})
	served := make(chan struct{})
	go func() {
		defer close(served)
		if a.Handshake() == nil {
			a.Serve(context.Background())
		}
	}()
	c, err := host.Direct(hostEnd, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); <-served })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	conn, err := c.DialTCP(ctx, "named.test", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatalf("allowed by name: %v", err)
	}
	conn.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("echo: %q %v", buf, err)
	}

	_, err = c.DialTCP(ctx, "rebind.test", uint16(srv.Addr.Port))
	var te *host.TCPError
	if !errors.As(err, &te) || !strings.Contains(te.Msg, "failed to lookup address information: Name or service not known") {
		t.Fatalf("a rebinding answer was not refused: %v", err)
	}

	// A reload that no longer allows the name cuts the open connection.
	n := g.Reload(mustPolicy(t, `{"default_egress": "deny", "rules": []}`))
	if n != 1 {
		t.Fatalf("reload revoked %d flows, want 1", n)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(buf); err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("a revoked connection still reads: %v", err)
	}
	conn.Close()
	stop()

	var decisions, revoked int
	for _, r := range records(t, audit) {
		switch {
		case r.Event == "decision":
			decisions++
			if r.Via != "core.tcp" || r.Name != "named.test" || r.Rule != "named" || r.Verdict != "allow" {
				t.Errorf("decision record %+v", r)
			}
		case r.Event == "revoked":
			revoked++
		case r.Event == "dns" && r.Name == "rebind.test.":
			if r.Verdict != "allow" {
				t.Errorf("rebind.test was refused by the policy, not by the rebinding check: %+v", r)
			}
		}
	}
	if decisions != 1 || revoked != 1 {
		t.Fatalf("%d decision records and %d revoked, want 1 and 1:\n%s", decisions, revoked, audit.String())
	}
	if got := g.Service.Counters.TCPAllowed.Load(); got != 1 {
		t.Fatalf("%d tcp decisions counted, want 1", got)
	}
}

// TestForwardIntoGuestIsIngress: a core.tcp connect to the guest itself (a forward to a
// guest service) is not egress: a deny-by-default egress policy lets it through when ingress
// is allowed, it is audited as ingress from the host's side, and an ingress deny refuses it.
func TestForwardIntoGuestIsIngress(t *testing.T) {
	tp := nettest.New(t)
	guestAddr := egress.DefaultGuestNet.Addr4.Addr()
	for _, tc := range []struct {
		name, policy string
		allowed      bool
	}{
		{"ingress allowed", `{"default_egress": "deny", "default_ingress": "allow", "rules": []}`, true},
		{"ingress denied", `{"default_egress": "allow", "default_ingress": "deny", "rules": []}`, false},
		{"ingress rule for the port", `{"default_egress": "deny", "default_ingress": "deny", "rules": [
			{"id": "fwd", "direction": "ingress", "destination": {"group": "host"}, "ports": [{"start": 18601}], "action": "allow"}]}`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			audit := &testutil.Buffer{}
			g, err := gateway.Start(gateway.Config{Mode: gateway.Netstack, Policy: mustPolicy(t, tc.policy), Audit: audit,
				GuestNetns: "/var/run/netns/" + tp.Name, Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")},
				TunName: "agtun" + tp.ID, MTU: 65520, Queues: 1, Guest: egress.DefaultGuestNet, Log: quiet})
			if err != nil {
				t.Fatal(err)
			}
			// The guest's service, on its own address, reached the way agentd as the guest's
			// init reaches it: a socket in the guest's namespace.
			l := listenIn(t, tp, netip.AddrPortFrom(guestAddr, 18601))
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Write([]byte("guest"))
					c.Close()
				}
			}()
			d := g.TCPDialer(tp.Guest.DialContext)
			conn, err := d.Dial(context.Background(), "", []netip.AddrPort{netip.AddrPortFrom(guestAddr, 18601)})
			if tc.allowed {
				if err != nil {
					t.Fatalf("forward into the guest: %v", err)
				}
				b, _ := io.ReadAll(conn)
				conn.Close()
				if string(b) != "guest" {
					t.Fatalf("read %q", b)
				}
			} else if err == nil || !strings.Contains(err.Error(), "denied by egress policy") {
				t.Fatalf("ingress deny: %v", err)
			}
			g.Stop()
			recs := records(t, audit)
			if len(recs) == 0 || recs[0].Event != "decision" || recs[0].Direction != "ingress" ||
				recs[0].Peer != egress.DefaultGuestNet.Gateway4.String() || (recs[0].Verdict == "allow") != tc.allowed {
				t.Fatalf("audit: %s", audit.String())
			}
		})
	}
}

// listenIn listens on ap inside the topology's guest namespace.
func listenIn(t *testing.T, tp *nettest.Topology, ap netip.AddrPort) net.Listener {
	t.Helper()
	fd, err := tp.Guest.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "guest listener")
	defer f.Close()
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// TestStartRefuses: a netstack path with no way out of its own, or an unknown mode, is refused
// before anything is created.
func TestStartRefuses(t *testing.T) {
	p := mustPolicy(t, `{"default_egress": "allow", "rules": []}`)
	if _, err := gateway.Start(gateway.Config{Mode: gateway.Netstack, Policy: p, Log: quiet}); !errors.Is(err, gateway.ErrUplinkNeeded) {
		t.Fatalf("netstack without uplink or guest namespace: %v", err)
	}
	if _, err := gateway.Start(gateway.Config{Mode: "tunnel", Policy: p, Log: quiet}); err == nil || !strings.Contains(err.Error(), `"tunnel"`) {
		t.Fatalf("unknown mode: %v", err)
	}
	g, err := gateway.Start(gateway.Config{Mode: gateway.Off, Policy: p, Log: quiet})
	if err != nil || g.Stack != nil || g.Resolver != nil {
		t.Fatalf("off: %v %+v", err, g)
	}
	g.Stop()
}
