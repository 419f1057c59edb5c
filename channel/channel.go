// Package channel opens the byte stream that carries agent frames: the virtio-serial port
// named "agent", any path opened read-write (a /dev/vport, a pty, a FIFO), or a unix socket.
package channel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// PortName is the virtio-serial port name the host gives the agent channel.
const PortName = "agent"

// VirtioPortsDir is where the kernel lists virtio-serial ports.
const VirtioPortsDir = "/sys/class/virtio-ports"

// Discover finds the device of the virtio port whose sysfs name is PortName.
func Discover(sysDir string) (string, error) { return DiscoverNamed(sysDir, PortName) }

// DiscoverNamed finds the device of the virtio port whose sysfs name is name.
func DiscoverNamed(sysDir, name string) (string, error) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return "", fmt.Errorf("serial port not found: read %s: %w", sysDir, err)
	}
	for _, e := range entries {
		n, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(n)) == name {
			return "/dev/" + e.Name(), nil
		}
	}
	return "", fmt.Errorf("serial port not found: no port named %q in %s", name, sysDir)
}

// Open opens a channel spec:
//
//	unix:PATH         connect to a unix stream socket (e.g. a qemu chardev in server mode)
//	unix-listen:PATH  listen on PATH and accept one connection
//	PATH              open the file read-write; a tty is switched to raw mode
//	""                discover the virtio port named "agent"
func Open(spec string) (io.ReadWriteCloser, error) {
	switch {
	case strings.HasPrefix(spec, "unix:"):
		path := strings.TrimPrefix(spec, "unix:")
		c, err := net.Dial("unix", path)
		if err != nil {
			return nil, fmt.Errorf("open channel %s: %w", spec, err)
		}
		return c, nil
	case strings.HasPrefix(spec, "unix-listen:"):
		return acceptOne(strings.TrimPrefix(spec, "unix-listen:"))
	case spec == "":
		dev, err := Discover(VirtioPortsDir)
		if err != nil {
			return nil, err
		}
		spec = dev
	}
	f, err := os.OpenFile(spec, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("open channel %s: %w", spec, err)
	}
	if err := MakeRaw(int(f.Fd())); err != nil && err != unix.ENOTTY {
		f.Close()
		return nil, fmt.Errorf("open channel %s: raw mode: %w", spec, err)
	}
	return f, nil
}

func acceptOne(path string) (io.ReadWriteCloser, error) {
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	defer l.Close()
	c, err := l.Accept()
	if err != nil {
		return nil, fmt.Errorf("accept on %s: %w", path, err)
	}
	return c, nil
}

// MakeRaw puts a terminal into raw mode (no echo, no line editing, no byte translation), so a
// pty carries frames byte for byte. It returns ENOTTY for anything that is not a terminal.
func MakeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

// Pollable returns a copy of f that uses Go's poller (non-blocking, with deadlines and a Close
// that interrupts blocked reads) and closes f. A pty master from pty.Open, for example, is a
// blocking fd whose reads a Close cannot interrupt.
func Pollable(f *os.File) (*os.File, error) {
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set %s non-blocking: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// WaitReadable waits up to d for port to hold a byte to read (or to hang up) without reading
// it; d = 0 asks whether one is there now. The port must have a file descriptor (an *os.File
// or a net.Conn) and, for d > 0, read deadlines.
func WaitReadable(port any, d time.Duration) (bool, error) {
	sc, ok := port.(syscall.Conn)
	if !ok {
		return false, fmt.Errorf("wait for input: %T has no file descriptor", port)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("wait for input: %w", err)
	}
	var ready bool
	check := func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0) // EINTR: not ready yet, asked again
		ready = n > 0
		return ready
	}
	if d <= 0 {
		if err := rc.Control(func(fd uintptr) { check(fd) }); err != nil {
			return false, fmt.Errorf("wait for input: %w", err)
		}
		return ready, nil
	}
	dl, ok := port.(interface{ SetReadDeadline(time.Time) error })
	if !ok || dl.SetReadDeadline(time.Now().Add(d)) != nil {
		return false, fmt.Errorf("wait for input: %T has no read deadline", port)
	}
	defer dl.SetReadDeadline(time.Time{})
	// Read calls check until it reports true, waiting for the poller between calls.
	if err := rc.Read(check); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return false, fmt.Errorf("wait for input: %w", err)
	}
	return ready, nil
}
