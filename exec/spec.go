package exec

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/agentd/agentd/internal/oserr"
	"github.com/agentd/agentd/protocol"
)

// DefaultPath is the PATH children get when neither the request nor agentd has one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Identity is a resolved exec user.
type Identity struct {
	UID, GID uint32
	Groups   []uint32 // supplementary groups (initgroups), empty for an unknown numeric uid
	Home     string
	Switch   bool // false: run as agentd (no user given)
}

// ResolveUser resolves "U[:G]" as the reference does: U is a name or a numeric uid (a uid
// without a passwd entry is used as is); G is a group name or gid, else the passwd group.
func ResolveUser(spec string) (Identity, error) {
	u, g, hasGroup := strings.Cut(spec, ":")
	u, g = strings.TrimSpace(u), strings.TrimSpace(g)
	if u == "" {
		return Identity{}, fmt.Errorf("user spec has empty user")
	}
	id := Identity{Switch: true}
	var pw *user.User
	if n, err := strconv.ParseUint(u, 10, 32); err == nil {
		id.UID = uint32(n)
		id.GID = uint32(os.Getgid())
		if found, err := user.LookupId(u); err == nil {
			pw = found
		}
	} else {
		found, err := user.Lookup(u)
		if err != nil {
			return Identity{}, fmt.Errorf("guest user not found: %s", u)
		}
		pw = found
		n, _ := strconv.ParseUint(found.Uid, 10, 32)
		id.UID = uint32(n)
	}
	if pw != nil {
		n, _ := strconv.ParseUint(pw.Gid, 10, 32)
		id.GID = uint32(n)
		id.Home = pw.HomeDir
		if gids, err := pw.GroupIds(); err == nil {
			for _, s := range gids {
				if n, err := strconv.ParseUint(s, 10, 32); err == nil {
					id.Groups = append(id.Groups, uint32(n))
				}
			}
		}
	}
	if hasGroup {
		switch n, err := strconv.ParseUint(g, 10, 32); {
		case g == "":
			return Identity{}, fmt.Errorf("user spec has empty group")
		case err == nil:
			id.GID = uint32(n)
		default:
			grp, err := user.LookupGroup(g)
			if err != nil {
				return Identity{}, fmt.Errorf("guest group not found: %s", g)
			}
			n, _ := strconv.ParseUint(grp.Gid, 10, 32)
			id.GID = uint32(n)
		}
	}
	return id, nil
}

// homeOf returns the passwd home of uid 0 (the default when no user is switched to).
func rootHome() string {
	if u, err := user.LookupId("0"); err == nil {
		return u.HomeDir
	}
	return ""
}

// BuildEnv makes a child's environment: base (agentd's clean set for children, never its own
// environment), overlaid with the request's KEY=VALUE entries, PATH prefixed with scripts, and
// HOME defaulted to the target user's home.
func BuildEnv(base, request []string, scripts, agentPath, home string) []string {
	env := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := env[k]; !ok {
			order = append(order, k)
		}
		env[k] = v
	}
	for _, kv := range base {
		if k, v, ok := strings.Cut(kv, "="); ok {
			set(k, v)
		}
	}
	requestPath := false
	for _, kv := range request {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue // entries without '=' are ignored, as by the reference
		}
		if k == "PATH" && !requestPath {
			requestPath = true
			v = scripts + ":" + v
		} else if k == "PATH" {
			continue // only the first PATH counts
		}
		set(k, v)
	}
	if !requestPath {
		p := agentPath
		if p == "" {
			p = DefaultPath
		}
		set("PATH", scripts+":"+p)
	}
	if _, ok := env["HOME"]; !ok && home != "" {
		set("HOME", home)
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+env[k])
	}
	return out
}

// LookPath finds cmd like execvp: a name with a '/' is used as is, else each PATH entry of the
// child's environment is tried in order.
func LookPath(cmd string, env []string) (string, error) {
	if strings.Contains(cmd, "/") {
		return cmd, nil
	}
	path := DefaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	denied := false
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, cmd)
		st, err := os.Stat(p)
		if err != nil || st.IsDir() {
			continue
		}
		if st.Mode()&0o111 == 0 {
			denied = true
			continue
		}
		return p, nil
	}
	if denied {
		return "", syscall.EACCES
	}
	return "", syscall.ENOENT
}

// errno names the reference reports in exec.failed (others are null).
var failedErrnoNames = map[syscall.Errno]string{
	syscall.E2BIG: "E2BIG", syscall.EACCES: "EACCES", syscall.EAGAIN: "EAGAIN", syscall.EBUSY: "EBUSY",
	syscall.EFAULT: "EFAULT", syscall.EINVAL: "EINVAL", syscall.EIO: "EIO", syscall.EISDIR: "EISDIR",
	syscall.ELOOP: "ELOOP", syscall.EMFILE: "EMFILE", syscall.ENAMETOOLONG: "ENAMETOOLONG",
	syscall.ENFILE: "ENFILE", syscall.ENOENT: "ENOENT", syscall.ENOEXEC: "ENOEXEC", syscall.ENOMEM: "ENOMEM",
	syscall.ENOSYS: "ENOSYS", syscall.ENOTDIR: "ENOTDIR", syscall.ENXIO: "ENXIO", syscall.EPERM: "EPERM",
	syscall.ETXTBSY: "ETXTBSY",
}

// Classify maps a spawn errno to the reference's ExecFailureKind.
func Classify(e syscall.Errno) string {
	switch e {
	case syscall.ENOENT:
		return protocol.ExecNotFound
	case syscall.ENOTDIR:
		return protocol.ExecBadCwd
	case syscall.EACCES, syscall.EPERM:
		return protocol.ExecPermissionDenied
	case syscall.ENOEXEC, syscall.EISDIR, syscall.ETXTBSY:
		return protocol.ExecNotExecutable
	case syscall.E2BIG, syscall.ELOOP, syscall.ENAMETOOLONG, syscall.EFAULT:
		return protocol.ExecBadArgs
	case syscall.EMFILE, syscall.ENFILE, syscall.EAGAIN:
		return protocol.ExecResourceLimit
	case syscall.ENOMEM:
		return protocol.ExecOutOfMemory
	}
	return protocol.ExecOther
}

// spawnFailure builds exec.failed for an OS error at a stage, in the reference's words.
func spawnFailure(cmd, stage string, err error) *protocol.ExecFailed {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return otherFailure(err)
	}
	code := int32(errno)
	f := &protocol.ExecFailed{
		Kind:    Classify(errno),
		Errno:   &code,
		Message: fmt.Sprintf("spawn %s: %s", strconv.Quote(cmd), oserr.Errno(errno)),
		Stage:   &stage,
	}
	if name, ok := failedErrnoNames[errno]; ok {
		f.ErrnoName = &name
	}
	return f
}

// otherFailure is exec.failed for a failure that is not an OS error of the spawn.
func otherFailure(err error) *protocol.ExecFailed {
	return &protocol.ExecFailed{Kind: protocol.ExecOther, Message: "exec session error: " + err.Error()}
}

// stdin.error names (the reference names only these).
var stdinErrnoNames = map[syscall.Errno]string{
	syscall.EPIPE: "EPIPE", syscall.EBADF: "EBADF", syscall.EINVAL: "EINVAL", syscall.EIO: "EIO",
	syscall.ENOSPC: "ENOSPC", syscall.EFBIG: "EFBIG",
}

func stdinError(err error) protocol.ExecStdinError {
	e := protocol.ExecStdinError{Message: "io error: " + oserr.Text(err)}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		code := int32(errno)
		e.Errno = &code
		if name, ok := stdinErrnoNames[errno]; ok {
			e.ErrnoName = &name
		}
	}
	return e
}
