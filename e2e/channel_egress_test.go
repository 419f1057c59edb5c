package e2e

import (
	"bufio"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

// TestChannelEgress: a guest namespace with no interface but agentd's tun. Each allowed flow
// goes to the host as a guest-initiated stream over the agent channel, and agentctl serve
// dials it out. curl, dig and iperf3 in the guest reach servers in this namespace; agentd's
// policy and the host's policy each refuse what they deny, at once.
func TestChannelEgress(t *testing.T) {
	tp := nettest.New(t)
	nettest.Hosts(t)
	dir := t.TempDir()
	dns := nettest.DNSServer(t, nettest.Good, map[string][]netip.Addr{"good.test.": {nettest.Good}})
	web := httpServer(t, nettest.Good.String()+":0", "through the channel")
	denied := httpServer(t, nettest.Bad.String()+":0", "denied")
	hostDenied := httpServer(t, nettest.Named.String()+":0", "host-denied")
	guestPol := filepath.Join(dir, "guest.json")
	os.WriteFile(guestPol, []byte(`{"default_egress": "deny", "rules": [
		{"id": "web", "destination": {"cidr": "198.18.0.10/32"}, "action": "allow"},
		{"id": "named", "destination": {"cidr": "198.18.0.12/32"}, "action": "allow"},
		{"id": "names", "destination": {"domain": "good.test"}, "action": "allow"}]}`), 0o644)
	hostPol := filepath.Join(dir, "host.json")
	os.WriteFile(hostPol, []byte(`{"default_egress": "allow", "rules": [
		{"id": "no-named", "destination": {"cidr": "198.18.0.12/32"}, "action": "deny"}]}`), 0o644)

	chanSock, relaySock := filepath.Join(dir, "chan.sock"), filepath.Join(dir, "relay.sock")
	serveLog := &testutil.Buffer{}
	serve := exec.Command(filepath.Join(binDir, "agentctl"), "serve", "--port", "unix-listen:"+chanSock, "--listen", relaySock,
		"--egress", "--egress-policy", hostPol, "--egress-dns", dns.String())
	serve.Stderr = serveLog
	startProc(t, serve, serveLog)
	waitPath(t, chanSock)
	tp.UseResolver(t, egress.DefaultGuestNet.ResolvConf())
	agentLog := &testutil.Buffer{}
	agentd := exec.Command("ip", "netns", "exec", tp.Name, filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix:"+chanSock,
		"--egress", "channel", "--egress-policy", guestPol, "--egress-tun", "agtun"+tp.ID, "--egress-audit", filepath.Join(dir, "audit.jsonl"))
	agentd.Stderr = agentLog
	startProc(t, agentd, agentLog)
	waitLog(t, serveLog, "serving clients")
	defer func() {
		if t.Failed() {
			t.Logf("agentctl serve:\n%s\nagentd:\n%s", tail(serveLog.String(), 3000), tail(agentLog.String(), 3000))
		}
	}()

	if out, err := tp.Cmd("ls", "/sys/class/net").CombinedOutput(); err != nil || len(strings.Fields(string(out))) != 2 {
		t.Fatalf("guest interfaces: %q %v", out, err)
	}
	// By name: the query goes to the host's resolver as a stream, the page through another.
	port := web[strings.LastIndex(web, ":")+1:]
	out, err := tp.Cmd("curl", "-sS", "--max-time", "10", "http://good.test:"+port+"/").CombinedOutput()
	if err != nil || string(out) != "through the channel" {
		t.Fatalf("curl by name: %q %v", out, err)
	}
	if _, err := exec.LookPath("dig"); err == nil {
		out, _ := tp.Cmd("dig", "+time=5", "+tries=1", "good.test").CombinedOutput()
		if !strings.Contains(string(out), nettest.Good.String()) {
			t.Fatalf("dig through the host: %s", out)
		}
	}
	// Refused at once: by agentd's policy, and by the host's.
	for _, c := range []struct{ name, url string }{{"guest policy", "http://" + denied + "/"}, {"host policy", "http://" + hostDenied + "/"}} {
		start := time.Now()
		cmd := tp.Cmd("curl", "-sS", "--max-time", "10", c.url)
		out, _ := cmd.CombinedOutput()
		if cmd.ProcessState.ExitCode() != 7 {
			t.Fatalf("%s: curl %q exit %d, want 7 (refused)", c.name, out, cmd.ProcessState.ExitCode())
		}
		t.Logf("%s: refused in %v", c.name, time.Since(start).Round(time.Millisecond))
	}
	// iperf3 both ways through the channel.
	nettest.Iperf3Server(t, nettest.Good, 5211, true)
	out, err = tp.Cmd("iperf3", "-c", nettest.Good.String(), "-p", "5211", "-t", "2", "-J").CombinedOutput()
	if err != nil {
		t.Fatalf("iperf3: %v\n%s", err, tail(string(out), 2000))
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	json.Unmarshal(out, &res)
	if res.End.SumReceived.BitsPerSecond <= 0 {
		t.Fatalf("iperf3 moved nothing: %s", tail(string(out), 1000))
	}
	t.Logf("iperf3 guest -> host through the channel: %.0f Mbit/s", res.End.SumReceived.BitsPerSecond/1e6)

	// The host logged each flow.
	if !strings.Contains(serveLog.String(), "stream opened") || !strings.Contains(serveLog.String(), "stream refused") {
		t.Fatalf("host log lacks flow records:\n%s", tail(serveLog.String(), 2000))
	}
	audit, _ := os.Open(filepath.Join(dir, "audit.jsonl"))
	defer audit.Close()
	n := 0
	for sc := bufio.NewScanner(audit); sc.Scan(); {
		n++
	}
	if n == 0 {
		t.Fatal("agentd wrote no audit records")
	}
}
