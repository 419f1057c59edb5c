// Command agentctl is the host side of agentd: it serves the agent channel to local clients
// (serve), runs programs and moves files in the guest (exec, fs), forwards local TCP ports
// into it (forward), and checks, explains and reloads egress policies (policy).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

var version = "dev"

const usage = `usage: agentctl COMMAND [options] [ARGS]

commands:
  exec      run a program in the guest (-i stdin, -t terminal, -it both) with its exit status
  fs        guest files: ls, stat, cat, get, put (-r for trees, - for stdin/stdout), mkdir, rm, mv
  forward   forward local TCP ports into the guest, like ssh -L (PORT, LPORT:HOST:PORT, ...)
  policy    check a policy file, explain which rule decides a flow, set or show the guest's policy
  audit     print the guest's egress decisions as JSON lines (-f to follow)
  shutdown  ask the agent to shut the guest down (core.shutdown)
  serve     own an agent channel and serve up to 128 clients on a relay socket
  context   show or set the relay socket the other commands use by default
  wait      wait until a relay socket answers (for scripts that start one in the background)
  version   print the version

Which agent: --connect SOCK (a relay socket, from agentctl serve or make vm), else
$AGENTCTL_CONNECT, else the context file (agentctl context use SOCK; make vm sets it).
--port SPEC talks to an agent channel directly instead.

Run 'agentctl COMMAND --help' for a command's options.
`

func main() {
	os.Exit(run(os.Args[1:]))
}

// run executes one command line and returns the exit status.
func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	var err error
	switch cmd, args := args[0], args[1:]; cmd {
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
	case "context":
		err = contextCmd(args)
	case "wait":
		err = waitCmd(args)
	case "version", "--version", "-version":
		fmt.Println("agentctl", version)
	case "help", "-h", "-help", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "agentctl: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	return exitStatus(err)
}

// exitStatus prints err (if any) and returns the status it stands for: 0, a program's own
// status (exitError), 2 for a bad command line, else 1.
func exitStatus(err error) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintf(os.Stderr, "agentctl: %v\n", ee.err)
		}
		return ee.code
	}
	fmt.Fprintf(os.Stderr, "agentctl: %v\n", err)
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

// usageError is a bad command line (exit status 2).
type usageError struct{ error }

// exitError exits with a program's status; err, if set, is printed first.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("exit status %d", e.code)
}
