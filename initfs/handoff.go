package initfs

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"
)

// HandoffCandidates are tried in order for MSB_HANDOFF_INIT=auto.
var HandoffCandidates = []string{"/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd"}

// HandoffLog is where the agent's stderr goes once another init is PID 1.
const HandoffLog = "/run/microsandbox/agentd.log"

// ResolveHandoff finds the init to hand PID 1 to and checks it can run: it must exist, be a
// regular file and have an execute bit.
func ResolveHandoff(h *Handoff) (string, error) {
	path := h.Path
	if path == "auto" {
		path = ""
		for _, c := range HandoffCandidates {
			if _, err := os.Stat(c); err == nil {
				path = c
				break
			}
		}
		if path == "" {
			return "", fmt.Errorf("handoff: MSB_HANDOFF_INIT=auto: none of %s exists", strings.Join(HandoffCandidates, ", "))
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("handoff: %w", err)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("handoff: %s is not an executable regular file", path)
	}
	return path, nil
}

// HandoffArgv and HandoffEnv build the new init's command line and environment: agentd's
// environment without the MSB_HANDOFF_* variables, overlaid with MSB_HANDOFF_INIT_ENV.
func HandoffArgv(path string, h *Handoff) []string {
	argv := []string{path}
	for _, a := range h.Args {
		if !strings.ContainsRune(a, 0) {
			argv = append(argv, a)
		}
	}
	return argv
}

func HandoffEnv(environ []string, h *Handoff) []string {
	var out []string
	overlay := map[string]bool{}
	for _, kv := range h.Env {
		overlay[kv[0]] = true
	}
	for _, e := range environ {
		k, _, _ := strings.Cut(e, "=")
		if k == "MSB_HANDOFF_INIT" || k == "MSB_HANDOFF_INIT_ARGS" || k == "MSB_HANDOFF_INIT_ENV" || overlay[k] {
			continue
		}
		out = append(out, e)
	}
	for _, kv := range h.Env {
		out = append(out, kv[0]+"="+kv[1])
	}
	return out
}

// ExecInit replaces this process (PID 1) with the new init, started in cwd ("": agentd's). It
// returns only on failure.
func ExecInit(path string, argv, env []string, cwd string) error {
	if cwd != "" {
		if err := os.Chdir(cwd); err != nil {
			return fmt.Errorf("handoff: chdir %s: %w", cwd, err)
		}
	}
	err := syscall.Exec(path, argv, env)
	return fmt.Errorf("handoff: execve(%s) failed: %w", path, err)
}

// StartHandoffAgent starts the agent half of a handoff: this program again (argv[0] names the
// role), with the channel as fd 3, stdin from /dev/null and stderr to HandoffLog. The caller
// then execs the new init with ExecInit; the channel is close-on-exec here, so that init does
// not inherit it.
func StartHandoffAgent(argv, env []string, channel *os.File) (pid int, err error) {
	if err := os.MkdirAll("/run/microsandbox", 0o755); err != nil {
		return 0, fmt.Errorf("handoff: %w", err)
	}
	logf, err := os.OpenFile(HandoffLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, fmt.Errorf("handoff: %w", err)
	}
	defer logf.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return 0, fmt.Errorf("handoff: %w", err)
	}
	defer null.Close()
	child, err := os.StartProcess("/proc/self/exe", argv, &os.ProcAttr{Env: env, Files: []*os.File{null, logf, logf, channel}})
	if err != nil {
		return 0, fmt.Errorf("handoff: start the agent: %w", err)
	}
	return child.Pid, nil
}

// HandoffPoweroffTimeout is how long the init that took PID 1 gets to power off (SIGRTMIN+4,
// systemd's poweroff) before it gets SIGTERM, as in the reference.
const HandoffPoweroffTimeout = 5 * time.Second

const sigRTMinPlus4 = syscall.Signal(38) // glibc's SIGRTMIN (34) + 4

// PowerOffViaInit asks the init that took PID 1 to power off (systemd's SIGRTMIN+4), and
// after HandoffPoweroffTimeout sends it SIGTERM.
func PowerOffViaInit() {
	syscall.Kill(1, sigRTMinPlus4)
	time.Sleep(HandoffPoweroffTimeout) // the power-off ends this process; nothing to await
	syscall.Kill(1, syscall.SIGTERM)
}
