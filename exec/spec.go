package exec

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
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
	if pw != nil {
		id.Groups = initGroups(pw.Username, id.GID)
	}
	return id, nil
}

// GroupFile is the group database initGroups reads.
var GroupFile = "/etc/group"

// initGroups is what initgroups(name, gid) sets, as the reference applies it: gid, then every
// group of GroupFile that lists name as a member (the user's passwd group only if it is one
// of those, or gid itself).
func initGroups(name string, gid uint32) []uint32 {
	groups := []uint32{gid}
	b, err := os.ReadFile(GroupFile)
	if err != nil {
		return groups
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) != 4 {
			continue
		}
		n, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || slices.Contains(groups, uint32(n)) {
			continue
		}
		for _, m := range strings.Split(f[3], ",") {
			if strings.TrimSpace(m) == name {
				groups = append(groups, uint32(n))
				break
			}
		}
	}
	return groups
}

// rootHome returns the passwd home of uid 0 (the default when no user is switched to).
func rootHome() string {
	if u, err := user.LookupId("0"); err == nil {
		return u.HomeDir
	}
	return ""
}

// InheritedHome is the HOME a child keeps when neither the request nor the target user's
// passwd entry gives one: the kernel's HOME for init, which the reference's children inherit.
const InheritedHome = "/"

// BuildEnv makes a child's environment as the reference does, from base (agentd's clean set
// for children, never its own environment): the first PATH entry of the request gets the
// scripts prefix (or, without one, PATH is the prefix and agentd's PATH); then the request's
// KEY=VALUE entries apply in order, so a later entry overrides an earlier one (the SDK sends
// the sandbox env, then the exec env); entries without '=' are ignored. Unless the request
// sets HOME, it is home (the target user's), else what base has, else InheritedHome.
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
	request = slices.Clone(request)
	if i := slices.IndexFunc(request, func(kv string) bool { return strings.HasPrefix(kv, "PATH=") }); i >= 0 {
		request[i] = "PATH=" + scripts + ":" + request[i][len("PATH="):]
	} else {
		p := agentPath
		if p == "" {
			p = DefaultPath
		}
		request = append(request, "PATH="+scripts+":"+p)
	}
	requestHome := false
	for _, kv := range request {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		requestHome = requestHome || k == "HOME"
		set(k, v)
	}
	if !requestHome && home != "" {
		set("HOME", home)
	}
	if _, ok := env["HOME"]; !ok {
		set("HOME", InheritedHome)
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
		Message: fmt.Sprintf("spawn %s: %s", RustQuote(cmd), oserr.Errno(errno)),
		Stage:   &stage,
	}
	if name, ok := failedErrnoNames[errno]; ok {
		f.ErrnoName = &name
	}
	return f
}

// RustQuote quotes s as Rust's Debug formatting of a str does (the reference's spawn
// messages): \0 \t \r \n \\ \" escaped, other unprintable characters as \u{hex}.
func RustQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case 0:
			b.WriteString(`\0`)
		case '\t':
			b.WriteString(`\t`)
		case '\r':
			b.WriteString(`\r`)
		case '\n':
			b.WriteString(`\n`)
		case '\\', '"':
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			if strconv.IsPrint(r) {
				b.WriteRune(r)
			} else {
				fmt.Fprintf(&b, `\u{%x}`, r)
			}
		}
	}
	b.WriteByte('"')
	return b.String()
}

// nulFailure is exec.failed for a NUL byte in the request's strings, in the reference's words:
// pipe mode is Rust's Command refusing to spawn; PTY mode is its CString check of the named
// string (position is the NUL's byte offset).
func nulFailure(cmd string, tty bool, what string, position int) *protocol.ExecFailed {
	if tty {
		return otherFailure(fmt.Errorf("invalid %s: nul byte found in provided data at position: %d", what, position))
	}
	stage := "Command::spawn"
	return &protocol.ExecFailed{Kind: protocol.ExecOther, Message: fmt.Sprintf("spawn %s: nul byte found in provided data", RustQuote(cmd)), Stage: &stage}
}

// findNUL returns the first request string with a NUL byte, in the order the reference checks
// them: PTY mode checks the command, the arguments and the cwd (env entries with a NUL are
// skipped there); pipe mode any of them, env included.
func findNUL(req protocol.ExecRequest) (what string, position int, found bool) {
	check := func(w, s string) bool {
		if i := strings.IndexByte(s, 0); i >= 0 {
			what, position, found = w, i, true
		}
		return found
	}
	if check("command", req.Cmd) {
		return
	}
	for _, a := range req.Args {
		if check("arg", a) {
			return
		}
	}
	if !req.TTY {
		for _, e := range req.Env {
			if check("env", e) {
				return
			}
		}
	}
	if req.Cwd != nil {
		check("cwd", *req.Cwd)
	}
	return
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
