package scenario

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/protocol"
)

func str(s string) *string { return &s }

// RunExec runs every exec scenario against agents made by start.
func RunExec(t *testing.T, start Start) {
	t.Run("Echo", func(t *testing.T) { ExecEcho(t, start(t, nil)) })
	t.Run("StdinPipe", func(t *testing.T) { ExecStdin(t, start, false) })
	t.Run("StdinPTY", func(t *testing.T) { ExecStdin(t, start, true) })
	t.Run("ExitCode", func(t *testing.T) { ExecExitCode(t, start(t, nil)) })
	t.Run("NotFound", func(t *testing.T) { ExecNotFound(t, start(t, nil)) })
	t.Run("PTYSize", func(t *testing.T) { ExecPTYSize(t, start(t, nil)) })
	t.Run("Signal", func(t *testing.T) { ExecSignal(t, start(t, nil)) })
	t.Run("SignalStock", func(t *testing.T) { ExecSignal(t, start(t, []string{})) })
	t.Run("User", func(t *testing.T) { ExecUser(t, start(t, nil)) })
	t.Run("CleanEnv", func(t *testing.T) { ExecCleanEnv(t, start(t, nil)) })
	t.Run("Rlimits", func(t *testing.T) { ExecRlimits(t, start(t, nil)) })
	t.Run("Cwd", func(t *testing.T) { ExecCwd(t, start(t, nil)) })
	t.Run("StdinError", func(t *testing.T) { ExecStdinError(t, start(t, nil)) })
	t.Run("StdinErrorPerChunk", func(t *testing.T) { ExecStdinErrorPerChunk(t, start(t, nil)) })
	t.Run("StdinNull", func(t *testing.T) { ExecStdinNull(t, start(t, nil)) })
	t.Run("NoShebang", func(t *testing.T) { ExecNoShebang(t, start(t, nil)) })
	t.Run("EmptyCwd", func(t *testing.T) { ExecEmptyCwd(t, start(t, nil)) })
	t.Run("EnvOverrides", func(t *testing.T) { ExecEnvOverrides(t, start(t, nil)) })
	t.Run("Groups", func(t *testing.T) { ExecGroups(t, start(t, nil)) })
	t.Run("NulByte", func(t *testing.T) { ExecNulByte(t, start(t, nil)) })
}

func run(t *testing.T, a Agent, req protocol.ExecRequest, stdin []byte) (string, string, int32) {
	t.Helper()
	out, errOut, code, err := a.Client.Run(Ctx(t), req, stdin)
	if err != nil {
		t.Fatalf("%s: %v", req.Cmd, err)
	}
	return string(out), string(errOut), code
}

// ExecEcho: output arrives as stdout/stderr chunks, then exited 0.
func ExecEcho(t *testing.T, a Agent) {
	out, errOut, code := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "echo hello; echo oops >&2"}}, nil)
	if out != "hello\n" || errOut != "oops\n" || code != 0 {
		t.Fatalf("stdout %q stderr %q code %d", out, errOut, code)
	}
	a.Idle(t)
}

// ExecStdin: stdin streams to cat and an empty chunk ends it, in pipe and PTY mode.
func ExecStdin(t *testing.T, start Start, tty bool) {
	for _, features := range [][]string{{protocol.FeatureFlow}, {}} {
		a := start(t, features)
		if !tty {
			in := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB: many chunks and credits
			out, _, code := run(t, a, protocol.ExecRequest{Cmd: "cat"}, in)
			if out != string(in) || code != 0 {
				t.Fatalf("features %v: cat returned %d bytes, code %d", features, len(out), code)
			}
			continue
		}
		out, _, code := run(t, a, protocol.ExecRequest{Cmd: "cat", TTY: true}, []byte("typed line\nno newline"))
		// The terminal echoes the input and cat repeats each line; EOF must end cat.
		if code != 0 || strings.Count(out, "typed line") != 2 || !strings.Contains(out, "no newline") {
			t.Fatalf("features %v: pty cat output %q code %d", features, out, code)
		}
	}
}

func ExecExitCode(t *testing.T, a Agent) {
	if _, _, code := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "exit 7"}}, nil); code != 7 {
		t.Fatalf("code %d, want 7", code)
	}
}

// ExecNotFound: a missing program is a terminal exec.failed with the reference's fields.
func ExecNotFound(t *testing.T, a Agent) {
	for _, c := range []struct {
		req   protocol.ExecRequest
		kind  string
		stage string
	}{
		{protocol.ExecRequest{Cmd: "/nonexistent/prog"}, protocol.ExecNotFound, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "no-such-program-anywhere"}, protocol.ExecNotFound, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "/nonexistent/prog", TTY: true}, protocol.ExecNotFound, "execvp"},
		{protocol.ExecRequest{Cmd: "/etc/passwd"}, protocol.ExecPermissionDenied, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "true", Cwd: str("/etc/passwd")}, protocol.ExecBadCwd, "Command::spawn"},
	} {
		_, err := a.Client.Exec(Ctx(t), c.req)
		var f *protocol.ExecFailed
		if !errors.As(err, &f) {
			t.Fatalf("%s: want exec.failed, got %v", c.req.Cmd, err)
		}
		if f.Kind != c.kind || f.Stage == nil || *f.Stage != c.stage || f.Errno == nil || !strings.HasPrefix(f.Message, "spawn \"") {
			t.Fatalf("%s: %+v", c.req.Cmd, f)
		}
	}
	_, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "true", User: str("no-such-user")})
	var f *protocol.ExecFailed
	if !errors.As(err, &f) || f.Kind != protocol.ExecOther || f.Message != "exec session error: guest user not found: no-such-user" {
		t.Fatalf("unknown user: %v", err)
	}
}

// ExecPTYSize: the PTY has the requested size, and resize changes it.
func ExecPTYSize(t *testing.T, a Agent) {
	out, _, code := run(t, a, protocol.ExecRequest{Cmd: "stty", Args: []string{"size"}, TTY: true, Rows: 33, Cols: 77}, nil)
	if strings.TrimSpace(out) != "33 77" || code != 0 {
		t.Fatalf("stty size: %q code %d", out, code)
	}
	e, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "read x; stty size"}, TTY: true, Rows: 10, Cols: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.Resize(50, 120)
	e.Stdin(Ctx(t), []byte("go\n"))
	var got strings.Builder
	for {
		ev, err := e.Next(Ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		got.Write(ev.Stdout)
		if ev.Exited {
			break
		}
	}
	if !strings.Contains(got.String(), "50 120") {
		t.Fatalf("after resize: %q", got.String())
	}
}

// ExecSignal: SIGTERM ends a sleep; a signal death reports -1, and names the signal only to a
// session under flow control (a stock host gets the reference's frame, code alone).
func ExecSignal(t *testing.T, a Agent) {
	wantSig := int32(0)
	if a.Client.HasFeature(protocol.FeatureFlow) {
		wantSig = 15
	}
	e, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "sleep", Args: []string{"60"}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.Signal(0)  // not a standard signal: ignored
	e.Signal(15) // SIGTERM
	for {
		ev, err := e.Next(Ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if ev.Exited {
			if ev.Code != -1 || ev.Signal != wantSig {
				t.Fatalf("code %d signal %d, want -1 and %d", ev.Code, ev.Signal, wantSig)
			}
			return
		}
	}
}

// ExecUser: the program runs as the requested user, with its groups and home.
func ExecUser(t *testing.T, a Agent) {
	if os.Getuid() != 0 {
		t.Skip("user switching needs root")
	}
	for spec, want := range map[string]string{"nobody": "65534 65534", "65534:0": "65534 0", "0": "0 0"} {
		out, _, code := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "echo $(id -u) $(id -g)"}, User: str(spec)}, nil)
		if strings.TrimSpace(out) != want || code != 0 {
			t.Fatalf("user %s: %q code %d", spec, out, code)
		}
	}
	out, _, _ := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "echo $HOME"}, User: str("nobody")}, nil)
	if strings.TrimSpace(out) != "/nonexistent" {
		t.Fatalf("nobody's HOME: %q", out)
	}
}

// ExecCleanEnv: children see only PATH (scripts first), HOME and what the request passes; none
// of agentd's own variables (MSB_* boot configuration) leak into them.
func ExecCleanEnv(t *testing.T, a Agent) {
	out, _, _ := run(t, a, protocol.ExecRequest{Cmd: "env", Env: []string{"FOO=bar", "NOEQUALS", "PATH=/bin:/usr/bin"}}, nil)
	lines := strings.Fields(out)
	want := map[string]bool{"FOO=bar": true, "PATH=/.msb/scripts:/bin:/usr/bin": true}
	for _, l := range lines {
		if strings.HasPrefix(l, "MSB_") || strings.HasPrefix(l, "AGENTD_") {
			t.Fatalf("agentd's variable leaked: %s", l)
		}
		delete(want, l)
	}
	if len(want) != 0 || !strings.Contains(out, "HOME=") {
		t.Fatalf("env %q misses %v or HOME", out, want)
	}
}

// ExecRlimits: per-request limits apply to the child (through the pre-exec helper).
func ExecRlimits(t *testing.T, a Agent) {
	out, _, code := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "ulimit -n; ulimit -Hn"},
		Rlimits: []protocol.ExecRlimit{{Resource: "NOFILE", Soft: 123, Hard: 456}, {Resource: "bogus", Soft: 1, Hard: 1}}}, nil)
	if strings.Fields(out)[0] != "123" || strings.Fields(out)[1] != "456" || code != 0 {
		t.Fatalf("limits: %q code %d", out, code)
	}
	_, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "true", User: str("nobody"),
		Rlimits: []protocol.ExecRlimit{{Resource: "nofile", Soft: 1 << 30, Hard: 1 << 30}}})
	var f *protocol.ExecFailed
	if os.Getuid() == 0 && (!errors.As(err, &f) || f.Kind != protocol.ExecPermissionDenied) {
		t.Fatalf("raising a hard limit as nobody: %v", err)
	}
}

func ExecCwd(t *testing.T, a Agent) {
	out, _, _ := run(t, a, protocol.ExecRequest{Cmd: "pwd", Cwd: str("/usr")}, nil)
	if strings.TrimSpace(out) != "/usr" {
		t.Fatalf("pwd %q", out)
	}
	_, err := a.Client.Exec(context.Background(), protocol.ExecRequest{Cmd: "pwd", Cwd: str("/no/such/dir")})
	var f *protocol.ExecFailed
	if !errors.As(err, &f) || f.Kind != protocol.ExecNotFound { // ENOENT, as the reference
		t.Fatalf("missing cwd: %v", err)
	}
}

// ExecStdinError: writing to a child that closed its stdin reports core.exec.stdin.error
// (non-terminal) with the reference's fields; the session still exits normally.
func ExecStdinError(t *testing.T, a Agent) {
	// The child closes stdin, then lives until SIGTERM (sent once the error was seen).
	e, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", `exec 0<&-; trap "exit 3" TERM; echo closed; while :; do sleep 0.01; done`}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var sawErr *protocol.ExecStdinError
	for {
		ev, err := e.Next(Ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(ev.Stdout), "closed") {
			e.Stdin(Ctx(t), []byte("nobody reads this\n"))
		}
		if ev.StdinError != nil {
			sawErr = ev.StdinError
			e.Signal(15)
		}
		if ev.Exited {
			if ev.Code != 3 {
				t.Fatalf("code %d", ev.Code)
			}
			break
		}
	}
	if sawErr == nil || sawErr.Errno == nil || *sawErr.Errno != 32 || sawErr.ErrnoName == nil || *sawErr.ErrnoName != "EPIPE" ||
		sawErr.Message != "io error: Broken pipe (os error 32)" {
		t.Fatalf("stdin error %+v", sawErr)
	}
}

// ExecStdinErrorPerChunk: every stdin chunk written to a child that closed its stdin gets its
// own core.exec.stdin.error, as in the reference (which writes each chunk and reports each
// failure; issue 16, item 10).
func ExecStdinErrorPerChunk(t *testing.T, a Agent) {
	e, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", `exec 0<&-; trap "exit 3" TERM; echo closed; while :; do sleep 0.01; done`}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithTimeout(Ctx(t), 10*time.Second)
	defer cancel()
	errs := 0
	for errs < 3 {
		ev, err := e.Next(ctx)
		if err != nil {
			t.Fatalf("after %d stdin errors: %v", errs, err)
		}
		if strings.Contains(string(ev.Stdout), "closed") {
			for i := 0; i < 3; i++ {
				e.Stdin(ctx, []byte(fmt.Sprintf("chunk %d\n", i)))
			}
		}
		if ev.StdinError != nil {
			if ev.StdinError.ErrnoName == nil || *ev.StdinError.ErrnoName != "EPIPE" {
				t.Fatalf("stdin error %+v", ev.StdinError)
			}
			errs++
		}
		if ev.Exited {
			t.Fatalf("exited after %d stdin errors", errs)
		}
	}
	e.Signal(15)
	for {
		ev, err := e.Next(Ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if ev.StdinError != nil {
			t.Fatal("a fourth stdin error for three chunks")
		}
		if ev.Exited {
			if ev.Code != 3 {
				t.Fatalf("code %d", ev.Code)
			}
			return
		}
	}
}

// ExecStdinNull: a null stdin chunk is core.error invalid_payload on the session's id, not
// EOF: the chunks around it still reach the child (issue 16, item 3).
func ExecStdinNull(t *testing.T, a Agent) {
	out := filepath.Join(t.TempDir(), "out")
	r := openRaw(t, a.Client)
	r.send(protocol.TypeExecRequest, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "cat > " + out}})
	if m := r.recv(); m.Type != protocol.TypeExecStarted {
		t.Fatalf("got %s", m.Name())
	}
	r.send(protocol.TypeExecStdin, protocol.Data{Data: []byte("a")})
	if err := a.Client.Send(r.s.ID, protocol.TypeExecStdin, []byte{0xa1, 0x64, 'd', 'a', 't', 'a', 0xf6}); err != nil {
		t.Fatal(err)
	}
	expectInvalidPayload(t, r.s, protocol.TypeExecStdin)
	s2, err := a.Client.OpenID(r.s.ID) // core.error is terminal for the client: listen again
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	r.send(protocol.TypeExecStdin, protocol.Data{Data: []byte("b")})
	r.send(protocol.TypeExecStdin, protocol.Data{Data: []byte{}})
	m, err := s2.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var x protocol.ExecExited
	if m.Type != protocol.TypeExecExited || protocol.Unmarshal(m.Payload, &x) != nil || x.Code != 0 {
		t.Fatalf("got %s %+v", m.Name(), x)
	}
	if b, _ := os.ReadFile(out); string(b) != "ab" {
		t.Fatalf("the child read %q", b)
	}
}

// ExecNoShebang: an executable text file without "#!" runs with /bin/sh, as execvp's ENOEXEC
// fallback does in the reference, found by path or through PATH (issue 16, item 4).
func ExecNoShebang(t *testing.T, a Agent) {
	dir := t.TempDir()
	script := filepath.Join(dir, "no-shebang")
	if err := os.WriteFile(script, []byte("echo ran as $0 with $1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, _, code := run(t, a, protocol.ExecRequest{Cmd: script, Args: []string{"x"}}, nil)
	if out != "ran as "+script+" with x\n" || code != 0 {
		t.Fatalf("by path: %q code %d", out, code)
	}
	out, _, code = run(t, a, protocol.ExecRequest{Cmd: "no-shebang", Args: []string{"y"}, Env: []string{"PATH=" + dir + ":/usr/bin:/bin"}}, nil)
	if out != "ran as "+script+" with y\n" || code != 0 {
		t.Fatalf("through PATH: %q code %d", out, code)
	}
	out, _, code = run(t, a, protocol.ExecRequest{Cmd: script, Args: []string{"z"}, TTY: true}, nil)
	if !strings.Contains(out, "ran as "+script+" with z") || code != 0 {
		t.Fatalf("on a PTY: %q code %d", out, code)
	}
	// With rlimits the program is started by the pre-exec helper, which falls back the same way.
	out, _, code = run(t, a, protocol.ExecRequest{Cmd: script, Args: []string{"w"}, Rlimits: []protocol.ExecRlimit{{Resource: "nofile", Soft: 64, Hard: 64}}}, nil)
	if out != "ran as "+script+" with w\n" || code != 0 {
		t.Fatalf("through the helper: %q code %d", out, code)
	}
}

// ExecEmptyCwd: a cwd of "" is chdir("") (ENOENT), not "stay where agentd is" (item 5).
func ExecEmptyCwd(t *testing.T, a Agent) {
	_, err := a.Client.Exec(Ctx(t), protocol.ExecRequest{Cmd: "pwd", Cwd: str("")})
	var f *protocol.ExecFailed
	if !errors.As(err, &f) || f.Kind != protocol.ExecNotFound || f.Errno == nil || *f.Errno != 2 ||
		f.Stage == nil || *f.Stage != "Command::spawn" || f.Message != `spawn "pwd": No such file or directory (os error 2)` {
		t.Fatalf("cwd \"\": %v", err)
	}
}

// ExecEnvOverrides: request env entries apply in order, so a later PATH overrides an earlier
// one (the SDK sends the sandbox env, then the exec env); only the first PATH gets the
// scripts prefix, as in the reference. A uid without a passwd entry keeps the inherited
// HOME (/, the kernel's for init) instead of root's (item 7).
func ExecEnvOverrides(t *testing.T, a Agent) {
	out, _, _ := run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "echo $PATH; echo $FOO"},
		Env: []string{"PATH=/sandbox", "FOO=1", "PATH=/bin:/usr/bin", "FOO=2"}}, nil)
	if out != "/bin:/usr/bin\n2\n" {
		t.Fatalf("overrides: %q", out)
	}
	if os.Getuid() != 0 {
		return
	}
	out, _, _ = run(t, a, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "echo $HOME $(id -u)"}, User: str("4242")}, nil)
	if out != "/ 4242\n" {
		t.Fatalf("uid without passwd entry: %q", out)
	}
}

// ExecGroups: "user:group" gets the groups initgroups(user, group) gives: the group, and
// those /etc/group lists the user in; not the user's passwd group as an extra (item 7).
func ExecGroups(t *testing.T, a Agent) {
	if os.Getuid() != 0 {
		t.Skip("user switching needs root")
	}
	want := []string{"0"}
	if f, err := os.Open("/etc/group"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Split(sc.Text(), ":")
			if len(fields) == 4 && slices.Contains(strings.Split(fields[3], ","), "nobody") && !slices.Contains(want, fields[2]) {
				want = append(want, fields[2])
			}
		}
		f.Close()
	}
	out, _, _ := run(t, a, protocol.ExecRequest{Cmd: "id", Args: []string{"-G"}, User: str("nobody:root")}, nil)
	got := strings.Fields(out)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("groups of nobody:root: %q, want %q", got, want)
	}
}

// ExecNulByte: a NUL byte in the command or an argument fails like the reference: kind other,
// no errno, Rust's texts (item 8).
func ExecNulByte(t *testing.T, a Agent) {
	for _, c := range []struct {
		req   protocol.ExecRequest
		msg   string
		stage string
	}{
		{protocol.ExecRequest{Cmd: "ec\x00ho"}, `spawn "ec\0ho": nul byte found in provided data`, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "echo", Args: []string{"a\x00b"}}, `spawn "echo": nul byte found in provided data`, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "echo", Env: []string{"A=\x00"}}, `spawn "echo": nul byte found in provided data`, "Command::spawn"},
		{protocol.ExecRequest{Cmd: "ec\x00ho", TTY: true}, "exec session error: invalid command: nul byte found in provided data at position: 2", ""},
		{protocol.ExecRequest{Cmd: "echo", Args: []string{"ab\x00"}, TTY: true}, "exec session error: invalid arg: nul byte found in provided data at position: 2", ""},
	} {
		_, err := a.Client.Exec(Ctx(t), c.req)
		var f *protocol.ExecFailed
		if !errors.As(err, &f) || f.Kind != protocol.ExecOther || f.Errno != nil || f.ErrnoName != nil || f.Message != c.msg ||
			(c.stage == "") != (f.Stage == nil) || (f.Stage != nil && *f.Stage != c.stage) {
			t.Fatalf("%q %q: %v (%+v)", c.req.Cmd, c.req.Args, err, f)
		}
	}
}
