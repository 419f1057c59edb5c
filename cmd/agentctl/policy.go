package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/protocol"
)

const policyUsage = `usage:
  agentctl policy check FILE
  agentctl policy explain [--name NAME] FILE PROTO DEST PORT
  agentctl policy reload [--connect SOCK | --port SPEC] [--path GUEST_PATH] [--pid PID] FILE

check    parses a policy file (JSON or YAML) and prints it normalized, or says what is wrong
explain  prints the rule that decides a flow (with the built-in floor in front of the file's
         rules, as agentd runs it); --name is a name the destination is known by (its DNS pin
         or TLS SNI). DEST may also be a name: then it is decided as a DNS query would be.
reload   checks FILE, writes it to the guest's policy path and signals agentd (SIGHUP) to swap
         it in atomically; flows the new policy no longer allows are reset
`

// policyCmd: agentctl policy check|explain|reload.
func policyCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, policyUsage)
		return usageError{fmt.Errorf("policy needs a subcommand")}
	}
	switch args[0] {
	case "check":
		return policyCheck(args[1:])
	case "explain":
		return policyExplain(args[1:])
	case "reload":
		return policyReload(args[1:])
	}
	fmt.Fprint(os.Stderr, policyUsage)
	return usageError{fmt.Errorf("unknown policy subcommand %q", args[0])}
}

func policyCheck(args []string) error {
	fs, _ := newFlags("policy check", "FILE")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError{fmt.Errorf("policy check takes one FILE")}
	}
	p, _, err := policy.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(p)
}

func policyExplain(args []string) error {
	fs, _ := newFlags("policy explain", "[--name NAME] FILE PROTO DEST PORT")
	var names stringList
	fs.Var(&names, "name", "a `NAME` the destination is known by (repeatable)")
	floor := fs.Bool("floor", true, "put agentd's built-in floor (deny metadata) in front of the file's rules")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 4 {
		return usageError{fmt.Errorf("policy explain takes FILE PROTO DEST PORT")}
	}
	p, _, err := policy.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	if *floor {
		if p, err = policy.WithFloor(policy.DefaultFloor, p); err != nil {
			return err
		}
	}
	proto := policy.Protocol(strings.ToLower(fs.Arg(1)))
	switch proto {
	case policy.TCP, policy.UDP, policy.ICMPv4, policy.ICMPv6:
	default:
		return usageError{fmt.Errorf("PROTO %q: want tcp, udp, icmpv4 or icmpv6", fs.Arg(1))}
	}
	port, err := strconv.ParseUint(fs.Arg(3), 10, 16)
	if err != nil {
		return usageError{fmt.Errorf("PORT %q: want 0-65535", fs.Arg(3))}
	}
	// Decided by the same service agentd runs, in the guest network's context (the gateway is
	// group "host"), with no DNS pins: --name stands for them.
	svc := egress.New(p, egress.Options{HostAddrs: egress.DefaultGuestNet.Gateways()})
	var d policy.Decision
	what := ""
	if addr, err := netip.ParseAddr(fs.Arg(2)); err == nil {
		d = svc.Decide(policy.Flow{Direction: policy.Egress, Protocol: proto, Addr: addr, Port: uint16(port), Names: names})
		what = fmt.Sprintf("%s %s", proto, netip.AddrPortFrom(addr, uint16(port)))
		if len(names) > 0 {
			what += " known as " + strings.Join(names, ", ")
		}
		what += fmt.Sprintf(" (group %s)", policy.Classify(addr, svc.Context()))
	} else {
		d = p.DecideQuery(fs.Arg(2), proto, uint16(port))
		what = fmt.Sprintf("DNS query for %s over %s/%d", fs.Arg(2), proto, port)
	}
	fmt.Printf("%s: %s\n  rule:   %s\n  reason: %s\n", what, strings.ToUpper(string(d.Action)), d.RuleID, d.Reason)
	if r, ok := p.Rule(d.RuleID); ok {
		b, _ := json.Marshal(r)
		fmt.Printf("  %s\n", b)
	}
	return nil
}

func policyReload(args []string) error {
	fs, level := newFlags("policy reload", "[--connect SOCK | --port SPEC] [--path GUEST_PATH] [--pid PID] FILE")
	relay, port := connectFlags(fs)
	path := fs.String("path", "/etc/agentd/egress.json", "the guest's policy file (agentd's --egress-policy)")
	pid := fs.Int("pid", 1, "agentd's process id in the guest (1 when it is the guest's init)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError{fmt.Errorf("policy reload takes one FILE")}
	}
	_, data, err := policy.ReadFile(fs.Arg(0)) // refuse a bad file here, before touching the guest
	if err != nil {
		return err
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Written beside the target and renamed over it, so agentd never reads half a file.
	tmp := *path + ".new"
	if _, err := c.WriteFile(ctx, tmp, 0o600, bytes.NewReader(data)); err != nil {
		return fmt.Errorf("write %s in the guest: %w", tmp, err)
	}
	if _, err := c.Fs(ctx, &protocol.FsRename{Src: tmp, Dst: *path}); err != nil {
		return fmt.Errorf("rename %s in the guest: %w", *path, err)
	}
	out, errOut, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "kill", Args: []string{"-HUP", strconv.Itoa(*pid)}}, nil)
	if err != nil || code != 0 {
		return fmt.Errorf("signal agentd (pid %d): exit %d %v %s%s", *pid, code, err, out, errOut)
	}
	fmt.Printf("policy %s installed at %s; agentd (pid %d) reloads it now\n", fs.Arg(0), *path, *pid)
	return nil
}
