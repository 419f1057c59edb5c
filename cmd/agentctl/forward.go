package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
)

// connectFlags adds the two ways of reaching an agent: a relay socket or the raw channel.
func connectFlags(fs interface {
	String(string, string, string) *string
}) (relay, port *string) {
	relay = fs.String("connect", "", "relay socket `PATH` (from agentctl serve)")
	port = fs.String("port", "", "talk to the agent channel directly: channel `SPEC` (see serve)")
	return
}

// connect makes the logger for level and reaches the agent (the preamble of every command
// that talks to one).
func connect(level, relay, port string) (*host.Client, *slog.Logger, error) {
	log, err := logger(level)
	if err != nil {
		return nil, nil, err
	}
	c, err := dialAgent(relay, port, log)
	return c, log, err
}

func dialAgent(relay, port string, log *slog.Logger) (*host.Client, error) {
	switch {
	case relay != "" && port != "":
		return nil, usageError{fmt.Errorf("use either --connect or --port, not both")}
	case relay != "":
		return host.Connect(relay, host.Options{Log: log})
	case port != "":
		conn, err := channel.Open(port)
		if err != nil {
			return nil, err
		}
		return host.Direct(conn, host.Options{Log: log})
	}
	return nil, usageError{fmt.Errorf("need --connect SOCK or --port SPEC")}
}

func forward(args []string) error {
	fs, level := newFlags("forward", "[--connect SOCK | --port SPEC] LOCAL_ADDR GUEST_HOST:PORT")
	relay, port := connectFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return usageError{fmt.Errorf("forward needs LOCAL_ADDR and GUEST_HOST:PORT")}
	}
	ghost, gport, err := net.SplitHostPort(fs.Arg(1))
	if err != nil {
		return usageError{fmt.Errorf("guest address %q: %w", fs.Arg(1), err)}
	}
	pn, err := strconv.ParseUint(gport, 10, 16)
	if err != nil {
		return usageError{fmt.Errorf("guest port %q: must be 0-65535", gport)}
	}
	c, log, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	l, err := net.Listen("tcp", fs.Arg(0))
	if err != nil {
		return fmt.Errorf("listen %s: %w", fs.Arg(0), err)
	}
	go func() { <-c.Done(); l.Close() }()
	log.Info("forwarding", "local", l.Addr().String(), "guest", fs.Arg(1))
	for {
		local, err := l.Accept()
		if err != nil {
			if c.Err() != nil {
				return fmt.Errorf("agent connection: %w", c.Err())
			}
			return err
		}
		go func() {
			if err := pipe(c, local.(*net.TCPConn), ghost, uint16(pn)); err != nil {
				log.Warn("forward failed", "from", local.RemoteAddr().String(), "error", err)
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
