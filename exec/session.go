// Package exec runs core.exec sessions: a program in pipe mode (stdin, stdout, stderr) or PTY
// mode (new session, controlling terminal, window size, merged output), with bounded buffers in
// both directions: output stops being read when the queue toward the host is full (the child
// then blocks on its pipe), and stdin is queued in a bounded sink.
package exec

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	osexec "os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/confine"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Options configure exec sessions. Zero fields take DefaultOptions' values.
type Options struct {
	// ChunkSize is the largest output read (one frame). The reference reads 4 KiB; larger
	// reads carry bulk output with far fewer frames.
	ChunkSize int
	// HighWater and LowWater bound output queued toward the host (per session).
	HighWater, LowWater int
	// StdinLimit bounds stdin bytes queued for the child (the window under flow control).
	StdinLimit int
	// StdinBudget is shared by all sessions' stdin queues (nil: none).
	StdinBudget *sessionio.Budget
	// DefaultUser is MSB_USER: the user of requests that name none ("" = agentd's own).
	DefaultUser string
	// Confine, when set, confines every child (confine.Confined: while egress is on, and under
	// MSB_SECURITY_PROFILE=restricted).
	Confine *confine.Profile
	// DefaultCwd is the working directory of requests that name none (core.bootstrap's
	// default_cwd; "" = agentd's).
	DefaultCwd string
	// Groups makes every child lead a process group of its own (a PTY child always does) and
	// sends signals and kills to the whole group, as hosts after generation 5 rely on
	// (contract 10.1); without it a pipe child shares agentd's group and signals go to its pid
	// alone, as in the reference 0.5.7.
	Groups bool
	// BaseEnv is the environment every child starts from. agentd's own environment is never
	// passed on (it holds boot configuration); only this and the request's entries are.
	BaseEnv []string
	// AgentPath is agentd's PATH, used when the request sets none.
	AgentPath string
	// ScriptsDir is prepended to every child's PATH.
	ScriptsDir string
	// HelperPath is the agentd binary, started as the pre-exec helper when a request needs
	// rlimits or the restricted profile.
	HelperPath string
	// Waiter, when set, reaps children instead of os/exec (PID 1's reaper owns every wait, so
	// that reaping orphans cannot take an exec child's status).
	Waiter Waiter
}

// Waiter returns the exit status of a child by pid.
type Waiter interface {
	Wait(pid int) (syscall.WaitStatus, error)
}

// DefaultOptions: 64 KiB reads, 256/64 KiB output watermarks, 1 MiB of stdin.
var DefaultOptions = Options{
	ChunkSize:  sessionio.ChunkSize,
	HighWater:  sessionio.DefaultHighWater,
	LowWater:   sessionio.DefaultLowWater,
	StdinLimit: 1 << 20,
	ScriptsDir: "/.msb/scripts",
}

func (o Options) withDefaults() Options {
	d := DefaultOptions
	if o.ChunkSize <= 0 || o.ChunkSize > sessionio.ChunkSize {
		o.ChunkSize = d.ChunkSize
	}
	if o.HighWater <= 0 {
		o.HighWater = d.HighWater
	}
	if o.LowWater <= 0 || o.LowWater > o.HighWater {
		o.LowWater = min(d.LowWater, o.HighWater)
	}
	if o.StdinLimit <= 0 {
		o.StdinLimit = d.StdinLimit
	}
	if o.ScriptsDir == "" {
		o.ScriptsDir = d.ScriptsDir
	}
	if o.HelperPath == "" {
		o.HelperPath, _ = os.Executable()
	}
	return o
}

// PipeSize is the capacity requested for output pipes (the kernel default is 64 KiB); the
// request is best effort (an unprivileged limit may refuse it).
const PipeSize = 1 << 20

// Session is one running program.
type Session struct {
	id    uint32
	cmd   *osexec.Cmd
	pid   int
	tty   *os.File // PTY master (PTY mode)
	in    *sessionio.Sink
	q     *sessionio.Queue
	out   *sessionio.Writer
	log   *slog.Logger
	done  func(*Session)
	flow  bool
	wait  Waiter
	pipes []io.Closer // closed after the child is reaped (os/exec would in Wait)

	ctx    context.Context
	cancel context.CancelFunc

	credit *sessionio.Credit // flow: output bytes the host can still take

	stopping atomic.Bool // the child is reaped: stdin write errors are no longer reported

	sigMu  sync.Mutex
	reaped bool // the child's pid is no longer its own: no signal may go to its group
	groups bool // signals go to the child's process group (Options.Groups or a PTY)

	mu       sync.Mutex
	lastByte byte          // last stdin byte written (PTY EOF needs a line start)
	fed      chan struct{} // closed when feed returns
	started  protocol.ExecStarted
	goRun    func()
	finished chan struct{}
}

// Groups reports whether the session's signals go to the child's process group.
func (s *Session) Groups() bool { return s.groups }

// ID returns the session id; PID the child's pid.
func (s *Session) ID() uint32 { return s.id }
func (s *Session) PID() int   { return s.pid }

// Finished is closed once the child has been reaped and exited was queued.
func (s *Session) Finished() <-chan struct{} { return s.finished }

// Start spawns the program of req; Go then announces and streams it. If the program never
// ran, the returned ExecFailed says why.
func Start(id uint32, req protocol.ExecRequest, out *sessionio.Writer, opts Options, log *slog.Logger, done func(*Session)) (*Session, *protocol.ExecFailed) {
	opts = opts.withDefaults()
	// The reference's order of checks: a PTY request's strings are checked for NUL bytes
	// before the user is resolved, a pipe request's after (when Command spawns).
	what, at, nul := findNUL(req)
	if nul && req.TTY {
		return nil, nulFailure(req.Cmd, true, what, at)
	}
	ident := Identity{}
	spec := strings.TrimSpace(ptrStr(req.User))
	if spec == "" {
		spec = strings.TrimSpace(opts.DefaultUser)
	}
	home := rootHome()
	if spec != "" {
		var err error
		if ident, err = ResolveUser(spec); err != nil {
			return nil, otherFailure(err)
		}
		home = ident.Home // none for a uid without a passwd entry: HOME stays as inherited
	}
	if nul {
		return nil, nulFailure(req.Cmd, false, what, at)
	}
	reqEnv := req.Env
	if req.TTY { // the reference's PTY child skips entries with a NUL byte
		reqEnv = slices.DeleteFunc(slices.Clone(reqEnv), func(kv string) bool { return strings.IndexByte(kv, 0) >= 0 })
	}
	env := BuildEnv(opts.BaseEnv, reqEnv, opts.ScriptsDir, opts.AgentPath, home)
	if req.TTY && !hasKey(env, "TERM") {
		env = append(env, "TERM=xterm-256color")
	}
	stage := "Command::spawn"
	if req.TTY {
		stage = "execvp"
	}
	if req.Cwd != nil && *req.Cwd == "" { // chdir("") fails before the program is looked for
		return nil, spawnFailure(req.Cmd, stage, syscall.ENOENT)
	}
	path, err := LookPath(req.Cmd, env)
	if err != nil {
		return nil, spawnFailure(req.Cmd, stage, err)
	}
	cmd := &osexec.Cmd{Path: path, Args: append([]string{req.Cmd}, req.Args...), Env: env, SysProcAttr: &syscall.SysProcAttr{}}
	if req.Cwd != nil {
		cmd.Dir = *req.Cwd
	} else {
		cmd.Dir = opts.DefaultCwd
	}
	var errPipe *os.File
	if len(req.Rlimits) > 0 || opts.Confine != nil {
		hs := helperSpec{Path: path, Argv: cmd.Args, Identity: ident, Confine: opts.Confine}
		for _, rl := range req.Rlimits {
			if n, ok := protocol.RlimitResources[strings.ToLower(rl.Resource)]; ok { // unknown names are skipped
				hs.Rlimits = append(hs.Rlimits, [3]int64{int64(n), int64(rl.Soft), int64(rl.Hard)})
			}
		}
		js, _ := json.Marshal(hs)
		cmd.Path, cmd.Args = opts.HelperPath, []string{HelperName}
		cmd.Env = append(env[:len(env):len(env)], helperEnv+"="+string(js))
		r, w, err := os.Pipe()
		if err != nil {
			return nil, spawnFailure(req.Cmd, stage, err)
		}
		defer r.Close()
		cmd.ExtraFiles = []*os.File{w}
		errPipe = r
		defer w.Close()
	} else if ident.Switch {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: ident.UID, Gid: ident.GID, Groups: ident.Groups}
	}

	ctx, cancel := context.WithCancel(context.Background())
	s := &Session{id: id, cmd: cmd, out: out, log: log, done: done, ctx: ctx, cancel: cancel, groups: opts.Groups,
		flow: req.Window > 0, credit: sessionio.NewCredit(int64(req.Window)),
		q: out.NewQueue(opts.HighWater, opts.LowWater), finished: make(chan struct{}), fed: make(chan struct{}),
		wait: opts.Waiter}
	cfg := sessionio.SinkConfig{Limit: opts.StdinLimit, Budget: opts.StdinBudget}
	if s.flow {
		cfg.Grant = func(n int) {
			out.ControlMsg(ctx, id, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(n)})
		}
	}
	s.in = sessionio.NewSink(ctx, cfg)

	var outputs []io.ReadCloser
	var stdin io.WriteCloser
	if req.TTY {
		master, slave, err := pty.Open()
		if err == nil {
			// pty.Open leaves the master in blocking mode; a pollable copy lets Close end a
			// blocked read or write, so a session never strands a goroutine on its terminal.
			master, err = channel.Pollable(master)
		}
		if err != nil {
			if slave != nil {
				slave.Close()
			}
			cancel()
			return nil, otherFailure(err)
		}
		setWinsize(master, req.Rows, req.Cols)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr.Setsid, cmd.SysProcAttr.Setctty = true, true
		cmd, err = startCmd(cmd)
		s.cmd = cmd
		slave.Close()
		if err != nil {
			master.Close()
			cancel()
			return nil, spawnFailure(req.Cmd, stage, err)
		}
		s.tty = master
		outputs, stdin = []io.ReadCloser{master}, master
	} else {
		// Each child leads a process group of its own (its own session, as a PTY child's),
		// so that signals reach every process it started (contract 10.1).
		cmd.SysProcAttr.Setsid = opts.Groups
		// Our own pipes (not os/exec's), so that a start refused with ENOEXEC can be retried
		// with the same ones; they are closed after the child is reaped.
		var ends [6]*os.File // stdin r, w; stdout r, w; stderr r, w
		var err error
		for i := 0; i < 6 && err == nil; i += 2 {
			ends[i], ends[i+1], err = os.Pipe()
		}
		if err == nil {
			cmd.Stdin, cmd.Stdout, cmd.Stderr = ends[0], ends[3], ends[5]
			cmd, err = startCmd(cmd)
			s.cmd = cmd
		}
		for _, f := range []*os.File{ends[0], ends[3], ends[5]} { // the child's ends
			if f != nil {
				f.Close()
			}
		}
		if err != nil {
			for _, f := range []*os.File{ends[1], ends[2], ends[4]} {
				if f != nil {
					f.Close()
				}
			}
			cancel()
			return nil, spawnFailure(req.Cmd, stage, err)
		}
		po, pe, pw := ends[2], ends[4], ends[1]
		outputs, stdin = []io.ReadCloser{po, pe}, pw
		s.pipes = []io.Closer{po, pe, pw}
		for _, r := range outputs { // a bigger pipe means fewer wake-ups of child and agent
			if sc, ok := r.(syscall.Conn); ok {
				if rc, err := sc.SyscallConn(); err == nil {
					rc.Control(func(fd uintptr) { unix.FcntlInt(fd, unix.F_SETPIPE_SZ, PipeSize) })
				}
			}
		}
	}
	if errPipe != nil {
		cmd.ExtraFiles[0].Close() // our copy of the write end: EOF comes when the helper execs
		if f := helperFailure(errPipe, req.Cmd, stage); f != nil {
			s.reap()
			if s.tty != nil {
				s.tty.Close()
			}
			for _, c := range outputs {
				c.Close()
			}
			stdin.Close()
			cancel()
			return nil, f
		}
	}
	s.pid = cmd.Process.Pid
	s.started = protocol.ExecStarted{PID: uint32(s.pid)}
	if s.flow {
		s.started.Window = uint32(opts.StdinLimit)
	}
	s.goRun = func() { go s.run(outputs, stdin, opts.ChunkSize) }
	return s, nil
}

// startCmd starts cmd. A program the kernel refuses with ENOEXEC (an executable text file
// without "#!") is run by /bin/sh instead, as execvp does for the reference: argv becomes
// /bin/sh, the program's path, its arguments. It returns the command that runs.
func startCmd(cmd *osexec.Cmd) (*osexec.Cmd, error) {
	err := cmd.Start()
	if !errors.Is(err, syscall.ENOEXEC) {
		return cmd, err
	}
	sh := &osexec.Cmd{Path: "/bin/sh", Args: append([]string{"/bin/sh", cmd.Path}, cmd.Args[1:]...),
		Env: cmd.Env, Dir: cmd.Dir, Stdin: cmd.Stdin, Stdout: cmd.Stdout, Stderr: cmd.Stderr,
		ExtraFiles: cmd.ExtraFiles, SysProcAttr: cmd.SysProcAttr}
	return sh, sh.Start()
}

// Go sends exec.started and starts streaming. The caller registers the session first, so
// the host can never act on a session the agent does not know yet. exec.started goes ahead of
// session output, as a reply of the agent loop: like the reference's, it precedes anything
// else on the id, output and replies to the host's later frames alike.
func (s *Session) Go() {
	s.out.ControlMsg(s.ctx, s.id, protocol.TypeExecStarted, s.started)
	s.goRun()
}

func ptrStr(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func hasKey(env []string, k string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, k+"=") {
			return true
		}
	}
	return false
}

// helperFailure reads the helper's report: nothing (EOF) means the program is running.
func helperFailure(r *os.File, cmd, stage string) *protocol.ExecFailed {
	b, _ := io.ReadAll(r)
	if len(b) == 0 {
		return nil
	}
	fields := strings.SplitN(string(b), " ", 3)
	n, _ := strconv.Atoi(fields[0])
	f := spawnFailure(cmd, stage, syscall.Errno(n))
	if len(fields) == 3 && f.Kind == protocol.ExecOther && f.Errno == nil {
		f.Message = "exec session error: " + fields[2]
	}
	return f
}

// run streams output, feeds stdin, reaps the child and queues exited after all output.
func (s *Session) run(outputs []io.ReadCloser, stdin io.WriteCloser, chunk int) {
	defer close(s.finished)
	go s.feed(stdin)
	var wg sync.WaitGroup
	for i, r := range outputs {
		t := protocol.TypeExecStdout
		if i == 1 {
			t = protocol.TypeExecStderr
		}
		wg.Add(1)
		go func() { defer wg.Done(); s.pump(r, t, chunk) }()
	}
	wg.Wait()
	code, sig := s.reap()
	s.stopping.Store(true)
	s.in.Close() // ends feed, and drops stdin nobody will read
	for _, c := range s.pipes {
		c.Close() // ends a stdin write blocked on a pipe a grandchild still holds open
	}
	<-s.fed
	if s.tty != nil {
		s.tty.Close()
	}
	exited := protocol.ExecExited{Code: code}
	if s.flow { // only a host that opted in gets the extension key
		exited.Signal = sig
	}
	s.q.PushMsg(context.Background(), s.id, protocol.TypeExecExited, exited)
	s.cancel()
	if s.done != nil {
		s.done(s)
	}
}

// reap waits for the child and returns the reference's exit code: the status, or -1 for a
// signal death (then also the signal) or a failed wait.
func (s *Session) reap() (code, sig int32) {
	defer func() {
		s.sigMu.Lock()
		s.reaped = true
		s.sigMu.Unlock()
	}()
	if s.wait == nil {
		err := s.cmd.Wait()
		if err == nil {
			return 0, 0
		}
		var ee *osexec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
				return exitCode(ws)
			}
		}
		return -1, 0
	}
	ws, err := s.wait.Wait(s.cmd.Process.Pid)
	s.cmd.Process.Release() // without os/exec's Wait, the process handle (a pidfd) is ours to free
	if err != nil {
		return -1, 0
	}
	return exitCode(ws)
}

// exitCode is the reference's code for a wait status, and the signal of a signal death.
func exitCode(ws syscall.WaitStatus) (code, sig int32) {
	switch {
	case ws.Exited():
		return int32(ws.ExitStatus()), 0
	case ws.Signaled():
		return -1, int32(ws.Signal())
	}
	return -1, 0
}

// pump reads one output stream into frames until EOF (or EIO: a PTY whose slave side closed).
func (s *Session) pump(r io.Reader, t protocol.Type, chunk int) {
	for {
		n := chunk
		if s.flow {
			var ok bool
			if n, ok = s.credit.Take(s.ctx, n); !ok {
				return
			}
		}
		buf := sessionio.GetBuf()
		m, err := r.Read((*buf)[:n])
		if s.flow && m < n {
			s.credit.Add(int64(n - m)) // the unread part of the grant goes back
		}
		if m > 0 {
			if s.q.PushData(context.Background(), s.id, t, buf, m) != nil {
				return
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err != nil {
			return
		}
	}
}

// feed writes queued stdin to the child. An empty stdin chunk from the host is EOF: the pipe
// is closed, or, on a PTY, the terminal's EOF character is sent (twice if the line is not
// empty: once to end the line, once for EOF). Every chunk whose write fails (a child that
// closed its stdin) gets its own exec.stdin.error, as the reference reports each failed write;
// a chunk is at most mux.ChunkSize bytes (larger host chunks are written in pieces).
func (s *Session) feed(stdin io.WriteCloser) {
	defer close(s.fed)
	w := io.Writer(stdin)
	if s.tty != nil {
		w = &lastByteWriter{s: s, w: stdin}
	}
	err := s.in.Run(w)
	for err != nil && err != io.EOF && !s.stopping.Load() {
		s.q.PushMsg(context.Background(), s.id, protocol.TypeExecStdinError, stdinError(err))
		err = s.in.Run(w)
	}
	switch {
	case err == io.EOF:
		if s.tty == nil {
			stdin.Close()
			return
		}
		eof := []byte{veof(s.tty)}
		s.mu.Lock()
		last := s.lastByte
		s.mu.Unlock()
		if last != 0 && last != '\n' {
			s.tty.Write(eof)
		}
		s.tty.Write(eof)
	}
}

type lastByteWriter struct {
	s *Session
	w io.Writer
}

func (l *lastByteWriter) Write(p []byte) (int, error) {
	n, err := l.w.Write(p)
	if n > 0 {
		l.s.mu.Lock()
		l.s.lastByte = p[n-1]
		l.s.mu.Unlock()
	}
	return n, err
}

// Stdin queues host stdin; an empty chunk is EOF. Data after EOF or an error is dropped.
func (s *Session) Stdin(data []byte) {
	if len(data) == 0 {
		s.in.CloseWrite()
		return
	}
	s.in.Write(data)
}

// Resize sets the PTY window size (a no-op in pipe mode).
func (s *Session) Resize(rows, cols uint16) {
	if s.tty != nil {
		setWinsize(s.tty, rows, cols)
	}
}

// setWinsize and veof work on the pollable master without os.File.Fd, which would switch it
// back to blocking mode.
func setWinsize(f *os.File, rows, cols uint16) {
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
		})
	}
}

// veof is the terminal's end-of-file character (^D unless changed).
func veof(f *os.File) byte {
	c := byte(4)
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if t, err := unix.IoctlGetTermios(int(fd), unix.TCGETS); err == nil {
				c = t.Cc[unix.VEOF]
			}
		})
	}
	return c
}

// Signal sends a standard signal (1..31) as Kill does; anything else is ignored, as by the
// reference.
func (s *Session) Signal(sig int32) {
	if sig >= 1 && sig <= 31 {
		s.Kill(syscall.Signal(sig))
	}
}

// Credit adds flow-control credit for output.
func (s *Session) Credit(n uint32) { s.credit.Add(int64(n)) }

// Kill sends sig to the child's process group (the child and everything it started) or, without
// Options.Groups, to the child; the session then ends as usual (exited is still sent). A group
// that is gone (ESRCH) is no error.
func (s *Session) Kill(sig syscall.Signal) {
	s.sigMu.Lock()
	defer s.sigMu.Unlock()
	if s.pid > 0 && !s.reaped {
		if s.groups {
			syscall.Kill(-s.pid, sig)
		} else {
			syscall.Kill(s.pid, sig)
		}
	}
}
