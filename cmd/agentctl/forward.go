package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/agentd/agentd/host"
)

const forwardAbout = `Listens on this host and forwards each connection to HOST:PORT as seen from the guest, like
ssh -L. Each SPEC is one of

  PORT                     127.0.0.1:PORT here to 127.0.0.1:PORT in the guest
  LOCAL_PORT:HOST:PORT     127.0.0.1:LOCAL_PORT here to HOST:PORT from the guest
  BIND:LOCAL_PORT:HOST:PORT  BIND:LOCAL_PORT here (* for every address; [::1] for IPv6)

LOCAL_PORT 0 takes any free port; the "forwarding" line on stderr says which.
Local ports bind to loopback unless BIND says otherwise, as with ssh. The older form
LOCAL_ADDR GUEST_HOST:PORT (two arguments) still works. A connection into the guest itself
(its loopback, its own address) is decided by the guest's egress policy as ingress: a
deny-by-default policy keeps forwards working with "default_ingress: allow" (see
docs/egress.md). Runs until interrupted.`

// forwardSpec is one local listener and where its connections go in the guest.
type forwardSpec struct {
	local string // host:port to listen on
	host  string // the guest-side destination
	port  uint16
}

func (f forwardSpec) String() string {
	return fmt.Sprintf("%s -> guest %s", f.local, net.JoinHostPort(f.host, strconv.Itoa(int(f.port))))
}

// splitSpec splits an ssh -L spec on ':' outside brackets, dropping the brackets.
func splitSpec(s string) []string {
	var parts []string
	var cur strings.Builder
	depth := 0
	for _, r := range s {
		switch {
		case r == '[':
			depth++
		case r == ']':
			depth--
		case r == ':' && depth == 0:
			parts = append(parts, cur.String())
			cur.Reset()
		default:
			cur.WriteRune(r)
		}
	}
	return append(parts, cur.String())
}

// parsePort reads a port; a local one may be 0 (any free port, printed when listening).
func parsePort(what, s string, zero bool) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || (n == 0 && !zero) {
		return 0, usageError{fmt.Errorf("%s %q: want a port number 1-65535", what, s)}
	}
	return uint16(n), nil
}

// parseForwards reads the operands: ssh -L specs, or the older LOCAL_ADDR GUEST_HOST:PORT.
func parseForwards(args []string) ([]forwardSpec, error) {
	if len(args) == 2 && len(splitSpec(args[0])) == 2 { // LOCAL_ADDR GUEST_HOST:PORT
		if _, _, err := net.SplitHostPort(args[0]); err != nil {
			return nil, usageError{fmt.Errorf("local address %q: %v", args[0], err)}
		}
		h, p, err := net.SplitHostPort(args[1])
		if err != nil {
			return nil, usageError{fmt.Errorf("guest address %q: %v", args[1], err)}
		}
		port, err := parsePort("guest port", p, false)
		if err != nil {
			return nil, err
		}
		return []forwardSpec{{local: args[0], host: h, port: port}}, nil
	}
	var out []forwardSpec
	for _, a := range args {
		parts := splitSpec(a)
		bind, lport, ghost, gport := "127.0.0.1", "", "127.0.0.1", ""
		switch len(parts) {
		case 1:
			lport, gport = parts[0], parts[0]
		case 3:
			lport, ghost, gport = parts[0], parts[1], parts[2]
		case 4:
			bind, lport, ghost, gport = parts[0], parts[1], parts[2], parts[3]
			if bind == "*" {
				bind = ""
			}
		default:
			return nil, usageError{fmt.Errorf("forward %q: want PORT, LOCAL_PORT:HOST:PORT or BIND:LOCAL_PORT:HOST:PORT", a)}
		}
		if _, err := parsePort("local port", lport, len(parts) > 1); err != nil {
			return nil, err
		}
		port, err := parsePort("guest port", gport, false)
		if err != nil {
			return nil, err
		}
		if ghost == "" {
			return nil, usageError{fmt.Errorf("forward %q: empty guest host", a)}
		}
		out = append(out, forwardSpec{local: net.JoinHostPort(bind, lport), host: ghost, port: port})
	}
	return out, nil
}

func forward(args []string) error {
	c := newCommand("forward", "[options] SPEC... | LOCAL_ADDR GUEST_HOST:PORT", forwardAbout)
	var to target
	to.register(c)
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 1, -1); err != nil {
		return err
	}
	specs, err := parseForwards(pos)
	if err != nil {
		return err
	}
	log, err := c.logger()
	if err != nil {
		return err
	}
	// Listen first: a port in use is reported before the agent is touched.
	ls := make([]net.Listener, len(specs))
	for i, s := range specs {
		if ls[i], err = net.Listen("tcp", s.local); err != nil {
			for _, l := range ls[:i] {
				l.Close()
			}
			return fmt.Errorf("host: listen %s: %w", s.local, err)
		}
		defer ls[i].Close()
	}
	cl, err := to.dial(log)
	if err != nil {
		return err
	}
	defer cl.Close()
	go func() {
		<-cl.Done()
		for _, l := range ls {
			l.Close()
		}
	}()
	errs := make(chan error, len(specs))
	for i, s := range specs {
		s.local = ls[i].Addr().String()
		fmt.Fprintf(os.Stderr, "forwarding %s\n", s)
		go func() { errs <- serveForward(cl, ls[i], s, log) }()
	}
	err = <-errs
	if cl.Err() != nil {
		return fmt.Errorf("agent connection: %w", cl.Err())
	}
	return err
}

func serveForward(cl *host.Client, l net.Listener, s forwardSpec, log *slog.Logger) error {
	for {
		local, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			if err := pipe(cl, local.(*net.TCPConn), s.host, s.port); err != nil {
				fmt.Fprintf(os.Stderr, "agentctl: forward %s: connection from %s: guest: %v\n", s, local.RemoteAddr(), err)
			}
		}()
	}
}

// pipe joins a local connection and a guest stream, passing each side's half-close on.
func pipe(c *host.Client, local *net.TCPConn, ghost string, gport uint16) error {
	defer local.Close()
	remote, err := c.DialTCP(context.Background(), ghost, gport)
	if err != nil {
		return err
	}
	defer remote.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(remote, local)
		remote.CloseWrite()
	}()
	_, err = io.Copy(local, remote)
	if err != nil {
		local.Close() // unblocks the other direction
	} else {
		local.CloseWrite()
	}
	wg.Wait()
	return err
}
