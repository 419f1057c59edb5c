package protocol

import "fmt"

// ExecRequest is core.exec.request (host -> guest, session start).
type ExecRequest struct {
	Cmd     string       `cbor:"cmd" req:"1"`
	Args    []string     `cbor:"args"`
	Env     []string     `cbor:"env"`
	Cwd     *string      `cbor:"cwd"`
	User    *string      `cbor:"user"`
	TTY     bool         `cbor:"tty"`
	Rows    uint16       `cbor:"rows"`
	Cols    uint16       `cbor:"cols"`
	Rlimits []ExecRlimit `cbor:"rlimits"`
	// Window opts the session into agentd's flow control (ext.go): the bytes of stdout and
	// stderr the host can take before it grants more. Absent for stock hosts.
	Window uint32 `cbor:"window,omitempty"`
}

// Default PTY size when a request omits rows/cols.
const (
	DefaultRows = 24
	DefaultCols = 80
)

// DecodeExecRequest decodes an exec request, applying the reference's defaults.
func DecodeExecRequest(p []byte) (ExecRequest, error) {
	r := ExecRequest{Rows: DefaultRows, Cols: DefaultCols}
	err := Unmarshal(p, &r)
	return r, err
}

// ExecRlimit is one per-process resource limit.
type ExecRlimit struct {
	Resource string `cbor:"resource" req:"1"`
	Soft     uint64 `cbor:"soft" req:"1"`
	Hard     uint64 `cbor:"hard" req:"1"`
}

// ExecStarted is core.exec.started: the child's pid, sent before any output.
type ExecStarted struct {
	PID uint32 `cbor:"pid" req:"1"`
	// Window is agentd's stdin grant, set only when the request carried a window.
	Window uint32 `cbor:"window,omitempty"`
}

// ExecStdinError is core.exec.stdin.error (non-terminal).
type ExecStdinError struct {
	Errno     *int32  `cbor:"errno"`
	ErrnoName *string `cbor:"errno_name"`
	Message   string  `cbor:"message" req:"1"`
}

// ExecExited is core.exec.exited (terminal): exit status, or -1 for a signal death.
type ExecExited struct {
	Code int32 `cbor:"code" req:"1"`
	// Signal is the signal that killed the program (with code -1), set only for a session that
	// opted in to flow control (an agentd host; see ext.go).
	Signal int32 `cbor:"signal,omitempty"`
}

// ExecFailed is core.exec.failed (terminal): the program never ran.
type ExecFailed struct {
	Kind      string  `cbor:"kind" req:"1"`
	Errno     *int32  `cbor:"errno"`
	ErrnoName *string `cbor:"errno_name"`
	Message   string  `cbor:"message" req:"1"`
	Stage     *string `cbor:"stage"`
}

func (e *ExecFailed) Error() string { return fmt.Sprintf("exec failed (%s): %s", e.Kind, e.Message) }

// ExecResize is core.exec.resize.
type ExecResize struct {
	Rows uint16 `cbor:"rows" req:"1"`
	Cols uint16 `cbor:"cols" req:"1"`
}

// ExecSignal is core.exec.signal.
type ExecSignal struct {
	Signal int32 `cbor:"signal" req:"1"`
}

// Exec failure kinds (ExecFailureKind, snake_case).
const (
	ExecNotFound         = "not_found"
	ExecPermissionDenied = "permission_denied"
	ExecNotExecutable    = "not_executable"
	ExecBadCwd           = "bad_cwd"
	ExecBadArgs          = "bad_args"
	ExecResourceLimit    = "resource_limit"
	ExecUserSetupFailed  = "user_setup_failed"
	ExecPTYSetupFailed   = "pty_setup_failed"
	ExecOutOfMemory      = "out_of_memory"
	ExecOther            = "other"
)

// RlimitResources maps the reference's lowercase resource names (ExecRlimit.resource and
// MSB_RLIMITS) to Linux RLIMIT_* numbers.
var RlimitResources = map[string]int{
	"cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7,
	"memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14,
	"rttime": 15,
}
