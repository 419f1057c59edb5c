package e2e

import (
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
)

// bg is a long-running command (make vm, make run) in a process group of its own, as a
// terminal runs a foreground job: interrupt sends SIGINT to the whole group, as Ctrl-C does.
type bg struct {
	name string
	cmd  *exec.Cmd
	out  *testutil.Buffer
	done chan struct{}
	err  error
}

// startBG starts argv in dir with extra environment; the test's end stops it (SIGTERM to the
// group, then SIGKILL) if it is still running.
func startBG(t *testing.T, name, dir string, env []string, argv ...string) *bg {
	t.Helper()
	b := &bg{name: name, cmd: exec.Command(argv[0], argv[1:]...), out: &testutil.Buffer{}, done: make(chan struct{})}
	b.cmd.Dir, b.cmd.Env = dir, append(os.Environ(), env...)
	b.cmd.Stdout, b.cmd.Stderr = b.out, b.out
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.err = b.cmd.Wait(); close(b.done) }()
	t.Cleanup(func() {
		if b.running() {
			syscall.Kill(-b.cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-b.done:
			case <-time.After(20 * time.Second):
				syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
				<-b.done
			}
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", b.name, tail(b.out.String(), 6000))
		}
	})
	return b
}

func (b *bg) running() bool {
	select {
	case <-b.done:
		return false
	default:
		return true
	}
}

// waitFor waits until the output contains s (fails if the command ends first or after limit).
func (b *bg) waitFor(t *testing.T, s string, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !strings.Contains(b.out.String(), s) {
		if !b.running() {
			t.Fatalf("%s ended (%v) before printing %q:\n%s", b.name, b.err, s, tail(b.out.String(), 4000))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not print %q within %v:\n%s", b.name, s, limit, tail(b.out.String(), 4000))
		}
		time.Sleep(50 * time.Millisecond) // output arrives from another process: polled
	}
}

// waitForRE waits until the output matches re and returns the match.
func (b *bg) waitForRE(t *testing.T, re *regexp.Regexp, limit time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if m := re.FindStringSubmatch(b.out.String()); m != nil {
			return m
		}
		if !b.running() {
			t.Fatalf("%s ended (%v) before printing %v:\n%s", b.name, b.err, re, tail(b.out.String(), 4000))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not print %v within %v:\n%s", b.name, re, limit, tail(b.out.String(), 4000))
		}
		time.Sleep(50 * time.Millisecond) // output arrives from another process: polled
	}
}

// interrupt is Ctrl-C in the command's terminal: SIGINT to its process group (SIGTERM when
// this test process was started with SIGINT ignored, which its children would inherit and
// could not trap). It waits for the command to end.
func (b *bg) interrupt(t *testing.T, limit time.Duration) {
	t.Helper()
	sig := syscall.SIGINT
	if signal.Ignored(syscall.SIGINT) {
		sig = syscall.SIGTERM
	}
	syscall.Kill(-b.cmd.Process.Pid, sig)
	select {
	case <-b.done:
	case <-time.After(limit):
		t.Fatalf("%s still running %v after %v:\n%s", b.name, limit, sig, tail(b.out.String(), 4000))
	}
}

// killPidFile kills the process whose id is in file, if it still runs (a qemu that a failed
// test left behind in a session of its own).
func killPidFile(file string) {
	b, err := os.ReadFile(file)
	if err != nil {
		return
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// repoRoot is the module root (the e2e tests run in e2e/).
func repoRoot(t *testing.T) string {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}
