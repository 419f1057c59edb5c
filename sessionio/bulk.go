// Generation-8 bulk flows: the state both ends keep for one direction of a bulk session. A
// flow's receiver (BulkIn) checks every raw record against what it granted and grants absolute
// credit as its consumer releases bytes; its sender (BulkOut) sends only up to the receiver's
// credit. Credit is absolute, so duplicates are harmless and a grant can never be taken back.

package sessionio

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/agentd/agentd/protocol"
)

// ErrBulkFinished is returned once a flow is finished.
var ErrBulkFinished = errors.New("bulk flow is finished")

// BulkInOptions describe one received flow.
type BulkInOptions struct {
	Kind protocol.BulkKind
	Flow protocol.BulkFlow
	// MaxRecord is the negotiated max_record_payload.
	MaxRecord int
	// Window is what the receiver grants ahead of its consumer: once credit_limit - consumed is
	// at most Window/2 it grants consumed + Window (the reference's re-grant rule). At most
	// protocol.BulkMaxWindow.
	Window uint64
	// Budget, if set, backs granted bytes: all flows together hold at most the budget, plus
	// MinGrant each (see BulkIn). nil: every grant is the full window.
	Budget *Budget
	// Grant sends core.bulk.credit (consumed, limit); it must not block for long.
	Grant func(consumed, limit uint64)
}

// MinGrant is the credit a flow with none left is always given, backed by the budget or not,
// so that no flow ever waits for others to release theirs.
const MinGrant = protocol.BulkMinRecordPayload

// BulkIn is the receiving side of a flow. With a budget, each grant takes at most half of what
// the budget has free, so stalled flows together can only approach the budget, never starve a
// new flow of all of it; a flow that holds no credit at all and finds nothing free is given
// MinGrant unbacked. The bytes a receiver ever holds for its flows are therefore bounded by the
// budget plus MinGrant per flow, and a flow never waits for another.
type BulkIn struct {
	o BulkInOptions

	mu       sync.Mutex
	next     uint64 // offset of the next record
	consumed uint64 // bytes the consumer released
	limit    uint64 // absolute credit granted
	backed   uint64 // of limit - consumed, the bytes held in the budget
	final    uint64
	finished bool // the sender's finish arrived
	closed   bool
}

// NewBulkIn makes a flow's receiver; Open grants its initial credit.
func NewBulkIn(o BulkInOptions) *BulkIn {
	o.Window = min(max(o.Window, uint64(o.MaxRecord)), protocol.BulkMaxWindow)
	return &BulkIn{o: o}
}

// Open takes the initial credit (up to Window, at least MinGrant) and returns the credit limit.
func (b *BulkIn) Open() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.grantLocked(b.o.Window)
	return b.limit
}

// grantLocked raises the limit by up to want: what the budget can back of it (at most half its
// free bytes), or MinGrant unbacked when the flow holds no credit and nothing is free.
func (b *BulkIn) grantLocked(want uint64) bool {
	got := want
	if b.o.Budget != nil {
		got = uint64(b.o.Budget.TryAcquire(int(min(want, uint64(b.o.Budget.Free()/2)))))
		b.backed += got
	}
	if got == 0 && b.limit == b.consumed {
		got = min(want, MinGrant)
	}
	b.limit += got
	return got > 0
}

// Accept checks a record of the flow: its kind and direction, that it starts where the last
// one ended, its size, and that it stays within the credit granted. An error is a protocol
// violation by the sender. The payload may then be queued: it is within the credit, so it is
// within the memory the receiver set aside.
func (b *BulkIn) Accept(r protocol.BulkRecord) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := uint64(len(r.Payload))
	switch {
	case r.Kind != b.o.Kind || r.Flow != b.o.Flow:
		return fmt.Errorf("raw bulk record of kind %d flow %d on a kind %d flow %d session", r.Kind, r.Flow, b.o.Kind, b.o.Flow)
	case b.finished && r.Offset+n > b.final:
		return fmt.Errorf("raw bulk record at offset %d after the finish at %d", r.Offset, b.final)
	case r.Offset != b.next:
		return fmt.Errorf("raw bulk record at offset %d, expected %d", r.Offset, b.next)
	case len(r.Payload) > b.o.MaxRecord:
		return fmt.Errorf("raw bulk record of %d bytes exceeds max_record_payload %d", n, b.o.MaxRecord)
	case r.Offset+n > b.limit:
		return fmt.Errorf("raw bulk record ending at %d exceeds the credit limit %d", r.Offset+n, b.limit)
	}
	b.next += n
	return nil
}

// Finish records the sender's core.bulk.finish. complete reports whether every byte of the
// flow has arrived, so the end can be applied now; otherwise Complete says so later.
func (b *BulkIn) Finish(final uint64) (complete bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.finished:
		return false, errors.New("duplicate bulk finish")
	case final < b.next:
		return false, fmt.Errorf("bulk finish at %d, but %d bytes arrived", final, b.next)
	case final > b.limit:
		return false, fmt.Errorf("bulk finish at %d beyond the credit limit %d", final, b.limit)
	}
	b.finished, b.final = true, final
	return b.next == final, nil
}

// Complete reports whether the sender finished and every byte of the flow arrived.
func (b *BulkIn) Complete() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.finished && b.next == b.final
}

// Received returns the bytes received so far.
func (b *BulkIn) Received() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.next
}

// Consumed records n bytes released by the consumer (written to the destination, read by the
// application) and grants more credit once the grant runs low (never after the finish).
func (b *BulkIn) Consumed(n int) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.consumed += uint64(n)
	r := min(uint64(n), b.backed)
	b.backed -= r
	b.o.Budget.Release(int(r))
	if b.finished || b.limit-b.consumed > b.o.Window/2 || !b.grantLocked(b.consumed+b.o.Window-b.limit) {
		b.mu.Unlock()
		return
	}
	consumed, limit := b.consumed, b.limit
	b.mu.Unlock()
	b.o.Grant(consumed, limit)
}

// Drained sends the receiver's last credit once the flow is finished and consumed (the
// reference's "drained" update after a host's TCP finish).
func (b *BulkIn) Drained() {
	b.mu.Lock()
	consumed, limit, closed := b.consumed, b.limit, b.closed
	b.mu.Unlock()
	if !closed {
		b.o.Grant(consumed, limit)
	}
}

// Close gives the flow's budget back; later calls do nothing.
func (b *BulkIn) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.closed = true
	b.o.Budget.Release(int(b.backed))
	b.backed = 0
}

// BulkOut is the sending side of a flow: the receiver's absolute credit and what was sent.
type BulkOut struct {
	mu       sync.Mutex
	sent     uint64
	consumed uint64
	limit    uint64
	finished bool
	wake     chan struct{}
}

// NewBulkOut starts a sender at the receiver's initial credit limit.
func NewBulkOut(limit uint64) *BulkOut { return &BulkOut{limit: limit, wake: make(chan struct{}, 1)} }

// Credit applies a core.bulk.credit from the receiver. The limit never goes down, consumed
// never passes what was sent, and limit - consumed never exceeds the maximum window.
func (b *BulkOut) Credit(consumed, limit uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case limit < b.limit:
		return fmt.Errorf("credit limit %d below the previous %d", limit, b.limit)
	case consumed > b.sent:
		return fmt.Errorf("consumed offset %d beyond the %d bytes sent", consumed, b.sent)
	case consumed < b.consumed:
		return fmt.Errorf("consumed offset %d below the previous %d", consumed, b.consumed)
	case limit-consumed > protocol.BulkMaxWindow:
		return fmt.Errorf("credit window %d exceeds the maximum %d", limit-consumed, protocol.BulkMaxWindow)
	}
	grew := limit > b.limit
	b.limit, b.consumed = limit, consumed
	if grew {
		select {
		case b.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Wait waits for credit and returns how much of want may be sent now (at least 1), and the
// offset it starts at. It reports false if ctx ended first. One goroutine sends.
func (b *BulkOut) Wait(ctx context.Context, want int) (offset uint64, n int, ok bool) {
	for {
		b.mu.Lock()
		if b.finished {
			b.mu.Unlock()
			return 0, 0, false
		}
		if avail := b.limit - b.sent; avail > 0 {
			off := b.sent
			b.mu.Unlock()
			return off, int(min(uint64(want), avail)), true
		}
		b.mu.Unlock()
		select {
		case <-b.wake:
		case <-ctx.Done():
			return 0, 0, false
		}
	}
}

// Sent records n bytes sent (at most what Wait allowed).
func (b *BulkOut) Sent(n int) {
	b.mu.Lock()
	b.sent += uint64(n)
	b.mu.Unlock()
}

// Finish marks the flow finished and returns its final offset; Wait then reports false.
func (b *BulkOut) Finish() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.finished = true
	return b.sent
}

// Total returns the bytes sent.
func (b *BulkOut) Total() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sent
}
