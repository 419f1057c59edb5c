package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
)

// ConnectEnv names the relay socket when --connect is not given (like DOCKER_HOST).
const ConnectEnv = "AGENTCTL_CONNECT"

// errStale is a socket file nobody listens on.
var errStale = errors.New("a stale socket")

// relayGreetingTimeout bounds the wait for a relay's greeting: a relay sends it once its agent
// is ready (at once, unless the VM behind it is still booting).
const relayGreetingTimeout = 60 * time.Second

// target is how a command reaches an agent: --connect (a relay socket) or --port (a channel).
type target struct{ connect, port string }

func (t *target) register(c *command) {
	c.fs.StringVar(&t.connect, "connect", "", "relay socket `PATH` (agentctl serve --listen; make vm's relay.sock); default $"+ConnectEnv+", then the context file")
	c.fs.StringVar(&t.port, "port", "", "talk to an agent channel directly: channel `SPEC` (unix:PATH, unix-listen:PATH or a device), instead of a relay")
}

// resolve returns the relay socket to use and where it came from ("" for --port).
func (t target) resolve() (sock, from string, err error) {
	switch {
	case t.connect != "" && t.port != "":
		return "", "", usageError{fmt.Errorf("use either --connect or --port, not both")}
	case t.connect != "":
		return t.connect, "--connect", nil
	case t.port != "":
		return "", "", nil
	}
	if s := os.Getenv(ConnectEnv); s != "" {
		return s, "$" + ConnectEnv, nil
	}
	file := contextFile()
	if s, err := readContext(file); err == nil && s != "" {
		return s, "the context file " + file, nil
	}
	return "", "", usageError{fmt.Errorf("no agent to talk to: give --connect SOCK (the relay socket of agentctl serve; make vm prints it), set %s=SOCK, or run agentctl context use SOCK", ConnectEnv)}
}

// dial reaches the agent; log gets the client's diagnostics.
func (t target) dial(log *slog.Logger) (*host.Client, error) {
	sock, from, err := t.resolve()
	if err != nil {
		return nil, err
	}
	if sock == "" {
		conn, err := channel.Open(t.port)
		if err != nil {
			return nil, err
		}
		return host.Direct(conn, host.Options{Log: log})
	}
	return dialRelay(sock, from, relayGreetingTimeout, log)
}

// dialRelay connects to a relay socket. What is behind the path is checked first, so that a
// wrong socket (a VM's channel, agentd's own) is named at once with the one to use instead.
func dialRelay(path, from string, greeting time.Duration, log *slog.Logger) (*host.Client, error) {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("relay socket %s (from %s) does not exist: is the VM or agentctl serve running?", path, from)
	case err != nil:
		return nil, fmt.Errorf("relay socket %s (from %s): %w", path, from, err)
	case st.Mode()&os.ModeSocket == 0:
		return nil, fmt.Errorf("%s (from %s) is not a unix socket: want the relay socket of agentctl serve (--listen)", path, from)
	}
	conn, err := net.DialTimeout("unix", path, greeting)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("nobody is listening on %s (from %s): its relay or VM is gone (%w)", path, from, errStale)
		}
		return nil, fmt.Errorf("connect to relay %s: %w", path, err)
	}
	if err := checkPeer(conn.(*net.UnixConn), path); err != nil {
		conn.Close()
		return nil, err
	}
	start := time.Now()
	c, err := host.FromRelay(conn, host.Options{Log: log, HandshakeTimeout: greeting})
	if err != nil {
		conn.Close()
		switch {
		case time.Since(start) >= greeting:
			return nil, fmt.Errorf("%s sent no relay greeting within %v: not an agentctl relay socket, or its agent never became ready", path, greeting.Round(time.Second))
		case strings.Contains(err.Error(), "bad id range"):
			return nil, fmt.Errorf("%s is not a relay socket (%v): it looks like an agent channel; talk to it with --port unix:%s, or serve it with agentctl serve", path, err, path)
		}
		return nil, fmt.Errorf("relay %s: %w", path, err)
	}
	return c, nil
}

// checkPeer refuses a socket that is an agent channel rather than a relay: the credentials of
// a unix socket's peer are its listener's, so the program behind the path is known before
// anything is read. The error names that program and the relay socket to use instead.
func checkPeer(conn *net.UnixConn, path string) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil || cred.Pid <= 0 {
		return nil
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cred.Pid))
	name := strings.TrimSpace(string(comm))
	args := cmdline(int(cred.Pid))
	var what string
	switch {
	case strings.HasPrefix(name, "qemu"):
		what = fmt.Sprintf("a VM's agent channel (%s, pid %d)", name, cred.Pid)
	case name == "agentd":
		what = fmt.Sprintf("agentd's own channel (agentd pid %d listens on it: --port unix-listen:)", cred.Pid)
	case name == "agentctl" && sameFile(flagValue(args, "port"), "unix-listen:"+path):
		what = fmt.Sprintf("the channel agentctl serve (pid %d) takes the agent on", cred.Pid)
		if l := flagValue(args, "listen"); l != "" {
			return fmt.Errorf("%s is %s, not its relay socket: connect to %s", path, what, l)
		}
	default:
		return nil
	}
	if relay := relayFor(path); relay != "" {
		return fmt.Errorf("%s is %s, not a relay socket: agentctl serve relays it on %s; connect to that (--connect %s)", path, what, relay, relay)
	}
	return fmt.Errorf("%s is %s, not a relay socket: one program owns a channel; serve it with agentctl serve --port unix:%s --listen RELAY and connect to RELAY, or use --port unix:%s while nothing else holds it",
		path, what, path, path)
}

// cmdline is a process's arguments.
func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// flagValue finds --name VALUE or --name=VALUE (one or two dashes) in args.
func flagValue(args []string, name string) string {
	for i, a := range args {
		a = strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// sameFile compares two channel specs or paths, cleaned.
func sameFile(a, b string) bool { return a != "" && filepath.Clean(a) == filepath.Clean(b) }

// relayFor finds the agentctl serve that owns the channel at path and returns its relay socket.
func relayFor(path string) string {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	abs, _ := filepath.Abs(path)
	for _, p := range procs {
		var pid int
		fmt.Sscanf(p, "/proc/%d/cmdline", &pid)
		args := cmdline(pid)
		if len(args) < 2 || filepath.Base(args[0]) != "agentctl" || args[1] != "serve" {
			continue
		}
		port := flagValue(args, "port")
		spec, ok := strings.CutPrefix(port, "unix:")
		if !ok {
			continue
		}
		if !filepath.IsAbs(spec) { // relative to that process's working directory
			if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid)); err == nil {
				spec = filepath.Join(cwd, spec)
			}
		}
		if filepath.Clean(spec) == abs {
			l := flagValue(args, "listen")
			if l != "" && !filepath.IsAbs(l) {
				if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid)); err == nil {
					l = filepath.Join(cwd, l)
				}
			}
			return l
		}
	}
	return ""
}

// contextFile is where agentctl context keeps the default relay socket.
func contextFile() string {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = os.TempDir()
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "agentctl", "connect")
}

func readContext(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

const contextAbout = `The relay socket agentctl uses when neither --connect nor $AGENTCTL_CONNECT is given is
kept in a context file (${XDG_CONFIG_HOME:-~/.config}/agentctl/connect). make vm sets it to
its VM's relay socket while the VM runs.

  agentctl context              print the socket in use and where it comes from
  agentctl context use SOCK     make SOCK the default
  agentctl context clear [SOCK] forget the default (only if it is SOCK, when given)`

// contextCmd: agentctl context [use SOCK | clear [SOCK]].
func contextCmd(args []string) error {
	c := newCommand("context", "[use SOCK | clear [SOCK]]", contextAbout)
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	file := contextFile()
	switch {
	case len(pos) == 0:
		sock, from, err := target{}.resolve()
		if err != nil {
			return err
		}
		fmt.Printf("%s\t(from %s)\n", sock, from)
		return nil
	case pos[0] == "use" && len(pos) == 2:
		abs, err := filepath.Abs(pos[1])
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			return fmt.Errorf("host: %w", err)
		}
		tmp := file + ".new"
		if err := os.WriteFile(tmp, []byte(abs+"\n"), 0o600); err != nil {
			return fmt.Errorf("host: %w", err)
		}
		return os.Rename(tmp, file)
	case pos[0] == "clear" && len(pos) <= 2:
		if len(pos) == 2 {
			abs, _ := filepath.Abs(pos[1])
			if cur, _ := readContext(file); cur != abs {
				return nil // someone else's now
			}
		}
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("host: %w", err)
		}
		return nil
	}
	return c.nargs(nil, 1, 0)
}

const waitAbout = `Waits until the relay socket answers with the agent's greeting (the relay is up and the agent
is ready), then exits 0: for scripts that start agentctl serve or a VM in the background.
A socket that is something else than a relay (a VM's channel) fails at once.`

// waitCmd: agentctl wait [--timeout D].
func waitCmd(args []string) error {
	c := newCommand("wait", "[--connect SOCK] [--timeout DURATION]", waitAbout)
	var to target
	to.register(c)
	timeout := c.fs.Duration("timeout", 60*time.Second, "give up after `DURATION`")
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 0, 0); err != nil {
		return err
	}
	if to.port != "" {
		return usageError{fmt.Errorf("wait needs a relay socket (--connect), not a channel")}
	}
	sock, from, err := to.resolve()
	if err != nil {
		return err
	}
	log, err := c.logger()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(*timeout)
	for {
		st, err := os.Stat(sock)
		if err == nil && st.Mode()&os.ModeSocket != 0 {
			cl, err := dialRelay(sock, from, max(time.Until(deadline), time.Second), log)
			if err == nil {
				cl.Close()
				return nil
			}
			if !errors.Is(err, errStale) {
				return err
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("relay socket %s (from %s) did not come up within %v", sock, from, *timeout)
		}
		time.Sleep(50 * time.Millisecond) // a socket's appearance has no event to wait on
	}
}
