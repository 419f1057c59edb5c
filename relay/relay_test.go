package relay

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// harness runs sessions on a sessionio writer whose channel end the test reads frame by frame.
type harness struct {
	t    *testing.T
	out  *sessionio.Writer
	fr   *protocol.FrameReader
	ends chan *Session
}

func newHarness(t *testing.T) *harness {
	a, b := testutil.SocketPair(t)
	w := sessionio.NewWriter(a, sessionio.WriterOptions{})
	t.Cleanup(func() { w.Close(); a.Close(); b.Close() })
	return &harness{t: t, out: w, fr: protocol.NewFrameReader(b), ends: make(chan *Session, 16)}
}

func (h *harness) start(id uint32, req protocol.TCPConnect, opts Options) *Session {
	s := New(id, req, protocol.Version, h.out, opts, quiet, func(s *Session) { h.ends <- s })
	s.Go()
	return s
}

func (h *harness) next() protocol.Message {
	h.t.Helper()
	f, err := h.fr.Next()
	if err != nil {
		h.t.Fatal(err)
	}
	m, err := protocol.DecodeMessage(f)
	if err != nil {
		h.t.Fatal(err)
	}
	m.Payload = append([]byte(nil), m.Payload...)
	return m
}

func TestConnectFailureIsTerminal(t *testing.T) {
	testutil.Leaks(t)
	h := newHarness(t)
	s := h.start(7, protocol.TCPConnect{Host: "127.0.0.1", Port: 0}, Options{})
	m := h.next()
	var f protocol.TCPFailed
	protocol.Unmarshal(m.Payload, &f)
	if m.Type != protocol.TypeTCPFailed || m.Flags != protocol.FlagTerminal || m.ID != 7 || !strings.Contains(f.Error, "connect 127.0.0.1:0") {
		t.Fatalf("got %s flags %d id %d %q", m.Name(), m.Flags, m.ID, f.Error)
	}
	<-h.ends
	<-s.Finished()
}

func TestAbortFinishesSession(t *testing.T) {
	testutil.Leaks(t)
	srv := testutil.Serve(t, testutil.Echo)
	h := newHarness(t)
	s := h.start(1, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)}, Options{})
	if m := h.next(); m.Type != protocol.TypeTCPConnected {
		t.Fatalf("got %s", m.Name())
	}
	s.Abort()
	select {
	case <-s.Finished():
	case <-time.After(time.Second):
		t.Fatal("session still running 1 s after abort")
	}
	if s.Write([]byte("x")) == nil {
		t.Fatal("write to an aborted session succeeded")
	}
}

func TestDestinationEOFKeepsSessionOpen(t *testing.T) {
	testutil.Leaks(t)
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
		c.Close()
	})
	h := newHarness(t)
	s := h.start(3, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)}, Options{})
	h.next() // connected
	if m := h.next(); m.Type != protocol.TypeTCPEOF || m.Flags != 0 {
		t.Fatalf("got %s flags %d", m.Name(), m.Flags)
	}
	s.Write([]byte("late data"))
	s.CloseWrite()
	if g := <-got; g != "late data" {
		t.Fatalf("destination got %q", g)
	}
	s.Abort()
	<-s.Finished()
}

// TestCreditBoundsOutput: with flow control a session sends exactly its credit, then waits
// for more, however much the destination has to say.
func TestCreditBoundsOutput(t *testing.T) {
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		c.Write(make([]byte, 1<<20))
		c.Close()
	})
	h := newHarness(t)
	s := h.start(5, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port), Window: 100_000}, Options{})
	m := h.next()
	var conn protocol.TCPConnected
	protocol.Unmarshal(m.Payload, &conn)
	if m.Type != protocol.TypeTCPConnected || conn.Window != uint32(DefaultOptions.InboundLimit) {
		t.Fatalf("got %s window %d", m.Name(), conn.Window)
	}
	received := 0
	for received < 100_000 {
		m := h.next()
		d, _ := protocol.DecodeData(m.Payload)
		received += len(d)
	}
	if received != 100_000 {
		t.Fatalf("sent %d bytes on a credit of 100000", received)
	}
	// Nothing more until credit arrives: grant some and the next frame is exactly that size.
	s.Credit(1234)
	m = h.next()
	if d, _ := protocol.DecodeData(m.Payload); m.Type != protocol.TypeTCPData || len(d) != 1234 {
		t.Fatalf("after a 1234-byte grant got %s of %d bytes", m.Name(), len(d))
	}
	s.Abort()
	<-s.Finished()
}

// TestInboundGrantsCredit: host data written to the destination is granted back as credit.
func TestInboundGrantsCredit(t *testing.T) {
	srv := testutil.Serve(t, func(c *net.TCPConn) { io.Copy(io.Discard, struct{ io.Reader }{c}); c.Close() })
	h := newHarness(t)
	s := h.start(9, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port), Window: 1}, Options{InboundLimit: 256 << 10})
	h.next() // connected
	s.Write(make([]byte, 256<<10))
	granted := 0
	for granted < 256<<10 {
		m := h.next()
		if m.Type != protocol.TypeFlowCredit {
			continue
		}
		var c protocol.FlowCredit
		protocol.Unmarshal(m.Payload, &c)
		granted += int(c.Bytes)
	}
	if granted != 256<<10 {
		t.Fatalf("granted %d for %d bytes written", granted, 256<<10)
	}
	s.Abort()
	<-s.Finished()
}

// TestDataAfterHostEOF: host data after the host's own EOF ends the session with one terminal
// tcp.failed, the reference's EPIPE text, after the data before the EOF was delivered (issue
// 16, item 9).
func TestDataAfterHostEOF(t *testing.T) {
	testutil.Leaks(t)
	got := make(chan string, 1)
	release := make(chan struct{})
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c)
		got <- string(b)
		<-release // no FIN from this side: the failure is the session's only frame
		c.Close()
	})
	defer close(release)
	h := newHarness(t)
	s := h.start(4, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)}, Options{})
	h.next() // connected
	s.Write([]byte("before"))
	s.CloseWrite()
	s.Write(nil) // nothing to write: no failure
	s.Write([]byte("after"))
	m := h.next()
	var f protocol.TCPFailed
	protocol.Unmarshal(m.Payload, &f)
	if m.Type != protocol.TypeTCPFailed || m.Flags != protocol.FlagTerminal || f.Error != "write TCP stream: Broken pipe (os error 32)" {
		t.Fatalf("got %s %q", m.Name(), f.Error)
	}
	if g := <-got; g != "before" {
		t.Fatalf("destination got %q", g)
	}
	<-h.ends
	<-s.Finished()
}

// TestConnectErrorTexts: connect failures read as the reference's (getaddrinfo's text for a
// name that does not resolve, which "" and "[::1]" are to it).
func TestConnectErrorTexts(t *testing.T) {
	h := newHarness(t)
	port := testutil.ClosedPort(t)
	cases := []struct {
		host string
		want string
	}{
		{"", "connect :%d: failed to lookup address information: Name or service not known"},
		{"[::1]", "connect [::1]:%d: failed to lookup address information: Name or service not known"},
		{"bad name", "connect bad name:%d: failed to lookup address information: Name or service not known"},
		{"127.0.0.1", "connect 127.0.0.1:%d: Connection refused (os error 111)"},
		{"::1", "connect ::1:%d: Connection refused (os error 111)"},
	}
	for i, c := range cases {
		s := h.start(uint32(10+i), protocol.TCPConnect{Host: c.host, Port: uint16(port)}, Options{})
		m := h.next()
		var f protocol.TCPFailed
		protocol.Unmarshal(m.Payload, &f)
		if want := fmt.Sprintf(c.want, port); m.Type != protocol.TypeTCPFailed || f.Error != want {
			t.Errorf("host %q: %s %q, want %q", c.host, m.Name(), f.Error, want)
		}
		<-h.ends
		<-s.Finished()
	}
	for _, c := range []struct {
		err  *net.DNSError
		want string
	}{
		{&net.DNSError{Err: "no such host", IsNotFound: true}, "failed to lookup address information: Name or service not known"},
		{&net.DNSError{Err: "i/o timeout", IsTimeout: true}, "failed to lookup address information: Temporary failure in name resolution"},
		{&net.DNSError{Err: "server misbehaving", IsTemporary: true}, "failed to lookup address information: Temporary failure in name resolution"},
	} {
		if got := dialText(&net.OpError{Op: "dial", Err: c.err}); got != c.want {
			t.Errorf("%v: %q, want %q", c.err, got, c.want)
		}
	}
}

func TestInetAton(t *testing.T) {
	for in, want := range map[string]string{"127.1": "127.0.0.1", "0x7f000001": "127.0.0.1", "2130706433": "127.0.0.1",
		"017700000001": "127.0.0.1", "10.1.2": "10.1.0.2", "1.2.3.4": "1.2.3.4", "0": "0.0.0.0"} {
		if a, ok := inetAton(in); !ok || a.String() != want {
			t.Errorf("%q: %v %v, want %s", in, a, ok, want)
		}
	}
	for _, in := range []string{"", "1.2.3.4.5", "256.1", "1.256.1.1", "0x", "a", "1..2", "+1", "1_0", "0o17", "0b1", "localhost", "::1", "4294967296"} {
		if a, ok := inetAton(in); ok {
			t.Errorf("%q parsed as %v", in, a)
		}
	}
}
