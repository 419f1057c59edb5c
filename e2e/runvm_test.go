package e2e

import (
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startRunVM starts scripts/run-vm.sh (make vm's script) on the test's kernel and initramfs
// and waits until it says the VM is up; it returns the run and its directory.
func startRunVM(t *testing.T, name string, env []string) (*bg, string) {
	t.Helper()
	b := startBG(t, name, repoRoot(t), append(env, "BUILD="+binDir), "scripts/run-vm.sh")
	b.waitFor(t, "agentd is PID 1", 3*time.Minute)
	m := regexp.MustCompile(`its context is (\S+)/relay\.sock`).FindStringSubmatch(b.out.String())
	if m == nil { // as the script said it before it had contexts
		m = regexp.MustCompile(`(/\S+)/relay\.sock`).FindStringSubmatch(b.out.String())
	}
	if m == nil {
		t.Fatalf("%s printed no relay socket:\n%s", name, b.out.String())
	}
	t.Cleanup(func() { // after a failure: shut down in order, then make sure qemu is gone
		if b.running() {
			syscall.Kill(-b.cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-b.done:
			case <-time.After(20 * time.Second):
			}
		}
		killPidFile(filepath.Join(m[1], "qemu.pid"))
	})
	return b, m[1]
}

// TestRunVM: make vm's script, run twice at once, and the host tools against the VMs.
//   - Each run has its own directory and relay: the second no longer deletes the first's and
//     takes its sockets while the first VM runs on unreachable. agentctl's context names the
//     newest; Ctrl-C shuts a VM down cleanly and removes its sockets, the other keeps running.
//   - The VM's channel socket given as a relay is refused at once, naming qemu and the relay
//     socket to use (it used to wait 60 s, then say "use of closed network connection").
//   - Under examples/deny-by-default.yaml, agentctl forward to a server on the guest's
//     loopback works (decided as ingress; it used to be refused as egress), a request to the
//     host is denied, and the audit (its own virtio port, make vm-audit) says why; the
//     workload cannot write to that port.
func TestRunVM(t *testing.T) {
	needVM(t)
	env := []string{"AGENTD_VM_RUNS=" + t.TempDir(), "XDG_CONFIG_HOME=" + t.TempDir(), "AGENTCTL_CONNECT="}
	ctl := func(stdin string, args ...string) ctlResult { t.Helper(); return runCtl(t, env, stdin, args...) }
	vm1, run1 := startRunVM(t, "make vm (first)", env)
	vm2, run2 := startRunVM(t, "make vm (second)", env)
	if run1 == run2 {
		t.Fatalf("both runs use %s", run1)
	}
	if !strings.Contains(vm2.out.String(), "another VM is running too, in "+run1) {
		t.Errorf("the second run does not mention the first:\n%s", vm2.out.String())
	}
	for _, run := range []string{run1, run2} {
		if r := ctl("", "exec", "--connect", run+"/relay.sock", "hostname"); r.stdout != "agentd-vm\n" {
			t.Fatalf("VM of %s: %+v", run, r)
		}
	}
	if r := ctl("", "context"); !strings.HasPrefix(r.stdout, run2+"/relay.sock\t") {
		t.Fatalf("context after the second make vm: %q %q", r.stdout, r.stderr)
	}

	// The channel socket is not the relay: named at once.
	r := ctl("", "exec", "--connect", run1+"/agent.sock", "true")
	if r.code != 1 || r.took > 5*time.Second || !strings.Contains(r.stderr, "is a VM's agent channel (qemu") ||
		!strings.Contains(r.stderr, "--connect "+run1+"/relay.sock") {
		t.Fatalf("the VM's channel as a relay: exit %d after %v: %q", r.code, r.took, r.stderr)
	}

	// Deny by default, through the context (the newest VM). The reload is asynchronous: wait
	// until a request to this host (10.0.2.2 is its loopback) is refused.
	hostSrv := httpServer(t, "127.0.0.1:0", "from the host")
	hostURL := "http://10.0.2.2:" + hostSrv[strings.LastIndex(hostSrv, ":")+1:] + "/"
	if r := ctl("", "policy", "reload", filepath.Join(repoRoot(t), "examples/deny-by-default.yaml")); r.code != 0 {
		t.Fatalf("policy reload: %+v", r)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		r := ctl("", "exec", "wget", "-q", "-O", "-", hostURL)
		if r.code != 0 && strings.Contains(r.stderr, "refused") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the host server still answers under deny-by-default: %+v", r)
		}
	}
	port := freePort(t)
	if r := ctl("", "exec", "sh", "-c", "mkdir -p /www && echo hello-from-guest > /www/index.html && httpd -p 127.0.0.1:"+port+" -h /www"); r.code != 0 {
		t.Fatalf("httpd in the guest: %+v", r)
	}
	fwd := startBG(t, "agentctl forward", repoRoot(t), env, filepath.Join(binDir, "agentctl"), "forward", port)
	fwd.waitFor(t, "forwarding 127.0.0.1:"+port+" -> guest 127.0.0.1:"+port, 20*time.Second)
	var body string
	for deadline := time.Now().Add(20 * time.Second); ; {
		resp, err := http.Get("http://127.0.0.1:" + port + "/")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if body = string(b); body == "hello-from-guest\n" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("forward into the guest under deny-by-default: %q %v\nforward: %s", body, err, fwd.out.String())
		}
		time.Sleep(50 * time.Millisecond) // httpd binds in the background
	}
	fwd.interrupt(t, 10*time.Second)
	audit := startBG(t, "make vm-audit", repoRoot(t), env, "scripts/run-vm.sh", "audit")
	audit.waitFor(t, `"direction":"ingress","via":"core.tcp","peer":"10.87.0.1","dst":"127.0.0.1:`+port+`","rule":"default","verdict":"allow"`, 20*time.Second)
	audit.waitFor(t, `"dst":"10.0.2.2:`+hostSrv[strings.LastIndex(hostSrv, ":")+1:]+`","rule":"default","verdict":"deny","reason":"no rule matched"`, 20*time.Second)
	audit.interrupt(t, 10*time.Second)
	// The audit comes on a port agentd holds: a workload (root in the guest) cannot open it to
	// forge records, and what it writes to the console does not reach the audit log.
	r = ctl("", "exec", "sh", "-c", `echo '{"time":"forged"}' > /dev/console; for p in /sys/class/virtio-ports/*; do `+
		`if [ "$(cat $p/name)" = agentd-audit ]; then echo '{"time":"forged"}' > /dev/${p##*/}; exit; fi; done; echo no port; exit 3`)
	if r.code != 1 || !strings.Contains(r.stderr, "Device or resource busy") {
		t.Errorf("a workload writing to the audit port: %+v", r)
	}
	if b, _ := os.ReadFile(filepath.Join(run2, "audit.log")); strings.Contains(string(b), "forged") || !strings.Contains(string(b), `"verdict":"deny"`) {
		t.Errorf("audit.log:\n%s", b)
	}

	// Ctrl-C the first: it powers off and cleans up; the second runs on.
	vm1.interrupt(t, 30*time.Second)
	for _, f := range []string{"agent.sock", "relay.sock", "qemu.pid"} {
		if _, err := os.Stat(filepath.Join(run1, f)); err == nil {
			t.Errorf("%s left after Ctrl-C", f)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(run1, "console.log")); !strings.Contains(string(b), "reboot: Power down") {
		t.Errorf("the first VM did not power off cleanly:\n%s", tail(string(b), 2000))
	}
	if r := ctl("", "exec", "echo", "still here"); r.stdout != "still here\n" {
		t.Fatalf("the second VM after the first stopped: %+v", r)
	}
	vm2.interrupt(t, 30*time.Second)
	if r := ctl("", "context"); r.code == 0 {
		t.Errorf("context still set after both VMs stopped: %q", r.stdout)
	}
	if _, err := os.Lstat(filepath.Join(filepath.Dir(run2), "current")); err == nil {
		t.Errorf("current still points somewhere after both VMs stopped")
	}
}

// freePort is a TCP port free on this host's loopback just now.
func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// TestMkinitramfsExplainsFailure: a failed kernel download shows apt's own message and says what
// to do (it used to exit 100 with nothing printed).
func TestMkinitramfsExplainsFailure(t *testing.T) {
	stubs, build := t.TempDir(), t.TempDir()
	for _, b := range []string{"agentd", "agentctl"} {
		os.Symlink(filepath.Join(binDir, b), filepath.Join(build, b))
	}
	os.WriteFile(filepath.Join(stubs, "apt-cache"), []byte("#!/bin/sh\necho linux-image-cloud-amd64\necho '  Depends: linux-image-9.9.9-cloud-amd64'\n"), 0o755)
	os.WriteFile(filepath.Join(stubs, "apt-get"), []byte("#!/bin/sh\necho 'E: Failed to fetch http://deb.example/linux-image-9.9.9.deb  404  Not Found' >&2\nexit 100\n"), 0o755)
	cmd := exec.Command(filepath.Join(repoRoot(t), "scripts/mkinitramfs.sh"), build)
	cmd.Env = append(os.Environ(), "PATH="+stubs+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("mkinitramfs succeeded without a kernel:\n%s", out)
	}
	for _, want := range []string{
		"fetching linux-image-9.9.9-cloud-amd64",                // progress before the wait
		"E: Failed to fetch http://deb.example/",                // apt's own message
		"apt-get download linux-image-9.9.9-cloud-amd64 failed", // what failed
		"apt-get update", // and what to do
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("no %q in:\n%s", want, out)
		}
	}
}
