package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/host"
)

const policyUsage = `usage:
  agentctl policy check FILE
  agentctl policy explain [--name NAME] FILE PROTO DEST PORT
  agentctl policy reload [--connect SOCK | --port SPEC] FILE
  agentctl policy show [--connect SOCK | --port SPEC]

check    parses a policy file (JSON or YAML) and prints it normalized, or says what is wrong
explain  prints the rule that decides a flow (with the built-in floor in front of the file's
         rules, as agentd runs it); --name is a name the destination is known by (its DNS pin
         or TLS SNI). DEST may also be a name: then it is decided as a DNS query would be.
reload   checks FILE here, then sends it to agentd over the agent channel (the only way its
         policy changes); agentd swaps it in atomically and resets flows it no longer allows,
         and the command prints the new generation, or agentd's error with the field path
show     prints the policy agentd enforces now, and its generation
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
	case "show":
		return policyShow(args[1:])
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
	fs, level := newFlags("policy reload", "[--connect SOCK | --port SPEC] FILE")
	relay, port := connectFlags(fs)
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
	st, err := c.SetPolicy(ctx, data)
	var pe *host.PolicyError
	if errors.As(err, &pe) {
		return fmt.Errorf("the agent refused %s: %s (generation %d, %d rules, stays in force)", fs.Arg(0), pe.State.Error, pe.State.Generation, pe.State.Rules)
	}
	if err != nil {
		return err
	}
	fmt.Printf("policy %s applied: generation %d, %d rules (floor included)\n", fs.Arg(0), st.Generation, st.Rules)
	return nil
}

func policyShow(args []string) error {
	fs, level := newFlags("policy show", "[--connect SOCK | --port SPEC]")
	relay, port := connectFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Errorf("policy show takes no arguments")}
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.Policy(ctx)
	if err != nil {
		return err
	}
	var doc bytes.Buffer
	json.Indent(&doc, st.Document, "", "  ")
	fmt.Printf("# generation %d, %d rules (floor included)\n%s\n", st.Generation, st.Rules, doc.String())
	return nil
}
