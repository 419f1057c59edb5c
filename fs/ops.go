package fs

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/internal/oserr"
	"github.com/agentd/agentd/protocol"
)

// opError is a failed operation; its text is the reference's "<prefix>: <detail>".
func opError(prefix string, err error) error {
	return errors.New(prefix + ": " + oserr.Text(err))
}

func pathData(p string) *protocol.FsResponseData {
	return &protocol.FsResponseData{Kind: "Path", Path: p}
}

func statData(info protocol.FsEntryInfo) *protocol.FsResponseData {
	return &protocol.FsResponseData{Kind: "Stat", Stat: info}
}

// entryInfo describes st for the given path, in the reference's shape (full st_mode).
func entryInfo(path string, st *unix.Stat_t) protocol.FsEntryInfo {
	kind := "other"
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		kind = "file"
	case unix.S_IFDIR:
		kind = "dir"
	case unix.S_IFLNK:
		kind = "symlink"
	}
	mtime, atime := st.Mtim.Sec, st.Atim.Sec
	return protocol.FsEntryInfo{Path: path, Kind: kind, Size: uint64(st.Size), Mode: st.Mode,
		Modified: &mtime, UID: st.Uid, GID: st.Gid, Atime: &atime, Mtime: &mtime}
}

func statPath(path string, follow bool) (*unix.Stat_t, error) {
	var st unix.Stat_t
	err := checkNUL(path)
	if err != nil {
		return &st, err
	}
	if follow {
		err = unix.Stat(path, &st)
	} else {
		err = unix.Lstat(path, &st)
	}
	return &st, err
}

// listEntry lstats one directory entry; a failure gives kind "other" with zeroes. Its path
// is the directory's path as the host gave it, joined as Rust's Path::join does.
func listEntry(dir, name string) protocol.FsEntryInfo {
	p := rustJoin(dir, name)
	st, err := statPath(p, false)
	if err != nil {
		return protocol.FsEntryInfo{Path: p, Kind: "other"}
	}
	return entryInfo(p, st)
}

// realPath is Rust's fs::canonicalize (realpath(3)); if that fails, the parent is
// canonicalized and the last component appended (a missing leaf is allowed); if the parent
// fails too, the original error.
func realPath(path string) (string, error) {
	p, err := canonicalize(path)
	if err == nil {
		return p, nil
	}
	parent, name, ok := rustParent(path)
	if !ok {
		return "", opError("realpath", err)
	}
	pp, perr := canonicalize(parent)
	if perr != nil {
		return "", opError("realpath", err)
	}
	if name == "" {
		return pp, nil
	}
	return rustJoin(pp, name), nil
}

// canonicalize resolves path as realpath(3) does: the kernel resolves it (O_PATH) and /proc
// names the result.
func canonicalize(path string) (string, error) {
	if err := checkNUL(path); err != nil {
		return "", err
	}
	fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", err
	}
	return p, nil
}

// setStat is the reference's SetStat: size, mode, owner, times, in that order, each with its
// own error prefix (and Rust's per-call NUL checks).
func setStat(path string, follow bool, a protocol.FsSetAttrs) error {
	fail := func(inner string, err error) error { return fmt.Errorf("setstat: %w", opError(inner, err)) }
	if a.Size != nil {
		if err := checkNUL(path); err != nil {
			return fail("open for truncate", err)
		}
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return fail("open for truncate", err)
		}
		err = setLen(f, *a.Size)
		f.Close()
		if err != nil {
			return fail("set_len", err)
		}
	}
	if a.Mode != nil {
		if !follow {
			st, err := statPath(path, false)
			if err != nil {
				return fail("lstat before chmod", err)
			}
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return errors.New("setstat: chmod on symlink without following is not supported")
			}
		}
		if err := chmod(path, *a.Mode); err != nil {
			return fail("chmod", err)
		}
	}
	if a.UID != nil || a.GID != nil {
		if i := strings.IndexByte(path, 0); i >= 0 {
			return fmt.Errorf("setstat: path contains NUL: %s", nulAt(i))
		}
		uid, gid := -1, -1
		if a.UID != nil {
			uid = int(*a.UID)
		}
		if a.GID != nil {
			gid = int(*a.GID)
		}
		chown := unix.Chown
		if !follow {
			chown = unix.Lchown
		}
		if err := chown(path, uid, gid); err != nil {
			return fail("chown", err)
		}
	}
	if a.Atime != nil || a.Mtime != nil {
		st, err := statPath(path, follow)
		if err != nil {
			return fail("stat before utimensat", err)
		}
		ts := times(st, a)
		flags := 0
		if !follow {
			flags = unix.AT_SYMLINK_NOFOLLOW
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, flags); err != nil {
			return fail("utimensat", err)
		}
	}
	return nil
}

// setLen is Rust's File::set_len: a size that does not fit an off_t is refused before the
// syscall, with Rust's conversion error.
func setLen(f *os.File, size uint64) error {
	if size > math.MaxInt64 {
		return errOutOfRange
	}
	return unix.Ftruncate(int(f.Fd()), int64(size))
}

func chmod(path string, mode uint32) error {
	if err := checkNUL(path); err != nil {
		return err
	}
	return unix.Chmod(path, mode)
}

// times fills missing atime/mtime from st (whole seconds, as the reference sets them).
func times(st *unix.Stat_t, a protocol.FsSetAttrs) []unix.Timespec {
	at, mt := st.Atim.Sec, st.Mtim.Sec
	if a.Atime != nil {
		at = *a.Atime
	}
	if a.Mtime != nil {
		mt = *a.Mtime
	}
	return []unix.Timespec{{Sec: at}, {Sec: mt}}
}

// fsetStat is the reference's FSetStat on an open file: set_len, chmod, fchown, futimens,
// each with its own prefix; a missing time comes from stat(path), as the reference takes it.
func fsetStat(f *os.File, path string, a protocol.FsSetAttrs) error {
	fail := func(inner string, err error) error { return fmt.Errorf("fsetstat: %w", opError(inner, err)) }
	fd := int(f.Fd())
	if a.Size != nil {
		if err := setLen(f, *a.Size); err != nil {
			return fail("set_len", err)
		}
	}
	if a.Mode != nil {
		if err := unix.Fchmod(fd, *a.Mode); err != nil {
			return fail("chmod", err)
		}
	}
	if a.UID != nil || a.GID != nil {
		uid, gid := -1, -1
		if a.UID != nil {
			uid = int(*a.UID)
		}
		if a.GID != nil {
			gid = int(*a.GID)
		}
		if err := unix.Fchown(fd, uid, gid); err != nil {
			return fail("fchown", err)
		}
	}
	if a.Atime != nil || a.Mtime != nil {
		st, err := statPath(path, true)
		if err != nil {
			return fail("stat before futimens", err)
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), times(st, a), 0); err != nil {
			return fail("futimens", err)
		}
	}
	return nil
}

// Rust's OpenOptions errors (they are not OS errors: no errno in the text).
var (
	errNoAccess  = errors.New("must specify at least one of read, write, or append access")
	errNeedWrite = errors.New("creating or truncating a file requires write or append access")
)

// openFlags maps the reference's OpenOptions (Rust's std semantics) to open(2) flags.
func openFlags(o protocol.FsOpenOptions) (int, error) {
	var acc int
	switch {
	case o.Read && !o.Write && !o.Append:
		acc = unix.O_RDONLY
	case !o.Read && (o.Write || o.Append):
		acc = unix.O_WRONLY
	case o.Read && (o.Write || o.Append):
		acc = unix.O_RDWR
	case o.Create || o.CreateNew || o.Truncate:
		return 0, errNeedWrite
	default:
		return 0, errNoAccess
	}
	if o.Append {
		acc |= unix.O_APPEND
	}
	if !o.Write && !o.Append {
		if o.Truncate || o.Create || o.CreateNew {
			return 0, errNeedWrite
		}
	} else if o.Append && o.Truncate && !o.CreateNew {
		return 0, errNeedWrite
	}
	switch {
	case o.CreateNew:
		acc |= unix.O_CREAT | unix.O_EXCL
	case o.Create && o.Truncate:
		acc |= unix.O_CREAT | unix.O_TRUNC
	case o.Create:
		acc |= unix.O_CREAT
	case o.Truncate:
		acc |= unix.O_TRUNC
	}
	return acc | unix.O_CLOEXEC, nil
}

// mkdir is Rust's create_dir_all (an existing directory, or "", is success; a file in the
// way is EEXIST), then, with a mode, chmod of the final path only.
func mkdir(path string, mode *uint32) error {
	if err := createDirAll(path); err != nil {
		return opError("mkdir", err)
	}
	if mode != nil {
		if err := chmod(path, *mode); err != nil {
			return opError("chmod", err)
		}
	}
	return nil
}

func createDirAll(path string) error {
	if path == "" {
		return nil
	}
	err := mkdirOne(path)
	switch {
	case err == nil:
		return nil
	case err == unix.ENOENT:
	case isDir(path):
		return nil
	default:
		return err
	}
	parent, _, ok := rustParent(path)
	if !ok {
		return errors.New("failed to create whole tree")
	}
	if err := createDirAll(parent); err != nil {
		return err
	}
	if err := mkdirOne(path); err != nil && !isDir(path) {
		return err
	}
	return nil
}

func mkdirOne(path string) error {
	if err := checkNUL(path); err != nil {
		return err
	}
	return unix.Mkdir(path, 0o777)
}

func isDir(path string) bool {
	st, err := statPath(path, true)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR
}

// removeDir is rmdir, or Rust's remove_dir_all: a symlink is unlinked, anything else must be
// a directory (a file is ENOTDIR: it is not removed), whose tree is then removed.
func removeDir(path string, recursive bool) error {
	if err := checkNUL(path); err != nil {
		return opError("remove_dir", err)
	}
	var err error
	if !recursive {
		err = unix.Rmdir(path)
	} else if st, serr := statPath(path, false); serr != nil {
		err = serr
	} else if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		err = unix.Unlink(path)
	} else {
		err = removeTree(path, true)
	}
	if err != nil {
		return opError("remove_dir", err)
	}
	return nil
}

// removeTree removes a directory and everything under it without following symlinks. Entries
// that vanish meanwhile are not errors; a root that is not a directory is.
func removeTree(path string, root bool) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == unix.ENOTDIR || err == unix.ELOOP {
		if root {
			return err
		}
		return unix.Unlink(path)
	}
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), path)
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		child := rustJoin(path, n)
		st, err := statPath(child, false)
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = removeTree(child, false)
		} else if err == nil {
			err = unix.Unlink(child)
		}
		if err != nil && err != unix.ENOENT {
			return err
		}
	}
	if err := unix.Rmdir(path); err != nil && err != unix.ENOENT {
		return err
	}
	return nil
}

// errNotFile is Rust's fs::copy error for a source that is not a regular file.
var errNotFile = errors.New("the source path is neither a regular file nor a symlink to a regular file")

// copyFile is Rust's fs::copy: a regular source only, created with its permission bits (set
// again if the destination existed), then the data.
func copyFile(src, dst string) error {
	if err := checkNUL(src); err != nil {
		return opError("copy", err)
	}
	in, err := os.Open(src)
	if err != nil {
		return opError("copy", err)
	}
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return opError("copy", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return opError("copy", errNotFile)
	}
	if err := checkNUL(dst); err != nil {
		return opError("copy", err)
	}
	perm := st.Mode & 0o7777
	fd, err := unix.Open(dst, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, perm)
	if err != nil {
		return opError("copy", err)
	}
	out := os.NewFile(uintptr(fd), dst)
	var ost unix.Stat_t
	err = unix.Fstat(fd, &ost)
	if err == nil && ost.Mode&unix.S_IFMT == unix.S_IFREG {
		err = unix.Fchmod(fd, perm)
	}
	if err == nil {
		_, err = io.Copy(out, in)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return opError("copy", err)
	}
	return nil
}

// rename is rename(2): unlike os.Rename, a directory may replace an empty directory.
func rename(src, dst string) error {
	if err := checkNUL(src); err != nil {
		return opError("rename", err)
	}
	if err := checkNUL(dst); err != nil {
		return opError("rename", err)
	}
	if err := unix.Rename(src, dst); err != nil {
		return opError("rename", err)
	}
	return nil
}

// Rust refuses paths with a NUL byte before any syscall, with its own text; so do we (Go's
// syscalls would say EINVAL).
var errNUL = errors.New("file name contained an unexpected NUL byte")

func checkNUL(path string) error {
	if strings.IndexByte(path, 0) >= 0 {
		return errNUL
	}
	return nil
}

// nulAt is the text of Rust's CString::new error.
func nulAt(i int) string { return fmt.Sprintf("nul byte found in provided data at position: %d", i) }

// errOutOfRange is Rust's TryFromIntError text (a u64 that does not fit an off_t).
var errOutOfRange = errors.New("out of range integral type conversion attempted")

// rustJoin is Rust's Path::join for a relative name: a separator is added unless the path is
// empty or already ends in one; nothing is cleaned.
func rustJoin(dir, name string) string {
	if dir == "" || strings.HasSuffix(dir, "/") {
		return dir + name
	}
	return dir + "/" + name
}

// rustParent is Rust's Path::parent and Path::file_name: the path without its last
// component (ok is false for "" and "/"), and that component if it is a plain name ("" for
// "..", "."). Repeated separators and "." components other than a leading one do not count.
func rustParent(path string) (parent, name string, ok bool) {
	type comp struct{ s, end int } // a component and where the path up to it ends
	var comps []comp
	for i := 0; i < len(path); {
		if path[i] == '/' {
			i++
			continue
		}
		j := i
		for j < len(path) && path[j] != '/' {
			j++
		}
		if c := path[i:j]; c != "." || i == 0 {
			comps = append(comps, comp{i, j})
		}
		i = j
	}
	if len(comps) == 0 {
		return "", "", false // "", "/", "//"
	}
	last := comps[len(comps)-1]
	if c := path[last.s:last.end]; c != "." && c != ".." {
		name = c
	}
	if len(comps) == 1 {
		if strings.HasPrefix(path, "/") {
			return "/", name, true
		}
		return "", name, true
	}
	return path[:comps[len(comps)-2].end], name, true
}
