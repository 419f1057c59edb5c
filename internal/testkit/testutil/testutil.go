// Package testutil holds helpers shared by agentd's tests: real socket pairs, real TCP
// servers, and leak checks for goroutines and file descriptors.
package testutil

import (
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// SocketPair returns the two ends of a connected unix stream socket pair.
func SocketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conv(fds[0]), conv(fds[1])
}

// Server is a real TCP server on loopback whose connections are handled by fn.
type Server struct {
	L    net.Listener
	Addr *net.TCPAddr
}

// Serve starts a TCP server on 127.0.0.1 and closes it when the test ends.
func Serve(t testing.TB, fn func(*net.TCPConn)) *Server { return ServeOn(t, "127.0.0.1", fn) }

// ServeOn is Serve on another local address.
func ServeOn(t testing.TB, ip string, fn func(*net.TCPConn)) *Server {
	t.Helper()
	return ServeAt(t, net.JoinHostPort(ip, "0"), fn)
}

// ServeAt is Serve on a given address and port.
func ServeAt(t testing.TB, addr string, fn func(*net.TCPConn)) *Server {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go fn(c.(*net.TCPConn))
		}
	}()
	return &Server{L: l, Addr: l.Addr().(*net.TCPAddr)}
}

// Echo copies everything back and half-closes after the peer does. It copies in user space:
// io.Copy between TCP sockets would splice through pooled pipes that only a GC finalizer
// closes, which leak checks would (rightly) count.
func Echo(c *net.TCPConn) {
	defer c.Close()
	io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c})
	c.CloseWrite()
}

// UDPEcho starts a UDP server on ip that answers each datagram with prefix followed by the
// datagram, and closes it when the test ends.
func UDPEcho(t testing.TB, ip net.IP, prefix string) *net.UDPAddr {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte(prefix), buf[:n]...), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr)
}

// ClosedPort returns a loopback port with nothing listening.
func ClosedPort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return p
}

// OpenFDs counts this process's open file descriptors.
func OpenFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Leaks records the goroutines and fds at the start of a test and, at the end, waits (polling
// runtime state, bounded) for both to come back to that baseline, failing with a goroutine
// dump if they do not.
func Leaks(t testing.TB) {
	t.Helper()
	if l, err := net.Listen("tcp", "127.0.0.1:0"); err == nil { // the netpoller's own fds open lazily
		l.Close()
	}
	g0, f0 := runtime.NumGoroutine(), OpenFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			g, f := runtime.NumGoroutine(), OpenFDs(t)
			if g <= g0 && f <= f0 {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				t.Errorf("leak: goroutines %d -> %d, fds %d -> %d (%s)\n%s", g0, g, f0, f, fdList(), filterStacks(string(buf[:n])))
				return
			}
			runtime.Gosched()
			time.Sleep(10 * time.Millisecond) // polling runtime counters: there is no event to await
		}
	})
}

func fdList() string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+"->"+l)
	}
	return strings.Join(out, " ")
}

func filterStacks(s string) string {
	var keep []string
	for _, g := range strings.Split(s, "\n\n") {
		if strings.Contains(g, "testing.tRunner") || strings.Contains(g, "testutil.Leaks") {
			continue
		}
		keep = append(keep, g)
	}
	return strings.Join(keep, "\n\n")
}

// RSS returns the resident set size of a process in bytes (from /proc/PID/status).
func RSS(t testing.TB, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, err := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// Percentile returns the p-th percentile (0-100) of sorted durations.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}

// WaitFor polls a condition owned by other goroutines or processes, for which no event exists,
// until it holds (bounded: it fails the test after 10 s).
func WaitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
