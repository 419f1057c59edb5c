package sessionio

import (
	"context"
	"io"
	"sync"
	"testing"

	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// frameCounter reads frames off the channel and records the order of their ids.
func frameCounter(t *testing.T, r io.Reader, n int) []uint32 {
	fr := protocol.NewFrameReader(r)
	ids := make([]uint32, 0, n)
	for len(ids) < n {
		f, err := fr.Next()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, f.ID)
	}
	return ids
}

// gate holds the writer's first write until the test has queued everything, so the order
// the writer chooses is deterministic.
type gate struct {
	w    io.Writer
	open chan struct{}
}

func (g *gate) Write(p []byte) (int, error) {
	<-g.open
	return g.w.Write(p)
}

// TestRoundRobin: a queue full of bulk frames does not delay another session's frames by more
// than one round.
func TestRoundRobin(t *testing.T) {
	testutil.Leaks(t)
	a, b := testutil.SocketPair(t)
	defer a.Close()
	defer b.Close()
	g := &gate{a, make(chan struct{})}
	w := NewWriter(g, WriterOptions{BatchBytes: 1}) // one frame per write, to observe the order
	defer w.Close()
	bulk, small := w.NewQueue(1<<30, 0), w.NewQueue(1<<30, 0)
	ctx := context.Background()
	for i := 0; i < 50; i++ {
		buf := GetBuf()
		bulk.PushData(ctx, 1, protocol.TypeTCPData, buf, ChunkSize)
	}
	for i := 0; i < 5; i++ {
		small.PushMsg(ctx, 2, protocol.TypeTCPEOF, protocol.Empty{})
	}
	close(g.open)
	ids := frameCounter(t, b, 55)
	// Round robin: once both queues have output they alternate, so the 5 small frames all go
	// out within the first 11, never two bulk frames between them (the writer may have taken one
	// bulk frame before the small queue was ready, so [1 2 1 2 ...] and [1 1 2 1 2 ...] both are).
	last2, run1, seen2 := -1, 0, 0
	for i, id := range ids[:11] {
		if id == 2 {
			seen2++
			last2, run1 = i, 0
			continue
		}
		if run1++; seen2 < 5 && run1 > 2 {
			t.Fatalf("three bulk frames in a row before the small session was done: %v", ids[:13])
		}
	}
	if seen2 != 5 || last2 > 10 {
		t.Fatalf("order %v: want the 5 small frames interleaved in the first 11", ids[:13])
	}
}

// TestHighWatermarkBlocks: Push blocks at the high watermark until the writer drains to the
// low one, so a producer can never queue more than HighWater plus one item.
func TestHighWatermarkBlocks(t *testing.T) {
	a, b := testutil.SocketPair(t)
	defer a.Close()
	defer b.Close()
	w := NewWriter(a, WriterOptions{})
	defer w.Close()
	const high = 4 * ChunkSize
	q := w.NewQueue(high, ChunkSize)
	var maxPending int
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200; i++ {
			q.PushData(context.Background(), 1, protocol.TypeTCPData, GetBuf(), ChunkSize)
			mu.Lock()
			maxPending = max(maxPending, q.Pending())
			mu.Unlock()
		}
	}()
	frameCounter(t, b, 200)
	<-done
	if limit := high + ChunkSize + 64; maxPending > limit {
		t.Fatalf("queue held %d bytes, limit %d", maxPending, limit)
	}
}

// TestCloseReleases: closing a queue drops its items and unblocks a pusher.
func TestCloseReleases(t *testing.T) {
	a, b := testutil.SocketPair(t)
	w := NewWriter(a, WriterOptions{})
	defer func() { a.Close(); b.Close(); w.Close() }() // the socket first: nobody reads it
	// Nobody reads b: the writer blocks on the socket and the queue fills.
	q := w.NewQueue(ChunkSize, 0)
	if err := q.PushData(context.Background(), 1, protocol.TypeTCPData, GetBuf(), ChunkSize); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		for {
			if err := q.PushData(context.Background(), 1, protocol.TypeTCPData, GetBuf(), ChunkSize); err != nil {
				errc <- err
				return
			}
		}
	}()
	q.Close() // whether the pusher is blocked yet or not, its next push must fail
	if err := <-errc; err != ErrClosed {
		t.Fatalf("push after close: %v", err)
	}
	if q.Pending() != 0 {
		t.Fatal("closed queue still holds bytes")
	}
}

// TestControlFirst: control frames overtake queued session output.
func TestControlFirst(t *testing.T) {
	a, b := testutil.SocketPair(t)
	defer a.Close()
	defer b.Close()
	g := &gate{a, make(chan struct{})}
	w := NewWriter(g, WriterOptions{BatchBytes: 1})
	defer w.Close()
	q := w.NewQueue(1<<30, 0)
	for i := 0; i < 20; i++ {
		q.PushData(context.Background(), 1, protocol.TypeTCPData, GetBuf(), ChunkSize)
	}
	w.ControlMsg(context.Background(), 9, protocol.TypeTCPFailed, protocol.TCPFailed{Error: "x"})
	close(g.open)
	ids := frameCounter(t, b, 21)
	pos := -1
	for i, id := range ids {
		if id == 9 {
			pos = i
		}
	}
	if pos < 0 || pos > 1 { // at most the frame already being written goes first
		t.Fatalf("control frame at position %d: %v", pos, ids)
	}
}

func TestFlushAndWriteError(t *testing.T) {
	a, b := testutil.SocketPair(t)
	w := NewWriter(a, WriterOptions{})
	go io.Copy(io.Discard, b)
	w.ControlMsg(context.Background(), 0, protocol.TypeTCPEOF, protocol.Empty{})
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Close()
	a.Close()
	w.ControlMsg(context.Background(), 0, protocol.TypeTCPEOF, protocol.Empty{})
	<-w.Done()
	if w.Err() == nil {
		t.Fatal("write to a closed channel reported no error")
	}
}
