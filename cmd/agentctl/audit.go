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
	fs, level := newFlags("audit", "[--connect SOCK] [-f]")
	relay, port := connectFlags(fs)
	follow := fs.Bool("f", false, "keep printing new records as they come (like tail -f)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Errorf("audit takes no arguments")}
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var lost uint64
	err = c.FollowAudit(ctx, *follow, func(records [][]byte, dropped uint64) error {
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
