package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/protocol"
)

const fsUsage = `agentctl fs [--connect SOCK | --port SPEC] COMMAND ARGS

commands:
  ls PATH              list a directory
  stat PATH            describe a path (JSON)
  cat PATH             print a file
  get GUEST LOCAL      copy a guest file here
  put LOCAL GUEST      copy a file into the guest (--mode sets its mode)
  mkdir PATH           make a directory and its parents (--mode sets its mode)
  rm [-r] PATH         remove a file, an empty directory, or (-r) a tree
  mv SRC DST           rename
`

func fsCmd(args []string) error {
	fs, level := newFlags("fs", "COMMAND ARGS (see agentctl fs -h)")
	relay, port := connectFlags(fs)
	mode := fs.String("mode", "", "octal `MODE` for put and mkdir")
	recursive := fs.Bool("r", false, "rm: remove a directory tree")
	fs.Usage = func() { fmt.Fprint(fs.Output(), fsUsage, "\noptions:\n"); fs.PrintDefaults() }
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usageError{fmt.Errorf("fs needs a command (ls, stat, cat, get, put, mkdir, rm, mv)")}
	}
	cmd := fs.Arg(0)
	if err := parse(fs, fs.Args()[1:]); err != nil { // options may also follow the command
		return err
	}
	rest := fs.Args()
	var m *uint32
	if *mode != "" {
		v, err := strconv.ParseUint(*mode, 8, 32)
		if err != nil {
			return usageError{fmt.Errorf("--mode %q: want an octal mode such as 0644", *mode)}
		}
		mv := uint32(v)
		m = &mv
	}
	need := map[string]int{"ls": 1, "stat": 1, "cat": 1, "get": 2, "put": 2, "mkdir": 1, "rm": 1, "mv": 2}
	n, ok := need[cmd]
	if !ok {
		return usageError{fmt.Errorf("unknown fs command %q", cmd)}
	}
	if len(rest) != n {
		return usageError{fmt.Errorf("fs %s takes %d argument(s)", cmd, n)}
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx := context.Background()
	switch cmd {
	case "ls":
		d, err := c.Fs(ctx, &protocol.FsList{Path: rest[0]})
		if err != nil {
			return err
		}
		for _, e := range d.List {
			mt := ""
			if e.Mtime != nil {
				mt = time.Unix(*e.Mtime, 0).UTC().Format("2006-01-02 15:04")
			}
			fmt.Printf("%s %8d %s %s\n", os.FileMode(e.Mode & 0o777).String()[1:], e.Size, mt, e.Path)
		}
	case "stat":
		d, err := c.Fs(ctx, &protocol.FsStat{Path: rest[0]})
		if err != nil {
			return err
		}
		b, _ := json.MarshalIndent(d.Stat, "", "  ")
		fmt.Println(string(b))
	case "cat":
		_, err = c.ReadFile(ctx, rest[0], os.Stdout)
	case "get":
		var f *os.File
		if f, err = os.Create(rest[1]); err != nil {
			return err
		}
		p := newProgress("get " + rest[0])
		_, err = c.ReadFile(ctx, rest[0], io.MultiWriter(f, p))
		p.done()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	case "put":
		var f *os.File
		if f, err = os.Open(rest[0]); err != nil {
			return err
		}
		defer f.Close()
		perm := uint32(0o644)
		if st, err := f.Stat(); err == nil {
			perm = uint32(st.Mode().Perm())
		}
		if m != nil {
			perm = *m
		}
		p := newProgress("put " + rest[1])
		_, err = c.WriteFile(ctx, rest[1], perm, io.TeeReader(f, p))
		p.done()
	case "mkdir":
		_, err = c.Fs(ctx, &protocol.FsMkdir{Path: rest[0], Mode: m})
	case "rm":
		err = remove(ctx, c, rest[0], *recursive)
	case "mv":
		_, err = c.Fs(ctx, &protocol.FsRename{Src: rest[0], Dst: rest[1]})
	}
	return err
}

func remove(ctx context.Context, c *host.Client, path string, recursive bool) error {
	d, err := c.Fs(ctx, &protocol.FsStat{Path: path})
	if err != nil {
		return err
	}
	if d.Stat.Kind == "dir" {
		_, err = c.Fs(ctx, &protocol.FsRemoveDir{Path: path, Recursive: recursive})
	} else {
		_, err = c.Fs(ctx, &protocol.FsRemove{Path: path})
	}
	return err
}

// progress prints transfer progress to stderr once a second for transfers that take a while.
type progress struct {
	label string
	n     atomic.Int64
	start time.Time
	stop  chan struct{}
}

func newProgress(label string) *progress {
	p := &progress{label: label, start: time.Now(), stop: make(chan struct{})}
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.print("\r")
			case <-p.stop:
				return
			}
		}
	}()
	return p
}

func (p *progress) Write(b []byte) (int, error) { p.n.Add(int64(len(b))); return len(b), nil }

func (p *progress) print(prefix string) {
	secs := time.Since(p.start).Seconds()
	n := p.n.Load()
	fmt.Fprintf(os.Stderr, "%s%s: %d MiB, %.0f MiB/s", prefix, p.label, n>>20, float64(n)/(1<<20)/max(secs, 1e-3))
}

func (p *progress) done() {
	close(p.stop)
	if time.Since(p.start) >= time.Second {
		p.print("\r")
		fmt.Fprintln(os.Stderr)
	}
}
