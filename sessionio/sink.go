// A Sink is one session's bounded byte queue toward a local writer (a destination
// socket, a child's stdin): the agent loop copies host data in, one goroutine drains it in
// order, and, under flow control, grants the host credit as bytes leave. A host without flow
// control that outruns the writer waits for room (bounded memory instead of unbounded queues).

package sessionio

import (
	"context"
	"errors"
	"io"
	"sync"
)

// ErrSinkClosed is returned by Write once the sink is closed or its writer failed.
var ErrSinkClosed = errors.New("session is closed")

// SinkConfig bounds a sink.
type SinkConfig struct {
	// Limit is the most bytes queued; under flow control it is the window granted to the host.
	Limit int
	// Budget is a byte budget shared with other sessions (nil: none).
	Budget *Budget
	// Grant, when set, is called with the bytes written since the last grant, every GrantEvery
	// bytes (default: a quarter of Limit) or whenever the queue empties (flow-control credit
	// back to the host).
	Grant      func(n int)
	GrantEvery int
	// Big queues data in BigChunkSize buffers (fewer, larger writes) instead of ChunkSize ones:
	// for raw bulk records, which arrive in pieces that large.
	Big bool
}

// Sink is the queue. Write and CloseWrite are called by the agent loop; Run by one goroutine.
type Sink struct {
	ctx    context.Context
	cancel context.CancelFunc
	cfg    SinkConfig

	mu     sync.Mutex
	chunks []*[]byte // pooled buffers sliced to their length
	bytes  int
	eof    bool
	closed bool
	wake   chan struct{} // wakes Run
	space  chan struct{} // wakes a Write waiting for room
}

// NewSink makes a sink; ctx ends it (as does Close).
func NewSink(ctx context.Context, cfg SinkConfig) *Sink {
	ctx, cancel := context.WithCancel(ctx)
	if cfg.Limit <= 0 {
		cfg.Limit = 1 << 20
	}
	return &Sink{ctx: ctx, cancel: cancel, cfg: cfg, wake: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Write copies data (which may alias the channel's read buffer) into the queue, in chunks of
// the pooled buffer size, waiting while the queue is at its limit or the budget is spent.
// Data after CloseWrite is dropped, as by the reference.
func (s *Sink) Write(data []byte) error {
	chunk, get := ChunkSize, GetBuf
	if s.cfg.Big {
		chunk, get = BigChunkSize, GetBigBuf
	}
	for len(data) > 0 {
		n := min(len(data), chunk)
		if err := s.waitRoom(n); err != nil {
			return err
		}
		if err := s.cfg.Budget.Acquire(s.ctx, n); err != nil {
			return ErrSinkClosed
		}
		c := get()
		*c = (*c)[:n]
		copy(*c, data[:n])
		s.mu.Lock()
		if s.closed || s.eof {
			closed := s.closed
			s.mu.Unlock()
			PutBuf(c)
			s.cfg.Budget.Release(n)
			if closed {
				return ErrSinkClosed
			}
			return nil
		}
		s.chunks = append(s.chunks, c)
		s.bytes += n
		s.mu.Unlock()
		poke(s.wake)
		data = data[n:]
	}
	return nil
}

func (s *Sink) waitRoom(n int) error {
	for {
		s.mu.Lock()
		closed, used := s.closed, s.bytes
		s.mu.Unlock()
		if closed {
			return ErrSinkClosed
		}
		if used == 0 || used+n <= s.cfg.Limit {
			return nil
		}
		select {
		case <-s.space:
		case <-s.ctx.Done():
			return ErrSinkClosed
		}
	}
}

// CloseWrite marks the end of the data: Run returns after writing everything queued.
func (s *Sink) CloseWrite() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrSinkClosed
	}
	s.eof = true
	poke(s.wake)
	return nil
}

// Run writes the queue to w in order until CloseWrite's EOF (returning io.EOF), Close (nil),
// or a write error (returned). The caller then shuts its writer down as it sees fit.
func (s *Sink) Run(w io.Writer) error {
	written := 0
	grantAt := max(s.cfg.Limit/4, 1)
	if s.cfg.GrantEvery > 0 {
		grantAt = s.cfg.GrantEvery
	}
	for {
		s.mu.Lock()
		for len(s.chunks) == 0 && !s.eof && !s.closed {
			s.mu.Unlock()
			select {
			case <-s.wake:
			case <-s.ctx.Done():
				return nil
			}
			s.mu.Lock()
		}
		if s.closed {
			s.mu.Unlock()
			return nil
		}
		if len(s.chunks) == 0 { // EOF, everything before it written
			s.mu.Unlock()
			return io.EOF
		}
		c := s.chunks[0]
		s.chunks[0] = nil
		s.chunks = s.chunks[1:]
		s.mu.Unlock()

		_, err := w.Write(*c)
		n := len(*c)
		PutBuf(c)
		s.mu.Lock()
		s.bytes -= n
		idle := len(s.chunks) == 0
		s.mu.Unlock()
		s.cfg.Budget.Release(n)
		poke(s.space)
		if err != nil {
			return err
		}
		if s.cfg.Grant != nil {
			written += n
			if written >= grantAt || idle {
				s.cfg.Grant(written)
				written = 0
			}
		}
	}
}

// Close drops everything queued and ends Run and any waiting Write.
func (s *Sink) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	for _, c := range s.chunks {
		PutBuf(c)
	}
	s.cfg.Budget.Release(s.bytes)
	s.chunks, s.bytes = nil, 0
	s.mu.Unlock()
	s.cancel()
	poke(s.wake)
	poke(s.space)
}

// Buffered returns the bytes queued.
func (s *Sink) Buffered() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}
