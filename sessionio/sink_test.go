package sessionio

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
)

// blockingWriter accepts writes only when told to.
type blockingWriter struct {
	bytes.Buffer
	gate chan struct{}
}

func (w *blockingWriter) Write(p []byte) (int, error) { <-w.gate; return w.Buffer.Write(p) }

func TestOrderEOFAndGrants(t *testing.T) {
	var granted int
	s := NewSink(context.Background(), SinkConfig{Limit: 1 << 20, Grant: func(n int) { granted += n }})
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- s.Run(&out) }()
	want := bytes.Repeat([]byte("0123456789"), 100_000)
	s.Write(want[:500_000])
	s.Write(want[500_000:])
	s.CloseWrite()
	s.Write([]byte("after EOF: dropped"))
	if err := <-done; err != io.EOF {
		t.Fatalf("Run returned %v, want io.EOF", err)
	}
	if !bytes.Equal(out.Bytes(), want) || granted != len(want) {
		t.Fatalf("wrote %d bytes, granted %d, want %d", out.Len(), granted, len(want))
	}
}

// TestBounded: a writer that does not drain holds Write at the limit; Close releases it and the
// budget.
func TestBounded(t *testing.T) {
	b := NewBudget(1 << 30)
	s := NewSink(context.Background(), SinkConfig{Limit: 256 << 10, Budget: b})
	w := &blockingWriter{gate: make(chan struct{})}
	go s.Run(w)
	wrote := make(chan error, 1)
	go func() {
		for i := 0; i < 100; i++ {
			if err := s.Write(make([]byte, 64<<10)); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	for s.Buffered() < 256<<10 {
		w.gate <- struct{}{} // let one write through so the queue refills behind it
	}
	if s.Buffered() > 256<<10 {
		t.Fatalf("buffered %d over the limit", s.Buffered())
	}
	s.Close()
	if err := <-wrote; !errors.Is(err, ErrSinkClosed) {
		t.Fatalf("write after close: %v", err)
	}
	close(w.gate)
	if b.Used() != 0 {
		t.Fatalf("budget still holds %d bytes", b.Used())
	}
}
