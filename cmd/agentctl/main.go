// Command agentctl is the host side of agentd: it serves the agent channel to local clients
// (serve), and forwards local TCP connections into the guest (forward).
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
)

var version = "dev"

const usage = `usage: agentctl COMMAND [options]

commands:
  serve    own an agent channel and serve up to 128 clients on a unix socket
  forward  listen locally and forward each connection to GUEST_HOST:PORT through the agent
  exec     run a program in the guest (-t for a terminal) and exit with its status
  fs       guest files: ls, stat, cat, get, put, mkdir, rm, mv
  policy   check a policy file, explain which rule decides a flow, set or show the guest's policy
  audit    print the guest's egress decisions as JSON lines (-f to follow)
  shutdown ask the agent to shut the guest down (core.shutdown)
  version  print the version

Run 'agentctl COMMAND -h' for a command's options.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "serve":
		err = serve(args)
	case "forward":
		err = forward(args)
	case "exec":
		err = execCmd(args)
	case "fs":
		err = fsCmd(args)
	case "shutdown":
		err = shutdownCmd(args)
	case "policy":
		err = policyCmd(args)
	case "audit":
		err = auditCmd(args)
	case "version", "--version", "-version":
		fmt.Println("agentctl", version)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "agentctl: unknown command %q\n\n%s", cmd, usage)
		os.Exit(2)
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		var ee exitError
		if errors.As(err, &ee) {
			if ee.err != nil {
				fmt.Fprintf(os.Stderr, "agentctl: %v\n", ee.err)
			}
			os.Exit(ee.code)
		}
		fmt.Fprintf(os.Stderr, "agentctl: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// usageError is a bad command line (exit status 2).
type usageError struct{ error }

func newFlags(name, synopsis string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("agentctl "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: agentctl %s %s\n\noptions:\n", name, synopsis)
		fs.PrintDefaults()
	}
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	return fs, level
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	return nil
}

func logger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", level)}
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})).With("component", "agentctl"), nil
}
