// Package e2e drives the real agentd and agentctl binaries through the host client: over a
// unix socket and over a pty, against real TCP servers on loopback.
package e2e

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "agentd-e2e")
	if err != nil {
		panic(err)
	}
	binDir = dir
	for _, cmd := range []string{"agentd", "agentctl"} {
		build := exec.Command("go", "build", "-o", filepath.Join(dir, cmd), "../cmd/"+cmd)
		build.Env = append(os.Environ(), "CGO_ENABLED=0") // static: agentd also runs as a VM's /init
		build.Stderr = os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", cmd, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// agentd is a running agentd --standalone process and a client on its channel.
type agentd struct {
	cmd  *exec.Cmd
	c    *host.Client
	log  *testutil.Buffer
	wait func() error // cmd.Wait, once
	// killed says the test had agentd killed: its exit is expected, not a failure.
	killed bool
}

func (a *agentd) pid() int { return a.cmd.Process.Pid }

// startAgentd starts agentd on a channel of the given kind ("socket" or "pty") and performs
// the host handshake with the given client options.
func startAgentd(t *testing.T, kind string, opts host.Options, args ...string) *agentd {
	t.Helper()
	return startAgentdWrapped(t, nil, kind, opts, args...)
}

// startAgentdWrapped is startAgentd with agentd run under a wrapper command (such as
// "ip netns exec NAME").
func startAgentdWrapped(t *testing.T, wrap []string, kind string, opts host.Options, args ...string) *agentd {
	t.Helper()
	var (
		hostEnd io.ReadWriteCloser
		port    string
		extra   func()
	)
	switch kind {
	case "socket":
		sock := filepath.Join(t.TempDir(), "chan.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		port = "unix:" + sock
		extra = func() {
			c, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			hostEnd = c
		}
	case "pty":
		master, slave, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		port = slave.Name()
		if hostEnd, err = channel.Pollable(master); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { slave.Close() })
	default:
		t.Fatalf("unknown channel kind %q", kind)
	}
	a := &agentd{log: &testutil.Buffer{}}
	a.wait = sync.OnceValue(func() error { return a.cmd.Wait() })
	argv := append(append(wrap, filepath.Join(binDir, "agentd"), "--standalone", "--port", port), args...)
	a.cmd = exec.Command(argv[0], argv[1:]...)
	a.cmd.Stderr = a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if extra != nil {
		extra()
	}
	if opts.Log == nil {
		opts.Log = quiet
	}
	opts.HandshakeTimeout = 20 * time.Second
	c, err := host.Direct(hostEnd, opts)
	if err != nil {
		a.cmd.Process.Kill()
		a.cmd.Wait()
		t.Fatalf("handshake: %v\nagentd log:\n%s", err, a.log)
	}
	a.c = c
	t.Cleanup(func() {
		c.Close()
		done := make(chan error, 1)
		go func() { done <- a.wait() }()
		select {
		case err := <-done:
			if err != nil && !a.killed {
				t.Errorf("agentd exited with %v\n%s", err, a.log)
			}
		case <-time.After(10 * time.Second):
			a.cmd.Process.Kill()
			<-done
			t.Errorf("agentd did not exit after the host closed the channel\n%s", a.log)
		}
		if t.Failed() {
			t.Logf("agentd log:\n%s", tail(a.log.String(), 4000))
		}
	})
	return a
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// fds counts a process's open file descriptors.
func fds(t *testing.T, pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// threadsAndFDs describes a process for leak messages.
func procSummary(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var keep []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS") || strings.HasPrefix(l, "Threads") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, ", ")
}
