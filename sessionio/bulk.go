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
	// Budget, if set, backs every granted byte: credit_limit - consumed is held in it, so all
	// flows together never have more bytes granted (and so buffered) than the budget. A flow
	// grants less under pressure, and waits for room only when it holds no credit at all.
	Budget *Budget
	// Grant sends core.bulk.credit (consumed, limit); it must not block for long.
	Grant func(consumed, limit uint64)
}

// BulkIn is the receiving side of a flow.
type BulkIn struct {
	o BulkInOptions

	mu       sync.Mutex
	next     uint64 // offset of the next record
	consumed uint64 // bytes the consumer released
	limit    uint64 // absolute credit granted
	final    uint64
	finished bool // the sender's finish arrived
	closed   bool
}

// NewBulkIn makes a flow's receiver; Open grants its initial credit.
func NewBulkIn(o BulkInOptions) *BulkIn {
	o.Window = min(max(o.Window, uint64(o.MaxRecord)), protocol.BulkMaxWindow)
	return &BulkIn{o: o}
}

// minGrant is the least credit a flow without any waits for when the budget is spent.
const minGrant = 64 << 10

// Open takes the initial credit: up to Window, at least some, waiting for budget room if
// there is none (ctx ends the wait). It returns the initial credit limit.
func (b *BulkIn) Open(ctx context.Context) (uint64, error) {
	n := b.reserve(b.o.Window)
	if n == 0 {
		want := min(uint64(minGrant), b.o.Window)
		if err := b.o.Budget.Acquire(ctx, int(want)); err != nil {
			return 0, err
		}
		n = want
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		b.o.Budget.Release(int(n))
		return 0, ErrSinkClosed
	}
	b.limit += n
	return b.limit, nil
}

// reserve takes up to n bytes of budget without waiting.
func (b *BulkIn) reserve(n uint64) uint64 {
	if b.o.Budget == nil {
		return n
	}
	return uint64(b.o.Budget.TryAcquire(int(n)))
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
// application) and grants more credit when the grant runs low. A flow left with no credit at
// all while the budget is spent waits here for room (ctx ends the wait): it has nothing to
// consume until it grants again.
func (b *BulkIn) Consumed(ctx context.Context, n int) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.consumed += uint64(n)
	b.o.Budget.Release(n)
	if b.finished || b.limit-b.consumed > b.o.Window/2 {
		b.mu.Unlock()
		return
	}
	want := b.consumed + b.o.Window - b.limit
	b.mu.Unlock()
	got := b.reserve(want)
	if got == 0 && b.idle() {
		want = min(want, minGrant)
		if b.o.Budget.Acquire(ctx, int(want)) != nil {
			return
		}
		got = want
	}
	if got == 0 {
		return
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		b.o.Budget.Release(int(got))
		return
	}
	b.limit += got
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

// idle reports whether the flow holds no credit: everything granted was consumed.
func (b *BulkIn) idle() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit == b.consumed
}

// Close gives the flow's budget back; later calls do nothing.
func (b *BulkIn) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.closed = true
	b.o.Budget.Release(int(b.limit - b.consumed))
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
