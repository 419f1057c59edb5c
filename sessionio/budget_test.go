package sessionio

import (
	"context"
	"testing"
	"time"
)

func TestBudget(t *testing.T) {
	b := NewBudget(100)
	ctx := context.Background()
	if err := b.Acquire(ctx, 60); err != nil {
		t.Fatal(err)
	}
	if err := b.Acquire(ctx, 40); err != nil { // exactly full
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- b.Acquire(ctx, 10) }()
	select {
	case err := <-got:
		t.Fatalf("acquire over the limit returned %v without waiting", err)
	case <-time.After(20 * time.Millisecond): // proving a negative: it must still be waiting
	}
	b.Release(60)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if b.Used() != 50 {
		t.Fatalf("used %d, want 50", b.Used())
	}
	// A request larger than the whole budget passes once nothing else is held.
	b.Release(50)
	if err := b.Acquire(ctx, 1000); err != nil || b.Used() != 1000 {
		t.Fatalf("oversized acquire: %v, used %d", err, b.Used())
	}
	// A waiter gives up with its context.
	cctx, cancel := context.WithCancel(ctx)
	go func() { got <- b.Acquire(cctx, 1) }()
	cancel()
	if err := <-got; err != context.Canceled {
		t.Fatalf("cancelled acquire: %v", err)
	}
	var nilBudget *Budget // nil = unlimited
	if nilBudget.Acquire(ctx, 1<<40) != nil || nilBudget.Used() != 0 {
		t.Fatal("nil budget must be unlimited")
	}
	nilBudget.Release(5)
}

func TestCredit(t *testing.T) {
	c := NewCredit(100)
	ctx := context.Background()
	if n, ok := c.Take(ctx, 64); n != 64 || !ok {
		t.Fatalf("take 64: %d %v", n, ok)
	}
	if n, _ := c.Take(ctx, 64); n != 36 { // only what is left
		t.Fatalf("take the rest: %d", n)
	}
	c.Add(10) // a grant, or an unread part given back
	if n, _ := c.Take(ctx, 64); n != 10 {
		t.Fatalf("after add: %d", n)
	}
	got := make(chan int, 1)
	go func() { n, _ := c.Take(ctx, 5); got <- n }()
	c.Add(3)
	if n := <-got; n != 3 {
		t.Fatalf("waiting take got %d", n)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, ok := c.Take(cctx, 1); ok {
		t.Fatal("take on an empty window ignored its context")
	}
}
