package refmodel

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Filesystem sessions, §2.3 and §3.11, with Rust's std semantics underneath (the reference
// calls std::fs / tokio::fs; their behaviour is part of what a host sees).

const relayStep = 33554431 // AGENT_RELAY_ID_RANGE_STEP

func sameClient(a, b uint32) bool { return a != 0 && b != 0 && (a-1)/relayStep == (b-1)/relayStep }

type mHandle struct {
	owner                uint32
	path                 string
	f                    *os.File
	dir                  bool
	read, write, appendM bool
	mu                   sync.Mutex
	refs                 int // guarded by mFS.mu: the table's, plus one per stream
}

type mWrite struct {
	owner        uint32
	h            *mHandle
	off, written uint64
	appendM      bool
	expect       *uint64
}

type mRead struct {
	owner uint32
	stop  chan struct{}
}

type mFS struct {
	mu      sync.Mutex
	next    uint64
	handles map[uint64]*mHandle
	writes  map[uint32]*mWrite
	reads   map[uint32]*mRead
}

func (fs *mFS) unref(h *mHandle) {
	fs.mu.Lock()
	h.refs--
	last := h.refs == 0
	fs.mu.Unlock()
	if last {
		h.f.Close()
	}
}

func (fs *mFS) closeRange(start, end uint32) {
	fs.mu.Lock()
	var drop []*mHandle
	for n, h := range fs.handles {
		if h.owner >= start && h.owner < end {
			delete(fs.handles, n)
			drop = append(drop, h)
		}
	}
	for id, w := range fs.writes {
		if id >= start && id < end {
			delete(fs.writes, id)
			drop = append(drop, w.h)
		}
	}
	for id, r := range fs.reads {
		if id >= start && id < end {
			delete(fs.reads, id)
			close(r.stop)
		}
	}
	fs.mu.Unlock()
	for _, h := range drop {
		fs.unref(h)
	}
}

// --- Rust std semantics ---

var (
	errNUL      = errors.New("file name contained an unexpected NUL byte")
	errNotFile  = errors.New("the source path is neither a regular file nor a symlink to a regular file")
	errRange    = errors.New("out of range integral type conversion attempted")
	errAccess   = errors.New("must specify at least one of read, write, or append access")
	errNeedW    = errors.New("creating or truncating a file requires write or append access")
	errTreeFail = errors.New("failed to create whole tree")
)

// text is Rust's io::Error display.
func text(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return osText(errno)
	}
	return err.Error()
}

func pre(prefix string, err error) error { return errors.New(prefix + ": " + text(err)) }

func cstr(p string) error {
	if strings.IndexByte(p, 0) >= 0 {
		return errNUL
	}
	return nil
}

func stat(p string, follow bool) (*unix.Stat_t, error) {
	if err := cstr(p); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	var err error
	if follow {
		err = unix.Stat(p, &st)
	} else {
		err = unix.Lstat(p, &st)
	}
	if err != nil {
		return nil, err
	}
	return &st, nil
}

// components are Rust's Path components of p: a root, then names, with empty and "."
// components dropped (a leading "." of a relative path stays).
func components(p string) (root bool, comps []string) {
	root = strings.HasPrefix(p, "/")
	for i, c := range strings.Split(p, "/") {
		if c == "" || (c == "." && !(i == 0 && !root)) {
			continue
		}
		comps = append(comps, c)
	}
	return
}

// pathParent and fileName are Path::parent and Path::file_name.
func pathParent(p string) (string, bool) {
	root, comps := components(p)
	if len(comps) == 0 {
		return "", false
	}
	s := strings.Join(comps[:len(comps)-1], "/")
	if root {
		s = "/" + s
	}
	return s, true
}

func fileName(p string) (string, bool) {
	_, comps := components(p)
	if len(comps) == 0 {
		return "", false
	}
	last := comps[len(comps)-1]
	if last == "." || last == ".." {
		return "", false
	}
	return last, true
}

// join is PathBuf::push of a relative name.
func join(base, name string) string {
	if base != "" && !strings.HasSuffix(base, "/") {
		base += "/"
	}
	return base + name
}

// realpath is glibc's realpath(3): each component looked up with lstat, links expanded.
func realpath(p string) (string, error) {
	if err := cstr(p); err != nil {
		return "", err
	}
	if p == "" {
		return "", syscall.ENOENT
	}
	out := ""
	if !strings.HasPrefix(p, "/") {
		wd, err := os.Getwd()
		if err != nil {
			return "", err
		}
		out = strings.TrimSuffix(wd, "/")
	}
	rest, links := p, 0
	for rest != "" {
		rest = strings.TrimLeft(rest, "/")
		if rest == "" {
			break
		}
		comp := rest
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			comp, rest = rest[:i], rest[i:]
		} else {
			rest = ""
		}
		switch comp {
		case ".":
			continue
		case "..":
			if i := strings.LastIndexByte(out, '/'); i >= 0 {
				out = out[:i]
			}
			continue
		}
		next := out + "/" + comp
		var st unix.Stat_t
		if err := unix.Lstat(next, &st); err != nil {
			return "", err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if links++; links > 40 {
				return "", syscall.ELOOP
			}
			target, err := os.Readlink(next)
			if err != nil {
				return "", err
			}
			if strings.HasPrefix(target, "/") {
				out = ""
			}
			rest = target + rest
			continue
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR && rest != "" {
			return "", syscall.ENOTDIR
		}
		out = next
	}
	if out == "" {
		return "/", nil
	}
	return out, nil
}

// canonicalizeOrParent is the reference's realpath(): fs::canonicalize, else the parent's
// canonical path with the final component appended, else the original error.
func canonicalizeOrParent(p string) (string, error) {
	r, err := realpath(p)
	if err == nil {
		return r, nil
	}
	parent, ok := pathParent(p)
	if !ok {
		return "", err
	}
	pr, perr := realpath(parent)
	if perr != nil {
		return "", err
	}
	if name, ok := fileName(p); ok {
		return join(pr, name), nil
	}
	return pr, nil
}

func isDirPath(p string) bool {
	st, err := stat(p, true)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR
}

func mkdir1(p string) error {
	if err := cstr(p); err != nil {
		return err
	}
	return unix.Mkdir(p, 0o777)
}

// createDirAll is fs::create_dir_all.
func createDirAll(p string) error {
	if p == "" {
		return nil
	}
	switch err := mkdir1(p); {
	case err == nil:
		return nil
	case errors.Is(err, syscall.ENOENT):
	case isDirPath(p):
		return nil
	default:
		return err
	}
	parent, ok := pathParent(p)
	if !ok {
		return errTreeFail
	}
	if err := createDirAll(parent); err != nil {
		return err
	}
	if err := mkdir1(p); err != nil && !isDirPath(p) {
		return err
	}
	return nil
}

// removeDirAll is fs::remove_dir_all: a symlink is unlinked; otherwise p must be a directory,
// which is removed with everything in it (entries that vanish meanwhile are fine).
func removeDirAll(p string) error {
	st, err := stat(p, false)
	if err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return unix.Unlink(p)
	}
	return removeRec(p, true)
}

func removeRec(p string, top bool) error {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.ELOOP) {
		if top {
			return err
		}
		return unix.Unlink(p)
	}
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), p)
	ents, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return err
	}
	for _, e := range ents {
		c := join(p, e.Name())
		var err error
		if e.IsDir() {
			err = removeRec(c, false)
		} else {
			err = unix.Unlink(c)
		}
		if err != nil && !errors.Is(err, syscall.ENOENT) {
			return err
		}
	}
	if err := unix.Rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
		return err
	}
	return nil
}

// copyFile is fs::copy.
func copyFile(src, dst string) error {
	if err := cstr(src); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errNotFile
	}
	if err := cstr(dst); err != nil {
		return err
	}
	fd, err := unix.Open(dst, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, st.Mode)
	if err != nil {
		return err
	}
	out := os.NewFile(uintptr(fd), dst)
	defer out.Close()
	var ost unix.Stat_t
	if err := unix.Fstat(fd, &ost); err != nil {
		return err
	}
	if ost.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := unix.Fchmod(fd, st.Mode); err != nil {
			return err
		}
	}
	_, err = io.Copy(out, in)
	return err
}

// openFlags is OpenOptions' validation and flags.
func openFlags(r, w, a, c, t, cn bool) (int, error) {
	var fl int
	switch {
	case r && !w && !a:
		fl = unix.O_RDONLY
	case !r && w && !a:
		fl = unix.O_WRONLY
	case r && w && !a:
		fl = unix.O_RDWR
	case !r && a:
		fl = unix.O_WRONLY | unix.O_APPEND
	case r && a:
		fl = unix.O_RDWR | unix.O_APPEND
	default:
		if c || cn || t {
			return 0, errNeedW
		}
		return 0, errAccess
	}
	switch {
	case w && !a:
	case !w && !a:
		if t || c || cn {
			return 0, errNeedW
		}
	default:
		if t && !cn {
			return 0, errNeedW
		}
	}
	switch {
	case cn:
		fl |= unix.O_CREAT | unix.O_EXCL
	case c && t:
		fl |= unix.O_CREAT | unix.O_TRUNC
	case c:
		fl |= unix.O_CREAT
	case t:
		fl |= unix.O_TRUNC
	}
	return fl | unix.O_CLOEXEC, nil
}

// entry is FsEntryInfo (§2.3).
func entry(path string, st *unix.Stat_t) Map {
	kind := "other"
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		kind = "file"
	case unix.S_IFDIR:
		kind = "dir"
	case unix.S_IFLNK:
		kind = "symlink"
	}
	return Map{{"path", path}, {"kind", kind}, {"size", uint64(st.Size)}, {"mode", uint64(st.Mode)},
		{"modified", st.Mtim.Sec}, {"uid", uint64(st.Uid)}, {"gid", uint64(st.Gid)},
		{"atime", st.Atim.Sec}, {"mtime", st.Mtim.Sec}}
}

func listEntry(path string) Map {
	st, err := stat(path, false)
	if err != nil {
		return Map{{"path", path}, {"kind", "other"}, {"size", uint64(0)}, {"mode", uint64(0)},
			{"modified", nil}, {"uid", uint64(0)}, {"gid", uint64(0)}, {"atime", nil}, {"mtime", nil}}
	}
	return entry(path, st)
}

// --- the operations ---

func (m *Model) fsReply(id uint32, data any, err error) {
	if err != nil {
		m.emit(id, "core.fs.response", Map{{"ok", false}, {"error", err.Error()}, {"data", nil}})
		return
	}
	m.emit(id, "core.fs.response", Map{{"ok", true}, {"error", nil}, {"data", data}})
}

func (m *Model) fsFrame(id uint32, t string, p any) error {
	f, err := asStruct(p)
	if err != nil {
		return err
	}
	if t == "core.fs.data" {
		data, err := f.data("data")
		if err != nil {
			return err
		}
		m.fsData(id, data)
		return nil
	}
	v, _, err := f.need("op", false)
	if err != nil {
		return err
	}
	op, ok := untag(v).(Map)
	if !ok || len(op) != 1 {
		return &badPayload{errors.New("op: expected a map with one variant")}
	}
	name, ok := keyName(op[0].K)
	if !ok {
		return &badPayload{errors.New("op: bad variant name")}
	}
	a, err := asStruct(op[0].V)
	if err != nil {
		return err
	}
	return m.fsOp(id, name, a)
}

// attrs is FsSetAttrs: every field an Option.
type attrs struct {
	mode, uid, gid, size *uint64
	atime, mtime         *int64
}

func decodeAttrs(f fields) (attrs, error) {
	s, err := f.sub("attrs")
	if err != nil {
		return attrs{}, err
	}
	var a attrs
	if a.mode, err = s.optUint("mode", math.MaxUint32); err != nil {
		return a, err
	}
	if a.uid, err = s.optUint("uid", math.MaxUint32); err != nil {
		return a, err
	}
	if a.gid, err = s.optUint("gid", math.MaxUint32); err != nil {
		return a, err
	}
	if a.size, err = s.optUint("size", math.MaxUint64); err != nil {
		return a, err
	}
	if a.atime, err = s.optInt("atime"); err != nil {
		return a, err
	}
	a.mtime, err = s.optInt("mtime")
	return a, err
}

func (m *Model) fsOp(id uint32, op string, a fields) error {
	str := a.str
	switch op {
	case "RealPath":
		p, err := str("path")
		if err != nil {
			return err
		}
		r, err := canonicalizeOrParent(p)
		if err != nil {
			m.fsReply(id, nil, pre("realpath", err))
		} else {
			m.fsReply(id, Map{{"Path", r}}, nil)
		}
	case "Stat":
		p, err := str("path")
		if err != nil {
			return err
		}
		follow, err := a.bool("follow_symlink", nil)
		if err != nil {
			return err
		}
		st, err := stat(p, follow)
		if err != nil {
			m.fsReply(id, nil, pre("stat", err))
		} else {
			m.fsReply(id, Map{{"Stat", entry(p, st)}}, nil)
		}
	case "SetStat":
		p, err := str("path")
		if err != nil {
			return err
		}
		follow, err := a.bool("follow_symlink", nil)
		if err != nil {
			return err
		}
		at, err := decodeAttrs(a)
		if err != nil {
			return err
		}
		err = setStat(p, follow, at)
		m.fsReply(id, nil, err)
	case "List":
		p, err := str("path")
		if err != nil {
			return err
		}
		list, err := listAll(p)
		if err != nil {
			m.fsReply(id, nil, errors.New("readdir: "+err.Error()))
		} else {
			m.fsReply(id, Map{{"List", list}}, nil)
		}
	case "ReadLink":
		p, err := str("path")
		if err != nil {
			return err
		}
		var target string
		if err = cstr(p); err == nil {
			target, err = os.Readlink(p)
		}
		if err != nil {
			m.fsReply(id, nil, pre("readlink", err))
		} else {
			m.fsReply(id, Map{{"Path", target}}, nil)
		}
	case "Symlink":
		target, err := str("target")
		if err != nil {
			return err
		}
		link, err := str("link_path")
		if err != nil {
			return err
		}
		if err = cstr(target); err == nil {
			if err = cstr(link); err == nil {
				err = unix.Symlink(target, link)
			}
		}
		m.fsReply(id, nil, wrapErr("symlink", err))
	case "Mkdir":
		p, err := str("path")
		if err != nil {
			return err
		}
		mode, err := a.optUint("mode", math.MaxUint32)
		if err != nil {
			return err
		}
		if err := createDirAll(p); err != nil {
			m.fsReply(id, nil, pre("mkdir", err))
			return nil
		}
		if mode != nil {
			if err = cstr(p); err == nil {
				err = unix.Chmod(p, uint32(*mode))
			}
			if err != nil {
				m.fsReply(id, nil, pre("chmod", err))
				return nil
			}
		}
		m.fsReply(id, nil, nil)
	case "Remove":
		p, err := str("path")
		if err != nil {
			return err
		}
		if err = cstr(p); err == nil {
			err = unix.Unlink(p)
		}
		m.fsReply(id, nil, wrapErr("remove", err))
	case "RemoveDir":
		p, err := str("path")
		if err != nil {
			return err
		}
		rec, err := a.bool("recursive", nil)
		if err != nil {
			return err
		}
		if err = cstr(p); err == nil {
			if rec {
				err = removeDirAll(p)
			} else {
				err = unix.Rmdir(p)
			}
		}
		m.fsReply(id, nil, wrapErr("remove_dir", err))
	case "Copy", "Rename":
		src, err := str("src")
		if err != nil {
			return err
		}
		dst, err := str("dst")
		if err != nil {
			return err
		}
		if op == "Copy" {
			m.fsReply(id, nil, wrapErr("copy", copyFile(src, dst)))
			return nil
		}
		if err = cstr(src); err == nil {
			if err = cstr(dst); err == nil {
				err = unix.Rename(src, dst)
			}
		}
		m.fsReply(id, nil, wrapErr("rename", err))
	case "OpenFile":
		p, err := str("path")
		if err != nil {
			return err
		}
		o, err := a.sub("options")
		if err != nil {
			return err
		}
		var b [6]bool
		for i, n := range []string{"read", "write", "append", "create", "truncate", "create_new"} {
			if b[i], err = o.bool(n, nil); err != nil {
				return err
			}
		}
		mode, err := o.optUint("mode", math.MaxUint32)
		if err != nil {
			return err
		}
		h, err := m.openFile(id, p, b, mode)
		if err != nil {
			m.fsReply(id, nil, pre("open", err))
		} else {
			m.fsReply(id, Map{{"Handle", h}}, nil)
		}
	case "OpenDir":
		p, err := str("path")
		if err != nil {
			return err
		}
		h, err := m.openDir(id, p)
		if err != nil {
			m.fsReply(id, nil, pre("opendir", err))
		} else {
			m.fsReply(id, Map{{"Handle", h}}, nil)
		}
	case "CloseHandle":
		n, err := a.uint("handle", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		m.fsReply(id, nil, m.closeHandle(id, n))
	case "Read", "Write":
		n, err := a.uint("handle", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		off, err := a.uint("offset", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		ln, err := a.optUint("len", math.MaxUint64)
		if err != nil {
			return err
		}
		if op == "Read" {
			m.startRead(id, n, off, ln)
		} else {
			m.startWrite(id, n, off, ln)
		}
	case "ReadDir":
		n, err := a.uint("handle", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		limit, err := a.optUint("limit", math.MaxUint32)
		if err != nil {
			return err
		}
		list, err := m.readDir(id, n, limit)
		if err != nil {
			m.fsReply(id, nil, err)
		} else {
			m.fsReply(id, Map{{"List", list}}, nil)
		}
	case "FStat":
		n, err := a.uint("handle", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		e, err := m.fstat(id, n)
		if err != nil {
			m.fsReply(id, nil, err)
		} else {
			m.fsReply(id, Map{{"Stat", e}}, nil)
		}
	case "FSetStat":
		n, err := a.uint("handle", math.MaxUint64, nil)
		if err != nil {
			return err
		}
		at, err := decodeAttrs(a)
		if err != nil {
			return err
		}
		m.fsReply(id, nil, m.fsetStat(id, n, at))
	default:
		return &badPayload{fmt.Errorf("unknown variant `%s`", op)}
	}
	return nil
}

func wrapErr(prefix string, err error) error {
	if err == nil {
		return nil
	}
	return pre(prefix, err)
}

func times(st *unix.Stat_t, a attrs) []unix.Timespec {
	at, mt := st.Atim.Sec, st.Mtim.Sec
	if a.atime != nil {
		at = *a.atime
	}
	if a.mtime != nil {
		mt = *a.mtime
	}
	return []unix.Timespec{{Sec: at}, {Sec: mt}}
}

func setStat(p string, follow bool, a attrs) error {
	e := func(inner string, err error) error { return fmt.Errorf("setstat: %s: %s", inner, text(err)) }
	if a.size != nil {
		if err := cstr(p); err != nil {
			return e("open for truncate", err)
		}
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return e("open for truncate", err)
		}
		defer f.Close()
		if *a.size > math.MaxInt64 {
			return e("set_len", errRange)
		}
		if err := unix.Ftruncate(int(f.Fd()), int64(*a.size)); err != nil {
			return e("set_len", err)
		}
	}
	if a.mode != nil {
		if !follow {
			st, err := stat(p, false)
			if err != nil {
				return e("lstat before chmod", err)
			}
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return errors.New("setstat: chmod on symlink without following is not supported")
			}
		}
		err := cstr(p)
		if err == nil {
			err = unix.Chmod(p, uint32(*a.mode))
		}
		if err != nil {
			return e("chmod", err)
		}
	}
	if a.uid != nil || a.gid != nil {
		if i := strings.IndexByte(p, 0); i >= 0 {
			return fmt.Errorf("setstat: path contains NUL: nul byte found in provided data at position: %d", i)
		}
		uid, gid := -1, -1
		if a.uid != nil {
			uid = int(*a.uid)
		}
		if a.gid != nil {
			gid = int(*a.gid)
		}
		var err error
		if follow {
			err = unix.Chown(p, uid, gid)
		} else {
			err = unix.Lchown(p, uid, gid)
		}
		if err != nil {
			return e("chown", err)
		}
	}
	if a.atime != nil || a.mtime != nil {
		st, err := stat(p, follow)
		if err != nil {
			return e("stat before utimensat", err)
		}
		flags := 0
		if !follow {
			flags = unix.AT_SYMLINK_NOFOLLOW
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, times(st, a), flags); err != nil {
			return e("utimensat", err)
		}
	}
	return nil
}

func opendir(p string) (*os.File, error) {
	if err := cstr(p); err != nil {
		return nil, err
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), p), nil
}

func listAll(p string) ([]any, error) {
	d, err := opendir(p)
	if err != nil {
		return nil, pre("opendir", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, errors.New(text(err))
	}
	list := []any{}
	for _, n := range names {
		list = append(list, listEntry(join(p, n)))
	}
	return list, nil
}

func (m *Model) insert(h *mHandle) (uint64, error) {
	fs := &m.fs
	fs.mu.Lock()
	defer fs.mu.Unlock()
	count := 0
	for _, o := range fs.handles {
		if sameClient(o.owner, h.owner) {
			count++
		}
	}
	if count >= 1024 {
		return 0, fmt.Errorf("too many open filesystem handles for relay client: %d", count)
	}
	for {
		fs.next++
		if fs.next == 0 {
			fs.next = 1
		}
		if fs.handles[fs.next] == nil {
			break
		}
	}
	h.refs = 1
	fs.handles[fs.next] = h
	return fs.next, nil
}

func (m *Model) openFile(id uint32, p string, b [6]bool, mode *uint64) (uint64, error) {
	if err := cstr(p); err != nil {
		return 0, err
	}
	fl, err := openFlags(b[0], b[1], b[2], b[3], b[4], b[5])
	if err != nil {
		return 0, err
	}
	perm := uint32(0o666)
	if mode != nil {
		perm = uint32(*mode)
	}
	fd, err := unix.Open(p, fl, perm)
	if err != nil {
		return 0, err
	}
	f := os.NewFile(uintptr(fd), p)
	n, err := m.insert(&mHandle{owner: id, path: p, f: f, read: b[0], write: b[1], appendM: b[2]})
	if err != nil {
		f.Close()
	}
	return n, err
}

func (m *Model) openDir(id uint32, p string) (uint64, error) {
	d, err := opendir(p)
	if err != nil {
		return 0, err
	}
	n, err := m.insert(&mHandle{owner: id, path: p, f: d, dir: true})
	if err != nil {
		d.Close()
	}
	return n, err
}

// file is FsState::file: kind, then owner, then access; the caller unrefs what it gets.
func (m *Model) file(id uint32, n uint64, needRead, needWrite bool) (*mHandle, error) {
	fs := &m.fs
	fs.mu.Lock()
	defer fs.mu.Unlock()
	h := fs.handles[n]
	switch {
	case h == nil:
		return nil, fmt.Errorf("invalid handle: %d", n)
	case h.dir:
		return nil, fmt.Errorf("handle %d is a directory", n)
	case !sameClient(h.owner, id):
		return nil, fmt.Errorf("handle %d is owned by a different relay client", n)
	case needRead && !h.read:
		return nil, fmt.Errorf("handle %d is not open for reading", n)
	case needWrite && !h.write && !h.appendM:
		return nil, fmt.Errorf("handle %d is not open for writing", n)
	}
	h.refs++
	return h, nil
}

func (m *Model) closeHandle(id uint32, n uint64) error {
	fs := &m.fs
	fs.mu.Lock()
	h := fs.handles[n]
	if h == nil {
		fs.mu.Unlock()
		return fmt.Errorf("close: invalid handle: %d", n)
	}
	if !sameClient(h.owner, id) {
		fs.mu.Unlock()
		return fmt.Errorf("close: handle %d is owned by a different relay client", n)
	}
	delete(fs.handles, n)
	fs.mu.Unlock()
	fs.unref(h)
	return nil
}

func (m *Model) readDir(id uint32, n uint64, limit *uint64) ([]any, error) {
	fs := &m.fs
	fs.mu.Lock()
	h := fs.handles[n]
	var err error
	switch {
	case h == nil:
		err = fmt.Errorf("readdir: invalid handle: %d", n)
	case !h.dir:
		err = fmt.Errorf("readdir: handle %d is a file", n)
	case !sameClient(h.owner, id):
		err = fmt.Errorf("readdir: handle %d is owned by a different relay client", n)
	default:
		h.refs++
	}
	fs.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer fs.unref(h)
	l := 128
	if limit != nil {
		l = max(int(*limit), 1)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	names, rerr := h.f.Readdirnames(l)
	if rerr != nil && rerr != io.EOF {
		return nil, fmt.Errorf("readdir %s: %s", h.path, text(rerr))
	}
	list := []any{}
	for _, name := range names {
		list = append(list, listEntry(join(h.path, name)))
	}
	return list, nil
}

func (m *Model) fstat(id uint32, n uint64) (Map, error) {
	fs := &m.fs
	fs.mu.Lock()
	h := fs.handles[n]
	var err error
	switch {
	case h == nil:
		err = fmt.Errorf("fstat: invalid handle: %d", n)
	case !sameClient(h.owner, id):
		err = fmt.Errorf("fstat: handle %d is owned by a different relay client", n)
	default:
		h.refs++
	}
	fs.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer fs.unref(h)
	var st unix.Stat_t
	if h.dir {
		err = unix.Stat(h.path, &st)
	} else {
		err = unix.Fstat(int(h.f.Fd()), &st)
	}
	if err != nil {
		return nil, pre("fstat", err)
	}
	return entry(h.path, &st), nil
}

func (m *Model) fsetStat(id uint32, n uint64, a attrs) error {
	h, err := m.file(id, n, false, false)
	if err != nil {
		return errors.New("fsetstat: " + err.Error())
	}
	defer m.fs.unref(h)
	h.mu.Lock()
	defer h.mu.Unlock()
	e := func(inner string, err error) error { return fmt.Errorf("fsetstat: %s: %s", inner, text(err)) }
	fd := int(h.f.Fd())
	if a.size != nil {
		if *a.size > math.MaxInt64 {
			return e("set_len", errRange)
		}
		if err := unix.Ftruncate(fd, int64(*a.size)); err != nil {
			return e("set_len", err)
		}
	}
	if a.mode != nil {
		if err := unix.Fchmod(fd, uint32(*a.mode)); err != nil {
			return e("chmod", err)
		}
	}
	if a.uid != nil || a.gid != nil {
		uid, gid := -1, -1
		if a.uid != nil {
			uid = int(*a.uid)
		}
		if a.gid != nil {
			gid = int(*a.gid)
		}
		if err := unix.Fchown(fd, uid, gid); err != nil {
			return e("fchown", err)
		}
	}
	if a.atime != nil || a.mtime != nil {
		st, err := stat(h.path, true)
		if err != nil {
			return e("stat before futimens", err)
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), times(st, a), 0); err != nil {
			return e("futimens", err)
		}
	}
	return nil
}

// startRead is the Read stream: fs.data chunks of at most 3 MiB, then the terminal response.
func (m *Model) startRead(id uint32, n, off uint64, ln *uint64) {
	h, err := m.file(id, n, true, false)
	if err != nil {
		m.fsReply(id, nil, errors.New("read: "+err.Error()))
		return
	}
	r := &mRead{owner: id, stop: make(chan struct{})}
	m.fs.mu.Lock()
	m.fs.reads[id] = r
	m.fs.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer m.fs.unref(h)
		err := func() error {
			h.mu.Lock()
			defer h.mu.Unlock()
			if _, err := unix.Seek(int(h.f.Fd()), int64(off), io.SeekStart); err != nil {
				return pre("seek", err)
			}
			buf := make([]byte, 3<<20)
			for {
				want := len(buf)
				if ln != nil {
					if *ln == 0 {
						return nil
					}
					want = int(min(uint64(want), *ln))
				}
				k, err := unix.Read(int(h.f.Fd()), buf[:want])
				if err != nil {
					return pre("read", err)
				}
				if k == 0 {
					return nil
				}
				if ln != nil {
					left := *ln - uint64(k)
					ln = &left
				}
				select {
				case <-r.stop:
					return errStopped
				default:
				}
				m.emit(id, "core.fs.data", Map{{"data", append([]byte{}, buf[:k]...)}})
			}
		}()
		m.fs.mu.Lock()
		live := m.fs.reads[id] == r
		if live {
			delete(m.fs.reads, id)
		}
		m.fs.mu.Unlock()
		if live && err != errStopped {
			m.fsReply(id, nil, err)
		}
	}()
}

var errStopped = errors.New("stopped")

// startWrite registers a write session; the host's fs.data chunks drive it (fsData).
func (m *Model) startWrite(id uint32, n, off uint64, ln *uint64) {
	h, err := m.file(id, n, false, true)
	if err != nil {
		m.fsReply(id, nil, errors.New("write: "+err.Error()))
		return
	}
	m.fs.mu.Lock()
	if old := m.fs.writes[id]; old != nil {
		defer m.fs.unref(old.h)
	}
	m.fs.writes[id] = &mWrite{owner: id, h: h, off: off, appendM: h.appendM, expect: ln}
	m.fs.mu.Unlock()
}

// fsData is handle_fs_data: empty is EOF (length check, then ok), a chunk is seek + write_all;
// an error ends the session.
func (m *Model) fsData(id uint32, data []byte) {
	m.fs.mu.Lock()
	w := m.fs.writes[id]
	m.fs.mu.Unlock()
	if w == nil {
		m.fsReply(id, nil, fmt.Errorf("unknown write session: %d", id))
		return
	}
	end := func(err error) {
		m.fs.mu.Lock()
		delete(m.fs.writes, id)
		m.fs.mu.Unlock()
		m.fs.unref(w.h)
		m.fsReply(id, nil, err)
	}
	if len(data) == 0 {
		if w.expect != nil && w.written != *w.expect {
			end(fmt.Errorf("write length mismatch: expected %d, wrote %d", *w.expect, w.written))
			return
		}
		end(nil)
		return
	}
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	fd := int(w.h.f.Fd())
	if !w.appendM {
		if _, err := unix.Seek(fd, int64(w.off), io.SeekStart); err != nil {
			end(pre("seek", err))
			return
		}
	}
	for b := data; len(b) > 0; {
		k, err := unix.Write(fd, b)
		if err != nil {
			// deviation: a failed write is reported on its own chunk with the OS text; the
			// reference's tokio file reports it on the next operation, by error kind.
			end(pre("write", err))
			return
		}
		b = b[k:]
	}
	w.off += uint64(len(data))
	w.written += uint64(len(data))
}
