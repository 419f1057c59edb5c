package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/confine"
	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/vm"
	"github.com/agentd/agentd/protocol"
)

var buildAttack = sync.OnceValue(func() error {
	cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, "attack"), "../internal/testkit/attack")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return &exec.ExitError{Stderr: out}
	}
	return nil
})

// attackResults runs the attack program as a workload (root, through agentd's exec) and
// returns what each attempt got.
func attackResults(t *testing.T, c *host.Client, pid int, args ...string) map[string]string {
	t.Helper()
	if err := buildAttack(); err != nil {
		t.Fatalf("build the attack program: %v", err)
	}
	return runAttack(t, c, filepath.Join(binDir, "attack"), append([]string{"-pid", itoa(pid)}, args...)...)
}

// pushAttack copies the attack program into a guest and returns its path there.
func pushAttack(t *testing.T, c *host.Client) string {
	t.Helper()
	if err := buildAttack(); err != nil {
		t.Fatalf("build the attack program: %v", err)
	}
	f, err := os.Open(filepath.Join(binDir, "attack"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := c.WriteFile(ctx(t), "/tmp/attack", 0o755, f); err != nil {
		t.Fatalf("push the attack program: %v", err)
	}
	return "/tmp/attack"
}

func runAttack(t *testing.T, c *host.Client, path string, args ...string) map[string]string {
	t.Helper()
	req := protocol.ExecRequest{Cmd: path, Args: args}
	out, errOut, code, err := c.Run(ctx(t), req, nil)
	if err != nil || code != 0 {
		t.Fatalf("attack: exit %d %v\n%s%s", code, err, out, errOut)
	}
	var res map[string]string
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("attack said %s %s", out, errOut)
	}
	return res
}

// holes lists the attempts that worked.
func holes(res map[string]string) []string {
	var out []string
	for k, v := range res {
		if v == "ok" && k != "signals sent" {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// TestConfinedWorkload is the hostile root workload against agentd with egress on, in a guest
// namespace whose uplink agentd isolated: it tries to ptrace and seize every agentd thread, read
// and write agentd's memory, copy agentd's descriptors, enter every agentd thread's namespaces
// (the uplink's among them), load and unload kernel modules, reach I/O ports and /dev/mem,
// create or attach a tun, open raw and packet sockets, make namespaces and mounts of its own,
// rewrite agentd's policy and audit files and send agentd every catchable signal. Every attempt
// fails; it started with only descriptors 0-2; afterwards agentd runs on with the same policy
// generation and the denied server is still refused. Then it kills agentd, and the guest is
// left with no way out at all.
func TestConfinedWorkload(t *testing.T) {
	tp := nettest.New(t)
	up := "agup" + tp.ID
	nettest.Run(t, "ip", "link", "add", up+"p", "type", "veth", "peer", "name", up)
	nettest.Run(t, "ip", "link", "set", up, "netns", tp.Name)
	nettest.Run(t, "ip", "addr", "add", "203.0.113.1/24", "dev", up+"p")
	nettest.Run(t, "ip", "addr", "add", "203.0.113.3/24", "dev", up+"p")
	nettest.Run(t, "ip", "link", "set", up+"p", "up")
	nettest.Run(t, "ip", "-n", tp.Name, "addr", "add", "203.0.113.2/24", "dev", up)
	nettest.Run(t, "ip", "-n", tp.Name, "link", "set", up, "up")
	nettest.Run(t, "ip", "-n", tp.Name, "route", "add", "default", "via", "203.0.113.1")
	allowed := httpServer(t, "203.0.113.1:0", "allowed")
	denied := httpServer(t, "203.0.113.3:0", "denied")
	dns := nettest.DNSServer(t, netip.MustParseAddr("203.0.113.1"), nil)
	dir := t.TempDir()
	pol := filepath.Join(dir, "policy.json")
	os.WriteFile(pol, []byte(`{"default_egress": "deny", "rules": [{"id": "web", "destination": {"cidr": "203.0.113.1/32"}, "protocols": ["tcp"], "action": "allow"}]}`), 0o600)
	audit := filepath.Join(dir, "audit.jsonl")
	tp.UseResolver(t, egress.DefaultGuestNet.ResolvConf())
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
	refused := func(when string) {
		t.Helper()
		if out, code := run("curl -sS --max-time 5 http://" + denied + "/"); code != 7 {
			t.Fatalf("%s: the denied server: exit %d %s", when, code, out)
		}
		if out, code := run("curl -sS --max-time 5 http://" + allowed + "/"); code != 0 || out != "allowed" {
			t.Fatalf("%s: the allowed server: exit %d %q", when, code, out)
		}
	}
	refused("before")
	out, _ := run("exec ls -l /proc/self/fd")
	var fds []string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[len(f)-2] == "->" && !strings.HasSuffix(f[len(f)-1], "/fd") { // not ls's own listing
			fds = append(fds, f[len(f)-3])
		}
	}
	if strings.Join(fds, ",") != "0,1,2" {
		t.Fatalf("a workload starts with descriptors %v, want 0, 1 and 2:\n%s", fds, out)
	}
	res := attackResults(t, a.c, a.pid(), "-rewrite", pol+","+audit, "-signals")
	if h := holes(res); len(h) > 0 {
		t.Fatalf("attempts that worked: %v\nall: %v", h, res)
	}
	t.Logf("attempts and what they got: %v", res)
	if b, _ := os.ReadFile(pol); !strings.Contains(string(b), `"deny"`) {
		t.Fatalf("agentd's policy file changed: %s", b)
	}
	time.Sleep(100 * time.Millisecond) // the signals: nothing to await, the point is nothing happens
	if a.cmd.ProcessState != nil {
		t.Fatal("agentd died of the signals")
	}
	st, err := a.c.Policy(ctx(t))
	if err != nil || st.Generation != 1 {
		t.Fatalf("policy after the attacks: %+v %v", st, err)
	}
	refused("after the attacks")

	// Kill it: the workload can (root may signal root), and the guest fails closed.
	a.killed = true
	a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "kill -9 " + itoa(a.pid()) + "; sleep 5"}}, nil)
	if err := a.wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("agentd after kill -9 from the workload: %v", err)
	}
	ifs, _ := tp.Cmd("ls", "/sys/class/net").CombinedOutput()
	if strings.Join(strings.Fields(string(ifs)), ",") != "lo" {
		t.Fatalf("after agentd died, the guest has interfaces %q", ifs)
	}
	if out, err := tp.Cmd("curl", "-sS", "--max-time", "3", "http://"+denied+"/").CombinedOutput(); err == nil {
		t.Fatalf("after agentd died, the denied server answers: %s", out)
	}
	if out, err := tp.Cmd("curl", "-sS", "--max-time", "3", "http://"+allowed+"/").CombinedOutput(); err == nil {
		t.Fatalf("after agentd died, the guest still gets out: %s", out)
	}
}

// TestRestrictedWorkload: MSB_SECURITY_PROFILE=restricted confines workloads the same way
// without egress.
func TestRestrictedWorkload(t *testing.T) {
	t.Setenv("MSB_SECURITY_PROFILE", "restricted")
	a := startAgentd(t, "socket", host.Options{})
	res := attackResults(t, a.c, a.pid(), "-signals")
	if h := holes(res); len(h) > 0 {
		t.Fatalf("attempts that worked: %v\nall: %v", h, res)
	}
	time.Sleep(100 * time.Millisecond)
	if err := a.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatal("agentd died of the signals")
	}
	if _, _, code, err := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "true"}, nil); err != nil || code != 0 {
		t.Fatalf("agentd after the attacks: %d %v", code, err)
	}
}

// TestVMConfined: the hostile root workload in a real VM with egress on, where the kernel
// matters (modules, I/O ports, /dev/mem): against agentd as PID 1, and against the agent child
// after a handoff, whose init (and so its whole tree) runs confined too.
func TestVMConfined(t *testing.T) {
	needVM(t)
	egressArgs := "MSB_NET=iface=eth0,mac=52:54:00:12:34:56,mtu=1500 MSB_NET_IPV4=addr=10.0.2.15/24,gw=10.0.2.2,dns=10.0.2.3 " +
		"AGENTD_EGRESS=netstack AGENTD_EGRESS_POLICY=/etc/agentd/egress.json"
	denied := httpServer(t, "127.0.0.1:0", "denied")
	check := func(t *testing.T, c *host.Client, res map[string]string) {
		t.Helper()
		if h := holes(res); len(h) > 0 {
			t.Fatalf("attempts that worked: %v\nall: %v", h, res)
		}
		for _, k := range []string{"finit_module", "iopl", "/dev/mem"} {
			if res[k] == "" {
				t.Errorf("%s was not tried", k)
			}
		}
		// The host sets a deny-all policy; the workload's tampering changed nothing before it.
		if st, err := c.SetPolicy(ctx(t), []byte(`{"default_egress": "deny"}`)); err != nil || st.Generation != 2 {
			t.Fatalf("set policy after the attacks: %+v %v", st, err)
		}
		out, _, code, err := c.Run(ctx(t), protocol.ExecRequest{Cmd: "wget", Args: []string{"-q", "-O", "-", "http://10.0.2.2:" + itoa(int(mustPort(t, denied))) + "/"}}, nil)
		if err != nil || code == 0 {
			t.Fatalf("the denied server after the attacks: %d %q %v", code, out, err)
		}
	}
	t.Run("pid 1", func(t *testing.T) {
		c, v := bootVM(t, egressArgs)
		res := runAttack(t, c, pushAttack(t, c), "-pid", "1", "-rewrite", "/etc/agentd/egress.json", "-signals")
		t.Logf("%v", res)
		check(t, c, res)
		shutdownVM(t, c, v, 10*time.Second)
	})
	t.Run("handoff", func(t *testing.T) {
		// The image's init reports, on the console, what the guest can reach once a workload
		// has killed the agent (it cannot be asked through the agent any more).
		allowedPort := itoa(int(mustPort(t, denied)))
		img := rootImage(t, map[string]string{"sbin/testinit": `#!/bin/sh
trap 'sync; poweroff -f' 38 15
while [ ! -e /tmp/agent-killed ]; do sleep 0.1; done
sleep 2
echo "AFTER: net=$(ls /sys/class/net | tr '\n' ' ') route=$(ip route | tr '\n' ' ')" > /dev/console
wget -q -O - http://10.0.2.2:` + allowedPort + `/ > /dev/null 2>&1; echo "AFTER: wget=$?" > /dev/console
while :; do sleep 0.1; done
`})
		c, v := bootVM(t, egressArgs+" MSB_BLOCK_ROOT=kind=disk-image,device=/dev/vda,fstype=ext4 MSB_HANDOFF_INIT=/sbin/testinit",
			vm.Disk{Path: img, Serial: "root"})
		res := runAttack(t, c, pushAttack(t, c), "-name", "agentd-handoff-agent", "-rewrite", "/etc/agentd/egress.json", "-signals")
		t.Logf("%v", res)
		if res["pid"] == "0" {
			t.Fatal("the agent child was not found")
		}
		check(t, c, res)
		out, _, _, err := c.Run(ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/1/status"}}, nil)
		if err != nil || !strings.Contains(string(out), "NoNewPrivs:\t1") || !strings.Contains(string(out), "Seccomp:\t2") ||
			!strings.Contains(string(out), "CapBnd:\t"+keptMask()) {
			t.Fatalf("the handed-off init is not confined: %q %v", out, err)
		}
		// Kill the agent: the guest must be left with no way out (the tun goes with agentd,
		// and the pinned uplink namespace keeps eth0 out of the guest's view).
		// The agent's end of the channel goes with it; the host's end sees nothing, so this
		// session's answer never comes: a short deadline.
		kctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c.Run(kctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "touch /tmp/agent-killed; kill -9 " + res["pid"]}}, nil)
		cancel()
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(v.Console(), "AFTER: wget=") && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond) // the init's report on the console; no event to await
		}
		con := v.Console()
		after := con[strings.Index(con, "AFTER: net="):]
		if !strings.Contains(after, "net=lo ") || strings.Contains(after, "eth0") || !strings.Contains(after, "wget=") || strings.Contains(after, "wget=0") {
			t.Fatalf("after the agent died the guest has: %s", after)
		}
		t.Logf("after the agent died: %q", after)
	})
}

// keptMask is the bounding set of a confined workload, as /proc/PID/status prints it.
func keptMask() string {
	var m uint64
	for _, c := range confine.Kept {
		m |= 1 << c.Num
	}
	return fmt.Sprintf("%016x", m)
}
