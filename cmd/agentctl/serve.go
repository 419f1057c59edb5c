package main

import (
	"fmt"
	"net"
	"os"
	"time"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
)

func serve(args []string) error {
	fs, level := newFlags("serve", "--port SPEC --listen SOCK")
	port := fs.String("port", "", "agent channel `SPEC`: unix:PATH (connect, e.g. a qemu chardev server), unix-listen:PATH (accept one), or a device/pty path")
	listen := fs.String("listen", "", "unix socket `PATH` clients connect to")
	clock := fs.Duration("clock-sync", 60*time.Second, "interval of core.clock.sync (0 disables)")
	noFlow := fs.Bool("no-flow-control", false, "do not negotiate the flow-control extension")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *port == "" || *listen == "" {
		return usageError{fmt.Errorf("serve needs --port and --listen")}
	}
	log, err := logger(*level)
	if err != nil {
		return err
	}
	os.Remove(*listen)
	l, err := net.Listen("unix", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	defer os.Remove(*listen)
	log.Info("waiting for the agent", "port", *port)
	conn, err := channel.Open(*port)
	if err != nil {
		return err
	}
	opts := host.RelayOptions{ClockSyncEvery: *clock, Log: log}
	if *noFlow {
		opts.Features = []string{}
	}
	r, err := host.NewRelay(conn, opts)
	if err != nil {
		return err
	}
	log.Info("serving clients", "listen", *listen)
	return r.Serve(l)
}
