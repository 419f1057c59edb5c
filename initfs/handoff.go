package initfs

import (
	"fmt"
	"os"
	"strings"
	"syscall"
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

// ExecInit replaces this process (PID 1) with the new init. It returns only on failure.
func ExecInit(path string, argv, env []string) error {
	err := syscall.Exec(path, argv, env)
	return fmt.Errorf("handoff: execve(%s) failed: %w", path, err)
}
