package e2e

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/creack/pty"

	"github.com/agentd/agentd/internal/testkit/testutil"
)

// relayed starts agentd behind agentctl serve and returns the relay socket.
func relayed(t *testing.T) string {
	sock, _, _ := relayedWith(t)
	return sock
}

// relayedWith is relayed with extra agentd flags; it also returns the agentd process and log.
func relayedWith(t *testing.T, agentdArgs ...string) (string, *exec.Cmd, *testutil.Buffer) {
	return relayedServeArgs(t, nil, agentdArgs...)
}

// relayedServeArgs is relayedWith with extra arguments for agentctl serve.
func relayedServeArgs(t *testing.T, serveArgs []string, agentdArgs ...string) (string, *exec.Cmd, *testutil.Buffer) {
	dir := t.TempDir()
	chanSock, relaySock := filepath.Join(dir, "chan.sock"), filepath.Join(dir, "relay.sock")
	serveLog, agentLog := &testutil.Buffer{}, &testutil.Buffer{}
	serve := exec.Command(filepath.Join(binDir, "agentctl"), append([]string{"serve", "--port", "unix-listen:" + chanSock, "--listen", relaySock}, serveArgs...)...)
	serve.Stderr = serveLog
	startProc(t, serve, serveLog)
	waitPath(t, chanSock)
	ad := exec.Command(filepath.Join(binDir, "agentd"), append([]string{"--standalone", "--port", "unix:" + chanSock}, agentdArgs...)...)
	ad.Stderr = agentLog
	startProc(t, ad, agentLog)
	waitLog(t, serveLog, "serving clients")
	return relaySock, ad, agentLog
}

// agentctl runs one agentctl command against the relay.
func agentctl(t *testing.T, sock string, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "agentctl"), args[0])
	cmd.Args = append(cmd.Args, "--connect", sock)
	cmd.Args = append(cmd.Args, args[1:]...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func TestAgentctlExec(t *testing.T) {
	sock := relayed(t)
	if out, _, code := agentctl(t, sock, "", "exec", "--", "echo", "hello"); out != "hello\n" || code != 0 {
		t.Fatalf("echo: %q %d", out, code)
	}
	if out, _, code := agentctl(t, sock, "line one\nline two\n", "exec", "--", "cat"); out != "line one\nline two\n" || code != 0 {
		t.Fatalf("cat with stdin: %q %d", out, code)
	}
	if _, _, code := agentctl(t, sock, "", "exec", "--", "sh", "-c", "exit 7"); code != 7 {
		t.Fatalf("exit code %d, want 7", code)
	}
	if _, errOut, code := agentctl(t, sock, "", "exec", "--", "/no/such/program"); code != 127 || !strings.Contains(errOut, "not_found") {
		t.Fatalf("missing program: %q %d", errOut, code)
	}
	if out, _, _ := agentctl(t, sock, "", "exec", "-u", "nobody", "-w", "/tmp", "-e", "GREETING=hi", "--", "sh", "-c", "echo $(id -un) $PWD $GREETING"); out != "nobody /tmp hi\n" {
		t.Fatalf("user, cwd, env: %q", out)
	}
	// SIGTERM to agentctl is forwarded to the program; a signal death exits 255.
	sleeper := exec.Command(filepath.Join(binDir, "agentctl"), "exec", "--connect", sock, "--", "sh", "-c", "echo ready; exec sleep 60")
	stdout, _ := sleeper.StdoutPipe()
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 6)
	if _, err := io.ReadFull(stdout, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("sleeper: %q %v", line, err)
	}
	sleeper.Process.Signal(syscall.SIGTERM)
	if err := sleeper.Wait(); err == nil || sleeper.ProcessState.ExitCode() != 255 {
		t.Fatalf("after SIGTERM: %v (exit %d)", err, sleeper.ProcessState.ExitCode())
	}
	// -t under a real local terminal: the remote PTY takes our size, and EOF (^D) ends cat.
	cmd := exec.Command(filepath.Join(binDir, "agentctl"), "exec", "--connect", sock, "-t", "--", "sh", "-c", "stty size; cat")
	tty, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 31, Cols: 97})
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	got := &watchBuffer{want: "31 97", seen: make(chan struct{})}
	copied := make(chan struct{})
	go func() { io.Copy(got, tty); close(copied) }() // until agentctl exits and the pty hangs up
	// Type only once the remote size is printed: by then agentctl has put this terminal in raw
	// mode (a ^D typed before that is an EOF marker the mode switch would drop).
	select {
	case <-got.seen:
	case <-copied:
		t.Fatalf("agentctl -t ended early: %q", got.String())
	}
	tty.Write([]byte("typed\n\x04"))
	<-copied
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agentctl -t: %v\n%s", err, got.String())
	}
	if !strings.Contains(got.String(), "31 97") || strings.Count(got.String(), "typed") < 2 {
		t.Fatalf("agentctl -t output %q", got.String())
	}
}

func TestAgentctlFs(t *testing.T) {
	sock := relayed(t)
	dir := t.TempDir()
	guest := filepath.Join(dir, "guest")
	local := filepath.Join(dir, "local.bin")
	data := bytes.Repeat([]byte("agentd fs "), 500_000)
	os.WriteFile(local, data, 0o640)
	for _, c := range [][]string{
		{"fs", "mkdir", "--mode", "0750", guest + "/sub"},
		{"fs", "put", local, guest + "/sub/file"},
		{"fs", "mv", guest + "/sub/file", guest + "/sub/renamed"},
		{"fs", "get", guest + "/sub/renamed", dir + "/back.bin"},
	} {
		if _, errOut, code := agentctl(t, sock, "", c...); code != 0 {
			t.Fatalf("%v: %d %s", c, code, errOut)
		}
	}
	if back, _ := os.ReadFile(dir + "/back.bin"); !bytes.Equal(back, data) {
		t.Fatal("put then get changed the bytes")
	}
	if st, _ := os.Stat(guest + "/sub"); st.Mode().Perm() != 0o750 {
		t.Fatalf("mkdir --mode: %v", st.Mode())
	}
	if out, _, _ := agentctl(t, sock, "", "fs", "ls", guest+"/sub"); !strings.Contains(out, "rw-r-----") || !strings.Contains(out, "renamed") {
		t.Fatalf("ls: %q", out)
	}
	if out, _, _ := agentctl(t, sock, "", "fs", "stat", guest+"/sub/renamed"); !strings.Contains(out, `"Size": 5000000`) && !strings.Contains(out, `"size"`) {
		t.Fatalf("stat: %q", out)
	}
	if out, _, _ := agentctl(t, sock, "", "fs", "cat", "/etc/hostname"); strings.TrimSpace(out) == "" {
		t.Fatal("cat printed nothing")
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "rm", guest+"/sub"); code == 0 || !strings.Contains(errOut, "Directory not empty") {
		t.Fatalf("rm of a non-empty dir without -r: %d %q", code, errOut)
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "rm", "-r", guest); code != 0 {
		t.Fatalf("rm -r: %d %s", code, errOut)
	}
	if _, err := os.Stat(guest); !os.IsNotExist(err) {
		t.Fatal("rm -r left the tree")
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "stat", guest); code != 1 || !strings.Contains(errOut, "No such file or directory (os error 2)") {
		t.Fatalf("stat of a missing path: %d %q", code, errOut)
	}
}

// watchBuffer collects output and closes seen once want appears in it.
type watchBuffer struct {
	mu   sync.Mutex
	b    bytes.Buffer
	want string
	seen chan struct{}
	done bool
}

func (w *watchBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b.Write(p)
	if !w.done && strings.Contains(w.b.String(), w.want) {
		w.done = true
		close(w.seen)
	}
	return len(p), nil
}

func (w *watchBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
