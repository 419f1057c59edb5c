package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/agentd/agentd/channel"
	egresspkg "github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/hostserver"
)

func serve(args []string) error {
	c := newCommand("serve", "--port SPEC --listen SOCK [options]",
		"Owns an agent channel (only one program can) and serves it to up to 128 clients on a relay\n"+
			"socket, as microsandbox's relay does: every other agentctl command, and microsandbox's own\n"+
			"clients, connect to that socket. With --egress it also dials out for a guest that has no\n"+
			"network of its own. Runs until SIGINT or SIGTERM, then removes the socket.")
	c.logLevel = "info"
	c.fs.Lookup("log-level").DefValue = "info"
	fs := c.fs
	port := fs.String("port", "", "agent channel `SPEC`: unix:PATH (connect, e.g. a qemu chardev server), unix-listen:PATH (accept one), or a device/pty path")
	listen := fs.String("listen", "", "unix socket `PATH` clients connect to")
	clock := fs.Duration("clock-sync", 60*time.Second, "interval of core.clock.sync (0 disables)")
	noFlow := fs.Bool("no-flow-control", false, "do not negotiate the flow-control extension")
	egress := fs.Bool("egress", false, "serve guest-initiated streams: dial out from this host for a guest that has no network of its own")
	policyFile := fs.String("egress-policy", "", "host-side policy `FILE` (microsandbox's format) the guest's streams must also pass")
	auditPath := fs.String("egress-audit", "", "append one JSON line per host-side decision and closed stream to `FILE` (- for stderr)")
	guestAudit := fs.String("audit", "", "append the guest's egress decision records (sent by agentd) to `FILE`; agentctl audit prints the latest either way")
	wait := fs.Duration("wait", 30*time.Second, "how long to wait for a unix:PATH channel to appear (a VM's socket, an agent's unix-listen)")
	dns := fs.String("egress-dns", "", "resolver `ADDR:PORT` for the guest's DNS (default: this host's /etc/resolv.conf)")
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 0, 0); err != nil {
		return err
	}
	if *port == "" || *listen == "" {
		return usageError{fmt.Errorf("serve needs --port and --listen (see agentctl serve --help)")}
	}
	log, err := c.logger()
	if err != nil {
		return err
	}
	if conn, err := net.Dial("unix", *listen); err == nil { // someone serves it: do not steal it
		conn.Close()
		return fmt.Errorf("host: %s: another relay is serving this socket", *listen)
	}
	os.Remove(*listen) // a stale socket
	l, err := net.Listen("unix", *listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *listen, err)
	}
	defer os.Remove(*listen)
	log.Info("waiting for the agent", "port", *port)
	conn, err := openChannel(*port, *wait)
	if err != nil {
		return err
	}
	opts := hostserver.Options{ClockSyncEvery: *clock, Log: log}
	if *guestAudit != "" {
		f, err := os.OpenFile(*guestAudit, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("--audit: %w", err)
		}
		defer f.Close()
		opts.AuditLog = f
	}
	if *noFlow {
		opts.Features = []string{}
	}
	if *egress {
		so := &hostserver.DialOutOptions{Log: log.With("component", "egress")}
		if *policyFile != "" {
			p, err := policy.Load(*policyFile, "")
			if err != nil {
				return err
			}
			var audit *egresspkg.Audit
			switch *auditPath {
			case "":
			case "-":
				audit = egresspkg.NewAudit(os.Stderr, log)
			default:
				f, err := os.OpenFile(*auditPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
				if err != nil {
					return fmt.Errorf("--egress-audit: %w", err)
				}
				audit = egresspkg.NewAudit(f, log)
			}
			defer audit.Close()
			so.Egress = egresspkg.New(p, egresspkg.Options{HostAddrs: egresspkg.DefaultGuestNet.Gateways(), Audit: audit})
		}
		if *dns != "" {
			ap, err := netip.ParseAddrPort(*dns)
			if err != nil {
				return usageError{fmt.Errorf("--egress-dns %q: want ADDR:PORT", *dns)}
			}
			so.DNS = []netip.AddrPort{ap}
		}
		opts.DialOut = so
	}
	r, err := hostserver.New(conn, opts)
	if err != nil {
		return err
	}
	// SIGINT/SIGTERM end the server cleanly: the socket is removed, clients see EOF.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); r.Close() }()
	log.Info("serving clients", "listen", *listen)
	err = r.Serve(l)
	switch {
	case ctx.Err() != nil:
		log.Info("stopped by signal")
		return nil
	case errors.Is(err, host.ErrClosed):
		log.Info("the agent closed its channel (the guest shut down)")
		return nil
	}
	return err
}

// openChannel opens the agent channel; a unix:PATH socket that does not exist yet, or has no
// listener yet, is waited for (qemu and agentd --port unix-listen: create theirs as they start).
func openChannel(spec string, wait time.Duration) (io.ReadWriteCloser, error) {
	deadline := time.Now().Add(wait)
	for {
		conn, err := channel.Open(spec)
		if err == nil || !strings.HasPrefix(spec, "unix:") || time.Now().After(deadline) ||
			!(errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED)) {
			return conn, err
		}
		time.Sleep(20 * time.Millisecond) // a socket's appearance has no event to wait on
	}
}
