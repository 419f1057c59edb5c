package netstack

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/netstack/tunlink"
)

// testPolicy: default deny (so only names a rule allows resolve); Good by CIDR (v4 and v6); Bad only on TCP
// port 18080; Named only by its name; a private answer for lan.test allowed by name.
const testPolicy = `{
  "default_egress": "deny",
  "rules": [
    {"id": "good", "destination": {"cidr": "198.18.0.10/32"}, "action": "allow"},
    {"id": "good6", "destination": {"cidr": "2001:db8:18::10/128"}, "action": "allow"},
    {"id": "bad-port", "destination": {"cidr": "198.18.0.11"}, "protocols": ["tcp"], "ports": [{"start": 18080}], "action": "allow"},
    {"id": "named", "destination": {"domain": "named.test"}, "protocols": ["tcp"], "action": "allow"},
    {"id": "public-18099", "destination": {"group": "public"}, "protocols": ["tcp"], "ports": [{"start": 18099}], "action": "allow"},
    {"id": "lan", "destination": {"domain": "lan.test"}, "action": "allow"}
  ]
}`

// dnsTable is the upstream resolver's data.
var dnsTable = map[string][]netip.Addr{
	"named.test.":  {nettest.Named},
	"evil.test.":   {nettest.Named}, // same address, a name the policy does not allow
	"rebind.test.": {netip.MustParseAddr("10.9.9.9")},
	"lan.test.":    {netip.MustParseAddr("10.9.9.10")},
	"good.test.":   {nettest.Good},
}

type env struct {
	tp    *nettest.Topology
	st    *Stack
	eg    *egress.Service
	audit *testutil.Buffer
	aud   *egress.Audit
}

// records returns the audit records written so far (after flushing the audit queue).
func (e *env) records(t *testing.T) []egress.Record {
	t.Helper()
	e.aud.Close()
	var out []egress.Record
	sc := bufio.NewScanner(strings.NewReader(e.audit.String()))
	for sc.Scan() {
		var r egress.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

func mustPolicy(t testing.TB, src string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	p, err = policy.WithFloor(policy.DefaultFloor, p)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// testLink is a tun link endpoint, MTU and queue count the suite runs on.
type testLink struct {
	mode   tunlink.Mode
	mtu    uint32
	queues int
}

// testLinks: the plain endpoint at the MTU it needs, and the offload endpoint at that MTU and
// at the guest's ordinary 1500 (where segments are 64 KiB only thanks to TSO and GSO), there
// with two queues.
var testLinks = []testLink{{tunlink.Plain, 65520, 1}, {tunlink.Offload, 65520, 1}, {tunlink.Offload, 1500, 2}}

// eachLink runs a test once per link endpoint and MTU, as subtests.
func eachLink(t *testing.T, f func(t *testing.T, lk testLink)) {
	for _, lk := range testLinks {
		t.Run(fmt.Sprintf("%s-%d-q%d", lk.mode, lk.mtu, lk.queues), func(t *testing.T) { f(t, lk) })
	}
}

func setup(t testing.TB, lk testLink, pol string, tune func(*Options)) *env {
	tp := nettest.New(t)
	nettest.Hosts(t)
	e := &env{tp: tp, audit: &testutil.Buffer{}}
	gw := egress.DefaultGuestNet
	e.aud = egress.NewAudit(e.audit, testLog(t))
	t.Cleanup(e.aud.Close)
	e.eg = egress.New(mustPolicy(t, pol), egress.Options{HostAddrs: gw.Gateways(), Audit: e.aud})
	up := nettest.DNSServer(t, nettest.Good, dnsTable)
	res := resolver.New(e.eg, resolver.Options{Upstream: resolver.Servers{Addrs: []netip.AddrPort{up}}})
	o := Options{TunName: "agtun" + tp.ID, Link: lk.mode, MTU: lk.mtu, Queues: lk.queues, Egress: e.eg, DNS: res, Gateways: gw.Gateways(), Log: testLog(t)}
	if tune != nil {
		tune(&o)
	}
	st, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	e.st = st
	t.Cleanup(st.Close)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(tp.Guest.FD()), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := AttachGuest(h, o.TunName, tp.Guest.FD(), o.MTU, gw); err != nil {
		t.Fatal(err)
	}
	tp.UseResolver(t, gw.ResolvConf())
	if dir := os.Getenv("AGENTD_TEST_PCAP"); dir != "" { // debugging aid: capture the guest's side of the tun
		cap := tp.Cmd("tcpdump", "-i", o.TunName, "-s", "96", "-U", "-w", filepath.Join(dir, t.Name()+".pcap"))
		if err := cap.Start(); err == nil {
			time.Sleep(500 * time.Millisecond) // tcpdump has no readiness signal
			t.Cleanup(func() { cap.Process.Signal(os.Interrupt); cap.Wait() })
		}
	}
	return e
}

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testWriter sends log lines to the test's log (shown on failure or with -v).
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// dial connects from inside the guest namespace.
func (e *env) dial(network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return e.tp.Guest.DialContext(ctx, network, addr)
}

// serve starts a TCP server on ip:port (0: any port) that runs fn per connection.
func serve(t testing.TB, ip netip.Addr, port int, fn func(*net.TCPConn)) netip.AddrPort {
	return testutil.ServeAt(t, netip.AddrPortFrom(ip, uint16(port)).String(), fn).Addr.AddrPort()
}

func TestTCPPolicy(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		good := serve(t, nettest.Good, 0, testutil.Echo)
		good6 := serve(t, nettest.Good6, 0, testutil.Echo)
		badAllowed := serve(t, nettest.Bad, 18080, testutil.Echo)
		badOther := serve(t, nettest.Bad, 0, testutil.Echo)
		badGroup := serve(t, nettest.Bad, 18099, testutil.Echo)
		named := serve(t, nettest.Named, 0, testutil.Echo)
		dead := netip.AddrPortFrom(nettest.Good, uint16(testutil.ClosedPort(t)))
		mapped := netip.AddrPortFrom(netip.AddrFrom16(nettest.Good.As16()), good.Port())
		cases := []struct {
			name string
			dst  netip.AddrPort
			ok   bool
		}{
			{"cidr allows", good, true},
			{"cidr allows ipv6", good6, true},
			{"ipv4-mapped destination is its ipv4 address", mapped, true},
			{"port rule allows its port", badAllowed, true},
			{"port rule denies other ports (default)", badOther, false},
			{"group rule (public) allows its port", badGroup, true},
			{"raw IP under a domain rule is denied", named, false},
			{"ipv6 host outside the rules", netip.AddrPortFrom(nettest.Bad6, good6.Port()), false},
			{"a dead upstream is refused, never connected", dead, false},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				start := time.Now()
				conn, err := e.dial("tcp", c.dst.String())
				took := time.Since(start)
				if !c.ok {
					if !errors.Is(err, syscall.ECONNREFUSED) {
						t.Fatalf("want ECONNREFUSED, got %v (conn %v)", err, conn)
					}
					if took > 100*time.Millisecond {
						t.Fatalf("refused after %v, want < 100 ms", took)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				conn.Write([]byte("ping"))
				buf := make([]byte, 4)
				if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
					t.Fatalf("echo: %q %v", buf, err)
				}
			})
		}
		if n := e.st.Counters.DialFailed.Load(); n != 1 {
			t.Errorf("dial failures %d, want 1", n)
		}
		testutil.WaitFor(t, func() bool { return e.st.Counters.Active.Load() == 0 && e.st.Endpoints() == 0 }, "relays and endpoints to end")
		// The audit log has exactly one decision per connection attempt, with the deciding rule.
		var decisions []egress.Record
		for _, r := range e.records(t) {
			if r.Event == "decision" {
				decisions = append(decisions, r)
			}
		}
		if len(decisions) != len(cases) {
			t.Fatalf("%d decision records for %d connects: %+v", len(decisions), len(cases), decisions)
		}
		want := []string{"good", "good6", "good", "bad-port", "default", "public-18099", "default", "default", "good"}
		for i, r := range decisions {
			if r.Rule != want[i] || r.Protocol != "tcp" || r.Dst == "" {
				t.Errorf("decision %d: %+v, want rule %s", i, r, want[i])
			}
		}
	})
}

func TestHalfClose(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		srv := serve(t, nettest.Good, 0, func(c *net.TCPConn) {
			defer c.Close()
			b, _ := io.ReadAll(c) // until the guest's FIN comes through
			fmt.Fprintf(c, "got %d bytes", len(b))
		})
		c, err := e.dial("tcp", srv.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(make([]byte, 5<<20))
		c.(*net.TCPConn).CloseWrite()
		reply, err := io.ReadAll(c)
		if err != nil || string(reply) != fmt.Sprintf("got %d bytes", 5<<20) {
			t.Fatalf("reply %q %v", reply, err)
		}
		c.Close()
		testutil.WaitFor(t, func() bool { return e.st.Counters.Active.Load() == 0 && e.st.Endpoints() == 0 }, "relays and endpoints to end")
		recs := e.records(t)
		last := recs[len(recs)-1]
		if last.Event != "close" || last.BytesUp == nil || *last.BytesUp != 5<<20 || *last.BytesDown != int64(len(reply)) || last.DurationMs == nil {
			t.Fatalf("close record %+v", last)
		}
	})
}

// TestDestinationReset: a destination's RST reaches the guest as a RST.
func TestDestinationReset(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		srv := serve(t, nettest.Good, 0, func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 1))
			c.SetLinger(0)
			c.Close()
		})
		c, err := e.dial("tcp", srv.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("want ECONNRESET, got %v", err)
		}
	})
}

func dig(t *testing.T, e *env, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("dig"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dig is missing: .ci/run should have installed bind9-dnsutils")
		}
		t.Skip("dig not installed")
	}
	out, err := e.tp.Cmd(append([]string{"dig", "+time=5", "+tries=1", "@" + egress.DefaultGuestNet.Gateway4.String()}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("dig %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// TestDNS: the guest's resolver, driven by dig over UDP and TCP.
func TestDNS(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		for _, tc := range []string{"+notcp", "+tcp"} {
			if out := dig(t, e, tc, "named.test", "A"); !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, nettest.Named.String()) {
				t.Fatalf("%s allowed name: %s", tc, out)
			}
			if out := dig(t, e, tc, "evil.test", "A"); !strings.Contains(out, "status: NXDOMAIN") {
				t.Fatalf("%s denied name: %s", tc, out)
			}
		}
		// good.test is reachable by its address, but no rule allows the name: the query is denied.
		if out := dig(t, e, "good.test"); !strings.Contains(out, "status: NXDOMAIN") {
			t.Fatalf("name without a rule: %s", out)
		}
		e.eg.Reload(mustPolicy(t, strings.Replace(testPolicy, `"rules": [`, `"rules": [{"id": "names", "destination": {"domain_suffix": "test"}, "protocols": ["udp"], "ports": [{"start": 9}], "action": "allow"},`, 1)))
		// A public name answered with a private address is refused (rebinding) ...
		if out := dig(t, e, "rebind.test"); !strings.Contains(out, "status: NXDOMAIN") {
			t.Fatalf("rebinding answer: %s", out)
		}
		// ... unless a rule allows that name.
		if out := dig(t, e, "lan.test"); !strings.Contains(out, "10.9.9.10") {
			t.Fatalf("allowed private answer: %s", out)
		}
		if !e.eg.Pins().Has(nettest.Named, "named.test") || e.eg.Pins().Has(nettest.Named, "evil.test") {
			t.Fatal("pins: want named.test pinned to its address and evil.test not")
		}
		var dns int
		for _, r := range e.records(t) {
			if r.Event == "dns" {
				dns++
			}
		}
		if dns != 7 {
			t.Fatalf("%d dns records, want 7 (one per query)", dns)
		}
	})
}

// TestDomainRule: an address is reachable under a domain rule only after the guest resolved
// the allowed name to it, and TLS must then name an allowed, pinned server.
func TestDomainRule(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls ok") }))
		l, err := net.Listen("tcp", nettest.Named.String()+":0")
		if err != nil {
			t.Fatal(err)
		}
		srv.Listener = l
		srv.StartTLS()
		t.Cleanup(srv.Close)
		dst := l.Addr().String()
		if _, err := e.dial("tcp", dst); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("before resolving: %v", err)
		}
		dig(t, e, "named.test")
		for _, c := range []struct {
			sni string
			ok  bool
		}{{"named.test", true}, {"evil.test", false}, {"", true}} {
			conn, err := e.dial("tcp", dst)
			if err != nil {
				t.Fatalf("after resolving: %v", err)
			}
			tc := tls.Client(conn, &tls.Config{ServerName: c.sni, InsecureSkipVerify: true})
			if c.sni == "" {
				tc = tls.Client(conn, &tls.Config{InsecureSkipVerify: true}) // an IP: no SNI sent
			}
			tc.SetDeadline(time.Now().Add(10 * time.Second))
			err = tc.Handshake()
			conn.Close()
			if c.ok && err != nil {
				t.Fatalf("sni %q: %v", c.sni, err)
			}
			if !c.ok && err == nil {
				t.Fatalf("sni %q: handshake succeeded, want the flow cut", c.sni)
			}
		}
		if e.eg.Counters.SNIDenied.Load() != 1 {
			t.Fatalf("sni denials %d, want 1", e.eg.Counters.SNIDenied.Load())
		}
		// curl resolves through the guest's resolver and connects by name.
		if _, err := exec.LookPath("curl"); err == nil {
			url := "https://named.test:" + fmt.Sprint(l.Addr().(*net.TCPAddr).Port) + "/"
			out, err := e.tp.Cmd("curl", "-ksS", "--max-time", "10", url).CombinedOutput()
			if err != nil || string(out) != "tls ok" {
				t.Fatalf("curl %s: %q %v", url, out, err)
			}
		}
	})
}

func TestUDP(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, func(o *Options) { o.UDPIdleTimeout = 300 * time.Millisecond })
		echo := testutil.UDPEcho(t, nettest.Good.AsSlice(), "")
		c, err := e.dial("udp", echo.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := 0; i < 3; i++ {
			msg := fmt.Sprintf("datagram %d", i)
			c.Write([]byte(msg))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			if err != nil || string(buf[:n]) != msg {
				t.Fatalf("udp echo: %q %v", buf[:n], err)
			}
		}
		// Denied UDP (Bad allows only TCP 18080): ICMP port unreachable, read as ECONNREFUSED.
		d, err := e.dial("udp", netip.AddrPortFrom(nettest.Bad, 18080).String())
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		d.Write([]byte("x"))
		d.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := d.Read(make([]byte, 10)); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("denied udp: %v", err)
		}
		if e.eg.Counters.UDPDenied.Load() != 1 || e.eg.Counters.UDPAllowed.Load() != 1 {
			t.Fatalf("udp counters: allowed %d denied %d", e.eg.Counters.UDPAllowed.Load(), e.eg.Counters.UDPDenied.Load())
		}
		testutil.WaitFor(t, func() bool { return e.st.Counters.UDPActive.Load() == 0 && e.st.Endpoints() == 0 }, "the idle udp flow to end")
	})
}

// TestReload: a live policy reload cuts a flow it no longer allows and keeps the others.
func TestReload(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		testutil.Leaks(t)
		good := serve(t, nettest.Good, 0, testutil.Echo)
		bad := serve(t, nettest.Bad, 18080, testutil.Echo)
		cg, err := e.dial("tcp", good.String())
		if err != nil {
			t.Fatal(err)
		}
		defer cg.Close()
		cb, err := e.dial("tcp", bad.String())
		if err != nil {
			t.Fatal(err)
		}
		defer cb.Close()
		if n := e.eg.Reload(mustPolicy(t, strings.Replace(testPolicy, `"198.18.0.10/32"`, `"198.18.0.99/32"`, 1))); n != 1 {
			t.Fatalf("reload revoked %d flows, want 1", n)
		}
		cg.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := cg.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("revoked flow: want ECONNRESET, got %v", err)
		}
		cb.Write([]byte("still"))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(cb, buf); err != nil {
			t.Fatalf("kept flow: %v", err)
		}
		if _, err := e.dial("tcp", good.String()); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("new connection after reload: %v", err)
		}
		revoked := 0
		for _, r := range e.records(t) {
			if r.Event == "revoked" {
				revoked++
				if r.Dst != good.String() || r.Rule != "default" {
					t.Errorf("revoked record %+v", r)
				}
			}
		}
		if revoked != 1 {
			t.Fatalf("%d revoked records, want 1", revoked)
		}
	})
}

// TestCaps: the per-destination cap refuses the flow over it and counts the reason.
func TestCaps(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, func(o *Options) { o.MaxFlowsPerDest = 2 })
		srv := serve(t, nettest.Good, 0, testutil.Echo)
		var conns []net.Conn
		for i := 0; i < 2; i++ {
			c, err := e.dial("tcp", srv.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			conns = append(conns, c)
		}
		if _, err := e.dial("tcp", srv.String()); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("third flow: %v", err)
		}
		if e.st.Counters.DestCapDrop.Load() != 1 {
			t.Fatalf("dest cap drops %d", e.st.Counters.DestCapDrop.Load())
		}
	})
}

// TestCurl: a real client in the guest namespace fetches through the netstack.
func TestCurl(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		if _, err := exec.LookPath("curl"); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("curl is missing: .ci/run should have installed it")
			}
			t.Skip("curl not installed")
		}
		e := setup(t, lk, testPolicy, nil)
		l, err := net.Listen("tcp", nettest.Good.String()+":0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello through the netstack") })}
		go srv.Serve(l)
		t.Cleanup(func() { srv.Close() })
		out, err := e.tp.Cmd("curl", "-sS", "--max-time", "10", "http://"+l.Addr().String()+"/").CombinedOutput()
		if err != nil || string(out) != "hello through the netstack" {
			t.Fatalf("curl: %q %v", out, err)
		}
		cmd := e.tp.Cmd("curl", "-sS", "--max-time", "10", "http://"+nettest.Bad.String()+":80/")
		out, err = cmd.CombinedOutput()
		if cmd.ProcessState.ExitCode() != 7 { // CURLE_COULDNT_CONNECT: refused, not timed out
			t.Fatalf("curl to a denied host: %q %v", out, err)
		}
	})
}

// TestManyConnections: 5,000 concurrent guest connections through the stack, then no leaked
// relays, goroutines or gVisor endpoints.
func TestManyConnections(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		n := 5000
		if testing.Short() {
			n = 500
		}
		e := setup(t, lk, testPolicy, nil)
		srv := serve(t, nettest.Good, 0, testutil.Echo)
		// Checked with the stack still up (gVisor's tun dispatcher keeps one eventfd per stack
		// after it stops), so this sees what 5,000 connections leave behind.
		testutil.Leaks(t)
		conns := make([]net.Conn, n)
		var wg sync.WaitGroup
		errs := make(chan error, n)
		sem := make(chan struct{}, 64) // at most 64 handshakes in flight from the guest
		for i := range conns {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				c, err := e.dial("tcp", srv.String())
				if err != nil {
					errs <- fmt.Errorf("connection %d: %w", i, err)
					return
				}
				conns[i] = c
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			out, _ := e.tp.Cmd("nstat", "-az").CombinedOutput()
			for _, l := range strings.Split(string(out), "\n") {
				if f := strings.Fields(l); len(f) > 1 && f[1] != "0" {
					t.Log(l)
				}
			}
			c := &e.st.Counters
			t.Fatalf("%v (dial failed %d, handshake failed %d, denied %d, caps %d/%d; gVisor: %s)", err, c.DialFailed.Load(),
				c.HandshakeFailed.Load(), e.eg.Counters.Denied(), c.FlowCapDrop.Load(), c.DestCapDrop.Load(), tcpStats(e.st))
		}
		for i, c := range conns {
			msg := []byte(fmt.Sprintf("conn %d", i))
			c.Write(msg)
			buf := make([]byte, len(msg))
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != string(msg) {
				t.Fatalf("conn %d: %q %v", i, buf, err)
			}
		}
		if a := e.st.Counters.Active.Load(); a != int64(n) {
			t.Fatalf("%d active relays, want %d", a, n)
		}
		for _, c := range conns {
			c.Close()
		}
		deadline := time.Now().Add(60 * time.Second) // a LAST_ACK retransmission can take a while under -race
		for e.st.Counters.Active.Load() != 0 || e.st.Endpoints() != 0 {
			if time.Now().After(deadline) {
				var b strings.Builder
				pprof.Lookup("goroutine").WriteTo(&b, 1)
				for _, g := range strings.Split(b.String(), "\n\n") {
					if strings.Contains(g, "netstack.(*tcpFlow)") {
						t.Log(g)
					}
				}
				t.Fatalf("after closing: %d relays active, %d gVisor endpoints registered", e.st.Counters.Active.Load(), e.st.Endpoints())
			}
			time.Sleep(20 * time.Millisecond) // polling counters owned by the stack's goroutines
		}
		if e.eg.Open() != 0 {
			t.Fatalf("%d flows still open in the egress table", e.eg.Open())
		}
	})
}

// tcpStats lists gVisor's non-zero TCP counters (for failure messages).
func tcpStats(st *Stack) string {
	v := reflect.ValueOf(st.Stats().TCP)
	var parts []string
	for i := 0; i < v.NumField(); i++ {
		if c, ok := v.Field(i).Interface().(*tcpip.StatCounter); ok && c != nil && c.Value() != 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", v.Type().Field(i).Name, c.Value()))
		}
	}
	ic := st.Stats().ICMP.V4.PacketsSent
	parts = append(parts, fmt.Sprintf("icmp-unreachable-sent=%d tcp-resets-sent=%d", ic.DstUnreachable.Value(), st.Stats().TCP.ResetsSent.Value()))
	return strings.Join(parts, " ")
}

// TestDialIntoGuest: the netstack dialer reaches a service in the guest through the tun, from
// the gateway address (core.tcp's "netstack" dialer).
func TestDialIntoGuest(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		// A TCP server inside the guest namespace: socat via ip netns exec.
		port := testutil.ClosedPort(t)
		srv := e.tp.Cmd("socat", fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr", port, egress.DefaultGuestNet.Addr4.Addr()), "EXEC:cat")
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { srv.Process.Kill(); srv.Wait() }()
		dst := netip.AddrPortFrom(egress.DefaultGuestNet.Addr4.Addr(), uint16(port)).String()
		var c net.Conn
		var err error
		testutil.WaitFor(t, func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			c, err = e.st.DialContext(ctx, "tcp", dst)
			return err == nil
		}, "the guest's socat to listen")
		defer c.Close()
		c.Write([]byte("into the guest"))
		buf := make([]byte, 14)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "into the guest" {
			t.Fatalf("echo: %q %v", buf, err)
		}
		if got := c.LocalAddr().String(); !strings.HasPrefix(got, egress.DefaultGuestNet.Gateway4.String()+":") {
			t.Fatalf("local address %s, want the gateway", got)
		}
	})
}

// TestICMPEcho: the gateway answers echo requests itself (a guest can ping its resolver);
// echo to other hosts is not forwarded, allowed or not, so it reveals nothing beyond the tun.
func TestICMPEcho(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		for _, c := range []struct {
			dst   string
			reply bool
		}{{egress.DefaultGuestNet.Gateway4.String(), true}, {nettest.Good.String(), false}, {nettest.Bad.String(), false}} {
			fd, err := e.tp.Guest.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
			if err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), "icmp")
			pc, err := net.FilePacketConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			msg, _ := (&icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: 7, Seq: 1, Data: []byte("agentd")}}).Marshal(nil)
			pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(c.dst)})
			pc.SetReadDeadline(time.Now().Add(500 * time.Millisecond)) // proving silence needs a wait
			buf := make([]byte, 1500)
			n, _, err := pc.ReadFrom(buf)
			pc.Close()
			if !c.reply {
				if err == nil {
					t.Errorf("%s: echo answered, want silence", c.dst)
				}
				continue
			}
			m, perr := icmp.ParseMessage(1, buf[:max(n, 0)])
			if err != nil || perr != nil || m.Type != ipv4.ICMPTypeEchoReply {
				t.Errorf("%s: want an echo reply: %v %v", c.dst, err, perr)
			}
		}
	})
}

// TestBufferBudget: with room for a single relay buffer in the whole stack, four flows moving
// data both ways at once still all complete (flows wait for the buffer, none deadlocks).
func TestBufferBudget(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, func(o *Options) { o.MaxBuffers = 1 })
		srv := serve(t, nettest.Good, 0, testutil.Echo)
		errs := make(chan error, 4)
		for i := 0; i < 4; i++ {
			go func() {
				c, err := e.dial("tcp", srv.String())
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				go func() { c.Write(make([]byte, 4<<20)); c.(*net.TCPConn).CloseWrite() }()
				c.SetReadDeadline(time.Now().Add(30 * time.Second))
				n, err := io.Copy(io.Discard, c)
				if err == nil && n != 4<<20 {
					err = fmt.Errorf("echoed %d bytes", n)
				}
				errs <- err
			}()
		}
		for i := 0; i < 4; i++ {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if n := len(e.st.bufTokens); n != 0 {
			t.Fatalf("%d buffers still taken", n)
		}
	})
}

// TestCloseWithOpenFlows: closing the stack ends every flow, a half-closed one whose upstream
// stays silent included (Close used to wait for it forever).
func TestCloseWithOpenFlows(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		quiet := make(chan struct{})
		defer close(quiet)
		silent := serve(t, nettest.Good, 0, func(c *net.TCPConn) { io.Copy(io.Discard, c); <-quiet; c.Close() })
		c, err := e.dial("tcp", silent.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("hello"))
		c.(*net.TCPConn).CloseWrite() // the guest's side is done; the server never answers
		testutil.WaitFor(t, func() bool { return e.st.Counters.Active.Load() == 1 }, "the flow to be relayed")
		done := make(chan struct{})
		go func() { e.st.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return with a half-closed flow open")
		}
	})
}

// TestLargeSegments: bulk data crosses the tun in large segments both ways on every link
// (the offload endpoint's TSO in and GSO out at MTU 1500; the MTU itself on the plain one), so
// that the per-packet cost is paid per 64 KiB, not per 1500 bytes.
func TestLargeSegments(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		const n = 8 << 20
		srv := serve(t, nettest.Good, 0, func(c *net.TCPConn) {
			defer c.Close()
			io.Copy(io.Discard, c)
			c.Write(make([]byte, n))
		})
		c, err := e.dial("tcp", srv.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stats := e.st.Stats().TCP
		in0, out0 := stats.ValidSegmentsReceived.Value(), stats.SegmentsSent.Value()
		c.Write(make([]byte, n))
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		if got, err := io.Copy(io.Discard, c); err != nil || got != n {
			t.Fatalf("downloaded %d bytes, %v", got, err)
		}
		in, out := stats.ValidSegmentsReceived.Value()-in0, stats.SegmentsSent.Value()-out0
		// 8 MiB in 1448-byte segments would be 5,800 each way (plus as many ACKs sent back);
		// in 64 KiB ones, 128. Allow for small segments at the window's edges.
		if in > n/(8<<10) || out > n/(8<<10)+in {
			t.Fatalf("8 MiB each way took %d segments in and %d out (link %s)", in, out, e.st.Link())
		}
		if lk.mode == tunlink.Offload && lk.mtu < 65520 && e.st.Link().Stats().SuperTCP == 0 {
			t.Fatal("no TSO super-packet came through the offload endpoint")
		}
		t.Logf("8 MiB each way: %d segments in, %d out (link %s)", in, out, e.st.Link())
	})
}

// TestUDPSegments: a guest sending with UDP_SEGMENT (one super-packet through the tun with the
// offload endpoint's USO) delivers each datagram separately, with its own bytes.
func TestUDPSegments(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: nettest.Good.AsSlice()})
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		fd, err := e.tp.Guest.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		dst := pc.LocalAddr().(*net.UDPAddr)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: nettest.Good.As4(), Port: dst.Port}); err != nil {
			t.Fatal(err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_UDP, unix.UDP_SEGMENT, 1000); err != nil {
			t.Skipf("UDP_SEGMENT: %v", err)
		}
		msg := make([]byte, 4500)
		for i := range msg {
			msg[i] = byte(i / 1000)
		}
		if _, err := unix.Write(fd, msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 65536)
		for i := 0; i < 5; i++ {
			pc.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				t.Fatalf("datagram %d: %v", i, err)
			}
			want := msg[i*1000 : min((i+1)*1000, len(msg))]
			if string(buf[:n]) != string(want) {
				t.Fatalf("datagram %d: %d bytes starting %d, want %d bytes of %d", i, n, buf[0], len(want), want[0])
			}
		}
		if st := e.st.Link().Stats(); lk.mode == tunlink.Offload && strings.Contains(e.st.Link().Features, "uso4") && st.SuperUDP != 1 {
			t.Fatalf("%d USO super-packets split (link %s), want 1", st.SuperUDP, e.st.Link())
		}
	})
}

// TestServerSpeaksFirst: a destination that talks first (SMTP, SSH) gets its banner to the
// guest over a handshake that completed at the guest's ACK. gVisor leaves that ACK queued when
// it arrives while the SYN-ACK's sender still holds the endpoint, and only the SYN-ACK's
// retransmission would complete the handshake (a second later); the offload endpoint writes
// SYNs after the lock is released, which its SYN count shows: one per connection.
func TestServerSpeaksFirst(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		srv := serve(t, nettest.Good, 0, func(c *net.TCPConn) {
			defer c.Close()
			io.WriteString(c, "220 banner\r\n")
			io.Copy(io.Discard, c)
		})
		const n = 20
		for i := 0; i < n; i++ {
			c, err := e.dial("tcp", srv.String())
			if err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err != nil || line != "220 banner\r\n" {
				t.Fatalf("connection %d: banner %q, %v", i, line, err)
			}
		}
		if st := e.st.Link().Stats(); lk.mode == tunlink.Offload && st.SYNs != n {
			t.Fatalf("%d SYN-ACKs for %d connections: handshakes waited for a retransmission", st.SYNs, n)
		}
	})
}

// TestIdleFlowsHoldNoGoroutine: once a flow has had nothing to do for a while, neither of its
// directions holds a goroutine (the reactor and gVisor's callbacks start them again), and it
// still relays both ways when woken.
func TestIdleFlowsHoldNoGoroutine(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, nil)
		srv := serve(t, nettest.Good, 0, testutil.Echo)
		var conns []net.Conn
		for i := 0; i < 50; i++ {
			c, err := e.dial("tcp", srv.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("x"))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		relayGoroutines := func() int {
			var b strings.Builder
			pprof.Lookup("goroutine").WriteTo(&b, 1)
			n := 0
			for _, g := range strings.Split(b.String(), "\n\n") {
				if strings.Contains(g, "netstack.(*tcpFlow)") {
					fmt.Sscan(g, &n) // "N @ ..." counts goroutines with this stack
				}
			}
			return n
		}
		testutil.WaitFor(t, func() bool { return relayGoroutines() == 0 }, "idle flows to park")
		for i, c := range conns { // woken by the guest, answered by the destination
			msg := fmt.Sprintf("again %d", i)
			c.Write([]byte(msg))
			buf := make([]byte, len(msg))
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				t.Fatalf("conn %d after idling: %q %v", i, buf, err)
			}
		}
	})
}

// TestMemoryComesBack: after a burst, the memory the Go runtime kept goes back to the OS once
// the stack is quiet (Options.ReleaseAfter).
func TestMemoryComesBack(t *testing.T) {
	eachLink(t, func(t *testing.T, lk testLink) {
		e := setup(t, lk, testPolicy, func(o *Options) { o.ReleaseAfter = 100 * time.Millisecond })
		srv := serve(t, nettest.Good, 0, func(c *net.TCPConn) {
			defer c.Close()
			io.Copy(io.Discard, c)
		})
		runtime.GC()
		debug.FreeOSMemory()
		base := retainedMemory()
		errs := make(chan error, 4)
		for i := 0; i < 4; i++ {
			go func() {
				c, err := e.dial("tcp", srv.String())
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				buf := make([]byte, 1<<20)
				for j := 0; j < 64 && err == nil; j++ {
					_, err = c.Write(buf)
				}
				errs <- err
			}()
		}
		for i := 0; i < 4; i++ {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		peak := retainedMemory()
		testutil.WaitFor(t, func() bool { return retainedMemory() < base+8<<20 }, "memory to come back")
		t.Logf("retained: %d MiB before, %d MiB after 256 MiB, %d MiB once quiet", base>>20, peak>>20, retainedMemory()>>20)
	})
}

// retainedMemory is the memory the Go runtime holds from the OS (mapped, not released).
func retainedMemory() uint64 {
	m := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(m)
	return m[0].Value.Uint64() - m[1].Value.Uint64()
}
