package protocol

import (
	"encoding/binary"
	"fmt"
)

// Message is a decoded frame: header fields plus the envelope. Payload is the inner CBOR item
// (the content of "p"); after DecodeMessage it may alias the frame buffer.
type Message struct {
	ID      uint32
	Flags   byte
	V       uint8
	Type    Type   // zero when the wire string is unknown
	Wire    string // the wire string, set only when Type is zero (unknown type)
	Payload []byte
}

// Name returns the message's wire string, known or not.
func (m *Message) Name() string {
	if m.Type.Valid() {
		return m.Type.String()
	}
	return m.Wire
}

// Error kinds of core.error (snake_case, as on the wire).
const (
	KindMalformedMessage       = "malformed_message"
	KindUnsupportedMessageType = "unsupported_message_type"
	KindUnsupportedGeneration  = "unsupported_protocol_generation"
	KindInvalidFlags           = "invalid_flags"
	KindInvalidPayload         = "invalid_payload"
	KindInvalidSession         = "invalid_session"
	// KindCapabilityUnavailable (generation 9): the request is understood but this guest
	// cannot do it (a root-disk grow on a root that is not a growable ext4).
	KindCapabilityUnavailable = "capability_unavailable"
)

// EnvelopeError is a body that is not a valid envelope. Kind is the core.error kind that
// answers it; V is the sender's generation when it could be read (else 0).
type EnvelopeError struct {
	Kind string
	Wire string // unknown wire string, for unsupported_message_type
	V    uint8
	Err  error
}

func (e *EnvelopeError) Error() string { return "decode envelope: " + e.Err.Error() }
func (e *EnvelopeError) Unwrap() error { return e.Err }

// DecodeMessage decodes a frame's envelope. The common canonical shape (definite 3-entry map,
// keys v, t, p in that order, as every known encoder writes it) takes a zero-allocation fast
// path; anything else goes through the general CBOR decoder with the reference's tolerance.
func DecodeMessage(f Frame) (Message, error) {
	m := Message{ID: f.ID, Flags: f.Flags}
	if fastEnvelope(f.Body, &m) {
		return m, nil
	}
	return m, slowEnvelope(f.Body, &m)
}

func fastEnvelope(b []byte, m *Message) bool {
	if len(b) < 8 || b[0] != 0xa3 || b[1] != 0x61 || b[2] != 'v' {
		return false
	}
	major, v, n, ok := readHead(b[3:])
	if !ok || major != majorUint || v > 0xff {
		return false
	}
	b = b[3+n:]
	if len(b) < 2 || b[0] != 0x61 || b[1] != 't' {
		return false
	}
	wire, n, ok := readDefinite(b[2:], majorText)
	if !ok {
		return false
	}
	t, known := byWire[string(wire)] // no allocation: the compiler special-cases this lookup
	if !known {
		return false // the slow path builds the error and keeps the string
	}
	b = b[2+n:]
	if len(b) < 2 || b[0] != 0x61 || b[1] != 'p' {
		return false
	}
	p, _, ok := readDefinite(b[2:], majorBytes)
	if !ok {
		return false
	}
	m.V, m.Type, m.Payload = uint8(v), t, p
	return true
}

// envGen, envType and Bytes record presence so that a missing key is an error, as in serde.
type envGen struct {
	v  uint8
	ok bool
}

func (g *envGen) UnmarshalCBOR(b []byte) error {
	if err := decMode.Unmarshal(b, &g.v); err != nil {
		return err
	}
	g.ok = true
	return nil
}

type envType struct {
	s  string
	ok bool
}

func (t *envType) UnmarshalCBOR(b []byte) error {
	if err := decMode.Unmarshal(b, &t.s); err != nil {
		return err
	}
	t.ok = true
	return nil
}

type envelopeWire struct {
	V envGen  `cbor:"v"`
	T envType `cbor:"t"`
	P Bytes   `cbor:"p"`
}

func slowEnvelope(b []byte, m *Message) error {
	var w envelopeWire
	if len(b) == 0 {
		return &EnvelopeError{Kind: KindMalformedMessage, Err: fmt.Errorf("empty body")}
	}
	if _, err := decMode.UnmarshalFirst(b, &w); err != nil {
		return &EnvelopeError{Kind: KindMalformedMessage, V: w.V.v, Err: err}
	}
	m.V = w.V.v
	switch {
	case !w.V.ok:
		return &EnvelopeError{Kind: KindMalformedMessage, Err: fmt.Errorf("missing field `v`")}
	case !w.T.ok:
		return &EnvelopeError{Kind: KindMalformedMessage, V: m.V, Err: fmt.Errorf("missing field `t`")}
	case w.P == nil:
		return &EnvelopeError{Kind: KindMalformedMessage, V: m.V, Err: fmt.Errorf("missing field `p`")}
	}
	t, known := byWire[w.T.s]
	if !known {
		m.Wire = w.T.s
		return &EnvelopeError{Kind: KindUnsupportedMessageType, Wire: w.T.s, V: m.V,
			Err: fmt.Errorf("unknown message type %q", w.T.s)}
	}
	m.Type, m.Payload = t, w.P
	return nil
}

// Bytes is a byte string that borrows from the decoded buffer when it can (a definite byte
// string) and copies otherwise (indefinite chunks, or an array of small integers, both of
// which the reference accepts). A present empty string decodes to a non-nil empty slice, so
// nil means "absent".
type Bytes []byte

// UnmarshalCBOR implements cbor.Unmarshaler. Null is not a byte string (as for serde_bytes).
func (p *Bytes) UnmarshalCBOR(b []byte) error {
	if isNull(b) {
		return fmt.Errorf("invalid type: null, expected bytes")
	}
	if s, _, ok := readDefinite(b, majorBytes); ok {
		*p = s
		return nil
	}
	if len(b) > 0 && b[0]>>5 == 4 { // array of small unsigned ints
		var arr []uint8
		if err := decMode.Unmarshal(b, &arr); err != nil {
			return err
		}
		*p = append(make([]byte, 0, len(arr)), arr...)
		return nil
	}
	var s []byte
	if err := decMode.Unmarshal(b, &s); err != nil {
		return err
	}
	if s == nil {
		s = []byte{}
	}
	*p = s
	return nil
}

// envelopePrefix is the constant part of an envelope for type t written by generation v:
// a3 "v" v "t" <wire> "p". The payload's byte-string head and content follow.
func appendEnvelopePrefix(dst []byte, v uint8, t Type) []byte {
	dst = append(dst, 0xa3, 0x61, 'v')
	dst = appendHead(dst, majorUint, uint64(v))
	dst = append(dst, 0x61, 't')
	wire := typeTable[t].Wire
	dst = appendHead(dst, majorText, uint64(len(wire)))
	dst = append(dst, wire...)
	return append(dst, 0x61, 'p')
}

func envelopeLen(v uint8, t Type, payloadLen int) int {
	wire := typeTable[t].Wire
	return 3 + headLen(uint64(v)) + 2 + headLen(uint64(len(wire))) + len(wire) + 2 +
		headLen(uint64(payloadLen)) + payloadLen
}

// AppendMessage appends a complete frame of type t carrying an encoded payload, stamped with
// generation Version and t's flags.
func AppendMessage(dst []byte, id uint32, t Type, payload []byte) ([]byte, error) {
	return AppendMessageV(dst, Version, id, t, payload)
}

// AppendMessageV is AppendMessage with an explicit generation.
func AppendMessageV(dst []byte, v uint8, id uint32, t Type, payload []byte) ([]byte, error) {
	if !t.Valid() {
		return dst, fmt.Errorf("append message: invalid type %d", t)
	}
	dst, err := AppendFrameHeader(dst, id, t.Flags(), envelopeLen(v, t, len(payload)))
	if err != nil {
		return dst, fmt.Errorf("append %s: %w", t, err)
	}
	dst = appendEnvelopePrefix(dst, v, t)
	dst = appendHead(dst, majorBytes, uint64(len(payload)))
	return append(dst, payload...), nil
}

// dataPayloadLen is the length of the payload {"data": bstr(n bytes)}.
func dataPayloadLen(n int) int { return 1 + 5 + headLen(uint64(n)) + n }

// AppendDataHeader appends everything of a {"data": bytes} frame (core.tcp.data,
// core.exec.stdin/stdout/stderr, core.fs.data) except the n data bytes themselves, so a
// writer can send the data from its own buffer without copying it into the frame.
func AppendDataHeader(dst []byte, id uint32, t Type, n int) ([]byte, error) {
	return AppendDataHeaderV(dst, Version, id, t, n)
}

// AppendDataHeaderV is AppendDataHeader with an explicit generation.
func AppendDataHeaderV(dst []byte, v uint8, id uint32, t Type, n int) ([]byte, error) {
	pl := dataPayloadLen(n)
	dst, err := AppendFrameHeader(dst, id, t.Flags(), envelopeLen(v, t, pl))
	if err != nil {
		return dst, fmt.Errorf("append %s: %w", t, err)
	}
	dst = appendEnvelopePrefix(dst, v, t)
	dst = appendHead(dst, majorBytes, uint64(pl))
	dst = append(dst, 0xa1, 0x64, 'd', 'a', 't', 'a')
	return appendHead(dst, majorBytes, uint64(n)), nil
}

// AppendData appends a complete {"data": bytes} frame.
func AppendData(dst []byte, id uint32, t Type, data []byte) ([]byte, error) {
	return AppendDataV(dst, Version, id, t, data)
}

// AppendDataV is AppendData with an explicit generation.
func AppendDataV(dst []byte, v uint8, id uint32, t Type, data []byte) ([]byte, error) {
	dst, err := AppendDataHeaderV(dst, v, id, t, len(data))
	if err != nil {
		return dst, err
	}
	return append(dst, data...), nil
}

// MaxDataChunk is the largest data chunk that fits in one frame of any data type.
var MaxDataChunk = func() int {
	n := MaxFrameSize - HeaderSize - envelopeLen(Version, TypeExecStderr, dataPayloadLen(0)) - 16
	return n
}()

// DecodeData decodes a {"data": bytes} payload. The result aliases p when p holds a definite
// byte string (the fast path: no copy, no allocation).
func DecodeData(p []byte) ([]byte, error) {
	if len(p) >= 6 && p[0] == 0xa1 && p[1] == 0x64 && string(p[2:6]) == "data" {
		if d, _, ok := readDefinite(p[6:], majorBytes); ok {
			return d, nil
		}
	}
	var w struct {
		Data Bytes `cbor:"data"`
	}
	if err := Unmarshal(p, &w); err != nil {
		return nil, err
	}
	if w.Data == nil {
		return nil, fmt.Errorf("missing field `data`")
	}
	return w.Data, nil
}

// EncodeFrame is a convenience for tests and cold paths: marshal payload and build a frame.
func EncodeFrame(id uint32, t Type, payload any) ([]byte, error) {
	p, err := Marshal(payload)
	if err != nil {
		return nil, fmt.Errorf("encode %s payload: %w", t, err)
	}
	return AppendMessage(nil, id, t, p)
}

// FrameType returns a frame's message type without decoding its payload, or zero for a frame
// that is not a CBOR message of a known type: a raw bulk record, an MSBL record, an unknown
// type, a broken envelope. On the canonical envelope every encoder writes it reads only the
// bytes before "p" and allocates nothing.
func FrameType(f Frame) Type {
	if f.Flags == FlagBulk || len(f.Body) == 0 || f.Body[0]>>5 != majorMap {
		return 0
	}
	var m Message
	if fastEnvelope(f.Body, &m) {
		return m.Type
	}
	if slowEnvelope(f.Body, &m) != nil {
		return 0
	}
	return m.Type
}

// PeekHeader reads id and flags of a wire frame without decoding it (relays route on these).
func PeekHeader(frame []byte) (id uint32, flags byte, ok bool) {
	if len(frame) < PrefixSize+HeaderSize {
		return 0, 0, false
	}
	return binary.BigEndian.Uint32(frame[4:]), frame[8], true
}
