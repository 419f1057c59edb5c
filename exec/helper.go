package exec

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The pre-exec helper. Go cannot run code between fork and exec, and some steps must happen
// there, on the thread that calls execve: per-request rlimits (after the user switch, as in the
// reference, so an unprivileged user cannot raise hard limits) and the restricted security
// profile (no_new_privs and capability drops are per thread). When a request needs either,
// agentd starts itself as the helper, which does them in order and then execs the program.
// Failures come back over fd 3 (close-on-exec, so a successful exec closes it empty).

// HelperName is argv[0] that makes agentd act as the helper.
const HelperName = "agentd-exec-helper"

const helperEnv = "AGENTD_EXEC_HELPER"

type helperSpec struct {
	Path       string     `json:"path"`
	Argv       []string   `json:"argv"`
	Identity   Identity   `json:"identity"`
	Restricted bool       `json:"restricted"`
	Rlimits    [][3]int64 `json:"rlimits"` // resource, soft, hard
}

// IsHelper reports whether this process was started as the helper.
func IsHelper() bool { return len(os.Args) > 0 && os.Args[0] == HelperName }

// HelperMain runs the helper; it never returns.
func HelperMain() {
	runtime.LockOSThread() // thread attributes below must be the exec'ing thread's
	errw := os.NewFile(3, "exec-error")
	fail := func(stage string, err error) {
		var errno syscall.Errno
		if !errors.As(err, &errno) {
			errno = syscall.EINVAL
		}
		fmt.Fprintf(errw, "%d %s %s", int(errno), stage, err)
		os.Exit(127)
	}
	var spec helperSpec
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &spec); err != nil {
		fail("helper", err)
	}
	if spec.Restricted {
		if err := Restrict(); err != nil {
			fail("security profile", err)
		}
	}
	if id := spec.Identity; id.Switch {
		groups := make([]int, len(id.Groups))
		for i, g := range id.Groups {
			groups[i] = int(g)
		}
		if err := syscall.Setgroups(groups); err != nil {
			fail("setgroups", err)
		}
		if err := syscall.Setgid(int(id.GID)); err != nil {
			fail("setgid", err)
		}
		if err := syscall.Setuid(int(id.UID)); err != nil {
			fail("setuid", err)
		}
	}
	for _, rl := range spec.Rlimits {
		lim := unix.Rlimit{Cur: uint64(rl[1]), Max: uint64(rl[2])}
		if err := unix.Setrlimit(int(rl[0]), &lim); err != nil {
			fail("setrlimit", err)
		}
	}
	env := os.Environ()[:0:0]
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	unix.CloseOnExec(3)
	err := unix.Exec(spec.Path, spec.Argv, env)
	if err == unix.ENOEXEC { // a script without "#!": /bin/sh runs it, as execvp does
		err = unix.Exec("/bin/sh", append([]string{"/bin/sh", spec.Path}, spec.Argv[1:]...), env)
	}
	fail("execve", err)
}

// Capabilities the restricted profile removes: mounting and namespace tricks (SYS_ADMIN, as the
// reference), and anything that could change or bypass the egress path (NET_ADMIN, NET_RAW).
var restrictedCaps = []uintptr{unix.CAP_SYS_ADMIN, unix.CAP_NET_ADMIN, unix.CAP_NET_RAW}

// Restrict applies the restricted security profile to the calling thread: no_new_privs, no
// ambient capabilities, and restrictedCaps dropped from the bounding, effective, permitted and
// inheritable sets.
func Restrict() error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && err != unix.EINVAL {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	for _, c := range restrictedCaps {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && err != unix.EINVAL && err != unix.EPERM {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	for _, c := range restrictedCaps {
		w, bit := c/32, uint32(1)<<(c%32)
		data[w].Effective &^= bit
		data[w].Permitted &^= bit
		data[w].Inheritable &^= bit
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return nil
}
