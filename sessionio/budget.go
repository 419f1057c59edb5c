// A Budget is a byte budget shared by many sessions, so the total memory they hold in
// buffers stays bounded however many sessions a host opens.

package sessionio

import (
	"context"
	"sync"
)

// Budget is a byte budget shared by every session of one direction. Acquire waits for room;
// a single request larger than the whole budget is let through when nothing else is held, so
// one big chunk can never deadlock.
type Budget struct {
	mu    sync.Mutex
	limit int64
	used  int64
	// waiters counts blocked Acquires; wake is replaced (and the old one closed) only when
	// someone waits, so the common Release allocates nothing.
	waiters int
	wake    chan struct{}
}

// NewBudget makes a budget of limit bytes (limit <= 0: unlimited).
func NewBudget(limit int64) *Budget {
	return &Budget{limit: limit, wake: make(chan struct{})}
}

// Acquire takes n bytes, waiting until they fit or ctx ends.
func (b *Budget) Acquire(ctx context.Context, n int) error {
	if b == nil || b.limit <= 0 {
		return nil
	}
	for {
		b.mu.Lock()
		if b.used == 0 || b.used+int64(n) <= b.limit {
			b.used += int64(n)
			b.mu.Unlock()
			return nil
		}
		wake := b.wake
		b.waiters++
		b.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
		}
		b.mu.Lock()
		b.waiters--
		b.mu.Unlock()
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// Release returns n bytes and wakes every waiter to re-check.
func (b *Budget) Release(n int) {
	if b == nil || b.limit <= 0 || n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= int64(n)
	if b.waiters > 0 {
		close(b.wake)
		b.wake = make(chan struct{})
	}
	b.mu.Unlock()
}

// Used returns the bytes currently held.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// TryAcquire takes up to n bytes without waiting and returns how many it took (n for an
// unlimited budget, 0 when it is spent).
func (b *Budget) TryAcquire(n int) int {
	if b == nil || b.limit <= 0 {
		return n
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	got := int(min(int64(n), b.limit-b.used))
	if got <= 0 {
		return 0
	}
	b.used += int64(got)
	return got
}

// Free returns the bytes not held (the largest int for an unlimited budget).
func (b *Budget) Free() int64 {
	if b == nil || b.limit <= 0 {
		return 1<<62 - 1
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return max(b.limit-b.used, 0)
}
