package sessionio

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/protocol"
)

// ErrClosed is returned when pushing to a closed queue or writer.
var ErrClosed = errors.New("sessionio: closed")

// WriterOptions are the writer's limits.
type WriterOptions struct {
	// BatchBytes is how many encoded bytes the writer gathers into one port write. Larger
	// batches mean fewer syscalls; the cap bounds how long one batch delays a fresh frame.
	BatchBytes int
	// ControlItems bounds the control queue (replies that belong to no live session). A host
	// that sends requests but never reads the replies fills it, and then its requests wait.
	ControlItems int
	// Observe, if set, is told of every frame written (its type and data length), for the
	// activity counters. It runs on the writer's goroutine and must be cheap.
	Observe func(t protocol.Type, dataLen int)
	// Generation is the v stamped on every frame (default protocol.Version): each side stamps
	// its own generation, which an agent may announce lower than the newest it implements.
	Generation uint8
}

// DefaultWriterOptions are tuned for a virtio-serial port or a unix socket.
var DefaultWriterOptions = WriterOptions{BatchBytes: 256 << 10, ControlItems: 1024}

// Item is one outgoing frame: either Data for a data message (written without re-encoding)
// or Payload, an encoded payload for any other type. With Bulk set, Data is the payload of a
// raw bulk record instead (Type is then the data type of its family, for the activity count).
type Item struct {
	ID      uint32
	Type    protocol.Type
	Data    []byte
	Payload []byte
	Bulk    protocol.BulkKind // a raw bulk record of this kind (0: a CBOR message)
	Flow    protocol.BulkFlow
	Offset  uint64
	buf     *[]byte       // pooled buffer backing Data, returned once written
	rel     Releaser      // budget charged for Data, credited once written or dropped
	flush   chan struct{} // a Flush marker, not a frame
}

// Releaser is the byte budget an item was charged to (a Budget), credited once it is written.
type Releaser interface{ Release(n int) }

// done returns the item's pooled buffer and budget; called once it is written or dropped.
func (it *Item) done() {
	if it.buf != nil {
		PutBuf(it.buf)
		it.buf = nil
	}
	if it.rel != nil {
		it.rel.Release(len(it.Data))
		it.rel = nil
	}
}

func (it *Item) size() int { return len(it.Data) + len(it.Payload) + 64 }

// Writer owns the write side of the channel.
type Writer struct {
	w    io.Writer
	opts WriterOptions

	mu      sync.Mutex
	control []Item
	ready   []*Queue // queues with pending items, in round-robin order
	closed  bool
	err     error
	wake    chan struct{}
	ctlFree chan struct{}
	done    chan struct{}
}

// NewWriter starts a writer on w. Stop it with Close; Err reports a write failure.
func NewWriter(w io.Writer, opts WriterOptions) *Writer {
	if opts.BatchBytes <= 0 {
		opts.BatchBytes = DefaultWriterOptions.BatchBytes
	}
	if opts.ControlItems <= 0 {
		opts.ControlItems = DefaultWriterOptions.ControlItems
	}
	if opts.Generation == 0 {
		opts.Generation = protocol.Version
	}
	mw := &Writer{w: w, opts: opts, wake: make(chan struct{}, 1), ctlFree: make(chan struct{}, 1), done: make(chan struct{})}
	go mw.loop()
	return mw
}

// Done is closed when the writer stops (Close or a write error).
func (w *Writer) Done() <-chan struct{} { return w.done }

// Err returns the write error that stopped the writer, if any.
func (w *Writer) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// CloseWait bounds how long Close waits for a write in progress: a peer that stopped reading
// would otherwise hold it forever. The writer goroutine ends once its owner closes the channel.
const CloseWait = 2 * time.Second

// Close stops the writer after the batch in progress; pending items are dropped.
func (w *Writer) Close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.signal()
	select {
	case <-w.done:
	case <-time.After(CloseWait):
	}
}

// Flush waits until every item queued before the call has been written (or the writer stops).
func (w *Writer) Flush(ctx context.Context) error {
	done := make(chan struct{})
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrClosed
	}
	w.control = append(w.control, Item{flush: done})
	w.mu.Unlock()
	w.signal()
	select {
	case <-done:
		return nil
	case <-w.done:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (w *Writer) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Control queues a frame ahead of session output. It blocks while the control queue is full.
func (w *Writer) Control(ctx context.Context, id uint32, t protocol.Type, payload []byte) error {
	for {
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return ErrClosed
		}
		if len(w.control) < w.opts.ControlItems {
			w.control = append(w.control, Item{ID: id, Type: t, Payload: payload})
			w.mu.Unlock()
			w.signal()
			return nil
		}
		w.mu.Unlock()
		select {
		case <-w.ctlFree:
		case <-w.done:
			return ErrClosed
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ControlMsg marshals v and queues it as a control frame.
func (w *Writer) ControlMsg(ctx context.Context, id uint32, t protocol.Type, v any) error {
	p, err := protocol.Marshal(v)
	if err != nil {
		return err
	}
	return w.Control(ctx, id, t, p)
}

// next takes the next item: control first, then one item from the queue at the head of the
// round-robin list, which goes to the back if it still has output.
func (w *Writer) next() (Item, *Queue, bool) {
	if len(w.control) > 0 {
		it := w.control[0]
		w.control[0] = Item{}
		w.control = w.control[1:]
		select {
		case w.ctlFree <- struct{}{}:
		default:
		}
		return it, nil, true
	}
	for len(w.ready) > 0 {
		q := w.ready[0]
		copy(w.ready, w.ready[1:])
		w.ready[len(w.ready)-1] = nil
		w.ready = w.ready[:len(w.ready)-1]
		it, ok := q.pop()
		if !ok {
			q.inReady = false
			continue
		}
		if q.n > 0 {
			w.ready = append(w.ready, q)
		} else {
			q.inReady = false
		}
		return it, q, true
	}
	return Item{}, nil, false
}

// zeroCopyMin is the data size from which a frame's data is written from its own buffer (one
// more iovec of the batch) instead of being copied into the batch.
const zeroCopyMin = 16 << 10

func (w *Writer) loop() {
	defer close(w.done)
	buf := make([]byte, 0, w.opts.BatchBytes+protocol.MaxWireFrame/16)
	var (
		flushes []chan struct{}
		iov     [][]byte
		held    []Item // items whose data is in iov: their buffers go back once written
	)
	for {
		buf, iov = buf[:0], iov[:0]
		flushes = flushes[:0]
		mark, batch := 0, 0 // buf[mark:] is not in iov yet; batch counts the bytes
		w.mu.Lock()
		for batch < w.opts.BatchBytes {
			it, q, ok := w.next()
			if !ok {
				break
			}
			if it.flush != nil {
				flushes = append(flushes, it.flush)
				continue
			}
			start := len(buf)
			own := len(it.Data) >= zeroCopyMin && (it.Bulk != 0 || it.Payload == nil && it.Type.IsData())
			var err error
			switch {
			case it.Bulk != 0:
				buf, err = protocol.AppendBulkHeader(buf, it.ID, it.Bulk, it.Flow, it.Offset, len(it.Data))
			case it.Payload == nil && it.Type.IsData():
				buf, err = protocol.AppendDataHeaderV(buf, w.opts.Generation, it.ID, it.Type, len(it.Data))
			default:
				buf, err = protocol.AppendMessageV(buf, w.opts.Generation, it.ID, it.Type, it.Payload)
				own = false
			}
			if w.opts.Observe != nil && err == nil {
				w.opts.Observe(it.Type, len(it.Data))
			}
			if q != nil {
				q.wrote(it.size())
			}
			if err != nil { // an encoding bug; drop the frame rather than desync the stream
				buf = buf[:start]
				it.done()
				continue
			}
			switch {
			case own:
				iov = append(iov, buf[mark:], it.Data)
				mark = len(buf)
				held = append(held, it)
			case it.Bulk != 0 || it.Payload == nil && it.Type.IsData():
				buf = append(buf, it.Data...)
				it.done()
			default:
				it.done()
			}
			batch += len(buf) - start + len(it.Data)
		}
		closed := w.closed
		w.mu.Unlock()
		if mark < len(buf) {
			iov = append(iov, buf[mark:])
		}
		if batch > 0 {
			err := writeVec(w.w, iov)
			for i := range held {
				held[i].done()
				held[i] = Item{}
			}
			held = held[:0]
			if err != nil {
				w.mu.Lock()
				w.err, w.closed = err, true
				w.mu.Unlock()
				return
			}
		}
		for _, f := range flushes {
			close(f)
		}
		if batch > 0 || len(flushes) > 0 {
			continue
		}
		if closed {
			return
		}
		<-w.wake
	}
}

// writeVec writes the pieces in order, as one write where the writer allows: writev on a
// socket (net.Buffers) or on any descriptor (an *os.File: a pty, a virtio port); otherwise a
// write per piece.
func writeVec(w io.Writer, iov [][]byte) error {
	if len(iov) == 1 {
		_, err := w.Write(iov[0])
		return err
	}
	if _, ok := w.(net.Conn); ok {
		bufs := net.Buffers(iov)
		_, err := bufs.WriteTo(w)
		return err
	}
	if sc, ok := w.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			return rawWritev(rc, iov)
		}
	}
	for _, b := range iov {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// rawWritev is writev(2) on a descriptor through Go's poller (waiting while it would block).
func rawWritev(rc syscall.RawConn, iov [][]byte) error {
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for len(iov) > 0 {
			n, err := unix.Writev(int(fd), iov[:min(len(iov), 1024)]) // IOV_MAX
			if err == unix.EINTR {
				continue
			}
			if err == unix.EAGAIN {
				return false
			}
			if err != nil {
				werr = err
				return true
			}
			for n > 0 { // drop what was written
				if n >= len(iov[0]) {
					n -= len(iov[0])
					iov = iov[1:]
				} else {
					iov[0] = iov[0][n:]
					n = 0
				}
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	return werr
}

// Queue is one session's bounded output queue. Push blocks while the queued bytes are at or
// above the high watermark and resumes once the writer drains them below the low watermark.
type Queue struct {
	w         *Writer
	high, low int

	// guarded by w.mu
	items   []Item
	n       int // items pending
	bytes   int
	inReady bool
	closed  bool
	space   chan struct{}
}

// NewQueue makes a session queue with the given byte watermarks.
func (w *Writer) NewQueue(high, low int) *Queue {
	if low > high {
		low = high
	}
	return &Queue{w: w, high: high, low: low, space: make(chan struct{}, 1)}
}

// Push queues an item, blocking while the queue is over its high watermark. It returns
// ErrClosed once the queue or writer is closed (the item's buffer is then released).
func (q *Queue) Push(ctx context.Context, it Item) error {
	for {
		q.w.mu.Lock()
		if q.closed || q.w.closed {
			q.w.mu.Unlock()
			it.done()
			return ErrClosed
		}
		if q.bytes < q.high {
			q.items = append(q.items, it)
			q.n++
			q.bytes += it.size()
			if !q.inReady {
				q.inReady = true
				q.w.ready = append(q.w.ready, q)
			}
			q.w.mu.Unlock()
			q.w.signal()
			return nil
		}
		q.w.mu.Unlock()
		select {
		case <-q.space:
		case <-q.w.done:
		case <-ctx.Done():
			it.done()
			return ctx.Err()
		}
	}
}

// PushMsg marshals v and pushes it.
func (q *Queue) PushMsg(ctx context.Context, id uint32, t protocol.Type, v any) error {
	p, err := protocol.Marshal(v)
	if err != nil {
		return err
	}
	return q.Push(ctx, Item{ID: id, Type: t, Payload: p})
}

// PushData pushes a data frame whose bytes live in a pooled buffer (from GetBuf); the buffer
// goes back to the pool once written or dropped.
func (q *Queue) PushData(ctx context.Context, id uint32, t protocol.Type, buf *[]byte, n int) error {
	return q.Push(ctx, Item{ID: id, Type: t, Data: (*buf)[:n], buf: buf})
}

// PushDataRelease is PushData for bytes charged to a budget, which is credited with n once the
// frame is written or dropped.
func (q *Queue) PushDataRelease(ctx context.Context, id uint32, t protocol.Type, buf *[]byte, n int, rel Releaser) error {
	return q.Push(ctx, Item{ID: id, Type: t, Data: (*buf)[:n], buf: buf, rel: rel})
}

// PushRecord pushes a raw bulk record whose payload lives in a pooled buffer, charged to rel
// (may be nil) like PushDataRelease. t is the data type of the record's family (counting).
func (q *Queue) PushRecord(ctx context.Context, id uint32, t protocol.Type, kind protocol.BulkKind, flow protocol.BulkFlow, offset uint64, buf *[]byte, n int, rel Releaser) error {
	return q.Push(ctx, Item{ID: id, Type: t, Data: (*buf)[:n], buf: buf, rel: rel, Bulk: kind, Flow: flow, Offset: offset})
}

// Close drops the queue's pending items; later pushes fail with ErrClosed.
func (q *Queue) Close() {
	q.w.mu.Lock()
	q.closed = true
	for i := range q.items[len(q.items)-q.n:] {
		it := &q.items[len(q.items)-q.n+i]
		it.done()
		*it = Item{}
	}
	q.items, q.n, q.bytes = nil, 0, 0
	q.w.mu.Unlock()
	select {
	case q.space <- struct{}{}:
	default:
	}
}

// Pending returns the bytes queued (for tests and accounting).
func (q *Queue) Pending() int {
	q.w.mu.Lock()
	defer q.w.mu.Unlock()
	return q.bytes
}

// pop removes the oldest item (w.mu held).
func (q *Queue) pop() (Item, bool) {
	if q.n == 0 || q.closed {
		return Item{}, false
	}
	i := len(q.items) - q.n
	it := q.items[i]
	q.items[i] = Item{}
	q.n--
	if q.n == 0 {
		q.items = q.items[:0]
	} else if i > 64 && i > q.n { // compact so the slice does not creep
		copy(q.items, q.items[i+1:])
		q.items = q.items[:q.n]
	}
	return it, true
}

// wrote accounts a written item (w.mu held) and wakes a blocked pusher at the low watermark.
func (q *Queue) wrote(size int) {
	q.bytes -= size
	if q.bytes <= q.low {
		select {
		case q.space <- struct{}{}:
		default:
		}
	}
}
