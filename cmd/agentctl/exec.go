package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/protocol"
)

const execAbout = `Runs CMD in the guest and exits with its status, as docker exec and ssh do: the program's
exit code, 128+N when signal N killed it, 126 when it could not be started (a missing working
directory, an unknown user), 127 when it does not exist.

  -i   keep stdin attached (without it the program's stdin is at EOF)
  -t   run under a terminal (this one in raw mode); needs stdin to be a terminal, else it is
       dropped with a note
  -it  an interactive shell: agentctl exec -it -- sh

Signals agentctl gets (INT, TERM, HUP, QUIT) are passed to the program; window size changes
follow under -t. Options end at CMD; "--" before it is optional.`

// execCmd runs a program in the guest, wired to this terminal, and exits with its status.
func execCmd(args []string) error {
	c := newCommand("exec", "[-i] [-t] [-u USER] [-w DIR] [-e K=V]... [--] CMD [ARG...]", execAbout)
	var to target
	to.register(c)
	interactive := c.fs.Bool("i", false, "keep stdin attached to the program")
	tty := c.fs.Bool("t", false, "allocate a terminal (a PTY) for the program")
	user := c.fs.String("u", "", "run as `USER[:GROUP]` (name or id)")
	dir := c.fs.String("w", "", "working `DIR`ectory in the guest")
	var env stringList
	c.fs.Var(&env, "e", "set `K=V` in the environment (repeatable)")
	cmdline, err := c.parse(args, true)
	if err != nil {
		return err
	}
	if len(cmdline) == 0 {
		return usageError{fmt.Errorf("exec needs a command: agentctl exec [-it] -- CMD [ARG...]")}
	}
	in := int(os.Stdin.Fd())
	_, termErr := unix.IoctlGetTermios(in, unix.TCGETS)
	if *tty && termErr != nil {
		// A remote PTY fed from a pipe would echo every line back into the output.
		fmt.Fprintln(os.Stderr, "agentctl: -t ignored: stdin is not a terminal (running without a PTY)")
		*tty = false
	}
	log, err := c.logger()
	if err != nil {
		return err
	}
	cl, err := to.dial(log)
	if err != nil {
		return err
	}
	defer cl.Close()
	req := protocol.ExecRequest{Cmd: cmdline[0], Args: cmdline[1:], Env: env, TTY: *tty}
	if *user != "" {
		req.User = user
	}
	if *dir != "" {
		req.Cwd = dir
	}
	if *tty {
		if sz, err := pty.GetsizeFull(os.Stdin); err == nil {
			req.Rows, req.Cols = sz.Rows, sz.Cols
		}
		if t := os.Getenv("TERM"); t != "" {
			req.Env = append(req.Env, "TERM="+t)
		}
	}
	ctx := context.Background()
	e, err := cl.Exec(ctx, req)
	if err != nil {
		return execFailure(ctx, cl, req, err)
	}
	defer e.Close()
	if *tty && *interactive {
		// Raw mode: keys (^C, ^D included) go to the remote terminal, which acts on them.
		if saved, err := unix.IoctlGetTermios(in, unix.TCGETS); err == nil {
			channel.MakeRaw(in)
			defer unix.IoctlSetTermios(in, unix.TCSETS, saved)
		}
	}
	var lastSignal atomic.Int32 // the last signal passed on, for a stock agent's bare -1
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGWINCH, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			if s == syscall.SIGWINCH {
				if sz, err := pty.GetsizeFull(os.Stdin); err == nil && *tty {
					e.Resize(sz.Rows, sz.Cols)
				}
				continue
			}
			n := int32(s.(syscall.Signal))
			lastSignal.Store(n)
			e.Signal(n)
		}
	}()
	switch {
	case *interactive:
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, err := os.Stdin.Read(buf)
				if n > 0 && e.Stdin(ctx, buf[:n]) != nil {
					return
				}
				if err != nil {
					e.CloseStdin()
					return
				}
			}
		}()
	case !*tty:
		e.CloseStdin() // docker's way: no -i, no stdin
	}
	for {
		ev, err := e.Next(ctx)
		if err != nil {
			return fmt.Errorf("guest: %s: %w", req.Cmd, err)
		}
		os.Stdout.Write(ev.Stdout)
		os.Stderr.Write(ev.Stderr)
		if ev.StdinError != nil {
			fmt.Fprintf(os.Stderr, "agentctl: guest: %s: stdin: %s\n", req.Cmd, ev.StdinError.Message)
		}
		if ev.Exited {
			return exitStatusOf(req.Cmd, ev, lastSignal.Load())
		}
	}
}

// exitStatusOf turns core.exec.exited into agentctl's exit: the code, or 128+N for a death by
// signal N (agentd names it; with a stock agent, the signal agentctl passed on, if any).
func exitStatusOf(cmd string, ev host.ExecEvent, passed int32) error {
	if ev.Code >= 0 {
		if ev.Code == 0 {
			return nil
		}
		return exitError{int(ev.Code), nil}
	}
	sig := ev.Signal
	if sig == 0 {
		sig = passed
	}
	if sig <= 0 || sig > 64 {
		return exitError{255, fmt.Errorf("guest: %s was killed by a signal (the agent does not say which)", cmd)}
	}
	name := unix.SignalName(syscall.Signal(sig))
	if name == "" {
		name = fmt.Sprintf("signal %d", sig)
	}
	return exitError{128 + int(sig), fmt.Errorf("guest: %s was killed by %s", cmd, name)}
}

// execFailure explains a program that never ran, as docker and a shell do: 127 when it does
// not exist, 126 when it cannot be started; a missing working directory or user is named as
// such (the agent reports a bad cwd as the program's ENOENT, as the reference does).
func execFailure(ctx context.Context, cl *host.Client, req protocol.ExecRequest, err error) error {
	var f *protocol.ExecFailed
	if !errors.As(err, &f) {
		return fmt.Errorf("guest: exec %s: %w", req.Cmd, err)
	}
	if req.Cwd != nil && (f.Kind == protocol.ExecNotFound || f.Kind == protocol.ExecPermissionDenied || f.Kind == protocol.ExecBadCwd) {
		d, serr := cl.Fs(ctx, &protocol.FsStat{Path: *req.Cwd, FollowSymlink: true})
		switch {
		case serr != nil:
			return exitError{126, fmt.Errorf("guest: working directory %s: %s", *req.Cwd, trimOp(serr.Error()))}
		case d == nil || d.Stat.Kind != "dir":
			return exitError{126, fmt.Errorf("guest: working directory %s: Not a directory", *req.Cwd)}
		}
	}
	msg := strings.TrimPrefix(f.Message, "exec session error: ")
	if u, ok := strings.CutPrefix(msg, "guest user not found: "); ok {
		return exitError{126, fmt.Errorf("guest: user %s does not exist", u)}
	}
	if g, ok := strings.CutPrefix(msg, "guest group not found: "); ok {
		return exitError{126, fmt.Errorf("guest: group %s does not exist", g)}
	}
	switch f.Kind {
	case protocol.ExecNotFound:
		return exitError{127, fmt.Errorf("guest: %s: command not found (%s)", req.Cmd, msg)}
	case protocol.ExecPermissionDenied, protocol.ExecNotExecutable:
		return exitError{126, fmt.Errorf("guest: %s: cannot execute (%s)", req.Cmd, msg)}
	}
	return exitError{126, fmt.Errorf("guest: cannot run %s: %s", req.Cmd, msg)}
}

// trimOp drops the agent's operation prefixes ("stat: ", "opendir: ") from an fs error
// message, leaving the OS's words.
func trimOp(msg string) string {
	for {
		op, rest, ok := strings.Cut(msg, ": ")
		if !ok || op == "" || strings.ContainsAny(op, " /") {
			return msg
		}
		msg = rest
	}
}
