package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

// TestAgentctlPolicyReload: the host owns the policy. `agentctl policy reload` refuses a bad
// file before touching the guest, and agentd refuses a bad document with the field path and
// keeps the old policy; a good one is applied over the channel, the printed generation is the
// one `policy show` reports, and the next decision uses it. Rewriting the policy file agentd
// started with and sending it SIGHUP (what a workload could do) change nothing.
func TestAgentctlPolicyReload(t *testing.T) {
	dir := t.TempDir()
	srv := testutil.Serve(t, testutil.Echo)
	guestPolicy := filepath.Join(dir, "guest.json")
	os.WriteFile(guestPolicy, []byte(`{"default_egress": "allow"}`), 0o644)
	relaySock, ad, agentLog := relayedWith(t, "--egress-policy", guestPolicy)
	c, err := host.Connect(relaySock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := uint16(srv.Addr.Port)
	dial := func() error {
		conn, err := c.DialTCP(ctx(t), "127.0.0.1", port)
		if err == nil {
			conn.Close()
		}
		return err
	}
	if err := dial(); err != nil {
		t.Fatalf("before the reload: %v", err)
	}
	run := func(args ...string) (string, int) {
		cmd := exec.Command(filepath.Join(binDir, "agentctl"), append([]string{"policy", args[0], "--connect", relaySock}, args[1:]...)...)
		out, _ := cmd.CombinedOutput()
		return string(out), cmd.ProcessState.ExitCode()
	}
	if out, code := run("show"); code != 0 || !strings.Contains(out, "# generation 1, 1 rules") || !strings.Contains(out, `"default_egress": "allow"`) {
		t.Fatalf("show at boot: exit %d %q", code, out)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("default_egress: deny\nrules:\n  - destination: {cidr: 127.0.0.300/8}\n    action: allow\n"), 0o644)
	if out, code := run("reload", bad); code != 1 || !strings.Contains(out, `rules[0]: destination: cidr: "127.0.0.300/8"`) {
		t.Fatalf("bad policy: exit %d %q", code, out)
	}
	// A document the host side cannot check beforehand (its floor's id taken) is refused by
	// agentd with the reason, and the old policy stays.
	clash := filepath.Join(dir, "clash.json")
	os.WriteFile(clash, []byte(`{"default_egress": "deny", "rules": [{"id": "floor-metadata", "destination": "any", "action": "deny"}]}`), 0o644)
	if out, code := run("reload", clash); code != 1 || !strings.Contains(out, `taken by the floor`) || !strings.Contains(out, "generation 1") {
		t.Fatalf("refused by agentd: exit %d %q", code, out)
	}
	if err := dial(); err != nil {
		t.Fatalf("a refused reload changed the policy: %v", err)
	}

	// The workload's way: rewrite the file agentd read at start, and signal it.
	os.WriteFile(guestPolicy, []byte(`{"default_egress": "deny"}`), 0o644)
	ad.Process.Signal(syscall.SIGHUP)
	time.Sleep(200 * time.Millisecond) // nothing to await: the point is that nothing happens
	if err := dial(); err != nil {
		t.Fatalf("a rewritten file and SIGHUP changed the policy: %v", err)
	}
	if ad.ProcessState != nil {
		t.Fatal("agentd died of SIGHUP")
	}

	deny := filepath.Join(dir, "deny.yaml")
	os.WriteFile(deny, []byte("default_egress: deny\nrules:\n  - id: no-local\n    destination: {group: loopback}\n    action: deny\n"), 0o644)
	out, code := run("reload", deny)
	if code != 0 || !strings.Contains(out, "generation 2, 2 rules") {
		t.Fatalf("reload: exit %d %q", code, out)
	}
	waitLog(t, agentLog, "egress policy set by the host")
	if err := dial(); err == nil || !strings.Contains(err.Error(), "no-local") {
		t.Fatalf("after the reload: %v", err)
	}
	if out, code := run("show"); code != 0 || !strings.Contains(out, "# generation 2, 2 rules") || !strings.Contains(out, `"no-local"`) {
		t.Fatalf("show after the reload: exit %d %q", code, out)
	}
}

// TestAgentctlAudit: agentd sends its decision records to the host; `agentctl audit` prints
// the ones the relay server holds and `-f` follows new ones as they come; `agentctl serve
// --audit FILE` keeps them all.
func TestAgentctlAudit(t *testing.T) {
	dir := t.TempDir()
	srv := testutil.Serve(t, testutil.Echo)
	pol := filepath.Join(dir, "policy.json")
	os.WriteFile(pol, []byte(`{"default_egress": "allow", "rules": [{"id": "no-9", "destination": {"cidr": "127.0.0.9"}, "action": "deny"}]}`), 0o644)
	hostAudit := filepath.Join(dir, "guest-audit.jsonl")
	relaySock, _, _ := relayedServeArgs(t, []string{"--audit", hostAudit}, "--egress-policy", pol)
	c, err := host.Connect(relaySock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	conn, err := c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	c.DialTCP(ctx(t), "127.0.0.9", 9) // denied
	var out string
	testutil.WaitFor(t, func() bool {
		o, _, code := agentctl(t, relaySock, "", "audit")
		out = o
		return code == 0 && strings.Contains(o, `"rule":"no-9"`)
	}, "the denial to reach agentctl audit")
	if !strings.Contains(out, `"event":"decision"`) || !strings.Contains(out, `"via":"core.tcp"`) || !strings.Contains(out, `"verdict":"allow"`) {
		t.Fatalf("agentctl audit:\n%s", out)
	}
	follow := exec.Command(filepath.Join(binDir, "agentctl"), "audit", "--connect", relaySock, "-f")
	followOut := &testutil.Buffer{}
	follow.Stdout = followOut
	startProc(t, follow, followOut)
	c.DialTCP(ctx(t), "127.0.0.9", 10)
	waitLog(t, followOut, `"dst":"127.0.0.9:10"`)
	testutil.WaitFor(t, func() bool {
		b, _ := os.ReadFile(hostAudit)
		return strings.Contains(string(b), `"dst":"127.0.0.9:10"`)
	}, "serve --audit to keep the records")
}
