package protocol

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
)

// The generation-8/9 transport extras a host switches on from core.ready's capability fields
// (contract sections 6.7 and 7.5). All optional: an agent that announces none of them gets the
// "combined" transport, raw records on the one agent port, and never sees what follows.

// BulkTransport is core.ready's bulk_transport: the agent bound the agent-bulk port.
type BulkTransport struct {
	Profile      string `cbor:"profile" req:"1"` // "dual-port-v1"
	Port         string `cbor:"port" req:"1"`    // "agent-bulk"
	ConnectionID ID16   `cbor:"connection_id" req:"1"`
}

// RelayLease is core.ready's relay_lease: the agent takes MSBL range-lease records.
type RelayLease struct {
	MaxFormat uint8 `cbor:"max_format" req:"1"`
}

// LocalTransport is what a host relay injects into the Ready its own clients see; an agent
// never sends it.
type LocalTransport struct {
	MaxFormat uint8 `cbor:"max_format" req:"1"`
}

// Dual-port discovery and names.
const (
	DualPortProfile = "dual-port-v1"
	BulkPortName    = "agent-bulk"
	// DualPortCmdline is the kernel command line word with which a host offers agent-bulk.
	DualPortCmdline = "microsandbox.agent_transport=dual-port-v1"
	// WorkloadBarrierVersion is the only released workload_transport_barrier_version.
	WorkloadBarrierVersion = 2
)

// LeaseEvent is an MSBL record's event.
type LeaseEvent uint8

const (
	LeaseConnected       LeaseEvent = 1 // host -> guest: a relay client owns the range
	LeaseDisconnectedAck LeaseEvent = 2 // guest -> host: the range's cleanup is done
)

// RangeLease is an MSBL record: a fixed 41-byte frame (id 0, flags 0) on the agent port whose
// body is "MSBL", format 1, the event, 00 00, the id range and the client's incarnation.
type RangeLease struct {
	Event          LeaseEvent
	IDStart, IDEnd uint32 // [IDStart, IDEnd): a relay slot's range
	Incarnation    ID16
}

const (
	leaseMagic    = "MSBL"
	leaseBodySize = 32
	leaseFormat   = 1
)

// IsRangeLease reports whether a frame is an MSBL record rather than a CBOR message.
func IsRangeLease(f Frame) bool {
	return f.ID == 0 && f.Flags == 0 && bytes.HasPrefix(f.Body, []byte(leaseMagic))
}

// AppendRangeLease appends an MSBL record.
func AppendRangeLease(dst []byte, l RangeLease) []byte {
	dst = binary.BigEndian.AppendUint32(dst, HeaderSize+leaseBodySize)
	dst = append(dst, 0, 0, 0, 0, 0)
	dst = append(dst, leaseMagic...)
	dst = append(dst, leaseFormat, byte(l.Event), 0, 0)
	dst = binary.BigEndian.AppendUint32(dst, l.IDStart)
	dst = binary.BigEndian.AppendUint32(dst, l.IDEnd)
	return append(dst, l.Incarnation[:]...)
}

// ParseRangeLease decodes an MSBL record. The range must be one relay slot's, exactly.
func ParseRangeLease(f Frame) (RangeLease, error) {
	b := f.Body
	switch {
	case !IsRangeLease(f):
		return RangeLease{}, fmt.Errorf("range lease: not an MSBL record (id %d, flags %d)", f.ID, f.Flags)
	case len(b) != leaseBodySize:
		return RangeLease{}, fmt.Errorf("range lease: %d body bytes, want %d", len(b), leaseBodySize)
	case b[4] != leaseFormat:
		return RangeLease{}, fmt.Errorf("range lease: format %d, want %d", b[4], leaseFormat)
	case b[5] != byte(LeaseConnected) && b[5] != byte(LeaseDisconnectedAck):
		return RangeLease{}, fmt.Errorf("range lease: unknown event %d", b[5])
	case b[6] != 0 || b[7] != 0:
		return RangeLease{}, fmt.Errorf("range lease: reserved bytes %02x%02x, want 0000", b[6], b[7])
	}
	l := RangeLease{Event: LeaseEvent(b[5]), IDStart: binary.BigEndian.Uint32(b[8:]), IDEnd: binary.BigEndian.Uint32(b[12:])}
	copy(l.Incarnation[:], b[16:])
	if s := RelaySlotOf(l.IDStart); l.IDStart == 0 || [2]uint32{l.IDStart, l.IDEnd} != slotRange(s) {
		return RangeLease{}, fmt.Errorf("range lease: [%d, %d) is not a relay slot's range", l.IDStart, l.IDEnd)
	}
	return l, nil
}

func slotRange(s int) [2]uint32 {
	start, end := RelaySlotRange(s)
	return [2]uint32{start, end}
}

// BulkBinding is the 24-byte agent-bulk handshake: the guest's hello ("MSBB") and the host's
// ack ("MSBA"), each with format 1, the bulk generation 8, 00 00 and the connection id.
type BulkBinding struct {
	Ack          bool // MSBA (host -> guest) rather than MSBB
	ConnectionID ID16
}

const (
	// BulkBindingSize is the length of a hello or an ack.
	BulkBindingSize = 24
	// BulkBindingGeneration is byte 5 of a hello or ack: the generation of the bulk format.
	BulkBindingGeneration = 8
	bindingFormat         = 1
)

// AppendBulkBinding appends a hello or an ack.
func AppendBulkBinding(dst []byte, b BulkBinding) []byte {
	magic := "MSBB"
	if b.Ack {
		magic = "MSBA"
	}
	dst = append(dst, magic...)
	dst = append(dst, bindingFormat, BulkBindingGeneration, 0, 0)
	return append(dst, b.ConnectionID[:]...)
}

// ParseBulkBinding decodes a hello or an ack from the first BulkBindingSize bytes of b.
func ParseBulkBinding(b []byte) (BulkBinding, error) {
	if len(b) < BulkBindingSize {
		return BulkBinding{}, io.ErrUnexpectedEOF
	}
	var out BulkBinding
	switch string(b[:4]) {
	case "MSBB":
	case "MSBA":
		out.Ack = true
	default:
		return BulkBinding{}, fmt.Errorf("agent-bulk binding: magic %q, want MSBB or MSBA", b[:4])
	}
	switch {
	case b[4] != bindingFormat:
		return BulkBinding{}, fmt.Errorf("agent-bulk binding: format %d, want %d", b[4], bindingFormat)
	case b[5] != BulkBindingGeneration:
		return BulkBinding{}, fmt.Errorf("agent-bulk binding: generation %d, want %d", b[5], BulkBindingGeneration)
	case b[6] != 0 || b[7] != 0:
		return BulkBinding{}, fmt.Errorf("agent-bulk binding: reserved bytes %02x%02x, want 0000", b[6], b[7])
	}
	copy(out.ConnectionID[:], b[8:BulkBindingSize])
	return out, nil
}

// LanePrefixSize is the client incarnation in front of every frame on the agent-bulk lane.
const LanePrefixSize = 16

// AppendLanePacket appends a raw record for the agent-bulk lane: the incarnation, then the record.
func AppendLanePacket(dst []byte, inc ID16, r BulkRecord) ([]byte, error) {
	return AppendBulkRecord(append(dst, inc[:]...), r)
}

// ParseLanePacket decodes one lane packet from the start of b and returns the bytes it used,
// or io.ErrUnexpectedEOF when b holds only part of one. Only raw records may use the lane.
func ParseLanePacket(b []byte) (ID16, BulkRecord, int, error) {
	var inc ID16
	if len(b) < LanePrefixSize {
		return inc, BulkRecord{}, 0, io.ErrUnexpectedEOF
	}
	copy(inc[:], b)
	f, n, err := ParseFrame(b[LanePrefixSize:])
	if err != nil {
		return inc, BulkRecord{}, 0, err
	}
	if f.Flags != FlagBulk {
		return inc, BulkRecord{}, 0, fmt.Errorf("agent-bulk lane: frame with flags %d on id %d: only raw bulk records may use the lane", f.Flags, f.ID)
	}
	r, err := ParseBulkRecord(f)
	if err != nil {
		return inc, BulkRecord{}, 0, err
	}
	return inc, r, LanePrefixSize + n, nil
}
