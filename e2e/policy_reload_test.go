package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

// TestAgentctlPolicyReload: `agentctl policy reload` refuses a bad file before touching the
// guest, and installs a good one (fs write, rename, SIGHUP through exec) so that agentd's
// next decision uses it.
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
	conn, err := c.DialTCP(ctx(t), "127.0.0.1", port)
	if err != nil {
		t.Fatalf("before the reload: %v", err)
	}
	conn.Close()

	reload := func(file string) (string, int) {
		cmd := exec.Command(filepath.Join(binDir, "agentctl"), "policy", "reload", "--connect", relaySock,
			"--path", guestPolicy, "--pid", fmt.Sprint(ad.Process.Pid), file)
		out, _ := cmd.CombinedOutput()
		return string(out), cmd.ProcessState.ExitCode()
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("default_egress: deny\nrules:\n  - destination: {cidr: 127.0.0.300/8}\n    action: allow\n"), 0o644)
	if out, code := reload(bad); code != 1 || !strings.Contains(out, `rules[0]: destination: cidr: "127.0.0.300/8"`) {
		t.Fatalf("bad policy: exit %d %q", code, out)
	}
	deny := filepath.Join(dir, "deny.yaml")
	os.WriteFile(deny, []byte("default_egress: deny\nrules:\n  - id: no-local\n    destination: {group: loopback}\n    action: deny\n"), 0o644)
	if out, code := reload(deny); code != 0 {
		t.Fatalf("reload: exit %d %q", code, out)
	}
	waitLog(t, agentLog, "egress policy reloaded")
	if _, err := c.DialTCP(ctx(t), "127.0.0.1", port); err == nil || !strings.Contains(err.Error(), "no-local") {
		t.Fatalf("after the reload: %v", err)
	}
}
