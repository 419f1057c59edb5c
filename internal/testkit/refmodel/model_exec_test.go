package refmodel

import (
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// Exec sessions, §2.2 and §3.10.

type mExec struct {
	m     *Model
	id    uint32
	pid   int
	tty   *os.File // PTY master
	mu    sync.Mutex
	stdin *os.File // pipe mode; nil once closed
	last  byte     // last byte written to the PTY
}

type rlimit struct {
	resource   string
	soft, hard uint64
}

type execRequest struct {
	cmd        string
	args, env  []string
	cwd, user  *string
	tty        bool
	rows, cols uint64
	rlimits    []rlimit
}

func decodeExecRequest(p any) (execRequest, error) {
	var r execRequest
	f, err := asStruct(p)
	if err != nil {
		return r, err
	}
	if r.cmd, err = f.str("cmd"); err != nil {
		return r, err
	}
	if r.args, err = f.strs("args"); err != nil {
		return r, err
	}
	if r.env, err = f.strs("env"); err != nil {
		return r, err
	}
	if r.cwd, err = f.optStr("cwd"); err != nil {
		return r, err
	}
	if r.user, err = f.optStr("user"); err != nil {
		return r, err
	}
	no := false
	if r.tty, err = f.bool("tty", &no); err != nil {
		return r, err
	}
	rows, cols := uint64(24), uint64(80)
	if r.rows, err = f.uint("rows", math.MaxUint16, &rows); err != nil {
		return r, err
	}
	if r.cols, err = f.uint("cols", math.MaxUint16, &cols); err != nil {
		return r, err
	}
	v, ok, err := f.need("rlimits", true)
	if err != nil {
		return r, err
	}
	if ok {
		arr, isArr := untag(v).([]any)
		if !isArr {
			return r, wrong("rlimits", v, "a sequence")
		}
		for _, e := range arr {
			rf, err := asStruct(e)
			if err != nil {
				return r, err
			}
			var rl rlimit
			if rl.resource, err = rf.str("resource"); err != nil {
				return r, err
			}
			if rl.soft, err = rf.uint("soft", math.MaxUint64, nil); err != nil {
				return r, err
			}
			if rl.hard, err = rf.uint("hard", math.MaxUint64, nil); err != nil {
				return r, err
			}
			r.rlimits = append(r.rlimits, rl)
		}
	}
	return r, nil
}

func (m *Model) execFrame(id uint32, t string, p any) error {
	switch t {
	case "core.exec.request":
		req, err := decodeExecRequest(p)
		if err != nil {
			return err
		}
		m.spawn(id, req)
	case "core.exec.stdin":
		f, err := asStruct(p)
		if err != nil {
			return err
		}
		data, err := f.data("data")
		if err != nil {
			return err
		}
		if e := m.exec(id); e != nil {
			e.write(data)
		}
	case "core.exec.resize":
		f, err := asStruct(p)
		if err != nil {
			return err
		}
		rows, err := f.uint("rows", math.MaxUint16, nil)
		if err != nil {
			return err
		}
		cols, err := f.uint("cols", math.MaxUint16, nil)
		if err != nil {
			return err
		}
		if e := m.exec(id); e != nil && e.tty != nil {
			unix.IoctlSetWinsize(int(e.tty.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(rows), Col: uint16(cols)})
		}
	case "core.exec.signal":
		f, err := asStruct(p)
		if err != nil {
			return err
		}
		sig, err := f.int("signal", math.MinInt32, math.MaxInt32)
		if err != nil {
			return err
		}
		if e := m.exec(id); e != nil && sig >= 1 && sig <= 31 {
			e.kill(int(sig))
		}
	}
	return nil
}

func (m *Model) exec(id uint32) *mExec {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.execs[id]
}

func (e *mExec) kill(sig int) { syscall.Kill(e.pid, syscall.Signal(sig)) }

// failed sends exec.failed; errno 0 means "not an OS error" (kind other, no errno or stage).
func (m *Model) failed(id uint32, cmd string, errno syscall.Errno, stage, msg string) {
	var p Map
	if errno == 0 {
		var st any
		if stage != "" {
			st = stage
		}
		p = Map{{"kind", "other"}, {"errno", nil}, {"errno_name", nil}, {"message", msg}, {"stage", st}}
	} else {
		var name any
		if n, ok := failedNames[errno]; ok {
			name = n
		}
		p = Map{{"kind", failureKind(errno)}, {"errno", int64(errno)}, {"errno_name", name},
			{"message", fmt.Sprintf("spawn %s: %s", debugQuote(cmd), osText(errno))}, {"stage", stage}}
	}
	m.emit(id, "core.exec.failed", p)
}

// failureKind is §2.2's errno classification.
func failureKind(e syscall.Errno) string {
	switch e {
	case syscall.ENOENT:
		return "not_found"
	case syscall.ENOTDIR:
		return "bad_cwd"
	case syscall.EACCES, syscall.EPERM:
		return "permission_denied"
	case syscall.ENOEXEC, syscall.EISDIR, syscall.ETXTBSY:
		return "not_executable"
	case syscall.E2BIG, syscall.ELOOP, syscall.ENAMETOOLONG, syscall.EFAULT:
		return "bad_args"
	case syscall.EMFILE, syscall.ENFILE, syscall.EAGAIN:
		return "resource_limit"
	case syscall.ENOMEM:
		return "out_of_memory"
	}
	return "other"
}

var failedNames = map[syscall.Errno]string{}

func init() {
	for _, n := range strings.Fields("E2BIG EACCES EAGAIN EBUSY EFAULT EINVAL EIO EISDIR ELOOP EMFILE ENAMETOOLONG ENFILE ENOENT ENOEXEC ENOMEM ENOSYS ENOTDIR ENXIO EPERM ETXTBSY") {
		failedNames[errnoByName[n]] = n
	}
}

var errnoByName = map[string]syscall.Errno{
	"E2BIG": syscall.E2BIG, "EACCES": syscall.EACCES, "EAGAIN": syscall.EAGAIN, "EBUSY": syscall.EBUSY,
	"EFAULT": syscall.EFAULT, "EINVAL": syscall.EINVAL, "EIO": syscall.EIO, "EISDIR": syscall.EISDIR,
	"ELOOP": syscall.ELOOP, "EMFILE": syscall.EMFILE, "ENAMETOOLONG": syscall.ENAMETOOLONG, "ENFILE": syscall.ENFILE,
	"ENOENT": syscall.ENOENT, "ENOEXEC": syscall.ENOEXEC, "ENOMEM": syscall.ENOMEM, "ENOSYS": syscall.ENOSYS,
	"ENOTDIR": syscall.ENOTDIR, "ENXIO": syscall.ENXIO, "EPERM": syscall.EPERM, "ETXTBSY": syscall.ETXTBSY,
}

// osText is Rust's io::Error display of an OS error: "<strerror> (os error N)".
func osText(e syscall.Errno) string {
	s := e.Error()
	return strings.ToUpper(s[:1]) + s[1:] + fmt.Sprintf(" (os error %d)", int(e))
}

// debugQuote is Rust's {:?} of a str.
func debugQuote(s string) string {
	out := []byte{'"'}
	for _, r := range s {
		switch {
		case r == 0:
			out = append(out, `\0`...)
		case r == '\t':
			out = append(out, `\t`...)
		case r == '\n':
			out = append(out, `\n`...)
		case r == '\r':
			out = append(out, `\r`...)
		case r == '"' || r == '\\':
			out = append(out, '\\', byte(r))
		case r < 0x20 || r == 0x7f || !strconv.IsPrint(r):
			out = append(out, fmt.Sprintf(`\u{%x}`, r)...)
		default:
			out = append(out, string(r)...)
		}
	}
	return string(append(out, '"'))
}

// ident is a resolved user (§3.10.4).
type ident struct {
	uid, gid uint32
	name     string // "" for a uid without a passwd entry
	home     string
}

func resolveUser(spec string) (ident, error) {
	u, g, hasGroup := strings.Cut(spec, ":")
	u, g = strings.TrimSpace(u), strings.TrimSpace(g)
	var id ident
	if u == "" {
		return id, errors.New("user spec has empty user")
	}
	var pw *user.User
	if n, err := strconv.ParseUint(u, 10, 32); err == nil {
		id.uid = uint32(n)
		if e, err := user.LookupId(u); err == nil {
			pw = e
		}
	} else {
		e, err := user.Lookup(u)
		if err != nil {
			return id, fmt.Errorf("guest user not found: %s", u)
		}
		pw = e
		n, _ := strconv.ParseUint(e.Uid, 10, 32)
		id.uid = uint32(n)
	}
	id.gid = uint32(os.Getgid())
	if pw != nil {
		n, _ := strconv.ParseUint(pw.Gid, 10, 32)
		id.gid, id.name, id.home = uint32(n), pw.Username, pw.HomeDir
	}
	if hasGroup {
		if g == "" {
			return id, errors.New("user spec has empty group")
		}
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			id.gid = uint32(n)
		} else if grp, err := user.LookupGroup(g); err == nil {
			n, _ := strconv.ParseUint(grp.Gid, 10, 32)
			id.gid = uint32(n)
		} else {
			return id, fmt.Errorf("guest group not found: %s", g)
		}
	}
	return id, nil
}

// groups is initgroups(name, gid): gid, then the groups /etc/group lists name in; a uid
// without a passwd entry gets setgroups(0).
func (id ident) groups() []uint32 {
	if id.name == "" {
		return []uint32{}
	}
	gs := []uint32{id.gid}
	b, _ := os.ReadFile("/etc/group")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) < 4 {
			continue
		}
		n, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		for _, member := range strings.Split(f[3], ",") {
			if member == id.name && !containsU32(gs, uint32(n)) {
				gs = append(gs, uint32(n))
			}
		}
	}
	return gs
}

func containsU32(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// spawn is ExecSession::spawn (§3.10): exec.started, or a terminal exec.failed.
func (m *Model) spawn(id uint32, req execRequest) {
	nulAt := func(s string) int { return strings.IndexByte(s, 0) }
	if req.tty { // the PTY path builds C strings first
		check := func(what, s string) bool {
			if i := nulAt(s); i >= 0 {
				m.failed(id, req.cmd, 0, "", fmt.Sprintf("exec session error: invalid %s: nul byte found in provided data at position: %d", what, i))
				return true
			}
			return false
		}
		if check("command", req.cmd) {
			return
		}
		for _, a := range req.args {
			if check("arg", a) {
				return
			}
		}
		if req.cwd != nil && check("cwd", *req.cwd) {
			return
		}
	}
	var who *ident
	if req.user != nil && strings.TrimSpace(*req.user) != "" {
		id2, err := resolveUser(strings.TrimSpace(*req.user))
		if err != nil {
			m.failed(id, req.cmd, 0, "", "exec session error: "+err.Error())
			return
		}
		who = &id2
	}
	stage := "Command::spawn"
	if req.tty {
		stage = "execvp"
	} else { // Command refuses any string with a NUL byte when it spawns
		bad := nulAt(req.cmd) >= 0
		for _, s := range append(append([]string{}, req.args...), req.env...) {
			bad = bad || nulAt(s) >= 0
		}
		if bad || (req.cwd != nil && nulAt(*req.cwd) >= 0) {
			m.failed(id, req.cmd, 0, stage, fmt.Sprintf("spawn %s: nul byte found in provided data", debugQuote(req.cmd)))
			return
		}
	}
	env := m.childEnv(req, who)
	// deviation: agentd reports a PTY child's pre-exec failures (here: a bad cwd, which the
	// reference's PTY child ignores) as exec.failed, like pipe mode does.
	if req.cwd != nil {
		var st unix.Stat_t
		if err := unix.Stat(*req.cwd, &st); err != nil {
			m.failed(id, req.cmd, err.(syscall.Errno), stage, "")
			return
		} else if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			m.failed(id, req.cmd, syscall.ENOTDIR, stage, "")
			return
		}
	}
	// The child sets each known rlimit before it execs (§3.10.2); the model checks what
	// setrlimit would refuse (a soft limit above the hard one) instead of setting them.
	for _, rl := range req.rlimits {
		if _, known := rlimitNames[strings.ToLower(rl.resource)]; known && rl.soft > rl.hard {
			m.failed(id, req.cmd, syscall.EINVAL, stage, "")
			return
		}
	}
	build := func(path string, argv []string) *exec.Cmd {
		c := &exec.Cmd{Path: path, Args: argv, Env: env, SysProcAttr: &syscall.SysProcAttr{}}
		if req.cwd != nil {
			c.Dir = *req.cwd
		}
		if who != nil {
			c.SysProcAttr.Credential = &syscall.Credential{Uid: who.uid, Gid: who.gid, Groups: who.groups()}
		}
		return c
	}
	e := &mExec{m: m, id: id}
	var outs []*os.File
	var child []*os.File
	if req.tty {
		master, slave, err := pty.Open()
		if err != nil {
			m.failed(id, req.cmd, 0, "", "exec session error: openpty: "+err.Error())
			return
		}
		unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(req.rows), Col: uint16(req.cols)})
		e.tty, outs, child = master, []*os.File{master}, []*os.File{slave}
	} else {
		inR, inW, _ := os.Pipe()
		outR, outW, _ := os.Pipe()
		errR, errW, _ := os.Pipe()
		e.stdin, outs, child = inW, []*os.File{outR, errR}, []*os.File{inR, outW, errW}
	}
	cmd, err := execvp(func(path string, argv []string) *exec.Cmd {
		c := build(path, argv)
		if req.tty {
			c.Stdin, c.Stdout, c.Stderr = child[0], child[0], child[0]
			c.SysProcAttr.Setsid, c.SysProcAttr.Setctty = true, true
		} else {
			c.Stdin, c.Stdout, c.Stderr = child[0], child[1], child[2]
		}
		return c
	}, req.cmd, req.args, env)
	for _, f := range child {
		f.Close()
	}
	if err != nil {
		for _, f := range outs {
			f.Close()
		}
		if e.stdin != nil {
			e.stdin.Close()
		}
		var errno syscall.Errno
		if !errors.As(err, &errno) {
			errno = syscall.EINVAL
		}
		m.failed(id, req.cmd, errno, stage, "")
		return
	}
	e.pid = cmd.Process.Pid
	m.mu.Lock()
	m.execs[id] = e
	m.mu.Unlock()
	m.emit(id, "core.exec.started", Map{{"pid", uint64(e.pid)}})
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		var wg sync.WaitGroup
		for i, f := range outs {
			t := "core.exec.stdout"
			if i == 1 {
				t = "core.exec.stderr"
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 4096)
				for {
					n, err := f.Read(buf)
					if n > 0 {
						m.emit(id, t, Map{{"data", append([]byte{}, buf[:n]...)}})
					}
					if err != nil {
						return
					}
				}
			}()
		}
		wg.Wait()
		code := int64(-1)
		if err := cmd.Wait(); err == nil {
			code = 0
		} else if ee, ok := err.(*exec.ExitError); ok && ee.Exited() {
			code = int64(ee.ExitCode())
		}
		for _, f := range outs {
			f.Close()
		}
		e.mu.Lock()
		if e.stdin != nil {
			e.stdin.Close()
			e.stdin = nil
		}
		e.mu.Unlock()
		m.mu.Lock()
		if m.execs[id] == e {
			delete(m.execs, id)
		}
		m.mu.Unlock()
		m.emit(id, "core.exec.exited", Map{{"code", code}})
	}()
}

// childEnv is §3.10.1: the first PATH entry gets the scripts prefix (or PATH is added), the
// entries apply in order over the base, HOME defaults to the target user's home.
func (m *Model) childEnv(req execRequest, who *ident) []string {
	reqEnv := append([]string{}, req.env...)
	if req.tty { // the PTY child skips entries it cannot make C strings of
		kept := reqEnv[:0]
		for _, kv := range reqEnv {
			if strings.IndexByte(kv, 0) < 0 {
				kept = append(kept, kv)
			}
		}
		reqEnv = kept
	}
	pathAt := -1
	for i, kv := range reqEnv {
		if strings.HasPrefix(kv, "PATH=") {
			pathAt = i
			break
		}
	}
	if pathAt >= 0 {
		reqEnv[pathAt] = "PATH=" + m.cfg.ScriptsDir + ":" + reqEnv[pathAt][5:]
	} else {
		p := m.cfg.AgentPath
		if p == "" {
			p = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
		}
		reqEnv = append(reqEnv, "PATH="+m.cfg.ScriptsDir+":"+p)
	}
	vals := map[string]string{}
	var keys []string
	set := func(k, v string) {
		if _, ok := vals[k]; !ok {
			keys = append(keys, k)
		}
		vals[k] = v
	}
	for _, kv := range m.cfg.BaseEnv {
		k, v, _ := strings.Cut(kv, "=")
		set(k, v)
	}
	hasHome := false
	for _, kv := range reqEnv {
		if k, v, ok := strings.Cut(kv, "="); ok {
			set(k, v)
			hasHome = hasHome || k == "HOME"
		}
	}
	if !hasHome {
		home := ""
		if who != nil {
			home = who.home
		} else if u, err := user.LookupId("0"); err == nil {
			home = u.HomeDir
		}
		if home != "" {
			set("HOME", home)
		}
	}
	if _, ok := vals["HOME"]; !ok {
		set("HOME", "/") // inherited: the kernel's HOME for init
	}
	if _, ok := vals["TERM"]; !ok && req.tty {
		set("TERM", "xterm-256color") // deviation: the reference's PTY child inherits TERM=linux
	}
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, k+"="+vals[k])
	}
	return out
}

var rlimitNames = map[string]bool{"cpu": true, "fsize": true, "data": true, "stack": true, "core": true, "rss": true,
	"nproc": true, "nofile": true, "memlock": true, "as": true, "locks": true, "sigpending": true, "msgqueue": true,
	"nice": true, "rtprio": true, "rttime": true}

// execvp emulates glibc's execvp with real execve attempts: a name with '/' is tried as is,
// others in each PATH directory; EACCES is remembered and the search goes on; ENOENT and
// friends go on; ENOEXEC runs the file with /bin/sh; anything else stops the search.
func execvp(build func(path string, argv []string) *exec.Cmd, cmd string, args, env []string) (*exec.Cmd, error) {
	if cmd == "" {
		return nil, syscall.ENOENT
	}
	argv := append([]string{cmd}, args...)
	var candidates []string
	if strings.Contains(cmd, "/") {
		candidates = []string{cmd}
	} else {
		path := ""
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				path = v
			}
		}
		for _, dir := range strings.Split(path, ":") {
			if dir == "" {
				dir = "."
			}
			candidates = append(candidates, strings.TrimSuffix(dir, "/")+"/"+cmd)
		}
	}
	eacces := false
	var last error = syscall.ENOENT
	for _, c := range candidates {
		x := build(c, argv)
		err := x.Start()
		if err == nil {
			return x, nil
		}
		var errno syscall.Errno
		errors.As(err, &errno)
		switch errno {
		case syscall.ENOEXEC:
			sh := build("/bin/sh", append([]string{"/bin/sh", c}, args...))
			return sh, sh.Start()
		case syscall.EACCES:
			eacces, last = true, err
		case syscall.ENOENT, syscall.ESTALE, syscall.ENOTDIR, syscall.ENODEV, syscall.ETIMEDOUT:
			last = err
		default:
			return nil, err
		}
	}
	if eacces {
		return nil, syscall.EACCES
	}
	return nil, last
}

// write is one exec.stdin chunk, written in full inside the loop (§2.2): empty is EOF (pipe:
// stdin closed; deviation: PTY: the terminal's EOF character, after one more to end a
// non-empty line), data after EOF is dropped, a failed write is a non-terminal stdin.error.
func (e *mExec) write(data []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.tty != nil {
		if len(data) == 0 {
			if e.last != 0 && e.last != '\n' {
				e.tty.Write([]byte{4})
			}
			e.tty.Write([]byte{4})
			e.last = '\n'
			return
		}
		if _, err := e.tty.Write(data); err != nil {
			e.stdinError(err)
			return
		}
		e.last = data[len(data)-1]
		return
	}
	if e.stdin == nil {
		return
	}
	if len(data) == 0 {
		e.stdin.Close()
		e.stdin = nil
		return
	}
	if _, err := e.stdin.Write(data); err != nil {
		e.stdinError(err)
	}
}

func (e *mExec) stdinError(err error) {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		e.m.emit(e.id, "core.exec.stdin.error", Map{{"errno", nil}, {"errno_name", nil}, {"message", "io error: " + err.Error()}})
		return
	}
	var name any
	switch errno {
	case syscall.EPIPE, syscall.EBADF, syscall.EINVAL, syscall.EIO, syscall.ENOSPC, syscall.EFBIG:
		name = unix.ErrnoName(errno)
	}
	e.m.emit(e.id, "core.exec.stdin.error", Map{{"errno", int64(errno)}, {"errno_name", name}, {"message", "io error: " + osText(errno)}})
}
