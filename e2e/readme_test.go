package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
)

// A README step: a ```sh block (run in one shell, in order, as written) or a directive from
// an HTML comment, <!-- readme-test: ... -->, that says how the next block runs or what a
// reader does between blocks:
//
//	background NAME ready="TEXT"   the next block runs on its own, as in another terminal
//	                               (make vm): wait until it prints TEXT, then go on
//	stdin "TEXT"                   the next block's stdin (what a reader would type)
//	skip (REASON)                  the next block is not run (make test itself)
//	interrupt NAME                 Ctrl-C in NAME's terminal
//	wait-exit NAME                 NAME ends by itself (make vm after agentctl shutdown)
type readmeStep struct {
	line             int
	block            string // a ```sh block's text
	directive, name  string
	arg              string // ready text, stdin
	background, skip bool
}

var (
	directiveRE = regexp.MustCompile(`^<!-- readme-test: (\S+)(?: (.*?))? -->$`)
	quotedRE    = regexp.MustCompile(`"((?:[^"\\]|\\.)*)"`)
)

// readmeSteps parses the README into steps; directives that shape a block are folded into it.
func readmeSteps(t *testing.T, text string) []readmeStep {
	lines := strings.Split(text, "\n")
	var steps []readmeStep
	var pending *readmeStep // a directive waiting for its block
	unquote := func(s string) string {
		m := quotedRE.FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("README directive without a quoted argument: %q", s)
		}
		v, err := strconv.Unquote(`"` + m[1] + `"`)
		if err != nil {
			t.Fatalf("README directive %q: %v", s, err)
		}
		return v
	}
	for i := 0; i < len(lines); i++ {
		l := strings.TrimSpace(lines[i])
		if m := directiveRE.FindStringSubmatch(l); m != nil {
			st := readmeStep{line: i + 1, directive: m[1]}
			args := m[2]
			switch m[1] {
			case "background":
				st.name, _, _ = strings.Cut(args, " ")
				st.arg, st.background = unquote(args), true
				pending = &st
			case "stdin":
				st.arg = unquote(args)
				pending = &st
			case "skip":
				st.skip = true
				pending = &st
			case "interrupt", "wait-exit":
				st.name = strings.TrimSpace(args)
				steps = append(steps, st)
			default:
				t.Fatalf("README line %d: unknown directive %q", i+1, m[1])
			}
			continue
		}
		if l == "```sh" {
			var b []string
			start := i + 1
			for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
				b = append(b, lines[i])
			}
			st := readmeStep{line: start}
			if pending != nil {
				st = *pending
				st.line = start
				pending = nil
			}
			st.block = strings.Join(b, "\n")
			steps = append(steps, st)
		}
	}
	if pending != nil {
		t.Fatalf("README line %d: directive %q has no block after it", pending.line, pending.directive)
	}
	return steps
}

// TestREADME runs every command block of README.md, in order, as written: foreground blocks in
// one bash (so a variable or a background job of one block is there in the next, as in a
// reader's terminal), under set -euo pipefail; make vm and the like as in another terminal. A
// block that fails, or hangs for 5 minutes, fails the test with the output so far.
func TestREADME(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the README's examples need root (network namespaces)")
	}
	needVM(t)
	// The examples use fixed names and ports (netns agentd-up, port 8080): one README run on
	// this machine at a time.
	unlock := readmeLock(t)
	defer unlock()
	root := repoRoot(t)
	text, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	steps := readmeSteps(t, string(text))
	// The reader's own machine state stays out of it: the context file and make vm's runs.
	env := []string{"XDG_CONFIG_HOME=" + t.TempDir(), "AGENTD_VM_RUNS=" + t.TempDir(), "AGENTCTL_CONNECT="}
	sh := startShell(t, root, env)
	bgs := map[string]*bg{}
	ran := 0
	for _, st := range steps {
		switch {
		case st.skip:
			t.Logf("README:%d skipped: %s", st.line, firstLine(st.block))
		case st.background:
			t.Logf("README:%d in another terminal: %s", st.line, firstLine(st.block))
			b := startBG(t, st.name, root, env, "bash", "-euo", "pipefail", "-c", st.block)
			b.waitFor(t, st.arg, 5*time.Minute)
			bgs[st.name] = b
			ran++
		case st.directive == "interrupt" || st.directive == "wait-exit":
			b := bgs[st.name]
			if b == nil {
				t.Fatalf("README:%d: %s of %q, which is not running", st.line, st.directive, st.name)
			}
			if st.directive == "interrupt" {
				b.interrupt(t, time.Minute)
			} else {
				select {
				case <-b.done:
				case <-time.After(time.Minute):
					t.Fatalf("README:%d: %s did not end:\n%s", st.line, st.name, tail(b.out.String(), 4000))
				}
				if b.err != nil {
					t.Fatalf("README:%d: %s ended with %v:\n%s", st.line, st.name, b.err, tail(b.out.String(), 4000))
				}
			}
		default:
			t.Logf("README:%d: %s", st.line, firstLine(st.block))
			sh.run(t, st, 5*time.Minute)
			ran++
		}
	}
	if ran < 10 {
		t.Fatalf("ran only %d README blocks", ran)
	}
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}

// shell is one bash that runs blocks sent to it, as a reader's terminal would.
type shell struct {
	cmd  *exec.Cmd
	in   *os.File
	out  *testutil.Buffer
	done chan struct{}
	err  error
	n    int
}

func startShell(t *testing.T, dir string, env []string) *shell {
	t.Helper()
	s := &shell{out: &testutil.Buffer{}, done: make(chan struct{})}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command("bash", "--noprofile", "--norc", "-euo", "pipefail")
	s.cmd.Dir, s.cmd.Env = dir, append(os.Environ(), env...)
	// Files, not writers: Wait must not wait for background jobs that keep the output open.
	s.cmd.Stdin, s.cmd.Stdout, s.cmd.Stderr = r, outW, outW
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	outW.Close()
	s.in = w
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := outR.Read(buf)
			s.out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.in.Close() // the shell ends at EOF
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
		}
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) // and what it left running
		outR.Close()
		if t.Failed() || testing.Verbose() {
			t.Logf("README shell output:\n%s", tail(s.out.String(), 16000))
		}
	})
	return s
}

// run sends one block and waits for its end marker (the shell exits on the first failing
// command, under set -e).
func (s *shell) run(t *testing.T, st readmeStep, limit time.Duration) {
	t.Helper()
	s.n++
	marker := fmt.Sprintf("@@readme-block-%d-done@@", s.n)
	stdin := "</dev/null"
	if st.arg != "" {
		stdin = "<<'README_STDIN'\n" + st.arg + "\nREADME_STDIN"
	}
	fmt.Fprintf(s.in, "echo '--- README:%d'\n{\n%s\n} %s\necho '%s'\n", st.line, st.block, stdin, marker)
	deadline := time.Now().Add(limit)
	for !strings.Contains(s.out.String(), marker+"\n") {
		select {
		case <-s.done:
			t.Fatalf("README:%d failed (%v): %s\noutput:\n%s", st.line, s.err, firstLine(st.block), tail(s.out.String(), 6000))
		case <-time.After(20 * time.Millisecond): // output arrives from another process: polled
		}
		if time.Now().After(deadline) {
			t.Fatalf("README:%d did not finish within %v: %s\noutput:\n%s", st.line, limit, firstLine(st.block), tail(s.out.String(), 6000))
		}
	}
}

// TestFirstRun runs scripts/first-run.sh, which writes docs/first-run.md (a first session as a
// new user sees it, every command really run), into a scratch file: the transcript's script
// keeps working, so the committed transcript can always be made again.
func TestFirstRun(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("make vm's set-up check installs as root")
	}
	needVM(t)
	unlock := readmeLock(t) // the same ports as the README's examples
	defer unlock()
	out := filepath.Join(t.TempDir(), "first-run.md")
	cmd := exec.Command("scripts/first-run.sh", out)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "AGENTCTL_CONNECT=")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("first-run.sh: %v\n%s", err, b)
	}
	doc, _ := os.ReadFile(out)
	for _, want := range []string{
		"$ build/agentctl exec -it -- sh", "/ # stty size\n24 100\n", // a real terminal
		"$ build/agentctl fs put -r ", "echo same\nsame\n", // a tree in and out
		"hello from the guest",                      // the forward under deny-by-default
		`"direction":"ingress"`, `"verdict":"deny"`, // the audit
		"$ build/agentctl policy reload examples/make-vm.yaml", "hello from the host",
		"run-vm: the VM powered off",
	} {
		if !strings.Contains(string(doc), want) {
			t.Errorf("no %q in the transcript:\n%s", want, doc)
		}
	}
}

// readmeLock takes the machine-wide lock of the README's examples (fixed ports and namespace
// names: one run at a time); the returned func releases it.
func readmeLock(t *testing.T) func() {
	t.Helper()
	lock, err := os.OpenFile("/tmp/agentd-readme-test.lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	return func() { lock.Close() }
}
