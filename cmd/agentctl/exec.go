package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/protocol"
)

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// execCmd runs a program in the guest, wired to this terminal, and exits with its code.
func execCmd(args []string) error {
	fs, level := newFlags("exec", "[-t] [-u USER] [-w DIR] [-e K=V]... [--connect SOCK | --port SPEC] -- CMD ARGS...")
	relay, port := connectFlags(fs)
	tty := fs.Bool("t", false, "run under a PTY, with this terminal in raw mode")
	user := fs.String("u", "", "run as `USER[:GROUP]` (name or uid)")
	dir := fs.String("w", "", "working `DIR`ectory")
	var env stringList
	fs.Var(&env, "e", "set `K=V` in the environment (repeatable)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageError{fmt.Errorf("exec needs a command")}
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	req := protocol.ExecRequest{Cmd: fs.Arg(0), Args: fs.Args()[1:], Env: env, TTY: *tty}
	if *user != "" {
		req.User = user
	}
	if *dir != "" {
		req.Cwd = dir
	}
	in := int(os.Stdin.Fd())
	if *tty {
		if sz, err := pty.GetsizeFull(os.Stdin); err == nil {
			req.Rows, req.Cols = sz.Rows, sz.Cols
		}
		if t := os.Getenv("TERM"); t != "" {
			req.Env = append(req.Env, "TERM="+t)
		}
	}
	ctx := context.Background()
	e, err := c.Exec(ctx, req)
	if err != nil {
		var f *protocol.ExecFailed
		if errors.As(err, &f) {
			code := 126
			if f.Kind == protocol.ExecNotFound {
				code = 127
			}
			return exitError{code, fmt.Errorf("%s: %s", f.Kind, f.Message)}
		}
		return err
	}
	defer e.Close()
	if *tty {
		if saved, err := unix.IoctlGetTermios(in, unix.TCGETS); err == nil {
			channel.MakeRaw(in)
			defer unix.IoctlSetTermios(in, unix.TCSETS, saved)
		}
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGWINCH, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			if s == syscall.SIGWINCH {
				if sz, err := pty.GetsizeFull(os.Stdin); err == nil {
					e.Resize(sz.Rows, sz.Cols)
				}
				continue
			}
			e.Signal(int32(s.(syscall.Signal)))
		}
	}()
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
	for {
		ev, err := e.Next(ctx)
		if err != nil {
			return err
		}
		os.Stdout.Write(ev.Stdout)
		os.Stderr.Write(ev.Stderr)
		if ev.StdinError != nil {
			fmt.Fprintf(os.Stderr, "agentctl: stdin: %s\n", ev.StdinError.Message)
		}
		if ev.Exited {
			if ev.Code == 0 {
				return nil
			}
			code := int(ev.Code)
			if code < 0 {
				code = 255 // killed by a signal
			}
			return exitError{code, nil}
		}
	}
}

// exitError exits with a program's status; err, if set, is printed first.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("exit status %d", e.code)
}
