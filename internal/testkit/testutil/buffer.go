package testutil

import (
	"bytes"
	"sync"
)

// Buffer is a bytes.Buffer safe for one writer (a child's stderr, a log, an audit sink) and
// readers at the same time.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns what was written so far.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
