package netstack

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// reactor wakes parked TCP flows when their upstream socket becomes readable or writable. A
// flow direction with nothing to do parks without a goroutine (an idle connection then costs
// only its memory), arming a one-shot interest in its socket here; the reactor starts its
// worker again. One goroutine serves every flow, its epoll descriptor waiting in the runtime's
// poller.
type reactor struct {
	epfd  int
	file  *os.File
	done  chan struct{}
	mu    sync.Mutex
	flows map[int32]*tcpFlow // by upstream descriptor
}

func newReactor() (*reactor, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("netstack: epoll: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil { // so that the runtime polls it
		unix.Close(fd)
		return nil, fmt.Errorf("netstack: epoll: %w", err)
	}
	r := &reactor{epfd: fd, file: os.NewFile(uintptr(fd), "epoll"), done: make(chan struct{}), flows: map[int32]*tcpFlow{}}
	rc, err := r.file.SyscallConn()
	if err != nil {
		r.file.Close()
		return nil, fmt.Errorf("netstack: epoll: %w", err)
	}
	go r.loop(rc)
	return r, nil
}

func (r *reactor) loop(rc interface {
	Read(func(uintptr) bool) error
}) {
	defer close(r.done)
	var evs [64]unix.EpollEvent
	rc.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), evs[:], 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return true
			}
			for _, ev := range evs[:n] {
				r.mu.Lock()
				t := r.flows[ev.Fd]
				r.mu.Unlock()
				if t != nil {
					t.socketEvent(ev.Events)
				}
			}
			if n < len(evs) {
				return false // drained: wait in the poller for more
			}
		}
	})
}

// add registers a flow's upstream socket with a one-shot interest.
func (r *reactor) add(fd int, t *tcpFlow, events uint32) error {
	r.mu.Lock()
	r.flows[int32(fd)] = t
	r.mu.Unlock()
	ev := unix.EpollEvent{Events: events | unix.EPOLLONESHOT, Fd: int32(fd)}
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		r.mu.Lock()
		delete(r.flows, int32(fd))
		r.mu.Unlock()
		return fmt.Errorf("netstack: epoll add: %w", err)
	}
	return nil
}

// arm sets the one-shot interest of a registered socket (the caller keeps it registered).
func (r *reactor) arm(fd int, events uint32) {
	ev := unix.EpollEvent{Events: events | unix.EPOLLONESHOT, Fd: int32(fd)}
	unix.EpollCtl(r.epfd, unix.EPOLL_CTL_MOD, fd, &ev)
}

// remove unregisters a socket; call it before the socket is closed (its number is reused).
func (r *reactor) remove(fd int) {
	r.mu.Lock()
	delete(r.flows, int32(fd))
	r.mu.Unlock()
	unix.EpollCtl(r.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

func (r *reactor) close() {
	r.file.Close()
	<-r.done
}
