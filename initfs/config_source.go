package initfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/agentd/agentd/protocol"
)

// Where the boot configuration comes from (contract 4.7). Upstream agentd since 0.6.10 reads
// only core.bootstrap; hosts before it set MSB_* variables and never send one. agentd boots
// under both, so it decides per boot, before it sends core.init.resolved (which, on a current
// host, must follow the pivot that the bootstrap describes).

// ConfigSource is a boot's configuration source, or the option that picks it.
type ConfigSource string

const (
	// SourceAuto decides from what is there (the default): see ChooseSource.
	SourceAuto ConfigSource = "auto"
	// SourceEnv reads only MSB_* and never waits for a frame (0.5.7 hosts, agentd's own tools).
	SourceEnv ConfigSource = "env"
	// SourceBootstrap requires core.bootstrap as the first frame, as upstream agentd does.
	SourceBootstrap ConfigSource = "bootstrap"
)

// Waits for the first frame.
const (
	// BootstrapGrace is how long an automatic boot without MSB_* variables waits for the
	// console's first byte: a current host's bootstrap is in the console before the guest
	// starts, an old host with nothing to configure sends nothing before init.resolved.
	BootstrapGrace = 2 * time.Second
	// BootstrapDeadline bounds the wait for a whole first frame once bytes arrive, and the wait
	// for any with SourceBootstrap (upstream's init_ack_deadline).
	BootstrapDeadline = 60 * time.Second
)

// FirstFrame is what the console held when the wait for it ended.
type FirstFrame uint8

const (
	FrameNone      FirstFrame = iota // nothing arrived within the wait
	FrameBootstrap                   // a core.bootstrap frame (whether or not it is valid)
	FrameOther                       // some other frame: it stays buffered for the agent loop
)

// ClassifyFirstFrame says what a first frame is.
func ClassifyFirstFrame(f protocol.Frame) FirstFrame {
	if protocol.FrameType(f) == protocol.TypeBootstrap {
		return FrameBootstrap
	}
	return FrameOther
}

// BootVars are the boot variables of the 0.5.7 reference (and MSB_HANDOFF_INIT_CWD of later
// 0.6 hosts): any of them set means a host that configures the guest through MSB_*.
var BootVars = []string{"MSB_BLOCK_ROOT", "MSB_DIR_MOUNTS", "MSB_FILE_MOUNTS", "MSB_DISK_MOUNTS", "MSB_TMPFS",
	"MSB_SECURITY_PROFILE", "MSB_HOSTNAME", "MSB_HOST_ALIAS", "MSB_NET", "MSB_NET_IPV4", "MSB_NET_IPV6",
	"MSB_RLIMITS", "MSB_USER", "MSB_HANDOFF_INIT", "MSB_HANDOFF_INIT_ARGS", "MSB_HANDOFF_INIT_ENV",
	"MSB_HANDOFF_INIT_CWD"}

// HasBootEnv reports whether any boot variable is set (blank counts as unset, as LoadConfig
// reads them).
func HasBootEnv(getenv func(string) string) bool {
	for _, k := range BootVars {
		if strings.TrimSpace(getenv(k)) != "" {
			return true
		}
	}
	return false
}

// BootstrapWait is how long the boot sequence waits for the console's first byte before it
// decides. Zero means: take only a frame that is already there, never wait.
func BootstrapWait(opt ConfigSource, envPresent bool) time.Duration {
	switch {
	case opt == SourceEnv:
		return 0
	case opt == SourceBootstrap:
		return BootstrapDeadline
	case envPresent: // a pre-0.6.10 host: it sends nothing before init.resolved
		return 0
	}
	return BootstrapGrace
}

// Decision is the source a boot uses. Conflict is set when both were there (no known host
// does that): bootstrap wins, being the newer, typed contract, and the boot logs it.
type Decision struct {
	Source   ConfigSource // SourceEnv or SourceBootstrap
	Conflict bool
}

// ChooseSource decides the source from the option, whether MSB_* boot variables are set and
// what the console held after BootstrapWait.
func ChooseSource(opt ConfigSource, envPresent bool, first FirstFrame) (Decision, error) {
	switch opt {
	case SourceEnv:
		return Decision{Source: SourceEnv}, nil
	case SourceBootstrap:
		switch first {
		case FrameNone:
			return Decision{}, fmt.Errorf("boot configuration: no core.bootstrap frame within %s", BootstrapDeadline)
		case FrameOther:
			return Decision{}, fmt.Errorf("boot configuration: expected core.bootstrap as first console frame")
		}
		return Decision{Source: SourceBootstrap, Conflict: envPresent}, nil
	case SourceAuto, "":
		if first == FrameBootstrap {
			return Decision{Source: SourceBootstrap, Conflict: envPresent}, nil
		}
		return Decision{Source: SourceEnv}, nil
	}
	return Decision{}, fmt.Errorf("boot configuration source %q: want auto, env or bootstrap", opt)
}

// Console is the agent channel as the boot reads its configuration from it, before the agent
// loop: the channel's frame reader (handed to the agent afterwards, with whatever it holds)
// and the means to wait on it.
type Console struct {
	Frames *protocol.FrameReader
	// Readable waits up to d for the channel to hold a byte (d = 0: is one there now?).
	Readable func(d time.Duration) (bool, error)
	// Deadline bounds the reads of Frames until it is called with the zero time.
	Deadline func(time.Time) error
}

// BootConfig is a boot's configuration and where it came from.
type BootConfig struct {
	Config
	Decision
	// Payload is the core.bootstrap payload as it arrived (nil from the MSB_* source): an agent
	// started later (the handoff child) maps it again with BootstrapConfig.
	Payload []byte
}

// ReadConfig decides the source of the boot configuration (BootstrapWait, ChooseSource) and
// reads it: a core.bootstrap frame from the console, or the MSB_* variables through getenv.
// A frame that is not core.bootstrap stays in con.Frames for the agent loop, as do the bytes
// that followed the bootstrap. When the result's Source is SourceBootstrap, an error is a bad
// or missing bootstrap (the boot fails closed with it); otherwise it is a bad MSB_* variable.
func ReadConfig(con Console, opt ConfigSource, getenv func(string) string) (BootConfig, error) {
	envPresent := HasBootEnv(getenv)
	first := FrameNone
	if opt != SourceEnv {
		f, ok, err := peekFirst(con, BootstrapWait(opt, envPresent))
		if err != nil {
			return BootConfig{Decision: Decision{Source: SourceBootstrap}}, fmt.Errorf("bootstrap receive failed: %w", err)
		}
		if ok {
			first = ClassifyFirstFrame(f)
		}
	}
	d, err := ChooseSource(opt, envPresent, first)
	if err != nil {
		return BootConfig{Decision: Decision{Source: SourceBootstrap}}, fmt.Errorf("bootstrap receive failed: %w", err)
	}
	if d.Source == SourceEnv {
		c, err := LoadConfig(getenv)
		return BootConfig{Config: c, Decision: d}, err
	}
	f, _ := con.Frames.Next() // the frame peekFirst saw
	bc := BootConfig{Decision: d}
	b, err := protocol.DecodeBootstrapFrame(f)
	if err != nil {
		return bc, fmt.Errorf("bootstrap receive failed: %w", err)
	}
	m, _ := protocol.DecodeMessage(f) // decoded once already by DecodeBootstrapFrame
	bc.Payload = append([]byte(nil), m.Payload...)
	if bc.Config, err = FromBootstrap(b); err != nil {
		return bc, fmt.Errorf("bootstrap validation failed: %w", err)
	}
	return bc, nil
}

// peekFirst waits up to wait for the console's first byte, then up to BootstrapDeadline for
// the whole first frame, which it leaves in con.Frames. ok is false when no byte came, or the
// channel ended before any frame.
func peekFirst(con Console, wait time.Duration) (protocol.Frame, bool, error) {
	ready, err := con.Readable(wait)
	if err != nil || !ready {
		return protocol.Frame{}, false, err
	}
	con.Deadline(time.Now().Add(BootstrapDeadline))
	defer con.Deadline(time.Time{})
	f, err := con.Frames.Peek()
	switch {
	case err == io.EOF:
		return f, false, nil // a hang-up (a host not connected yet): nothing was sent
	case errors.Is(err, os.ErrDeadlineExceeded):
		return f, false, fmt.Errorf("no whole first frame within %s", BootstrapDeadline)
	case err != nil:
		return f, false, fmt.Errorf("read the first console frame: %w", err)
	}
	return f, true, nil
}

// BootstrapConfig maps a core.bootstrap payload (BootConfig.Payload) again.
func BootstrapConfig(payload []byte) (BootConfig, error) {
	bc := BootConfig{Decision: Decision{Source: SourceBootstrap}, Payload: payload}
	var b protocol.Bootstrap
	if err := protocol.Unmarshal(payload, &b); err != nil {
		return bc, fmt.Errorf("decode guest bootstrap payload: %w", err)
	}
	var err error
	bc.Config, err = FromBootstrap(&b)
	return bc, err
}
