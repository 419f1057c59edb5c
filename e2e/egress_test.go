package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/protocol"
)

// TestEgressIsolation runs agentd --egress netstack in a guest namespace whose uplink is a veth
// to this namespace. agentd moves the uplink into a namespace of its own, so the guest keeps
// only the tun. Workloads (run through agentd's exec, restricted profile: no CAP_NET_ADMIN,
// CAP_NET_RAW or CAP_SYS_ADMIN) reach an allowed server by name, are refused a denied one at
// once, and cannot route, bind or send raw packets around the tun.
func TestEgressIsolation(t *testing.T) {
	tp := nettest.New(t)
	up := "agup" + tp.ID
	nettest.Run(t, "ip", "link", "add", up+"p", "type", "veth", "peer", "name", up)
	nettest.Run(t, "ip", "link", "set", up, "netns", tp.Name)
	// This namespace plays the outside world: an allowed host .1 and a denied host .3.
	nettest.Run(t, "ip", "addr", "add", "203.0.113.1/24", "dev", up+"p")
	nettest.Run(t, "ip", "addr", "add", "203.0.113.3/24", "dev", up+"p")
	nettest.Run(t, "ip", "link", "set", up+"p", "up")
	nettest.Run(t, "ip", "-n", tp.Name, "addr", "add", "203.0.113.2/24", "dev", up)
	nettest.Run(t, "ip", "-n", tp.Name, "link", "set", up, "up")
	nettest.Run(t, "ip", "-n", tp.Name, "route", "add", "default", "via", "203.0.113.1")

	allowed := httpServer(t, "203.0.113.1:0", "allowed")
	denied := httpServer(t, "203.0.113.3:0", "denied")
	dns := nettest.DNSServer(t, netip.MustParseAddr("203.0.113.1"), map[string][]netip.Addr{
		"allowed.test.": {netip.MustParseAddr("203.0.113.1")},
	})
	dir := t.TempDir()
	pol := filepath.Join(dir, "policy.yaml")
	os.WriteFile(pol, []byte(`
default_egress: deny
rules:
  - id: web
    destination: {domain: allowed.test}
    protocols: [tcp]
    action: allow
`), 0o644)
	audit := filepath.Join(dir, "audit.jsonl")
	tp.UseResolver(t, egress.DefaultGuestNet.ResolvConf())
	t.Setenv("MSB_SECURITY_PROFILE", "restricted")
	t.Setenv("MSB_USER", "0:0")
	a := startAgentdWrapped(t, []string{"ip", "netns", "exec", tp.Name}, "socket", host.Options{},
		"--egress", "netstack", "--egress-uplink", up, "--egress-policy", pol, "--egress-dns", dns.String(),
		"--egress-audit", audit, "--egress-tun", "agtun"+tp.ID)
	run := func(script string) (string, int32) {
		t.Helper()
		out, errOut, code, err := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", script}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return string(out) + string(errOut), code
	}
	// The guest sees only the loopback and the tun.
	if out, _ := run("ls /sys/class/net"); strings.Fields(out)[0] != "agtun"+tp.ID || len(strings.Fields(out)) != 2 {
		t.Fatalf("guest interfaces: %q", out)
	}
	// By address, before any name resolved to it: denied (the rule is a domain rule).
	if out, code := run("curl -sS --max-time 5 http://" + allowed + "/"); code != 7 {
		t.Fatalf("raw IP under a domain rule: code %d %s", code, out)
	}
	// By name, through agentd's resolver: allowed.
	port := allowed[strings.LastIndex(allowed, ":")+1:]
	if out, code := run("curl -sS --max-time 10 http://allowed.test:" + port + "/"); code != 0 || out != "allowed" {
		t.Fatalf("allowed by name: code %d %q", code, out)
	}
	// The denied host: refused at once.
	if out, code := run("curl -sS --max-time 5 http://" + denied + "/"); code != 7 {
		t.Fatalf("denied host: code %d %s", code, out)
	}
	// Around the tun: a route to the uplink, a socket bound to it, a raw socket. All fail, and
	// the denied host stays unreachable.
	for _, probe := range []struct{ name, script string }{
		{"route via the uplink", "ip route add 203.0.113.3/32 dev " + up},
		{"SO_BINDTODEVICE to the uplink", "curl -sS --max-time 5 --interface " + up + " http://" + denied + "/"},
		{"raw socket", `python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)'`},
		{"packet socket", `python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'`},
	} {
		if out, code := run(probe.script); code == 0 {
			t.Fatalf("%s: succeeded: %s", probe.name, out)
		} else {
			t.Logf("%s: refused (exit %d): %s", probe.name, code, strings.TrimSpace(out))
		}
	}
	if out, code := run("curl -sS --max-time 5 http://" + denied + "/"); code != 7 {
		t.Fatalf("denied host after the probes: code %d %s", code, out)
	}
	a.c.Close()
	if err := a.wait(); err != nil { // agentd writes out its audit queue as it exits
		t.Fatal(err)
	}
	// One audit record per decision: the raw-IP denial, curl's A and AAAA queries, the allowed
	// flow (and its close), the denied host twice (and curl's query for the interface name).
	f, err := os.Open(audit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var events []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r egress.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		events = append(events, fmt.Sprintf("%s %s %s %s", r.Event, r.Dst+r.Name, r.Rule, r.Verdict))
	}
	t.Logf("audit:\n%s", strings.Join(events, "\n"))
	want := map[string]int{"decision deny": 3, "decision allow": 1, "close allow": 1, "dns allow": 2}
	got := map[string]int{}
	for _, e := range events {
		f := strings.Fields(e)
		got[f[0]+" "+f[len(f)-1]]++
	}
	for k, n := range want {
		if got[k] != n {
			t.Errorf("audit: %d %q records, want %d", got[k], k, n)
		}
	}
}

func httpServer(t *testing.T, addr, body string) string {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}
