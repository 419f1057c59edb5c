package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"
)

// command is one subcommand's flags, synopsis and help text. Its command lines follow the
// habits people bring from docker, kubectl and ssh: --help (or -h) anywhere before "--" prints
// the help on stdout and exits 0; short boolean flags combine (-it is -i -t); flags may follow
// positional arguments, unless the command's operands are a program's command line (exec),
// which starts at the first positional argument.
type command struct {
	name     string // as typed after agentctl: "fs get"
	synopsis string // the operands: "[options] GUEST_PATH LOCAL_PATH"
	about    string // what it does, a paragraph or two
	fs       *flag.FlagSet
	logLevel string
}

func newCommand(name, synopsis, about string) *command {
	c := &command{name: name, synopsis: synopsis, about: about, fs: flag.NewFlagSet("agentctl "+name, flag.ContinueOnError)}
	c.fs.SetOutput(io.Discard) // errors are returned, help is printed by parse
	c.fs.StringVar(&c.logLevel, "log-level", "warn", "log `LEVEL`: debug, info, warn or error")
	return c
}

// help writes the command's help text.
func (c *command) help(w io.Writer) {
	fmt.Fprintf(w, "usage: agentctl %s %s\n", c.name, c.synopsis)
	if c.about != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimRight(c.about, "\n"))
	}
	fmt.Fprintln(w, "\noptions:")
	var flags []*flag.Flag
	c.fs.VisitAll(func(f *flag.Flag) { flags = append(flags, f) })
	sort.SliceStable(flags, func(i, j int) bool { return flags[i].Name < flags[j].Name })
	for _, f := range flags {
		arg, text := flag.UnquoteUsage(f)
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		head := "  " + dash + f.Name
		if arg != "" {
			head += " " + arg
		}
		if len(head) < 22 {
			head += strings.Repeat(" ", 22-len(head))
		} else {
			head += "\n" + strings.Repeat(" ", 22)
		}
		if d := f.DefValue; d != "" && d != "false" && d != "0" && d != "[]" {
			text += fmt.Sprintf(" (default %s)", d)
		}
		fmt.Fprintf(w, "%s%s\n", head, text)
	}
}

// parse parses args and returns the positional arguments. With commandLine set, the first
// positional argument ends the options (everything from it on is a program's command line).
func (c *command) parse(args []string, commandLine bool) ([]string, error) {
	for _, a := range args {
		if a == "--" || (commandLine && !strings.HasPrefix(a, "-")) {
			break
		}
		if a == "-h" || a == "-help" || a == "--help" {
			c.help(os.Stdout)
			return nil, flag.ErrHelp
		}
	}
	args = c.expandShort(args, commandLine)
	var pos []string
	for {
		if err := c.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) { // -h after a flag's value
				c.help(os.Stdout)
				return nil, err
			}
			return nil, usageError{fmt.Errorf("%s: %v (see agentctl %s --help)", c.name, err, c.name)}
		}
		rest := c.fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		// Parse stopped at "--" (all the rest is positional) or at a positional argument.
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		if commandLine {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// expandShort splits combined short boolean flags ("-it" into "-i", "-t") up to "--" (or, for
// a command line, up to its first operand).
func (c *command) expandShort(args []string, commandLine bool) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || (commandLine && !strings.HasPrefix(a, "-")) {
			return append(out, args[i:]...)
		}
		if name := strings.TrimLeft(a, "-"); a != name && !strings.Contains(name, "=") && c.takesValue(name) && i+1 < len(args) {
			out = append(out, a, args[i+1]) // -u bob: bob is the flag's value, not an operand
			i++
			continue
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' && c.fs.Lookup(a[1:]) == nil && c.allBoolFlags(a[1:]) {
			for _, r := range a[1:] {
				out = append(out, "-"+string(r))
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

// takesValue reports whether name is a flag that is followed by a value.
func (c *command) takesValue(name string) bool {
	f := c.fs.Lookup(name)
	if f == nil {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return !ok || !b.IsBoolFlag()
}

func (c *command) allBoolFlags(s string) bool {
	for _, r := range s {
		f := c.fs.Lookup(string(r))
		if f == nil {
			return false
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); !ok || !b.IsBoolFlag() {
			return false
		}
	}
	return true
}

// logger is the command's logger on stderr, at --log-level.
func (c *command) logger() (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(c.logLevel))); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", c.logLevel)}
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})).With("component", "agentctl"), nil
}

// nargs checks the number of positional arguments.
func (c *command) nargs(pos []string, min, max int) error {
	if len(pos) >= min && (max < 0 || len(pos) <= max) {
		return nil
	}
	return usageError{fmt.Errorf("usage: agentctl %s %s (see --help)", c.name, c.synopsis)}
}

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }
