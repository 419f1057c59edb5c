package refmodel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
)

// The model of the reference agent: one frame at a time, as its single-threaded loop handles
// them (replies to a frame are sent before the next frame is read; stdin and fs writes are
// done inside the loop), with one goroutine per exec output reader, fs read stream and tcp
// relay. Spec references (§) are to /work/shared/reference/agentd-v0.5.7.md. Where agentd
// deliberately differs (docs/parity.md), the model does what agentd documents, and says so
// with a "deviation:" comment.

// frame is a guest frame as compared: header fields and the decoded payload.
type frame struct {
	ID    uint32
	Flags byte
	Type  string
	P     any
}

// typeInfo is the §1.2/§2 table: flags of every generation-5 type, and whether the host
// sends it (the reference's loop handles only those; the others are ignored).
type typeInfo struct {
	flags  byte
	hostTo bool
}

var types = map[string]typeInfo{
	"core.ready": {0, false}, "core.init.resolved": {0, false}, "core.init.ack": {0, true},
	"core.shutdown": {4, true}, "core.relay.client.disconnected": {0, true}, "core.clock.sync": {0, true},
	"core.error": {1, false}, "core.exec.request": {2, true}, "core.exec.started": {0, false},
	"core.exec.stdin": {0, true}, "core.exec.stdin.error": {0, false}, "core.exec.stdout": {0, false},
	"core.exec.stderr": {0, false}, "core.exec.exited": {1, false}, "core.exec.failed": {1, false},
	"core.exec.resize": {0, true}, "core.exec.signal": {0, true}, "core.fs.request": {2, true},
	"core.fs.response": {1, false}, "core.fs.data": {0, true}, "core.tcp.connect": {2, true},
	"core.tcp.connected": {0, false}, "core.tcp.data": {0, true}, "core.tcp.eof": {0, true},
	"core.tcp.close": {0, true}, "core.tcp.closed": {1, false}, "core.tcp.failed": {1, false},
}

// modelConfig is what the model shares with the agentd it is compared with.
type modelConfig struct {
	BaseEnv    []string // deviation: children start from this clean set, not the agent's env
	AgentPath  string   // the agent's own PATH (used when a request has none)
	ScriptsDir string
}

type Model struct {
	cfg modelConfig
	out chan frame
	wg  sync.WaitGroup

	mu    sync.Mutex
	execs map[uint32]*mExec
	tcps  map[uint32]*mTCP
	fs    mFS
}

func newModel(cfg modelConfig) *Model {
	return &Model{cfg: cfg, out: make(chan frame, 4096), execs: map[uint32]*mExec{}, tcps: map[uint32]*mTCP{},
		fs: mFS{handles: map[uint64]*mHandle{}, writes: map[uint32]*mWrite{}, reads: map[uint32]*mRead{}}}
}

// emit sends a guest frame; its flags follow from its type (§1.2).
func (m *Model) emit(id uint32, t string, p any) {
	m.out <- frame{ID: id, Flags: types[t].flags, Type: t, P: p}
}

// coreError is §2.1 CoreError; offending_type is omitted when empty.
func (m *Model) coreError(id uint32, kind, msg, offending string) {
	p := Map{{"kind", kind}, {"message", msg}}
	if offending != "" {
		p = append(p, KV{"offending_type", offending})
	}
	m.emit(id, "core.error", p)
}

const hostGen = 5 // the generation the driver's host speaks

// close ends every session, as a host that goes away makes agentd do.
func (m *Model) close() {
	m.mu.Lock()
	for _, e := range m.execs {
		e.kill(9)
	}
	for id, t := range m.tcps {
		t.abort()
		delete(m.tcps, id)
	}
	m.mu.Unlock()
	m.fs.closeRange(0, math.MaxUint32)
	m.wg.Wait()
}

// handle processes one host frame: §3.3's steps.
func (m *Model) handle(raw []byte) {
	id := binary.BigEndian.Uint32(raw[4:8])
	flags := raw[8]
	v, t, p, kind, err := envelope(raw[9:])
	if err != nil {
		// deviation: the reference exits on a bad envelope; agentd answers core.error
		// (malformed_message, or unsupported_message_type for an unknown t), unless the
		// sender is older than generation 5, whose frame is dropped.
		gen := v
		if gen < 0 {
			gen = hostGen
		}
		if gen >= 5 {
			off := ""
			if kind == "unsupported_message_type" {
				off = t
			}
			m.coreError(id, kind, err.Error(), off)
		}
		return
	}
	info := types[t]
	if flags != info.flags {
		if v >= 5 { // deviation: older senders' bad frames are dropped, not fatal
			m.coreError(id, "invalid_flags", fmt.Sprintf("invalid flags for %s: got %d, expected %d", t, flags, info.flags), t)
		}
		return
	}
	if !info.hostTo || t == "core.init.ack" || t == "core.shutdown" {
		return // guest-to-host types, and init.ack after init, are ignored (§2)
	}
	pv, derr := decode(p)
	if derr == nil {
		derr = m.dispatch(id, t, pv) // it returns only payload errors: acting on it sends frames
	}
	if derr != nil {
		if v >= 5 {
			m.coreError(id, "invalid_payload", fmt.Sprintf("decode payload for %s: %v", t, derr), t)
		}
	}
}

// badPayload marks a payload that does not decode as its type.
type badPayload struct{ err error }

func (b *badPayload) Error() string { return b.err.Error() }

// envelope decodes §1.3's {v, t, p}: v is the sender's generation (-1 if unreadable).
func envelope(body []byte) (v int, t string, p []byte, kind string, err error) {
	v = -1
	item, err := decode(body)
	if err != nil {
		return v, "", nil, "malformed_message", err
	}
	mp, ok := untag(item).(Map)
	if !ok {
		return v, "", nil, "malformed_message", errors.New("envelope is not a map")
	}
	var haveV, haveT, haveP bool
	for _, kv := range mp {
		k, ok := keyName(kv.K)
		if !ok {
			continue
		}
		switch k {
		case "v":
			if haveV {
				return v, "", nil, "malformed_message", errors.New("duplicate field `v`")
			}
			n, ok := untag(kv.V).(uint64)
			if !ok || n > math.MaxUint8 {
				return v, "", nil, "malformed_message", errors.New("v is not a u8")
			}
			v, haveV = int(n), true
		case "t":
			if haveT {
				return v, "", nil, "malformed_message", errors.New("duplicate field `t`")
			}
			s, ok := untag(kv.V).(string)
			if !ok {
				return v, "", nil, "malformed_message", errors.New("t is not a string")
			}
			t, haveT = s, true
		case "p":
			if haveP {
				return v, "", nil, "malformed_message", errors.New("duplicate field `p`")
			}
			b, err := bytesValue(kv.V)
			if err != nil {
				return v, "", nil, "malformed_message", err
			}
			p, haveP = b, true
		}
	}
	switch {
	case !haveV:
		return -1, "", nil, "malformed_message", errors.New("missing field `v`")
	case !haveT:
		return v, "", nil, "malformed_message", errors.New("missing field `t`")
	case !haveP:
		return v, "", nil, "malformed_message", errors.New("missing field `p`")
	}
	if _, known := types[t]; !known {
		return v, t, nil, "unsupported_message_type", fmt.Errorf("unknown message type %q", t)
	}
	return v, t, p, "", nil
}

// dispatch decodes the payload of a host type and acts on it (§3.3 step 5 onwards).
func (m *Model) dispatch(id uint32, t string, p any) error {
	switch t {
	case "core.relay.client.disconnected":
		s, err := asStruct(p)
		if err != nil {
			return err
		}
		start, err := s.uint("id_start", math.MaxUint32, nil)
		if err != nil {
			return err
		}
		end, err := s.uint("id_end_exclusive", math.MaxUint32, nil)
		if err != nil {
			return err
		}
		m.closeRange(uint32(start), uint32(end))
	case "core.clock.sync":
		s, err := asStruct(p)
		if err != nil {
			return err
		}
		if _, err := s.uint("unix_time_nanos", math.MaxUint64, nil); err != nil {
			return err
		}
		// the clock is not stepped in the test (nor by the agentd it is compared with)
	case "core.exec.request", "core.exec.stdin", "core.exec.resize", "core.exec.signal":
		return m.execFrame(id, t, p)
	case "core.fs.request", "core.fs.data":
		return m.fsFrame(id, t, p)
	case "core.tcp.connect", "core.tcp.data", "core.tcp.eof", "core.tcp.close":
		return m.tcpFrame(id, t, p)
	}
	return nil
}

// closeRange is §3.6: fs handles and streams and tcp sessions owned by ids in the range end
// without frames; exec sessions are left alone.
func (m *Model) closeRange(start, end uint32) {
	m.mu.Lock()
	for id, t := range m.tcps {
		if id >= start && id < end {
			t.abort()
			delete(m.tcps, id)
		}
	}
	m.mu.Unlock()
	m.fs.closeRange(start, end)
}

// --- payload decoding with serde's rules (§1.4, decoding tolerance) ---

// untag drops the tags in front of an item (the reference's decoder skips them).
func untag(v any) any {
	for {
		t, ok := v.(Tag)
		if !ok {
			return v
		}
		v = t.V
	}
}

// keyName is a map key as a field name: text, or a byte string of at most 4096 bytes.
func keyName(k any) (string, bool) {
	switch x := untag(k).(type) {
	case string:
		return x, true
	case []byte:
		if len(x) <= 4096 {
			return string(x), true
		}
	}
	return "", false
}

// fields is a decoded struct: its fields by name. A duplicated field is an error when it is
// read (serde rejects a duplicate known field; an unknown one is ignored, duplicated or not).
type fields struct {
	m   map[string]any
	dup map[string]bool
}

func asStruct(v any) (fields, error) {
	mp, ok := untag(v).(Map)
	if !ok {
		return fields{}, &badPayload{fmt.Errorf("invalid type: %s, expected a map", kindOf(v))}
	}
	f := fields{m: map[string]any{}, dup: map[string]bool{}}
	for _, kv := range mp {
		k, ok := keyName(kv.K)
		if !ok {
			return fields{}, &badPayload{errors.New("invalid map key")}
		}
		if _, seen := f.m[k]; seen {
			f.dup[k] = true
		}
		f.m[k] = kv.V
	}
	return f, nil
}

// get returns a field's value; a duplicated field is an error.
func (f fields) get(name string) (any, bool, error) {
	if f.dup[name] {
		return nil, false, &badPayload{fmt.Errorf("duplicate field `%s`", name)}
	}
	v, ok := f.m[name]
	return v, ok, nil
}

func kindOf(v any) string {
	switch untag(v).(type) {
	case nil:
		return "null"
	case undefined:
		return "undefined"
	case bool:
		return "boolean"
	case uint64, int64:
		return "integer"
	case float64:
		return "float"
	case string:
		return "string"
	case []byte:
		return "bytes"
	case []any:
		return "sequence"
	case Map:
		return "map"
	}
	return "value"
}

func missing(name string) error { return &badPayload{fmt.Errorf("missing field `%s`", name)} }

func wrong(name string, v any, want string) error {
	return &badPayload{fmt.Errorf("%s: invalid type: %s, expected %s", name, kindOf(v), want)}
}

// opt returns an Option field: absent, null and undefined are None.
func (f fields) opt(name string) (any, bool, error) {
	v, ok, err := f.get(name)
	if !ok || err != nil {
		return nil, false, err
	}
	switch untag(v).(type) {
	case nil, undefined:
		return nil, false, nil
	}
	return untag(v), true, nil
}

// need returns a required field (or, with hasDef, reports it absent for its default).
func (f fields) need(name string, hasDef bool) (any, bool, error) {
	v, ok, err := f.get(name)
	if err != nil {
		return nil, false, err
	}
	if !ok && !hasDef {
		return nil, false, missing(name)
	}
	return v, ok, nil
}

func (f fields) bool(name string, def *bool) (bool, error) {
	v, ok, err := f.need(name, def != nil)
	if err != nil || !ok {
		if def != nil {
			return *def, err
		}
		return false, err
	}
	b, isBool := untag(v).(bool)
	if !isBool {
		return false, wrong(name, v, "a boolean")
	}
	return b, nil
}

func (f fields) uint(name string, max uint64, def *uint64) (uint64, error) {
	v, ok, err := f.need(name, def != nil)
	if err != nil || !ok {
		if def != nil {
			return *def, err
		}
		return 0, err
	}
	return uintValue(name, v, max)
}

func uintValue(name string, v any, max uint64) (uint64, error) {
	switch x := untag(v).(type) {
	case uint64:
		if x > max {
			return 0, &badPayload{fmt.Errorf("%s: integer %d out of range", name, x)}
		}
		return x, nil
	case int64:
		return 0, &badPayload{fmt.Errorf("%s: integer %d out of range", name, x)}
	}
	return 0, wrong(name, v, "an unsigned integer")
}

func (f fields) optUint(name string, max uint64) (*uint64, error) {
	v, ok, err := f.opt(name)
	if !ok || err != nil {
		return nil, err
	}
	n, err := uintValue(name, v, max)
	return &n, err
}

func (f fields) int(name string, min, max int64) (int64, error) {
	v, _, err := f.need(name, false)
	if err != nil {
		return 0, err
	}
	return intValue(name, v, min, max)
}

func intValue(name string, v any, min, max int64) (int64, error) {
	switch x := untag(v).(type) {
	case uint64:
		if x > uint64(max) {
			return 0, &badPayload{fmt.Errorf("%s: integer out of range", name)}
		}
		return int64(x), nil
	case int64:
		if x < min {
			return 0, &badPayload{fmt.Errorf("%s: integer out of range", name)}
		}
		return x, nil
	}
	return 0, wrong(name, v, "an integer")
}

func (f fields) optInt(name string) (*int64, error) {
	v, ok, err := f.opt(name)
	if !ok || err != nil {
		return nil, err
	}
	n, err := intValue(name, v, math.MinInt64, math.MaxInt64)
	return &n, err
}

func (f fields) str(name string) (string, error) {
	v, _, err := f.need(name, false)
	if err != nil {
		return "", err
	}
	s, ok := untag(v).(string)
	if !ok {
		return "", wrong(name, v, "a string")
	}
	return s, nil
}

func (f fields) optStr(name string) (*string, error) {
	v, ok, err := f.opt(name)
	if !ok || err != nil {
		return nil, err
	}
	s, isStr := v.(string)
	if !isStr {
		return nil, wrong(name, v, "a string")
	}
	return &s, nil
}

// strs is a Vec<String> with #[serde(default)]: absent is empty; null is an error.
func (f fields) strs(name string) ([]string, error) {
	v, ok, err := f.need(name, true)
	if err != nil || !ok {
		return nil, err
	}
	arr, isArr := untag(v).([]any)
	if !isArr {
		return nil, wrong(name, v, "a sequence")
	}
	out := make([]string, 0, len(arr))
	for _, e := range arr {
		s, isStr := untag(e).(string)
		if !isStr {
			return nil, wrong(name, e, "a string")
		}
		out = append(out, s)
	}
	return out, nil
}

// data is a serde_bytes field: a byte string, or an array of small unsigned integers.
func (f fields) data(name string) ([]byte, error) {
	v, _, err := f.need(name, false)
	if err != nil {
		return nil, err
	}
	b, err := bytesValue(v)
	if err != nil {
		return nil, &badPayload{fmt.Errorf("%s: %v", name, err)}
	}
	return b, nil
}

func bytesValue(v any) ([]byte, error) {
	switch x := untag(v).(type) {
	case []byte:
		return x, nil
	case []any:
		b := make([]byte, 0, len(x))
		for _, e := range x {
			n, ok := untag(e).(uint64)
			if !ok || n > math.MaxUint8 {
				return nil, errors.New("invalid byte in an array")
			}
			b = append(b, byte(n))
		}
		return b, nil
	}
	return nil, fmt.Errorf("invalid type: %s, expected bytes", kindOf(v))
}

// sub decodes a required nested struct field.
func (f fields) sub(name string) (fields, error) {
	v, _, err := f.need(name, false)
	if err != nil {
		return fields{}, err
	}
	return asStruct(v)
}

// optSub decodes an Option of a struct.
func (f fields) optSub(name string) (*fields, error) {
	v, ok, err := f.opt(name)
	if !ok || err != nil {
		return nil, err
	}
	s, err := asStruct(v)
	return &s, err
}
