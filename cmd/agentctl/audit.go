package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// auditCmd: agentctl audit [-f]: the guest's egress decisions, as JSON lines.
func auditCmd(args []string) error {
	c := newCommand("audit", "[options]", "Prints the guest's egress decision records (JSON lines, one per decision and per closed\n"+
		"flow) that the relay server holds; with -f it keeps printing new ones as they come, like\n"+
		"tail -f. agentd sends them over the agent channel, out of the workloads' reach.")
	var to target
	to.register(c)
	follow := c.fs.Bool("f", false, "keep printing new records as they come")
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 0, 0); err != nil {
		return err
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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var lost uint64
	err = cl.FollowAudit(ctx, *follow, func(records [][]byte, dropped uint64) error {
		for _, r := range records {
			if _, err := os.Stdout.Write(append(r, '\n')); err != nil {
				return err
			}
		}
		lost = dropped
		return nil
	})
	if lost > 0 {
		fmt.Fprintf(os.Stderr, "agentctl: %d audit records were lost on the way (the host read too slowly)\n", lost)
	}
	if ctx.Err() != nil {
		return nil
	}
	return err
}
