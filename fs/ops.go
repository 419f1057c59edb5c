package fs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

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
	var err error
	if follow {
		err = unix.Stat(path, &st)
	} else {
		err = unix.Lstat(path, &st)
	}
	return &st, err
}

// listEntry lstats one directory entry; a failure gives kind "other" with zeroes.
func listEntry(dir, name string) protocol.FsEntryInfo {
	p := filepath.Join(dir, name)
	st, err := statPath(p, false)
	if err != nil {
		return protocol.FsEntryInfo{Path: p, Kind: "other"}
	}
	return entryInfo(p, st)
}

func realPath(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", opError("realpath", err)
	}
	p, err := filepath.EvalSymlinks(abs)
	if err == nil {
		return p, nil
	}
	// A missing leaf is allowed: canonicalize the parent and append the last component.
	parent, perr := filepath.EvalSymlinks(filepath.Dir(abs))
	if perr != nil {
		return "", opError("realpath", err)
	}
	return filepath.Join(parent, filepath.Base(abs)), nil
}

func setStat(path string, follow bool, a protocol.FsSetAttrs) error {
	if a.Size != nil {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("setstat: %w", opError("open for truncate", err))
		}
		err = f.Truncate(int64(*a.Size))
		f.Close()
		if err != nil {
			return fmt.Errorf("setstat: %w", opError("set_len", err))
		}
	}
	if a.Mode != nil {
		if !follow {
			st, err := statPath(path, false)
			if err != nil {
				return fmt.Errorf("setstat: %w", opError("lstat before chmod", err))
			}
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return errors.New("setstat: chmod on symlink without following is not supported")
			}
		}
		if err := unix.Chmod(path, *a.Mode); err != nil {
			return fmt.Errorf("setstat: %w", opError("chmod", err))
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
		chown := unix.Chown
		if !follow {
			chown = unix.Lchown
		}
		if err := chown(path, uid, gid); err != nil {
			return fmt.Errorf("setstat: %w", opError("chown", err))
		}
	}
	if a.Atime != nil || a.Mtime != nil {
		st, err := statPath(path, follow)
		if err != nil {
			return fmt.Errorf("setstat: %w", opError("stat before utimensat", err))
		}
		ts := times(st, a)
		flags := 0
		if !follow {
			flags = unix.AT_SYMLINK_NOFOLLOW
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, flags); err != nil {
			return fmt.Errorf("setstat: %w", opError("utimensat", err))
		}
	}
	return nil
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

func fsetStat(f *os.File, a protocol.FsSetAttrs) error {
	fd := int(f.Fd())
	if a.Size != nil {
		if err := unix.Ftruncate(fd, int64(*a.Size)); err != nil {
			return opError("fsetstat", err)
		}
	}
	if a.Mode != nil {
		if err := unix.Fchmod(fd, *a.Mode); err != nil {
			return opError("fsetstat", err)
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
			return opError("fsetstat", err)
		}
	}
	if a.Atime != nil || a.Mtime != nil {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return opError("fsetstat", err)
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), times(&st, a), 0); err != nil {
			return opError("fsetstat", err)
		}
	}
	return nil
}

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
	default:
		return 0, syscall.EINVAL
	}
	if o.Append {
		acc |= unix.O_APPEND
	}
	if !o.Write && !o.Append {
		if o.Truncate || o.Create || o.CreateNew {
			return 0, syscall.EINVAL
		}
	} else if o.Append && o.Truncate && !o.CreateNew {
		return 0, syscall.EINVAL
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

func mkdir(path string, mode *uint32) error {
	if err := os.MkdirAll(path, 0o777); err != nil {
		return opError("mkdir", err)
	}
	if mode != nil {
		if err := unix.Chmod(path, *mode); err != nil {
			return opError("chmod", err)
		}
	}
	return nil
}

func removeDir(path string, recursive bool) error {
	var err error
	if recursive {
		if _, serr := os.Lstat(path); serr != nil {
			return opError("remove_dir", serr)
		}
		err = os.RemoveAll(path)
	} else {
		err = unix.Rmdir(path)
	}
	if err != nil {
		return opError("remove_dir", err)
	}
	return nil
}

// copyFile copies a regular file with its permissions (directories fail, as in the reference).
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return opError("copy", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return opError("copy", err)
	}
	if !st.Mode().IsRegular() {
		return opError("copy", syscall.EINVAL)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return opError("copy", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return opError("copy", err)
	}
	if err := out.Chmod(st.Mode().Perm()); err != nil {
		out.Close()
		return opError("copy", err)
	}
	if err := out.Close(); err != nil {
		return opError("copy", err)
	}
	return nil
}
