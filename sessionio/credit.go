package sessionio

import (
	"context"
	"sync"
)

// Credit is a flow-control window: the bytes a stream may still send until its peer grants more
// (agentd.flow.credit). One sender takes from it; grants add to it.
type Credit struct {
	mu   sync.Mutex
	n    int64
	wake chan struct{}
}

// NewCredit starts a window at n bytes.
func NewCredit(n int64) *Credit { return &Credit{n: n, wake: make(chan struct{}, 1)} }

// Add grants n more bytes (or gives back an unused part of a Take).
func (c *Credit) Add(n int64) {
	c.mu.Lock()
	c.n += n
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Take waits until credit is available and takes up to want bytes of it. It reports false if
// ctx ended first.
func (c *Credit) Take(ctx context.Context, want int) (int, bool) {
	for {
		c.mu.Lock()
		if c.n > 0 {
			n := int(min(int64(want), c.n))
			c.n -= int64(n)
			c.mu.Unlock()
			return n, true
		}
		c.mu.Unlock()
		select {
		case <-c.wake:
		case <-ctx.Done():
			return 0, false
		}
	}
}
