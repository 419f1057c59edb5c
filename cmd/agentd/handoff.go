package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/confine"
	"github.com/agentd/agentd/gateway"
	"github.com/agentd/agentd/heartbeat"
	"github.com/agentd/agentd/initfs"
	"github.com/agentd/agentd/protocol"
)

// With MSB_HANDOFF_INIT, PID 1 must become another init while the agent keeps the channel. A
// Go process cannot fork without exec'ing, so the roles swap the other way round from the
// reference: PID 1, after the handshake, starts agentd again as a child (argv[0]
// handoffAgentName) that inherits the channel as fd 3 and the handshake's outcome in
// AGENTD_HANDOFF_STATE, then execs the new init. The child sends core.ready and serves.

const (
	handoffAgentName = "agentd-handoff-agent"
	handoffStateEnv  = "AGENTD_HANDOFF_STATE"
)

// handoffState is what the agent child needs from PID 1's boot and handshake: the boot
// configuration when it came as core.bootstrap (the child has no MSB_* to read it from), and
// the bytes PID 1 had read from the channel past the handshake.
type handoffState struct {
	HostGen   uint8    `json:"host_gen"`
	Features  []string `json:"features"`
	InitNs    uint64   `json:"init_ns"`
	Bootstrap []byte   `json:"bootstrap,omitempty"`
	Buffered  []byte   `json:"buffered,omitempty"`
}

func isHandoffAgent() bool { return len(os.Args) > 0 && os.Args[0] == handoffAgentName }

// handOff starts the agent child on port and execs the new init, confined by profile (when
// set) like every other workload: the init and everything it starts. It returns only on
// failure.
func handOff(log *slog.Logger, bc initfs.BootConfig, a *agent.Agent, port io.ReadWriteCloser, initNs uint64, profile *confine.Profile) error {
	h := bc.Handoff
	path, err := initfs.ResolveHandoff(h)
	if err != nil {
		return err
	}
	f, ok := port.(*os.File)
	if !ok {
		return fmt.Errorf("handoff: the channel is not a file (%T)", port)
	}
	gen, features := a.Negotiated()
	state, _ := json.Marshal(handoffState{HostGen: gen, Features: features, InitNs: initNs, Bootstrap: bc.Payload, Buffered: a.Buffered()})
	argv := append([]string{handoffAgentName}, os.Args[1:]...)
	env := append(os.Environ(), handoffStateEnv+"="+string(state))
	pid, err := initfs.StartHandoffAgent(argv, env, f)
	if err != nil {
		return err
	}
	log.Info("handing PID 1 to another init", "init", path, "agent_pid", pid, "agent_log", initfs.HandoffLog, "confined", profile != nil)
	confine.CloseOnExec(3) // the init gets nothing of agentd's (gVisor's tun lacks O_CLOEXEC)
	if profile != nil {
		runtime.LockOSThread() // the confinement is the exec'ing thread's
		if err := confine.Apply(*profile); err != nil {
			return fmt.Errorf("handoff: confine the init: %w", err)
		}
	}
	// The channel's fd is close-on-exec here: the new init does not inherit it. Its environment
	// is agentd's (the kernel's) or, from core.bootstrap, the workloads' default_env.
	environ := os.Environ()
	if bc.Source == initfs.SourceBootstrap {
		environ = nil
		for _, kv := range bc.WorkloadEnv() {
			environ = append(environ, kv[0]+"="+kv[1])
		}
	}
	return initfs.ExecInit(path, initfs.HandoffArgv(path, h), initfs.HandoffEnv(environ, h), h.Cwd)
}

// handoffAgentMain is the agent child: the same flags as PID 1, the channel on fd 3.
func handoffAgentMain(boot uint64) int {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "agentd (handoff agent): %v\n", err)
		return 2
	}
	log, _ := newLogger(o.logLevel)
	if o.heartbeat == "" { // not standalone by its flags, yet not PID 1
		o.heartbeat = heartbeat.DefaultPath
	}
	var st handoffState
	if err := json.Unmarshal([]byte(os.Getenv(handoffStateEnv)), &st); err != nil {
		log.Error("handoff state", "error", err)
		return 1
	}
	os.Unsetenv(handoffStateEnv)
	err = func() error {
		bc := initfs.BootConfig{Decision: initfs.Decision{Source: initfs.SourceEnv}}
		if st.Bootstrap != nil {
			bc, err = initfs.BootstrapConfig(st.Bootstrap)
			if err == nil {
				o, err = withBootSettings(o, bc)
			}
		} else {
			bc.Config, err = initfs.LoadConfig(os.Getenv)
		}
		if err != nil {
			return err
		}
		conf := bc.Config
		execOpts, defaultUser, err := execOptions(bc, o.egress)
		if err != nil {
			return err
		}
		var gw *gateway.Gateway
		if o.egress.mode != "off" {
			if gw, err = startGuestEgress(o.egress, conf, log); err != nil {
				return err
			}
			defer gw.Stop()
		}
		port, err := channel.Pollable(os.NewFile(3, "agent-channel"))
		if err != nil {
			return err
		}
		defer port.Close()
		fr := protocol.NewFrameReaderWith(port, st.Buffered)
		return serve(o, log, boot, 0, port, execOpts, defaultUser, gw, serveHooks{adopted: &st, frames: fr})
	}()
	if err != nil {
		log.Error("agent stopped", "error", err)
		return 1
	}
	return 0
}
