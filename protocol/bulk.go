package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Generation 8: raw bulk transfer. A core.tcp.connect or a core.fs.request Read/Write may carry
// a BulkOffer; the guest answers core.bulk.accepted, and the session's bytes then travel as raw
// records: frames whose flags byte is exactly FlagBulk and whose body is not CBOR:
//
//	[len u32][id u32][0x08][kind u8][flow u8][00 00][offset u64 BE][payload, 1..max_record_payload]
//
// Offsets are byte positions within the flow, contiguous from 0; a sender never goes past the
// receiver's absolute credit limit (core.bulk.credit); core.bulk.finish is the half-close.

// BulkKind is the session kind a bulk flow belongs to (a bare unsigned int on the wire).
type BulkKind uint8

const (
	BulkFS  BulkKind = 1
	BulkTCP BulkKind = 2
)

func (k BulkKind) Valid() bool { return k == BulkFS || k == BulkTCP }

// BulkFlow is a flow's direction (a bare unsigned int on the wire).
type BulkFlow uint8

const (
	BulkHostToGuest BulkFlow = 1
	BulkGuestToHost BulkFlow = 2
)

func (f BulkFlow) Valid() bool { return f == BulkHostToGuest || f == BulkGuestToHost }

// Bit is the flow's bit in BulkAccepted.Flows.
func (f BulkFlow) Bit() uint8 { return uint8(f) }

// BulkCancelReason says why a bulk session was cancelled.
type BulkCancelReason uint8

const (
	BulkCancelCaller        BulkCancelReason = 1
	BulkCancelDestinationIO BulkCancelReason = 2
	BulkCancelResource      BulkCancelReason = 3
	BulkCancelTransport     BulkCancelReason = 4
	BulkCancelProtocolState BulkCancelReason = 5
)

// The reference's bulk constants (gen-9.json's "bulk" block).
const (
	BulkFormatRawV1            = 1
	BulkHeaderSize             = 12
	BulkMinRecordPayload       = 16 << 10  // 16384
	BulkDefaultRecordPayload   = 256 << 10 // 262144, TCP
	BulkDefaultFSRecordPayload = 3 << 20   // 3145728
	BulkMaxRecordPayload       = 3 << 20   // 3145728
	BulkDefaultWindow          = 8 << 20   // 8388608: initial credit, and the re-grant step
	BulkMaxWindow              = 32 << 20  // 33554432: credit_limit - consumed never exceeds it
	// BulkMinFrame is the smallest length prefix of a raw record: id, flags, header, 1 byte.
	BulkMinFrame = HeaderSize + BulkHeaderSize + 1
)

// BulkOffer is the optional "bulk" key of core.tcp.connect and core.fs.request (host -> guest).
type BulkOffer struct {
	Format           uint8  `cbor:"format" req:"1"`
	MaxRecordPayload uint32 `cbor:"max_record_payload" req:"1"`
	// GuestToHostCreditLimit is the initial absolute credit the host grants the guest.
	GuestToHostCreditLimit uint64 `cbor:"guest_to_host_credit_limit" req:"1"`
}

// The host's default offers (the reference's BulkOffer::tcp, filesystem_read, filesystem_write).
var (
	BulkOfferTCP     = BulkOffer{BulkFormatRawV1, BulkDefaultRecordPayload, BulkDefaultWindow}
	BulkOfferFSRead  = BulkOffer{BulkFormatRawV1, BulkDefaultFSRecordPayload, BulkDefaultWindow}
	BulkOfferFSWrite = BulkOffer{BulkFormatRawV1, BulkDefaultFSRecordPayload, 0}
)

// Validate checks the offer's format and record size; what the credit must be depends on the
// session (a TCP offer must grant guest-to-host credit, an fs write must not).
func (o BulkOffer) Validate() error {
	if o.Format != BulkFormatRawV1 {
		return fmt.Errorf("unsupported bulk format %d (want %d)", o.Format, BulkFormatRawV1)
	}
	if o.MaxRecordPayload < BulkMinRecordPayload || o.MaxRecordPayload > BulkMaxRecordPayload {
		return fmt.Errorf("max_record_payload %d outside %d..%d", o.MaxRecordPayload, BulkMinRecordPayload, BulkMaxRecordPayload)
	}
	if o.GuestToHostCreditLimit > BulkMaxWindow {
		return fmt.Errorf("guest_to_host_credit_limit %d exceeds the maximum window %d", o.GuestToHostCreditLimit, BulkMaxWindow)
	}
	return nil
}

// BulkAccepted is core.bulk.accepted (guest -> host, on the session id).
type BulkAccepted struct {
	Kind                   BulkKind `cbor:"kind" req:"1"`
	Flows                  uint8    `cbor:"flows" req:"1"` // bit 0 host->guest, bit 1 guest->host
	Format                 uint8    `cbor:"format" req:"1"`
	MaxRecordPayload       uint32   `cbor:"max_record_payload" req:"1"`
	HostToGuestCreditLimit uint64   `cbor:"host_to_guest_credit_limit" req:"1"`
	GuestToHostCreditLimit uint64   `cbor:"guest_to_host_credit_limit" req:"1"` // the offer's, echoed
}

// BulkCredit is core.bulk.credit (from a flow's receiver): the sender may send up to offset
// CreditLimit. Credit is absolute, so duplicates are harmless.
type BulkCredit struct {
	Kind           BulkKind `cbor:"kind" req:"1"`
	Flow           BulkFlow `cbor:"flow" req:"1"`
	ConsumedOffset uint64   `cbor:"consumed_offset" req:"1"`
	CreditLimit    uint64   `cbor:"credit_limit" req:"1"`
}

// BulkFinish is core.bulk.finish (from a flow's sender): the flow holds exactly FinalOffset
// bytes. It replaces core.tcp.eof and the empty core.fs.data of the CBOR path.
type BulkFinish struct {
	Kind        BulkKind `cbor:"kind" req:"1"`
	Flow        BulkFlow `cbor:"flow" req:"1"`
	FinalOffset uint64   `cbor:"final_offset" req:"1"`
}

// BulkCancel is core.bulk.cancel (either side).
type BulkCancel struct {
	Kind    BulkKind         `cbor:"kind" req:"1"`
	Reason  BulkCancelReason `cbor:"reason" req:"1"`
	Message string           `cbor:"message" req:"1"`
}

// BulkRecord is one raw record. Payload aliases the frame it was parsed from.
type BulkRecord struct {
	ID      uint32
	Kind    BulkKind
	Flow    BulkFlow
	Offset  uint64
	Payload []byte
}

// ErrNotBulk is a frame whose flags are not exactly FlagBulk.
var ErrNotBulk = errors.New("not a raw bulk record")

// AppendBulkHeader appends a raw record's frame header and 12-byte header for n payload bytes,
// so a writer can send the payload from its own buffer without copying it into the frame.
func AppendBulkHeader(dst []byte, id uint32, kind BulkKind, flow BulkFlow, offset uint64, n int) ([]byte, error) {
	if err := checkRecord(id, kind, flow, offset, n); err != nil {
		return dst, err
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(HeaderSize+BulkHeaderSize+n))
	dst = binary.BigEndian.AppendUint32(dst, id)
	dst = append(dst, FlagBulk, byte(kind), byte(flow), 0, 0)
	return binary.BigEndian.AppendUint64(dst, offset), nil
}

// AppendBulkRecord appends a complete raw record.
func AppendBulkRecord(dst []byte, r BulkRecord) ([]byte, error) {
	dst, err := AppendBulkHeader(dst, r.ID, r.Kind, r.Flow, r.Offset, len(r.Payload))
	if err != nil {
		return dst, err
	}
	return append(dst, r.Payload...), nil
}

// ParseBulkRecord decodes a raw record from a frame (flags FlagBulk). It checks what a record
// carries by itself; the session checks kind, flow, contiguity, the negotiated record size and
// the credit limit.
func ParseBulkRecord(f Frame) (BulkRecord, error) {
	if f.Flags != FlagBulk {
		return BulkRecord{}, ErrNotBulk
	}
	b := f.Body
	if len(b) <= BulkHeaderSize {
		return BulkRecord{}, fmt.Errorf("raw bulk record on id %d: %d body bytes, want a %d-byte header and a payload", f.ID, len(b), BulkHeaderSize)
	}
	r := BulkRecord{ID: f.ID, Kind: BulkKind(b[0]), Flow: BulkFlow(b[1]),
		Offset: binary.BigEndian.Uint64(b[4:12]), Payload: b[BulkHeaderSize:]}
	if b[2] != 0 || b[3] != 0 {
		return BulkRecord{}, fmt.Errorf("raw bulk record on id %d: reserved bytes %02x%02x, want 0000", f.ID, b[2], b[3])
	}
	if err := checkRecord(r.ID, r.Kind, r.Flow, r.Offset, len(r.Payload)); err != nil {
		return BulkRecord{}, err
	}
	return r, nil
}

func checkRecord(id uint32, kind BulkKind, flow BulkFlow, offset uint64, n int) error {
	switch {
	case id == 0:
		return errors.New("raw bulk record on id 0")
	case !kind.Valid():
		return fmt.Errorf("raw bulk record on id %d: unknown kind %d", id, kind)
	case !flow.Valid():
		return fmt.Errorf("raw bulk record on id %d: unknown flow %d", id, flow)
	case n < 1 || n > BulkMaxRecordPayload:
		return fmt.Errorf("raw bulk record on id %d: payload of %d bytes, want 1..%d", id, n, BulkMaxRecordPayload)
	case offset > ^uint64(0)-uint64(n):
		return fmt.Errorf("raw bulk record on id %d: offset %d + %d overflows", id, offset, n)
	}
	return nil
}
