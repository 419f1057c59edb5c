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

const policyAbout = `Egress policies in microsandbox's format (JSON or YAML; examples/ has some to start from).

commands:
  check FILE...                      parse policy files and print each normalized, or say what is
                                     wrong (the field and the right form)
  explain [--name NAME] FILE PROTO DEST PORT
                                     print the rule that decides a flow (with agentd's floor in
                                     front of the file's rules, as agentd runs it); DEST may be a
                                     name: then it is decided as a DNS query
  reload FILE                        check FILE here, then send it to agentd over the agent
                                     channel (the only way its policy changes); print the new
                                     generation, or agentd's error with the field path
  show                               print the policy agentd enforces now, and its generation

Run 'agentctl policy COMMAND --help' for a command's options.`

// policyCmd: agentctl policy check|explain|reload.
func policyCmd(args []string) error {
	top := newCommand("policy", "COMMAND [options] ARGS", policyAbout)
	rest, err := top.parse(args, true)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return usageError{fmt.Errorf("policy needs a command: check, explain, reload or show (see agentctl policy --help)")}
	}
	switch rest[0] {
	case "check":
		return policyCheck(rest[1:])
	case "explain":
		return policyExplain(rest[1:])
	case "reload":
		return policyReload(rest[1:])
	case "show":
		return policyShow(rest[1:])
	case "help":
		top.help(os.Stdout)
		return nil
	}
	return usageError{fmt.Errorf("unknown policy command %q: want check, explain, reload or show (see agentctl policy --help)", rest[0])}
}

func policyCheck(args []string) error {
	c := newCommand("policy check", "FILE...", "Parses each policy file (JSON or YAML) and prints it normalized as JSON (rule ids filled in),\nor says what is wrong and exits 1.")
	quiet := c.fs.Bool("q", false, "print nothing for a good file, only the errors")
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 1, -1); err != nil {
		return err
	}
	bad := 0
	for _, file := range pos {
		p, _, err := policy.ReadFile(file)
		if err != nil {
			fmt.Fprintf(os.Stderr, "agentctl: %v\n", err)
			bad++
			continue
		}
		if *quiet {
			continue
		}
		if p.Rules == nil {
			p.Rules = []policy.Rule{} // "rules": [], not null
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(p); err != nil {
			return err
		}
	}
	if bad > 0 {
		return exitError{1, nil}
	}
	return nil
}

func policyExplain(args []string) error {
	c := newCommand("policy explain", "[--name NAME]... FILE PROTO DEST PORT",
		"Prints the rule of FILE that decides a flow of PROTO (tcp, udp, icmpv4, icmpv6) to DEST:PORT,\n"+
			"decided as agentd does in the guest's network (the gateway is group host). --name is a name\n"+
			"the destination is known by (its DNS pin or TLS SNI). A name as DEST is decided as a DNS query.")
	var names stringList
	c.fs.Var(&names, "name", "a `NAME` the destination is known by (repeatable)")
	floor := c.fs.Bool("floor", true, "put agentd's built-in floor (deny metadata) in front of the file's rules")
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 4, 4); err != nil {
		return err
	}
	p, _, err := policy.ReadFile(pos[0])
	if err != nil {
		return err
	}
	if *floor {
		if p, err = policy.WithFloor(policy.DefaultFloor, p); err != nil {
			return err
		}
	}
	proto := policy.Protocol(strings.ToLower(pos[1]))
	switch proto {
	case policy.TCP, policy.UDP, policy.ICMPv4, policy.ICMPv6:
	default:
		return usageError{fmt.Errorf("PROTO %q: want tcp, udp, icmpv4 or icmpv6", pos[1])}
	}
	port, err := strconv.ParseUint(pos[3], 10, 16)
	if err != nil {
		return usageError{fmt.Errorf("PORT %q: want 0-65535", pos[3])}
	}
	// Decided by the same service agentd runs, in the guest network's context (the gateway is
	// group "host"), with no DNS pins: --name stands for them.
	svc := egress.New(p, egress.Options{HostAddrs: egress.DefaultGuestNet.Gateways()})
	var d policy.Decision
	what := ""
	if addr, err := netip.ParseAddr(pos[2]); err == nil {
		d = svc.Decide(policy.Flow{Direction: policy.Egress, Protocol: proto, Addr: addr, Port: uint16(port), Names: names})
		what = fmt.Sprintf("%s %s", proto, netip.AddrPortFrom(addr, uint16(port)))
		if len(names) > 0 {
			what += " known as " + strings.Join(names, ", ")
		}
		what += fmt.Sprintf(" (group %s)", policy.Classify(addr, svc.Context()))
	} else {
		d = p.DecideQuery(pos[2], proto, uint16(port))
		what = fmt.Sprintf("DNS query for %s over %s/%d", pos[2], proto, port)
	}
	fmt.Printf("%s: %s\n  rule:   %s\n  reason: %s\n", what, strings.ToUpper(string(d.Action)), d.RuleID, d.Reason)
	if r, ok := p.Rule(d.RuleID); ok {
		b, _ := json.Marshal(r)
		fmt.Printf("  %s\n", b)
	}
	return nil
}

func policyReload(args []string) error {
	c := newCommand("policy reload", "[options] FILE",
		"Checks FILE on this host, then sends it to agentd over the agent channel (the host owns the\n"+
			"policy: nothing inside the guest can change it). agentd puts its floor in front, swaps it in\n"+
			"atomically and resets the flows it no longer allows; the command prints the new generation,\n"+
			"or agentd's error with the field path (the old policy stays in force).")
	var to target
	to.register(c)
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 1, 1); err != nil {
		return err
	}
	_, data, err := policy.ReadFile(pos[0]) // refuse a bad file here, before touching the guest
	if err != nil {
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := cl.SetPolicy(ctx, data)
	var pe *host.PolicyError
	if errors.As(err, &pe) {
		return fmt.Errorf("the agent refused %s: %s (generation %d, %d rules, stays in force)", pos[0], pe.State.Error, pe.State.Generation, pe.State.Rules)
	}
	if err != nil {
		return err
	}
	fmt.Printf("policy %s applied: generation %d, %d rules (floor included)\n", pos[0], st.Generation, st.Rules)
	return nil
}

func policyShow(args []string) error {
	c := newCommand("policy show", "[options]", "Prints the policy agentd enforces now (normalized JSON, its floor included) and its generation.")
	var to target
	to.register(c)
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := cl.Policy(ctx)
	if err != nil {
		return err
	}
	var doc bytes.Buffer
	json.Indent(&doc, st.Document, "", "  ")
	fmt.Printf("# generation %d, %d rules (floor included)\n%s\n", st.Generation, st.Rules, doc.String())
	return nil
}
