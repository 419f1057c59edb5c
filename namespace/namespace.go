// Package namespace opens sockets in a network namespace other than the process's own, without
// moving the process. A socket belongs for life to the namespace it was created in, so one
// goroutine locked to a thread that entered the namespace creates every socket, and the caller
// connects and uses it through the runtime poller like any other.
//
// agentd uses it two ways: as PID 1 it keeps the uplink in a namespace of its own (workloads
// cannot see it, so they cannot bind to it or route to it), and tests use it to act as the guest.
package namespace

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// NS is a network namespace with a thread inside it.
type NS struct {
	fd   int // the namespace (an nsfs file), for moving links into it
	reqs chan func()
	done chan struct{}
}

// Open enters the namespace at path (/var/run/netns/NAME, /proc/PID/ns/net).
func Open(path string) (*NS, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("namespace: open %s: %w", path, err)
	}
	return start(func() (int, error) {
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return -1, fmt.Errorf("namespace: enter %s: %w", path, err)
		}
		return fd, nil
	}, fd)
}

// New creates a fresh, empty network namespace (only a loopback, down).
func New() (*NS, error) {
	return start(func() (int, error) {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return -1, fmt.Errorf("namespace: unshare: %w", err)
		}
		fd, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("namespace: open new namespace: %w", err)
		}
		return fd, nil
	}, -1)
}

func start(enter func() (int, error), openFD int) (*NS, error) {
	ns := &NS{reqs: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		// Never unlocked: the thread is in another namespace, so it must exit with this
		// goroutine rather than go back to the scheduler.
		runtime.LockOSThread()
		fd, err := enter()
		if err != nil {
			if openFD >= 0 {
				unix.Close(openFD)
			}
			ready <- err
			return
		}
		ns.fd = fd
		ready <- nil
		for {
			select {
			case f := <-ns.reqs:
				f()
			case <-ns.done:
				return
			}
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return ns, nil
}

// FD is the namespace's file descriptor (valid until Close), for netlink's LinkSetNsFd.
func (ns *NS) FD() int { return ns.fd }

// Close ends the namespace's thread. The namespace itself lives on while anything (a socket,
// a link, a process) is in it.
func (ns *NS) Close() {
	close(ns.done)
	unix.Close(ns.fd)
}

// Do runs f on the thread inside the namespace and returns its error: netlink sockets and
// sysctl writes made there act on the namespace.
func (ns *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	select {
	case ns.reqs <- func() { errc <- f() }:
	case <-ns.done:
		return errors.New("namespace: closed")
	}
	return <-errc
}

// Socket creates a non-blocking, close-on-exec socket inside the namespace.
func (ns *NS) Socket(domain, typ, proto int) (int, error) {
	fd := -1
	err := ns.Do(func() error {
		var err error
		fd, err = unix.Socket(domain, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
		return err
	})
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

// DialContext connects to address (an IP literal and port; names are resolved by the caller,
// with its own policy) over "tcp" or "udp" from inside the namespace.
func (ns *NS) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", address, err)
	}
	typ := unix.SOCK_STREAM
	switch network {
	case "tcp", "tcp4", "tcp6":
	case "udp", "udp4", "udp6":
		typ = unix.SOCK_DGRAM
	default:
		return nil, fmt.Errorf("dial %s: unsupported network %q", address, network)
	}
	domain, sa := sockaddr(ap)
	fd, err := ns.Socket(domain, typ, 0)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, address, err)
	}
	f := os.NewFile(uintptr(fd), "socket") // registers the non-blocking fd with the poller
	defer f.Close()                        // net.FileConn keeps its own duplicate
	if err := connect(ctx, f, fd, sa); err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(ap), Err: err}
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, address, err)
	}
	return c, nil
}

func sockaddr(ap netip.AddrPort) (int, unix.Sockaddr) {
	a := ap.Addr().Unmap()
	if a.Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
}

// connect runs a non-blocking connect and waits for it through the poller, honouring ctx.
func connect(ctx context.Context, f *os.File, fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if err == nil {
		return nil
	}
	if err != unix.EINPROGRESS && err != unix.EINTR { // after EINTR the connect goes on too
		return os.NewSyscallError("connect", err)
	}
	if d, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var soErr error
	werr := rc.Write(func(uintptr) bool {
		n, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			soErr = err
			return true
		}
		if n == 0 {
			// Writable with no error: connected, unless the poller woke us early.
			if _, err := unix.Getpeername(fd); err != nil {
				return false
			}
			return true
		}
		soErr = os.NewSyscallError("connect", unix.Errno(n))
		return true
	})
	if werr != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return werr
	}
	f.SetWriteDeadline(time.Time{})
	return soErr
}
