package e2e

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

// TestChannelHostEnforces: in channel mode the host's end applies a policy of its own with the
// full rule set. The guest's agentd allows everything (as a guest taken over completely would),
// and the host still refuses by address, by name (it serves the guest's DNS, so it holds the
// pins: a name it does not allow is not even resolved, and an address reached without its
// allowed name is refused) and by SNI (a TLS stream to an allowed, pinned address with another
// name in its ClientHello is cut before a byte of it reaches the server).
func TestChannelHostEnforces(t *testing.T) {
	tp := nettest.New(t)
	nettest.Hosts(t)
	dir := t.TempDir()
	dns := nettest.DNSServer(t, nettest.Good, map[string][]netip.Addr{
		"good.test.": {nettest.Good}, "evil.test.": {nettest.Good}, "named.test.": {nettest.Named}})
	web := httpServer(t, nettest.Good.String()+":0", "allowed")
	other := httpServer(t, nettest.Named.String()+":0", "should not be reached")
	var tlsHits int
	tlsSrv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tlsHits++
		io.WriteString(w, "tls "+r.TLS.ServerName)
	}))
	l, err := net.Listen("tcp", nettest.Good.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	tlsSrv.Listener = l
	tlsSrv.StartTLS()
	defer tlsSrv.Close()
	tlsPort := tlsSrv.Listener.Addr().(*net.TCPAddr).Port

	guestPol := filepath.Join(dir, "guest.json")
	os.WriteFile(guestPol, []byte(`{"default_egress": "allow", "rules": []}`), 0o644)
	hostPol := filepath.Join(dir, "host.json")
	os.WriteFile(hostPol, []byte(`{"default_egress": "deny", "rules": [
		{"id": "good", "destination": {"domain": "good.test"}, "protocols": ["tcp"], "action": "allow"}]}`), 0o644)
	chanSock, relaySock := filepath.Join(dir, "chan.sock"), filepath.Join(dir, "relay.sock")
	serveLog := &testutil.Buffer{}
	serve := exec.Command(filepath.Join(binDir, "agentctl"), "serve", "--port", "unix-listen:"+chanSock, "--listen", relaySock,
		"--egress", "--egress-policy", hostPol, "--egress-dns", dns.String(), "--egress-audit", filepath.Join(dir, "host-audit.jsonl"))
	serve.Stderr = serveLog
	startProc(t, serve, serveLog)
	waitPath(t, chanSock)
	tp.UseResolver(t, egress.DefaultGuestNet.ResolvConf())
	agentLog := &testutil.Buffer{}
	agentd := exec.Command("ip", "netns", "exec", tp.Name, filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix:"+chanSock,
		"--egress", "channel", "--egress-policy", guestPol, "--egress-tun", "agtun"+tp.ID)
	agentd.Stderr = agentLog
	startProc(t, agentd, agentLog)
	waitLog(t, serveLog, "serving clients")
	defer func() {
		if t.Failed() {
			t.Logf("agentctl serve:\n%s\nagentd:\n%s", tail(serveLog.String(), 3000), tail(agentLog.String(), 3000))
		}
	}()
	curl := func(args ...string) (string, int) {
		cmd := tp.Cmd(append([]string{"curl", "-sS", "--max-time", "10"}, args...)...)
		out, _ := cmd.CombinedOutput()
		return string(out), cmd.ProcessState.ExitCode()
	}
	port := func(addr string) string { return addr[strings.LastIndex(addr, ":")+1:] }

	if out, code := curl("http://good.test:" + port(web) + "/"); code != 0 || out != "allowed" {
		t.Fatalf("the allowed name: %q exit %d", out, code)
	}
	// By name: the host does not resolve what it does not allow (curl: could not resolve).
	if out, code := curl("http://named.test:" + port(other) + "/"); code != 6 {
		t.Fatalf("a name the host does not allow: %q exit %d, want 6", out, code)
	}
	// By address: reached without any allowed name pinned to it.
	if out, code := curl("http://" + other + "/"); code != 7 && code != 52 && code != 56 {
		t.Fatalf("an address the host does not allow: %q exit %d, want refused", out, code)
	}
	// By SNI: good.test pinned Good, and evil.test (resolved by the guest itself, which
	// allows everything, to the same address) names another server in its ClientHello.
	if out, code := curl("-k", "https://good.test:"+itoa(tlsPort)+"/"); code != 0 || out != "tls good.test" {
		t.Fatalf("TLS with the allowed SNI: %q exit %d", out, code)
	}
	hits := tlsHits
	if out, code := curl("-k", "--resolve", "evil.test:"+itoa(tlsPort)+":"+nettest.Good.String(), "https://evil.test:"+itoa(tlsPort)+"/"); code == 0 {
		t.Fatalf("TLS with a forbidden SNI to a pinned address got through: %q", out)
	}
	if tlsHits != hits {
		t.Fatal("the TLS server saw a request with the forbidden SNI")
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "host-audit.jsonl"))
	for _, want := range []string{`"event":"sni"`, `"sni":"evil.test"`, `"event":"dns"`, `"name":"named.test."`, `"via":"host"`} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("host audit lacks %s:\n%s", want, audit)
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
