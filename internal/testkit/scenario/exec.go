package scenario

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

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
