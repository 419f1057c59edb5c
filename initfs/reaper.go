package initfs

import (
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper is PID 1's child reaper. As PID 1, agentd inherits every orphan, and an orphan that
// exits stays a zombie until someone waits for it. The reaper therefore owns every wait in the
// process: it reaps all children as they exit and hands the status of a child agentd started
// itself to whoever waits for that pid (exec sessions wait through it instead of os/exec).
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
	exited  map[int]syscall.WaitStatus // statuses nobody waited for yet (bounded)
	order   []int
	reaped  uint64
}

// maxUnclaimed bounds remembered statuses: a child can exit before its starter calls Wait,
// so recent statuses are kept; orphans' statuses age out.
const maxUnclaimed = 4096

// StartReaper starts reaping. Call it once, as PID 1.
func StartReaper() *Reaper {
	r := &Reaper{waiters: map[int]chan syscall.WaitStatus{}, exited: map[int]syscall.WaitStatus{}}
	sig := make(chan os.Signal, 64)
	signal.Notify(sig, syscall.SIGCHLD)
	go func() {
		for range sig {
			r.reap()
		}
	}()
	r.reap() // anything that exited before the signal handler was in place
	return r
}

func (r *Reaper) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		r.mu.Lock()
		r.reaped++
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- syscall.WaitStatus(ws)
		} else {
			r.exited[pid] = syscall.WaitStatus(ws)
			r.order = append(r.order, pid)
			for len(r.order) > maxUnclaimed {
				delete(r.exited, r.order[0])
				r.order = r.order[1:]
			}
		}
		r.mu.Unlock()
	}
}

// Wait returns the exit status of a child this process started.
func (r *Reaper) Wait(pid int) (syscall.WaitStatus, error) {
	r.mu.Lock()
	if ws, ok := r.exited[pid]; ok {
		delete(r.exited, pid)
		r.mu.Unlock()
		return ws, nil
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[pid] = ch
	r.mu.Unlock()
	return <-ch, nil
}

// Reaped counts children reaped so far.
func (r *Reaper) Reaped() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reaped
}
