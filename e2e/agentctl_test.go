package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/agentd/agentd/internal/testkit/nettest"
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

// ctlResult is one agentctl run.
type ctlResult struct {
	stdout, stderr string
	code           int
	took           time.Duration
}

// runCtl runs agentctl with args, stdin and extra environment, bounded by 30 s (a hang is a
// failure of the test, not of the run).
func runCtl(t *testing.T, env []string, stdin string, args ...string) ctlResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "agentctl"), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	start := time.Now()
	err := cmd.Run()
	r := ctlResult{o.String(), e.String(), 0, time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("agentctl %v hung (killed after 30 s): %s", args, r.stderr)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return r
}

// agentctl runs one agentctl command against the relay (--connect right after the command).
func agentctl(t *testing.T, sock string, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	r := runCtl(t, nil, stdin, append([]string{args[0], "--connect", sock}, args[1:]...)...)
	return r.stdout, r.stderr, r.code
}

func TestAgentctlExec(t *testing.T) {
	sock := relayed(t)
	if out, _, code := agentctl(t, sock, "", "exec", "--", "echo", "hello"); out != "hello\n" || code != 0 {
		t.Fatalf("echo: %q %d", out, code)
	}
	// -i attaches stdin; without it the program reads EOF, as with docker exec.
	if out, _, code := agentctl(t, sock, "line one\nline two\n", "exec", "-i", "--", "cat"); out != "line one\nline two\n" || code != 0 {
		t.Fatalf("cat with -i: %q %d", out, code)
	}
	if out, _, code := agentctl(t, sock, "not forwarded\n", "exec", "cat"); out != "" || code != 0 {
		t.Fatalf("cat without -i: %q %d", out, code)
	}
	if _, _, code := agentctl(t, sock, "", "exec", "--", "sh", "-c", "exit 7"); code != 7 {
		t.Fatalf("exit code %d, want 7", code)
	}
	if _, errOut, code := agentctl(t, sock, "", "exec", "--", "/no/such/program"); code != 127 || !strings.Contains(errOut, "guest: /no/such/program: command not found") {
		t.Fatalf("missing program: %q %d", errOut, code)
	}
	if out, _, _ := agentctl(t, sock, "", "exec", "-u", "nobody", "-w", "/tmp", "-e", "GREETING=hi", "sh", "-c", "echo $(id -un) $PWD $GREETING"); out != "nobody /tmp hi\n" {
		t.Fatalf("user, cwd, env (no --): %q", out)
	}
	// -it under a real local terminal: the remote PTY takes our size, and EOF (^D) ends cat.
	cmd := exec.Command(filepath.Join(binDir, "agentctl"), "exec", "--connect", sock, "-it", "--", "sh", "-c", "stty size; cat")
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
		t.Fatalf("agentctl -it ended early: %q", got.String())
	}
	tty.Write([]byte("typed\n\x04"))
	<-copied
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agentctl -it: %v\n%s", err, got.String())
	}
	if !strings.Contains(got.String(), "31 97") || strings.Count(got.String(), "typed") < 2 {
		t.Fatalf("agentctl -it output %q", got.String())
	}
}

// TestAgentctlExecStatus: exit status as docker and ssh give it. A program killed by signal N
// exits 128+N with a note naming the signal (was 255 for every signal); a missing working
// directory is named as such (was reported as the program not being found); an unknown user
// says so (was "other: exec session error: ...").
func TestAgentctlExecStatus(t *testing.T) {
	sock := relayed(t)
	for _, c := range []struct {
		args []string
		code int
		note string
	}{
		{[]string{"sh", "-c", "kill -TERM $$"}, 143, "guest: sh was killed by SIGTERM"},
		{[]string{"sh", "-c", "kill -KILL $$"}, 137, "guest: sh was killed by SIGKILL"},
		{[]string{"-w", "/nonexistent", "--", "ls"}, 126, "guest: working directory /nonexistent: No such file or directory"},
		{[]string{"-w", "/etc/hostname", "ls"}, 126, "guest: working directory /etc/hostname: Not a directory"},
		{[]string{"-u", "nosuchuser", "true"}, 126, "guest: user nosuchuser does not exist"},
	} {
		_, errOut, code := agentctl(t, sock, "", append([]string{"exec"}, c.args...)...)
		if code != c.code || !strings.Contains(errOut, c.note) || strings.Contains(errOut, "exec session error") ||
			strings.Contains(errOut, "command not found") {
			t.Errorf("exec %v: exit %d %q, want %d and %q", c.args, code, errOut, c.code, c.note)
		}
	}
	// SIGTERM to agentctl is passed to the program, which dies of it: 128+15.
	sleeper := exec.Command(filepath.Join(binDir, "agentctl"), "exec", "--connect", sock, "--", "sh", "-c", "echo ready; exec sleep 60")
	stdout, _ := sleeper.StdoutPipe()
	var errOut bytes.Buffer
	sleeper.Stderr = &errOut
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 6)
	if _, err := io.ReadFull(stdout, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("sleeper: %q %v", line, err)
	}
	sleeper.Process.Signal(syscall.SIGTERM)
	if err := sleeper.Wait(); err == nil || sleeper.ProcessState.ExitCode() != 143 || !strings.Contains(errOut.String(), "SIGTERM") {
		t.Fatalf("after SIGTERM: %v (exit %d) %q", err, sleeper.ProcessState.ExitCode(), errOut.String())
	}
}

// TestAgentctlExecTTYWithoutTerminal: -t with stdin that is not a terminal runs without a PTY
// and says so; the output is the program's once (a remote PTY fed from a pipe echoed every
// line back, so it came out twice).
func TestAgentctlExecTTYWithoutTerminal(t *testing.T) {
	sock := relayed(t)
	for _, flags := range [][]string{{"-it"}, {"-ti"}, {"-i", "-t"}} {
		out, errOut, code := agentctl(t, sock, "hello\n", append(append([]string{"exec"}, flags...), "--", "cat")...)
		if out != "hello\n" || code != 0 || !strings.Contains(errOut, "-t ignored: stdin is not a terminal") {
			t.Errorf("exec %v cat from a pipe: %q %q exit %d", flags, out, errOut, code)
		}
	}
	if out, _, _ := agentctl(t, sock, "", "exec", "-t", "--", "sh", "-c", "tty || true"); !strings.Contains(out, "not a tty") {
		t.Errorf("-t from a pipe still got a terminal: %q", out)
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
	if st, _ := os.Stat(dir + "/back.bin"); st.Mode().Perm() != 0o640 {
		t.Fatalf("get: mode %v, want the guest file's 0640", st.Mode())
	}
	if st, _ := os.Stat(guest + "/sub"); st.Mode().Perm() != 0o750 {
		t.Fatalf("mkdir --mode: %v", st.Mode())
	}
	// ls: ls -l style (type and mode, owner, size, time, name relative to the directory), sorted.
	os.WriteFile(guest+"/sub/a-first", []byte("x"), 0o600)
	os.Symlink("renamed", guest+"/sub/link")
	os.Mkdir(guest+"/sub/zdir", 0o755)
	out, _, _ := agentctl(t, sock, "", "fs", "ls", guest+"/sub")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	line := regexp.MustCompile(`^([-dlcbps][-rwxsStT]{9}) +\d+ +\d+ +(\d+) \d{4}-\d\d-\d\d \d\d:\d\d (.+)$`)
	var names []string
	for _, l := range lines {
		m := line.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("ls line %q is not ls -l style:\n%s", l, out)
		}
		names = append(names, m[3])
	}
	want := []string{"a-first", "link -> renamed", "renamed", "zdir"}
	if strings.Join(names, "|") != strings.Join(want, "|") || !sort.StringsAreSorted(names) {
		t.Fatalf("ls names %q, want %q", names, want)
	}
	if !strings.HasPrefix(lines[0], "-rw------- ") || !strings.HasPrefix(lines[1], "lrwxrwxrwx ") ||
		!strings.HasPrefix(lines[2], "-rw-r----- ") || !strings.Contains(lines[2], " 5000000 ") || !strings.HasPrefix(lines[3], "drwxr-xr-x ") {
		t.Fatalf("ls modes and sizes:\n%s", out)
	}
	// stat: octal mode and readable times; --json for scripts.
	out, _, _ = agentctl(t, sock, "", "fs", "stat", guest+"/sub/renamed")
	for _, w := range []string{"type: file", "size: 5000000", "mode: 0640 (-rw-r-----)", "modify: 20"} {
		if !strings.Contains(out, w) {
			t.Fatalf("stat: no %q in\n%s", w, out)
		}
	}
	out, _, _ = agentctl(t, sock, "", "fs", "stat", "--json", guest+"/sub/renamed")
	var st struct {
		Type, Mode, Modified string
		Size                 int
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Type != "file" || st.Mode != "0640" || st.Size != 5000000 {
		t.Fatalf("stat --json: %v %+v\n%s", err, st, out)
	}
	if _, err := time.Parse(time.RFC3339, st.Modified); err != nil {
		t.Fatalf("stat --json modified %q: %v", st.Modified, err)
	}
	if out, _, _ := agentctl(t, sock, "", "fs", "cat", "/etc/hostname"); strings.TrimSpace(out) == "" {
		t.Fatal("cat printed nothing")
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "rm", guest+"/sub"); code == 0 || !strings.Contains(errOut, "guest: "+guest+"/sub: Directory not empty") {
		t.Fatalf("rm of a non-empty dir without -r: %d %q", code, errOut)
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "rm", guest, "-r"); code != 0 { // a flag after the operand
		t.Fatalf("rm PATH -r: %d %s", code, errOut)
	}
	if _, err := os.Stat(guest); !os.IsNotExist(err) {
		t.Fatal("rm -r left the tree")
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "stat", guest); code != 1 || !strings.Contains(errOut, "guest: "+guest+": No such file or directory (os error 2)") {
		t.Fatalf("stat of a missing path: %d %q", code, errOut)
	}
}

// TestAgentctlFsGetKeepsLocal: a get that fails changes nothing here. It used to create (and
// so empty) the local file before the guest read began: get of a missing path or of a
// directory emptied an existing file and left empty files behind.
func TestAgentctlFsGetKeepsLocal(t *testing.T) {
	sock := relayed(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	os.WriteFile(existing, []byte("keep me\n"), 0o600)
	for _, src := range []string{"/nonexistent", "/etc", "/proc/self/mem"} {
		for _, dst := range []string{existing, filepath.Join(dir, "new")} {
			if _, errOut, code := agentctl(t, sock, "", "fs", "get", src, dst); code == 0 || !strings.Contains(errOut, "guest: "+src+": ") {
				t.Errorf("get %s %s: exit %d %q", src, dst, code, errOut)
			}
		}
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me\n" {
		t.Fatalf("a failed get changed the local file: %q", b)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("failed gets left files behind: %v", names)
	}
	// A get that succeeds replaces the file whole, keeping its mode; - is stdout.
	if _, errOut, code := agentctl(t, sock, "", "fs", "get", "/etc/hostname", existing); code != 0 {
		t.Fatal(errOut)
	}
	want, _ := os.ReadFile("/etc/hostname")
	if b, _ := os.ReadFile(existing); !bytes.Equal(b, want) {
		t.Fatalf("get: %q", b)
	}
	if st, _ := os.Stat(existing); st.Mode().Perm() != 0o600 {
		t.Fatalf("get over an existing file: mode %v, want its 0600", st.Mode())
	}
	if out, _, code := agentctl(t, sock, "", "fs", "get", "/etc/hostname", "-"); code != 0 || out != string(want) {
		t.Fatalf("get to stdout: %q %d", out, code)
	}
}

// TestAgentctlFsPutDirectory: put of a directory without -r is refused at once and touches
// nothing in the guest (it used to hang forever and leave an empty file); -r copies the tree,
// get -r copies it back; - is stdin.
func TestAgentctlFsPutDirectory(t *testing.T) {
	sock := relayed(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(src, "sub", "deeper"), 0o755)
	os.WriteFile(filepath.Join(src, "top.txt"), []byte("top\n"), 0o644)
	os.WriteFile(filepath.Join(src, "sub", "run.sh"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(src, "sub", "deeper", "big"), bytes.Repeat([]byte("x"), 3<<20), 0o600)
	os.Symlink("top.txt", filepath.Join(src, "link"))
	guestDir := filepath.Join(dir, "guest")
	os.Mkdir(guestDir, 0o755)

	r := runCtl(t, nil, "", "fs", "put", "--connect", sock, src, guestDir+"/copy")
	if r.code == 0 || !strings.Contains(r.stderr, "host: "+src+": is a directory (use put -r") || r.took > 5*time.Second {
		t.Fatalf("put of a directory without -r: exit %d after %v: %q", r.code, r.took, r.stderr)
	}
	if ents, _ := os.ReadDir(guestDir); len(ents) != 0 {
		t.Fatalf("a refused put left %d entries in the guest", len(ents))
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "put", "-r", src, guestDir+"/copy"); code != 0 {
		t.Fatalf("put -r: %s", errOut)
	}
	if d := diffTrees(src, guestDir+"/copy"); d != "" {
		t.Fatalf("put -r: %s", d)
	}
	// Into an existing directory: the copy goes under the source's name, as with cp -r.
	if _, errOut, code := agentctl(t, sock, "", "fs", "put", "-r", src, guestDir); code != 0 {
		t.Fatalf("put -r into a directory: %s", errOut)
	}
	if d := diffTrees(src, guestDir+"/tree"); d != "" {
		t.Fatalf("put -r into a directory: %s", d)
	}
	if _, errOut, code := agentctl(t, sock, "", "fs", "put", "-r", src, guestDir); code == 0 || !strings.Contains(errOut, "guest: "+guestDir+"/tree: exists") {
		t.Fatalf("put -r over an existing tree: %d %q", code, errOut)
	}
	back := filepath.Join(dir, "back")
	if _, errOut, code := agentctl(t, sock, "", "fs", "get", "-r", guestDir+"/copy", back); code != 0 {
		t.Fatalf("get -r: %s", errOut)
	}
	if d := diffTrees(src, back); d != "" {
		t.Fatalf("get -r: %s", d)
	}
	if _, errOut, code := agentctl(t, sock, "from stdin\n", "fs", "put", "-", guestDir+"/stdin.txt"); code != 0 {
		t.Fatal(errOut)
	}
	if b, _ := os.ReadFile(guestDir + "/stdin.txt"); string(b) != "from stdin\n" {
		t.Fatalf("put -: %q", b)
	}
	// No temporary files are left anywhere.
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if strings.Contains(d.Name(), ".agentctl-") {
			t.Errorf("left behind: %s", p)
		}
		return nil
	})
	// A file put whose guest side fails leaves nothing either.
	os.Chmod(guestDir+"/copy", 0o555)
	defer os.Chmod(guestDir+"/copy", 0o755)
	if _, errOut, code := agentctl(t, sock, "", "fs", "put", filepath.Join(src, "top.txt"), "/proc/nonexistent/x"); code == 0 || !strings.Contains(errOut, "guest: ") {
		t.Fatalf("put into a missing guest directory: %d %q", code, errOut)
	}
}

// diffTrees compares two trees: names, types, modes, contents and link targets.
func diffTrees(a, b string) string {
	var diffs []string
	filepath.WalkDir(a, func(p string, d os.DirEntry, err error) error {
		rel, _ := filepath.Rel(a, p)
		q := filepath.Join(b, rel)
		sa, _ := os.Lstat(p)
		sb, err := os.Lstat(q)
		switch {
		case err != nil:
			diffs = append(diffs, rel+": missing")
		case sa.Mode() != sb.Mode():
			diffs = append(diffs, rel+": mode "+sa.Mode().String()+" vs "+sb.Mode().String())
		case sa.Mode().IsRegular():
			x, _ := os.ReadFile(p)
			y, _ := os.ReadFile(q)
			if !bytes.Equal(x, y) {
				diffs = append(diffs, rel+": contents differ")
			}
		case sa.Mode()&os.ModeSymlink != 0:
			x, _ := os.Readlink(p)
			y, _ := os.Readlink(q)
			if x != y {
				diffs = append(diffs, rel+": link "+x+" vs "+y)
			}
		}
		return nil
	})
	return strings.Join(diffs, "; ")
}

// TestAgentctlHelp: --help (and -h) on every command and subcommand prints its usage on stdout
// and exits 0 (agentctl policy --help exited 2 with "unknown subcommand").
func TestAgentctlHelp(t *testing.T) {
	for _, c := range []string{"exec", "fs", "fs ls", "fs stat", "fs cat", "fs get", "fs put", "fs mkdir", "fs rm", "fs mv",
		"forward", "policy", "policy check", "policy explain", "policy reload", "policy show", "audit", "shutdown", "serve", "context", "wait"} {
		for _, h := range []string{"--help", "-h"} {
			r := runCtl(t, nil, "", append(strings.Fields(c), h)...)
			if r.code != 0 || !strings.HasPrefix(r.stdout, "usage: agentctl "+c+" ") || r.stderr != "" {
				t.Errorf("agentctl %s %s: exit %d, stdout %q, stderr %q", c, h, r.code, r.stdout, r.stderr)
			}
		}
	}
	if r := runCtl(t, nil, "", "--help"); r.code != 0 || !strings.Contains(r.stdout, "commands:") {
		t.Errorf("agentctl --help: %d %q", r.code, r.stdout)
	}
	if r := runCtl(t, nil, "", "policy", "frobnicate"); r.code != 2 || !strings.Contains(r.stderr, "want check, explain, reload or show") {
		t.Errorf("unknown policy command: %d %q", r.code, r.stderr)
	}
}

// TestAgentctlTarget: the sandbox is named once (AGENTCTL_CONNECT, or the context file that
// agentctl context use writes), flags may follow operands, and a socket that is not a relay
// is named at once with the one to use.
func TestAgentctlTarget(t *testing.T) {
	sock := relayed(t)
	cfg := []string{"XDG_CONFIG_HOME=" + t.TempDir(), "AGENTCTL_CONNECT="}
	if r := runCtl(t, cfg, "", "exec", "true"); r.code != 2 || !strings.Contains(r.stderr, "AGENTCTL_CONNECT") {
		t.Fatalf("no target: %d %q", r.code, r.stderr)
	}
	if r := runCtl(t, append(cfg, "AGENTCTL_CONNECT="+sock), "", "exec", "echo", "via env"); r.stdout != "via env\n" {
		t.Fatalf("AGENTCTL_CONNECT: %+v", r)
	}
	if r := runCtl(t, cfg, "", "context", "use", sock); r.code != 0 {
		t.Fatalf("context use: %+v", r)
	}
	if r := runCtl(t, cfg, "", "exec", "echo", "via context"); r.stdout != "via context\n" {
		t.Fatalf("context: %+v", r)
	}
	if r := runCtl(t, cfg, "", "context"); !strings.HasPrefix(r.stdout, sock+"\t(from the context file ") {
		t.Fatalf("context: %q", r.stdout)
	}
	if r := runCtl(t, cfg, "", "fs", "ls", "/", "--connect", sock); r.code != 0 || !strings.Contains(r.stdout, " etc\n") {
		t.Fatalf("flags after operands: %+v", r)
	}
	runCtl(t, cfg, "", "context", "clear", "/some/other.sock") // not the current one: kept
	if r := runCtl(t, cfg, "", "exec", "true"); r.code != 0 {
		t.Fatalf("context clear of another socket cleared it: %+v", r)
	}
	runCtl(t, cfg, "", "context", "clear", sock)
	if r := runCtl(t, cfg, "", "exec", "true"); r.code != 2 {
		t.Fatalf("after context clear: %+v", r)
	}

	// agentd's own listening channel is not a relay: refused at once, saying what it is.
	dir := t.TempDir()
	chanSock := filepath.Join(dir, "chan.sock")
	ad := exec.Command(filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix-listen:"+chanSock)
	adLog := &testutil.Buffer{}
	ad.Stderr = adLog
	startProc(t, ad, adLog)
	waitPath(t, chanSock)
	r := runCtl(t, nil, "", "exec", "--connect", chanSock, "true")
	if r.code != 1 || r.took > 5*time.Second || !strings.Contains(r.stderr, chanSock+" is agentd's own channel") || !strings.Contains(r.stderr, "not a relay socket") {
		t.Fatalf("agentd's channel as a relay: exit %d after %v: %q", r.code, r.took, r.stderr)
	}
	// A socket file nobody listens on, and a path that is not a socket.
	stale := filepath.Join(dir, "stale.sock")
	l, _ := net.Listen("unix", stale)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if r := runCtl(t, nil, "", "exec", "--connect", stale, "true"); r.code != 1 || !strings.Contains(r.stderr, "nobody is listening on "+stale) {
		t.Fatalf("stale socket: %+v", r)
	}
	if r := runCtl(t, nil, "", "exec", "--connect", "/etc/hostname", "true"); r.code != 1 || !strings.Contains(r.stderr, "is not a unix socket") {
		t.Fatalf("not a socket: %+v", r)
	}
}

// TestAgentctlForwardSpecs: forward takes ssh -L's forms and binds to loopback unless told
// otherwise (here agentd runs standalone, so the guest's loopback is this machine's).
func TestAgentctlForwardSpecs(t *testing.T) {
	sock := relayed(t)
	srv := testutil.Serve(t, testutil.Echo)
	gport := strconv.Itoa(srv.Addr.Port)
	for _, c := range []struct{ spec, listen string }{
		{"0:127.0.0.1:" + gport, "127.0.0.1:"},
		{"127.0.0.3:0:127.0.0.1:" + gport, "127.0.0.3:"},
		{"[::1]:0:localhost:" + gport, "[::1]:"},
	} {
		fwd := exec.Command(filepath.Join(binDir, "agentctl"), "forward", c.spec, "--connect", sock)
		lines := &watchBuffer{want: "forwarding ", seen: make(chan struct{})}
		fwd.Stderr = lines
		if err := fwd.Start(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-lines.seen:
		case <-time.After(20 * time.Second):
			fwd.Process.Kill()
			t.Fatalf("forward %s never listened: %q", c.spec, lines.String())
		}
		waitLine(t, lines)
		m := regexp.MustCompile(`forwarding (\S+) -> guest (\S+)`).FindStringSubmatch(lines.String())
		if m == nil || !strings.HasPrefix(m[1], c.listen) {
			fwd.Process.Kill()
			t.Fatalf("forward %s: %q, want a listener on %s*", c.spec, lines.String(), c.listen)
		}
		conn, err := net.Dial("tcp", m[1])
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("through " + c.spec))
		conn.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(conn)
		conn.Close()
		fwd.Process.Signal(syscall.SIGTERM)
		fwd.Wait()
		if string(got) != "through "+c.spec {
			t.Fatalf("forward %s: echo %q", c.spec, got)
		}
	}
	if r := runCtl(t, nil, "", "forward", "--connect", sock, "1:2"); r.code != 2 || !strings.Contains(r.stderr, "want PORT, LOCAL_PORT:HOST:PORT or BIND:LOCAL_PORT:HOST:PORT") {
		t.Fatalf("bad spec: %+v", r)
	}
}

// waitLine waits until the buffer holds a whole line.
func waitLine(t *testing.T, b *watchBuffer) {
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(b.String()[strings.Index(b.String(), b.want):], "\n") {
		if time.Now().After(deadline) {
			t.Fatalf("no whole line in %q", b.String())
		}
		time.Sleep(5 * time.Millisecond) // the rest of the line is one write away
	}
}

// TestRelayDisconnectIsDebug: a client leaving the relay (every agentctl command does) is not
// an INFO line in agentd's log any more, only a debug one.
func TestRelayDisconnectIsDebug(t *testing.T) {
	for _, level := range []string{"info", "debug"} {
		sock, _, agentLog := relayedWith(t, "--log-level", level)
		agentctl(t, sock, "", "exec", "true")
		// The relay tells the agent about the first client before the second one's frames, so
		// once the second command is done the first disconnect has been handled.
		agentctl(t, sock, "", "exec", "true")
		logged := strings.Contains(agentLog.String(), "relay client disconnected")
		if logged != (level == "debug") {
			t.Errorf("--log-level %s: relay client disconnected logged %v:\n%s", level, logged, agentLog.String())
		}
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

// TestAgentctlForwardDenyByDefault: agentctl forward into the guest under a deny-by-default
// policy (examples/deny-by-default.yaml) with the egress netstack on. The connection to the
// guest itself is decided as ingress, which the policy allows; it used to be decided as egress
// and refused. (agentd runs standalone: the guest's "own loopback" is agentd's namespace.)
func TestAgentctlForwardDenyByDefault(t *testing.T) {
	tp := nettest.New(t)
	audit := filepath.Join(t.TempDir(), "audit.jsonl")
	sock, _, _ := relayedWith(t, "--egress", "netstack", "--egress-guest-netns", "/var/run/netns/"+tp.Name,
		"--egress-tun", "agfw"+tp.ID, "--egress-dns", "127.0.0.1:53",
		"--egress-policy", filepath.Join(repoRoot(t), "examples/deny-by-default.yaml"), "--egress-audit", audit)
	srv := testutil.Serve(t, testutil.Echo)
	// The two-argument form, which every agentctl took; the line that says where it listens
	// was a log line before (msg=forwarding local=ADDR).
	fwd := startBG(t, "agentctl forward", "", nil, filepath.Join(binDir, "agentctl"), "forward", "--connect", sock,
		"127.0.0.1:0", srv.Addr.String())
	m := fwd.waitForRE(t, regexp.MustCompile(`(?:forwarding |local=)(\d+\.\d+\.\d+\.\d+:\d+)`), 20*time.Second)
	conn, err := net.Dial("tcp", m[1])
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("into the guest"))
	conn.(*net.TCPConn).CloseWrite()
	got, _ := io.ReadAll(conn)
	conn.Close()
	if string(got) != "into the guest" {
		t.Fatalf("forward under deny-by-default: %q\nforward: %s", got, fwd.out.String())
	}
	for deadline := time.Now().Add(10 * time.Second); ; { // the audit is written in the background
		b, _ := os.ReadFile(audit)
		if strings.Contains(string(b), `"direction":"ingress"`) && strings.Contains(string(b), `"verdict":"allow"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit: %s", b)
		}
		time.Sleep(20 * time.Millisecond) // the audit writer has no event to wait on
	}
}
