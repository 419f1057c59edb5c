package netstack

import (
	"sync/atomic"
	"time"
)

// pool runs short jobs (a SYN's decision and dial, a flow direction's turn) on goroutines it
// keeps for a while after their job: a fresh goroutine starts with a small stack and copies it
// a few times growing into gVisor's call depth (a tenth of agentd's CPU per connection in
// measurement), a kept one has the stack it needs. At most maxIdle are kept, each for idleFor.
type pool struct {
	jobs chan func() // unbuffered: a send succeeds only to a waiting goroutine
	idle atomic.Int32
	quit chan struct{} // closed: kept goroutines end
}

const (
	maxIdle = 32
	idleFor = time.Second
)

func newPool() *pool { return &pool{jobs: make(chan func()), quit: make(chan struct{})} }

// close ends the kept goroutines (jobs running go on, and end after).
func (p *pool) close() { close(p.quit) }

// run starts f on a kept goroutine, or a new one.
func (p *pool) run(f func()) {
	select {
	case p.jobs <- f:
	default:
		go p.loop(f)
	}
}

func (p *pool) loop(f func()) {
	var t *time.Timer
	for {
		f()
		f = nil
		if p.idle.Add(1) > maxIdle {
			p.idle.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(idleFor)
		} else {
			t.Reset(idleFor)
		}
		select {
		case f = <-p.jobs:
			p.idle.Add(-1)
			t.Stop()
		case <-t.C:
			p.idle.Add(-1)
			return
		case <-p.quit:
			p.idle.Add(-1)
			t.Stop()
			return
		}
	}
}
