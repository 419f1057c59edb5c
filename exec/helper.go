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

	"github.com/agentd/agentd/confine"
)

// The pre-exec helper. Go cannot run code between fork and exec, and some steps must happen
// there, on the thread that calls execve: per-request rlimits (after the user switch, as in the
// reference, so an unprivileged user cannot raise hard limits) and the workload's confinement
// (no_new_privs, capabilities, the mount namespace and the seccomp filter are per thread). When
// a request needs either, agentd starts itself as the helper, which does them in order
// (confine.Begin, the user switch, the rlimits, confine.End) and then execs the program.
// Failures come back over fd 3 (close-on-exec, so a successful exec closes it empty).

// HelperName is argv[0] that makes agentd act as the helper.
const HelperName = "agentd-exec-helper"

const helperEnv = "AGENTD_EXEC_HELPER"

type helperSpec struct {
	Path     string           `json:"path"`
	Argv     []string         `json:"argv"`
	Identity Identity         `json:"identity"`
	Confine  *confine.Profile `json:"confine,omitempty"`
	Rlimits  [][3]int64       `json:"rlimits"` // resource, soft, hard
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
	if spec.Confine != nil {
		if err := confine.Begin(*spec.Confine); err != nil {
			fail("confinement", err)
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
	if spec.Confine != nil {
		if err := confine.End(*spec.Confine); err != nil {
			fail("confinement", err)
		}
	}
	env := os.Environ()[:0:0]
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	confine.CloseOnExec(3) // the error pipe, and anything of agentd's that lacked O_CLOEXEC
	err := unix.Exec(spec.Path, spec.Argv, env)
	if err == unix.ENOEXEC { // a script without "#!": /bin/sh runs it, as execvp does
		err = unix.Exec("/bin/sh", append([]string{"/bin/sh", spec.Path}, spec.Argv[1:]...), env)
	}
	fail("execve", err)
}
