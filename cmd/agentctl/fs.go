package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/protocol"
)

const fsAbout = `Guest files, through the agent's core.fs operations. Every error names its side (host or
guest) and the path. get and put change nothing unless the whole copy succeeded: each writes
beside its target and renames it into place at the end.

commands:
  ls [--json] PATH                 list a directory (ls -l style: type and mode, owner, size,
                                   modification time, name), sorted by name
  stat [--json] PATH               describe a path (octal mode, readable times)
  cat PATH...                      print guest files
  get [-r] GUEST_PATH LOCAL_PATH   copy a guest file (-r: a tree) here; LOCAL_PATH - is stdout
  put [-r] [--mode MODE] LOCAL_PATH GUEST_PATH
                                   copy a file (-r: a tree) into the guest; LOCAL_PATH - is stdin
  mkdir [--mode MODE] PATH         make a directory and its parents (mkdir -p)
  rm [-r] PATH                     remove a file, an empty directory, or (-r) a tree
  mv SRC DST                       rename in the guest

As with cp, a destination that is an existing directory receives the copy under the source's
name. Run 'agentctl fs COMMAND --help' for a command's options.`

// fsSub is one fs command: its operands, its help and how it runs.
type fsSub struct {
	synopsis, about string
	min, max        int
}

var fsSubs = map[string]fsSub{
	"ls":    {"[--json] PATH", "List a guest directory, ls -l style, sorted by name.", 1, 1},
	"stat":  {"[--json] PATH", "Describe a guest path: type, size, octal mode, owner, times.", 1, 1},
	"cat":   {"PATH...", "Print guest files to stdout.", 1, -1},
	"get":   {"[-r] GUEST_PATH LOCAL_PATH", "Copy a guest file, or with -r a directory tree, to this host. LOCAL_PATH - writes the file to\nstdout. Nothing local changes unless the whole copy succeeded.", 2, 2},
	"put":   {"[-r] [--mode MODE] LOCAL_PATH GUEST_PATH", "Copy a file, or with -r a directory tree, into the guest. LOCAL_PATH - reads stdin. The\nguest keeps nothing from a copy that failed.", 2, 2},
	"mkdir": {"[--mode MODE] PATH", "Make a guest directory and its parents.", 1, 1},
	"rm":    {"[-r] PATH", "Remove a guest file, an empty directory, or with -r a whole tree.", 1, 1},
	"mv":    {"SRC DST", "Rename a guest path.", 2, 2},
}

func fsCmd(args []string) error {
	top := newCommand("fs", "[options] COMMAND ARGS", fsAbout)
	var to target
	to.register(top)
	rest, err := top.parse(args, true)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return usageError{fmt.Errorf("fs needs a command: ls, stat, cat, get, put, mkdir, rm or mv (see agentctl fs --help)")}
	}
	name := rest[0]
	sub, ok := fsSubs[name]
	if !ok {
		return usageError{fmt.Errorf("unknown fs command %q: want ls, stat, cat, get, put, mkdir, rm or mv", name)}
	}
	c := newCommand("fs "+name, sub.synopsis, sub.about)
	c.logLevel = top.logLevel
	var to2 target
	to2.register(c)
	jsonOut, recursive := new(bool), new(bool)
	mode := new(string)
	switch name {
	case "ls", "stat":
		jsonOut = c.fs.Bool("json", false, "print JSON (for scripts)")
	case "get", "put", "rm":
		recursive = c.fs.Bool("r", false, "recursive: a whole directory tree")
	}
	if name == "put" || name == "mkdir" {
		mode = c.fs.String("mode", "", "octal `MODE` of what is created (put: default the local file's)")
	}
	pos, err := c.parse(rest[1:], false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, sub.min, sub.max); err != nil {
		return err
	}
	if to2.connect != "" || to2.port != "" {
		to = to2
	}
	var m *uint32
	if *mode != "" {
		v, err := strconv.ParseUint(*mode, 8, 32)
		if err != nil || v > 0o7777 {
			return usageError{fmt.Errorf("--mode %q: want an octal mode such as 0644", *mode)}
		}
		mv := uint32(v)
		m = &mv
	}
	if name == "put" && pos[0] != "-" { // a local problem is found before the guest is touched
		if st, err := os.Stat(pos[0]); err != nil {
			return hostErr(pos[0], err)
		} else if st.IsDir() && !*recursive {
			return fmt.Errorf("host: %s: is a directory (use put -r to copy a tree)", pos[0])
		}
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
	g := &guestFS{cl: cl, ctx: context.Background()}
	switch name {
	case "ls":
		return g.ls(pos[0], *jsonOut)
	case "stat":
		return g.stat(pos[0], *jsonOut)
	case "cat":
		for _, p := range pos {
			if _, err := g.cl.ReadFile(g.ctx, p, os.Stdout); err != nil {
				return guestErr(p, err)
			}
		}
		return nil
	case "get":
		return g.get(pos[0], pos[1], *recursive)
	case "put":
		return g.put(pos[0], pos[1], *recursive, m)
	case "mkdir":
		if _, err := cl.Fs(g.ctx, &protocol.FsMkdir{Path: pos[0], Mode: m}); err != nil {
			return guestErr(pos[0], err)
		}
		return nil
	case "rm":
		return g.remove(pos[0], *recursive)
	case "mv":
		if _, err := cl.Fs(g.ctx, &protocol.FsRename{Src: pos[0], Dst: pos[1]}); err != nil {
			return guestErr(pos[0]+" -> "+pos[1], err)
		}
	}
	return nil
}

// guestFS runs the fs commands against one agent.
type guestFS struct {
	cl  *host.Client
	ctx context.Context
}

// guestErr names the guest side and path of a failed operation.
func guestErr(p string, err error) error {
	var fe *host.FsError
	if errors.As(err, &fe) {
		return fmt.Errorf("guest: %s: %s", p, trimOp(fe.Msg))
	}
	return fmt.Errorf("guest: %s: %w", p, err)
}

// hostErr names the host side and path of a failed local operation.
func hostErr(p string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return fmt.Errorf("host: %s: %w", p, err)
}

func (g *guestFS) statOf(p string, follow bool) (protocol.FsEntryInfo, error) {
	d, err := g.cl.Fs(g.ctx, &protocol.FsStat{Path: p, FollowSymlink: follow})
	if err != nil {
		return protocol.FsEntryInfo{}, guestErr(p, err)
	}
	if d == nil || d.Kind != "Stat" {
		return protocol.FsEntryInfo{}, fmt.Errorf("guest: %s: stat gave no result", p)
	}
	return d.Stat, nil
}

func (g *guestFS) ls(dir string, asJSON bool) error {
	var list []protocol.FsEntryInfo
	d, err := g.cl.Fs(g.ctx, &protocol.FsList{Path: dir})
	if err != nil {
		st, serr := g.statOf(dir, false)
		if serr != nil || st.Kind == "dir" {
			return guestErr(dir, err)
		}
		list = []protocol.FsEntryInfo{st} // ls of a file lists the file
	} else if d != nil {
		list = d.List
	}
	sort.Slice(list, func(i, j int) bool { return path.Base(list[i].Path) < path.Base(list[j].Path) })
	targets := make([]string, len(list))
	for i, e := range list {
		if e.Mode&unix.S_IFMT == unix.S_IFLNK {
			if r, err := g.cl.Fs(g.ctx, &protocol.FsReadLink{Path: e.Path}); err == nil && r != nil {
				targets[i] = r.Path
			}
		}
	}
	if asJSON {
		out := make([]statJSON, len(list))
		for i, e := range list {
			out[i] = toJSON(e)
			out[i].Name, out[i].Target = path.Base(e.Path), targets[i]
		}
		return printJSON(out)
	}
	wu, wg, ws := 1, 1, 1
	for _, e := range list {
		wu, wg, ws = max(wu, digits(uint64(e.UID))), max(wg, digits(uint64(e.GID))), max(ws, digits(e.Size))
	}
	for i, e := range list {
		name := path.Base(e.Path)
		if targets[i] != "" {
			name += " -> " + targets[i]
		}
		fmt.Printf("%s %*d %*d %*d %s %s\n", modeString(e.Mode), wu, e.UID, wg, e.GID, ws, e.Size, shortTime(e.Mtime), name)
	}
	return nil
}

// statJSON is fs stat --json's (and ls --json's) record.
type statJSON struct {
	Name     string `json:"name,omitempty"`
	Path     string `json:"path"`
	Type     string `json:"type"`
	Size     uint64 `json:"size"`
	Mode     string `json:"mode"`  // octal permissions, "0644"
	Perms    string `json:"perms"` // "-rw-r--r--"
	UID      uint32 `json:"uid"`
	GID      uint32 `json:"gid"`
	Modified string `json:"modified,omitempty"` // RFC 3339
	Accessed string `json:"accessed,omitempty"`
	Target   string `json:"target,omitempty"` // a symlink's
}

func toJSON(e protocol.FsEntryInfo) statJSON {
	return statJSON{Path: e.Path, Type: e.Kind, Size: e.Size, Mode: fmt.Sprintf("%04o", e.Mode&0o7777),
		Perms: modeString(e.Mode), UID: e.UID, GID: e.GID, Modified: rfcTime(e.Mtime), Accessed: rfcTime(e.Atime)}
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (g *guestFS) stat(p string, asJSON bool) error {
	e, err := g.statOf(p, false)
	if err != nil {
		return err
	}
	j := toJSON(e)
	if e.Mode&unix.S_IFMT == unix.S_IFLNK {
		if r, err := g.cl.Fs(g.ctx, &protocol.FsReadLink{Path: p}); err == nil && r != nil {
			j.Target = r.Path
		}
	}
	if asJSON {
		return printJSON(j)
	}
	fmt.Printf("  path: %s\n  type: %s\n  size: %d\n  mode: %s (%s)\n owner: %d:%d\n", p, e.Kind, e.Size, j.Mode, j.Perms, e.UID, e.GID)
	if j.Target != "" {
		fmt.Printf("target: %s\n", j.Target)
	}
	if e.Mtime != nil {
		fmt.Printf("modify: %s\n", longTime(*e.Mtime))
	}
	if e.Atime != nil {
		fmt.Printf("access: %s\n", longTime(*e.Atime))
	}
	return nil
}

// modeString is ls -l's mode column for a full st_mode: the type character and permissions.
func modeString(m uint32) string {
	t := byte('-')
	switch m & unix.S_IFMT {
	case unix.S_IFDIR:
		t = 'd'
	case unix.S_IFLNK:
		t = 'l'
	case unix.S_IFCHR:
		t = 'c'
	case unix.S_IFBLK:
		t = 'b'
	case unix.S_IFIFO:
		t = 'p'
	case unix.S_IFSOCK:
		t = 's'
	}
	b := []byte{t}
	const rwx = "rwxrwxrwx"
	for i := 0; i < 9; i++ {
		if m&(1<<(8-i)) != 0 {
			b = append(b, rwx[i])
		} else {
			b = append(b, '-')
		}
	}
	special := func(bit uint32, at int, set, unset byte) {
		if m&bit != 0 {
			if b[at] == '-' {
				b[at] = unset
			} else {
				b[at] = set
			}
		}
	}
	special(unix.S_ISUID, 3, 's', 'S')
	special(unix.S_ISGID, 6, 's', 'S')
	special(unix.S_ISVTX, 9, 't', 'T')
	return string(b)
}

func digits(n uint64) int { return len(strconv.FormatUint(n, 10)) }

func shortTime(t *int64) string {
	if t == nil {
		return "-"
	}
	return time.Unix(*t, 0).Format("2006-01-02 15:04")
}

func longTime(t int64) string { return time.Unix(t, 0).Format("2006-01-02 15:04:05 -0700") }

func rfcTime(t *int64) string {
	if t == nil {
		return ""
	}
	return time.Unix(*t, 0).Format(time.RFC3339)
}

func (g *guestFS) remove(p string, recursive bool) error {
	st, err := g.statOf(p, false)
	if err != nil {
		return err
	}
	if st.Kind == "dir" {
		_, err = g.cl.Fs(g.ctx, &protocol.FsRemoveDir{Path: p, Recursive: recursive})
	} else {
		_, err = g.cl.Fs(g.ctx, &protocol.FsRemove{Path: p})
	}
	if err != nil {
		return guestErr(p, err)
	}
	return nil
}

// tempName is a hidden name beside p for a copy in progress.
func tempName(p string) string {
	var b [6]byte
	rand.Read(b[:])
	return path.Join(path.Dir(p), "."+path.Base(p)+".agentctl-"+hex.EncodeToString(b[:]))
}

// get copies a guest file or tree to dst.
func (g *guestFS) get(src, dst string, recursive bool) error {
	st, err := g.statOf(src, true)
	if err != nil {
		return err
	}
	if st.Kind == "dir" && !recursive {
		return fmt.Errorf("guest: %s: is a directory (use get -r to copy a tree)", src)
	}
	if dst == "-" {
		if st.Kind != "file" {
			return fmt.Errorf("guest: %s: not a regular file (%s); only a file can go to stdout", src, st.Kind)
		}
		_, err := g.cl.ReadFile(g.ctx, src, os.Stdout)
		if err != nil {
			return guestErr(src, err)
		}
		return nil
	}
	if lst, err := os.Stat(dst); err == nil && lst.IsDir() {
		dst = filepath.Join(dst, path.Base(src))
	}
	switch st.Kind {
	case "dir":
		if _, err := os.Lstat(dst); err == nil {
			return fmt.Errorf("host: %s: exists (get -r makes a new tree: remove it or name another)", dst)
		}
		tmp := filepath.Join(filepath.Dir(dst), path.Base(tempName(dst)))
		if err := os.Mkdir(tmp, 0o700); err != nil {
			return hostErr(tmp, err)
		}
		if err := g.getTree(src, tmp); err != nil {
			os.RemoveAll(tmp)
			return err
		}
		os.Chmod(tmp, os.FileMode(st.Mode&0o777)&^umask)
		if err := os.Rename(tmp, dst); err != nil {
			os.RemoveAll(tmp)
			return hostErr(dst, err)
		}
		return nil
	case "file":
		perm := os.FileMode(st.Mode&0o777) &^ umask
		if lst, err := os.Stat(dst); err == nil {
			perm = lst.Mode().Perm() // an existing file keeps its mode, as with cp
		}
		return g.getFile(src, dst, perm, st.Size)
	}
	return fmt.Errorf("guest: %s: not a regular file or directory (%s)", src, st.Kind)
}

// getFile copies one guest file to dst through a temporary file renamed at the end.
func (g *guestFS) getFile(src, dst string, perm os.FileMode, size uint64) error {
	f, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".agentctl-*")
	if err != nil {
		return hostErr(dst, err)
	}
	tmp := f.Name()
	fail := func(err error) error { f.Close(); os.Remove(tmp); return err }
	w := &localWriter{f: f}
	p := newProgress("get "+src, size)
	_, err = g.cl.ReadFile(g.ctx, src, io.MultiWriter(w, p))
	p.done()
	switch {
	case w.err != nil:
		return fail(hostErr(dst, w.err))
	case err != nil:
		return fail(guestErr(src, err))
	}
	if err := f.Chmod(perm); err != nil {
		return fail(hostErr(dst, err))
	}
	if err := f.Sync(); err != nil {
		return fail(hostErr(dst, err))
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return hostErr(dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return hostErr(dst, err)
	}
	return nil
}

// localWriter keeps the local write error apart from the guest's.
type localWriter struct {
	f   *os.File
	err error
}

func (w *localWriter) Write(b []byte) (int, error) {
	n, err := w.f.Write(b)
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// getTree copies the guest directory src into the existing local directory dir.
func (g *guestFS) getTree(src, dir string) error {
	d, err := g.cl.Fs(g.ctx, &protocol.FsList{Path: src})
	if err != nil {
		return guestErr(src, err)
	}
	var list []protocol.FsEntryInfo
	if d != nil {
		list = d.List
	}
	for _, e := range list {
		name := path.Base(e.Path)
		local := filepath.Join(dir, name)
		perm := os.FileMode(e.Mode&0o777) &^ umask
		switch e.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if err := os.Mkdir(local, 0o700); err != nil {
				return hostErr(local, err)
			}
			if err := g.getTree(e.Path, local); err != nil {
				return err
			}
			if err := os.Chmod(local, perm); err != nil {
				return hostErr(local, err)
			}
		case unix.S_IFREG:
			f, err := os.OpenFile(local, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
			if err != nil {
				return hostErr(local, err)
			}
			w := &localWriter{f: f}
			_, err = g.cl.ReadFile(g.ctx, e.Path, w)
			f.Close()
			if w.err != nil {
				return hostErr(local, w.err)
			}
			if err != nil {
				return guestErr(e.Path, err)
			}
		case unix.S_IFLNK:
			r, err := g.cl.Fs(g.ctx, &protocol.FsReadLink{Path: e.Path})
			if err != nil {
				return guestErr(e.Path, err)
			}
			if err := os.Symlink(r.Path, local); err != nil {
				return hostErr(local, err)
			}
		default:
			fmt.Fprintf(os.Stderr, "agentctl: guest: %s: skipped (%s, not a file, directory or symlink)\n", e.Path, modeString(e.Mode)[:1])
		}
	}
	return nil
}

// put copies a local file (src "-": stdin) or tree into the guest at dst.
func (g *guestFS) put(src, dst string, recursive bool, mode *uint32) error {
	gst, gerr := g.statOf(dst, true)
	dstIsDir := gerr == nil && gst.Kind == "dir"
	if src == "-" {
		if dstIsDir {
			return fmt.Errorf("guest: %s: is a directory (name the file to write stdin to)", dst)
		}
		perm := uint32(0o644)
		if mode != nil {
			perm = *mode
		}
		return g.putFile(os.Stdin, "stdin", dst, perm, 0)
	}
	st, err := os.Stat(src)
	if err != nil {
		return hostErr(src, err)
	}
	if dstIsDir {
		dst = path.Join(dst, filepath.Base(src))
	}
	if st.IsDir() {
		if !recursive {
			return fmt.Errorf("host: %s: is a directory (use put -r to copy a tree)", src)
		}
		if _, err := g.statOf(dst, false); err == nil {
			return fmt.Errorf("guest: %s: exists (put -r makes a new tree: remove it or name another)", dst)
		}
		tmp := tempName(dst)
		if _, err := g.cl.Fs(g.ctx, &protocol.FsMkdir{Path: tmp, Mode: ptr(uint32(0o700))}); err != nil {
			return guestErr(tmp, err)
		}
		err := g.putTree(src, tmp)
		if err == nil {
			perm := uint32(st.Mode().Perm())
			if mode != nil {
				perm = *mode
			}
			g.cl.Fs(g.ctx, &protocol.FsSetStat{Path: tmp, FollowSymlink: true, Attrs: protocol.FsSetAttrs{Mode: &perm}})
			if _, rerr := g.cl.Fs(g.ctx, &protocol.FsRename{Src: tmp, Dst: dst}); rerr != nil {
				err = guestErr(dst, rerr)
			}
		}
		if err != nil {
			g.cleanup(&protocol.FsRemoveDir{Path: tmp, Recursive: true})
		}
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("host: %s: not a regular file or directory", src)
	}
	f, err := os.Open(src)
	if err != nil {
		return hostErr(src, err)
	}
	defer f.Close()
	perm := uint32(st.Mode().Perm())
	if mode != nil {
		perm = *mode
	}
	return g.putFile(f, src, dst, perm, uint64(st.Size()))
}

func ptr[T any](v T) *T { return &v }

// cleanup removes what a failed copy left in the guest, even when the copy was cut short.
func (g *guestFS) cleanup(op protocol.FsOp) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	g.cl.Fs(ctx, op)
}

// putFile writes r to a temporary guest file beside dst and renames it into place; a failed
// copy is removed.
func (g *guestFS) putFile(r io.Reader, src, dst string, perm uint32, size uint64) error {
	tmp := tempName(dst)
	lr := &localReader{r: r}
	p := newProgress("put "+dst, size)
	_, err := g.cl.WriteFile(g.ctx, tmp, perm, io.TeeReader(lr, p))
	p.done()
	if err == nil {
		if _, rerr := g.cl.Fs(g.ctx, &protocol.FsRename{Src: tmp, Dst: dst}); rerr != nil {
			err = guestErr(dst, rerr)
		} else {
			return nil
		}
	} else if lr.err != nil {
		err = hostErr(src, lr.err)
	} else {
		err = guestErr(dst, err)
	}
	g.cleanup(&protocol.FsRemove{Path: tmp})
	return err
}

// localReader keeps the local read error apart from the guest's.
type localReader struct {
	r   io.Reader
	err error
}

func (l *localReader) Read(b []byte) (int, error) {
	n, err := l.r.Read(b)
	if err != nil && err != io.EOF && l.err == nil {
		l.err = err
	}
	return n, err
}

// putTree copies the local directory src into the existing guest directory dir.
func (g *guestFS) putTree(src, dir string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return hostErr(src, err)
	}
	for _, e := range ents {
		local, remote := filepath.Join(src, e.Name()), path.Join(dir, e.Name())
		info, err := e.Info()
		if err != nil {
			return hostErr(local, err)
		}
		perm := uint32(info.Mode().Perm())
		switch {
		case info.IsDir():
			if _, err := g.cl.Fs(g.ctx, &protocol.FsMkdir{Path: remote, Mode: &perm}); err != nil {
				return guestErr(remote, err)
			}
			if err := g.putTree(local, remote); err != nil {
				return err
			}
		case info.Mode().IsRegular():
			f, err := os.Open(local)
			if err != nil {
				return hostErr(local, err)
			}
			lr := &localReader{r: f}
			_, err = g.cl.WriteFile(g.ctx, remote, perm, lr)
			f.Close()
			if lr.err != nil {
				return hostErr(local, lr.err)
			}
			if err != nil {
				return guestErr(remote, err)
			}
		case info.Mode()&os.ModeSymlink != 0:
			t, err := os.Readlink(local)
			if err != nil {
				return hostErr(local, err)
			}
			if _, err := g.cl.Fs(g.ctx, &protocol.FsSymlink{Target: t, LinkPath: remote}); err != nil {
				return guestErr(remote, err)
			}
		default:
			fmt.Fprintf(os.Stderr, "agentctl: host: %s: skipped (not a file, directory or symlink)\n", local)
		}
	}
	return nil
}

// umask is this process's file mode creation mask (read once: setting it is the only way).
var umask = func() os.FileMode {
	m := unix.Umask(0)
	unix.Umask(m)
	return os.FileMode(m)
}()

// progress prints a transfer's progress to stderr, once a second, when stderr is a terminal
// and the transfer takes longer than that.
type progress struct {
	label string
	total uint64
	n     atomic.Int64
	start time.Time
	stop  chan struct{}
	shown atomic.Bool
}

func newProgress(label string, total uint64) *progress {
	p := &progress{label: label, total: total, start: time.Now(), stop: make(chan struct{})}
	if _, err := unix.IoctlGetTermios(int(os.Stderr.Fd()), unix.TCGETS); err != nil {
		return p // not a terminal: no progress lines in logs and pipes
	}
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.shown.Store(true)
				p.print()
			case <-p.stop:
				return
			}
		}
	}()
	return p
}

func (p *progress) Write(b []byte) (int, error) { p.n.Add(int64(len(b))); return len(b), nil }

func (p *progress) print() {
	secs := time.Since(p.start).Seconds()
	n := p.n.Load()
	of := ""
	if p.total > 0 {
		of = fmt.Sprintf(" of %.1f", float64(p.total)/(1<<20))
	}
	fmt.Fprintf(os.Stderr, "\r%s: %.1f%s MiB, %.1f MiB/s ", p.label, float64(n)/(1<<20), of, float64(n)/(1<<20)/max(secs, 1e-3))
}

func (p *progress) done() {
	close(p.stop)
	if p.shown.Load() {
		p.print()
		fmt.Fprintln(os.Stderr)
	}
}
