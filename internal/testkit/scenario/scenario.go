// Package scenario holds the core.tcp behaviour tests that run against every way of hosting the
// agent: in-process (agent package tests, with goroutine leak checks) and the real agentd
// binary (e2e tests, with fd leak checks of the process).
package scenario

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// Agent is one agent under test.
type Agent struct {
	Client *host.Client
	// Sessions reports the agent's live TCP sessions, where the back-end can see them (-1 if
	// not); Idle waits until the agent holds no session resources any more.
	Sessions func() int
	Idle     func(t *testing.T)
}

// Start makes a fresh agent with a client that requested the given features.
type Start func(t *testing.T, features []string) Agent

// Run runs every scenario against agents made by start.
func Run(t *testing.T, start Start) {
	t.Run("Echo", func(t *testing.T) { Echo(t, start) })
	t.Run("ConnectRefused", func(t *testing.T) { ConnectRefused(t, start(t, nil)) })
	t.Run("DestinationHalfClose", func(t *testing.T) { DestinationHalfClose(t, start(t, nil)) })
	t.Run("HostHalfClose", func(t *testing.T) { HostHalfClose(t, start(t, nil)) })
	t.Run("CloseSendsNothing", func(t *testing.T) { CloseSendsNothing(t, start(t, nil)) })
	t.Run("CloseDrains", func(t *testing.T) { CloseDrains(t, start(t, nil)) })
	t.Run("CloseResets", func(t *testing.T) { CloseResets(t, start(t, nil)) })
	t.Run("UnknownSession", func(t *testing.T) { UnknownSession(t, start(t, nil)) })
	t.Run("ManySessions", func(t *testing.T) { ManySessions(t, start(t, nil), 1000) })
	t.Run("MalformedFrames", func(t *testing.T) { MalformedFrames(t, start(t, nil)) })
	t.Run("DataAfterHostEOF", func(t *testing.T) { DataAfterHostEOF(t, start(t, nil)) })
	t.Run("NullData", func(t *testing.T) { NullData(t, start(t, nil)) })
	t.Run("ConnectErrors", func(t *testing.T) { ConnectErrors(t, start(t, nil)) })
}

// Ctx is a test-bounded context.
func Ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

// Echo relays a multi-chunk message through an echo server, with and without flow control.
func Echo(t *testing.T, start Start) {
	for _, features := range [][]string{{protocol.FeatureFlow}, {}} {
		t.Run(fmt.Sprintf("features=%v", features), func(t *testing.T) {
			srv := testutil.Serve(t, testutil.Echo)
			a := start(t, features)
			conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
			if err != nil {
				t.Fatal(err)
			}
			msg := bytes.Repeat([]byte("agentd "), 100000) // several chunks and credits
			go func() { conn.Write(msg); conn.CloseWrite() }()
			got, err := io.ReadAll(conn)
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("echo: %d bytes, err %v", len(got), err)
			}
			conn.Close()
			a.Idle(t)
		})
	}
}

// ConnectRefused: a refused connect is one terminal core.tcp.failed with the reference's text.
func ConnectRefused(t *testing.T, a Agent) {
	port := testutil.ClosedPort(t)
	_, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(port))
	var te *host.TCPError
	if !errors.As(err, &te) {
		t.Fatalf("want a core.tcp.failed, got %v", err)
	}
	if want := fmt.Sprintf("connect 127.0.0.1:%d: Connection refused (os error 111)", port); te.Msg != want {
		t.Fatalf("error %q, want %q", te.Msg, want)
	}
	a.Idle(t)
}

// DestinationHalfClose: the destination's FIN reaches the host as a non-terminal eof and the
// session stays open for host writes, which still reach the destination.
func DestinationHalfClose(t *testing.T, a Agent) {
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		c.Write([]byte("bye"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(conn)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q %v", b, err)
	}
	if _, err := conn.Write([]byte("after your eof")); err != nil {
		t.Fatal(err)
	}
	conn.CloseWrite()
	if s := <-got; s != "after your eof" {
		t.Fatalf("destination got %q", s)
	}
	conn.Close()
	a.Idle(t)
}

// HostHalfClose: the host's eof becomes a write shutdown after all queued data; the
// destination can still answer.
func HostHalfClose(t *testing.T, a Agent) {
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "got %d bytes", len(b))
	})
	conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	conn.Write(make([]byte, 3<<20))
	conn.CloseWrite()
	b, err := io.ReadAll(conn)
	if err != nil || string(b) != fmt.Sprintf("got %d bytes", 3<<20) {
		t.Fatalf("read %q %v", b, err)
	}
	conn.Close()
	a.Idle(t)
}

// raw drives the agent with hand-built frames on one id, to check exact replies.
type raw struct {
	t *testing.T
	c *host.Client
	s *host.Session
}

func openRaw(t *testing.T, c *host.Client) *raw {
	s, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &raw{t, c, s}
}

func (r *raw) send(typ protocol.Type, v any) {
	if err := r.c.SendMsg(r.s.ID, typ, v); err != nil {
		r.t.Fatal(err)
	}
}

func (r *raw) recv() protocol.Message {
	m, err := r.s.Recv(Ctx(r.t))
	if err != nil {
		r.t.Fatalf("recv on %d: %v", r.s.ID, err)
	}
	return m
}

// CloseSendsNothing: core.tcp.close aborts at once with no reply; the id is then unknown.
func CloseSendsNothing(t *testing.T, a Agent) {
	closed := make(chan struct{})
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, struct{ io.Reader }{c})
		close(closed)
		c.Close()
	})
	r := openRaw(t, a.Client)
	r.send(protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)})
	if m := r.recv(); m.Type != protocol.TypeTCPConnected || !bytes.Equal(m.Payload, []byte{0xa0}) {
		t.Fatalf("got %s %x", m.Name(), m.Payload)
	}
	r.send(protocol.TypeTCPClose, protocol.Empty{})
	<-closed // the destination saw the socket close
	// The next frame on this id answers a probe: nothing was sent for the close.
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("x")})
	m := r.recv()
	var f protocol.TCPFailed
	protocol.Unmarshal(m.Payload, &f)
	if m.Type != protocol.TypeTCPFailed || f.Error != fmt.Sprintf("unknown TCP session: %d", r.s.ID) {
		t.Fatalf("got %s %+v", m.Name(), f)
	}
	a.Idle(t)
}

// current reports whether the client's sessions run with the behaviour of hosts after 0.5.7
// (contract section 10), rather than the reference's.
func current(a Agent) bool { return a.Client.Generation() > protocol.ReferenceGeneration }

// CloseDrains: a core.tcp.close after the host's orderly end (its data written, the write
// side shut down) stops the stream toward the host but drains the destination, which can
// still write its whole answer and sees an orderly close, not a reset (contract 10.4). A 0.5.7
// host's close ends the session at once, as the reference's: the answer is cut off.
func CloseDrains(t *testing.T, a Agent) {
	gotEOF, wrote := make(chan int, 1), make(chan error, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		n, _ := io.Copy(io.Discard, c) // the host's data, then its FIN
		gotEOF <- int(n)
		_, err := c.Write(make([]byte, 32<<20)) // far more than the kernel buffers unread
		wrote <- err
	})
	conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	conn.Write(make([]byte, 100<<10))
	conn.CloseWrite()
	if n := <-gotEOF; n != 100<<10 {
		t.Fatalf("destination got %d bytes before the FIN", n)
	}
	conn.Read(make([]byte, 1000)) // the answer is under way
	conn.Close()
	err = <-wrote
	if current(a) && err != nil {
		t.Fatalf("the destination's answer after the close: %v (want it drained, not reset)", err)
	}
	if !current(a) && err == nil {
		t.Fatal("a 0.5.7 host's close drained the destination (the reference closes at once)")
	}
	a.Idle(t)
}

// CloseResets: a core.tcp.close before the host's end resets the destination, so it cannot
// take the truncated stream for a whole one (contract 10.4). A 0.5.7 host's close is a plain
// close, as the reference's: the destination sees an orderly end.
func CloseResets(t *testing.T, a Agent) {
	got := make(chan error, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		_, err := io.Copy(io.Discard, c)
		got <- err
	})
	conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("half a request"))
	conn.Close()
	err = <-got
	if current(a) && (err == nil || !strings.Contains(err.Error(), "connection reset")) {
		t.Fatalf("destination after a close without the host's end: %v, want a reset", err)
	}
	if !current(a) && err != nil {
		t.Fatalf("destination after a 0.5.7 host's close: %v, want an orderly end", err)
	}
	a.Idle(t)
}

// UnknownSession: eof, close and credit for an unknown id are ignored; data gets failed.
func UnknownSession(t *testing.T, a Agent) {
	r := openRaw(t, a.Client)
	r.send(protocol.TypeTCPEOF, protocol.Empty{})
	r.send(protocol.TypeTCPClose, protocol.Empty{})
	r.send(protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: 1})
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("x")})
	m := r.recv()
	if m.Type != protocol.TypeTCPFailed || m.Flags != protocol.FlagTerminal {
		t.Fatalf("got %s flags %d", m.Name(), m.Flags)
	}
}

// ManySessions runs n concurrent sessions, then checks that all of them end.
func ManySessions(t *testing.T, a Agent, n int) {
	srv := testutil.Serve(t, testutil.Echo)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	conns := make(chan *host.TCPConn, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := a.Client.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
			if err != nil {
				errs <- err
				return
			}
			conns <- conn
			msg := []byte(fmt.Sprintf("session %d", i))
			conn.Write(msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil || !bytes.Equal(buf, msg) {
				errs <- fmt.Errorf("session %d: %q %v", i, buf, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	close(conns)
	for err := range errs {
		t.Fatal(err)
	}
	if a.Sessions != nil {
		if got := a.Sessions(); got >= 0 && got != n {
			t.Fatalf("%d live sessions, want %d", got, n)
		}
	}
	for c := range conns {
		c.Close()
	}
	a.Idle(t)
}

// MalformedFrames sends every kind of bad frame; each gets the right core.error on its id (or,
// for a pre-generation-5 sender, nothing), and the agent keeps serving.
func MalformedFrames(t *testing.T, a Agent) {
	srv := testutil.Serve(t, testutil.Echo)
	c := a.Client
	env := func(v uint8, typ string, p string) []byte {
		b := []byte{0xa3, 0x61, 'v', v, 0x61, 't', 0x60 + byte(len(typ))}
		b = append(b, typ...)
		pb, _ := hex.DecodeString(p)
		b = append(b, 0x61, 'p', 0x40+byte(len(pb)))
		return append(b, pb...)
	}
	cases := []struct {
		name      string
		flags     byte
		body      []byte
		kind      string // "" = no reply expected
		offending string
	}{
		{"not cbor", 0, []byte{0xff, 0x00}, protocol.KindMalformedMessage, ""},
		{"empty body", 0, nil, protocol.KindMalformedMessage, ""},
		{"not a map", 0, []byte{0x83, 1, 2, 3}, protocol.KindMalformedMessage, ""},
		{"unknown type", 0, env(5, "core.bogus", "a0"), protocol.KindUnsupportedMessageType, "core.bogus"},
		{"bad flags", 0x80, env(5, "core.tcp.eof", "a0"), protocol.KindInvalidFlags, "core.tcp.eof"},
		{"session start missing", 0, env(5, "core.tcp.connect", "a0"), protocol.KindInvalidFlags, "core.tcp.connect"},
		{"payload not a map", 2, env(5, "core.tcp.connect", "05"), protocol.KindInvalidPayload, "core.tcp.connect"},
		{"missing field", 2, env(5, "core.tcp.connect", "a164706f72741850"), protocol.KindInvalidPayload, "core.tcp.connect"},
		{"bad data", 0, env(5, "core.tcp.data", "a164646174610a"), protocol.KindInvalidPayload, "core.tcp.data"},
		{"bad exec request", 2, env(5, "core.exec.request", "a0"), protocol.KindInvalidPayload, "core.exec.request"},
		{"bad fs request", 2, env(5, "core.fs.request", "a1626f70a163466f6fa0"), protocol.KindInvalidPayload, "core.fs.request"},
		{"bad clock sync", 0, env(5, "core.clock.sync", "a0"), protocol.KindInvalidPayload, "core.clock.sync"},
		{"pre-gen5 bad flags: dropped", 0x80, env(4, "core.tcp.eof", "a0"), "", ""},
	}
	for _, cs := range cases {
		t.Run(cs.name, func(t *testing.T) {
			s, _ := c.Open()
			defer s.Close()
			frame, _ := protocol.AppendRawFrame(nil, s.ID, cs.flags, cs.body)
			if err := c.WriteFrame(frame); err != nil {
				t.Fatal(err)
			}
			// A probe on the same id: tcp.data for no session answers with tcp.failed, so
			// whatever arrives first tells whether the bad frame got a reply.
			c.SendMsg(s.ID, protocol.TypeTCPData, protocol.Data{Data: []byte("probe")})
			m, err := s.Recv(Ctx(t))
			if err != nil {
				t.Fatal(err)
			}
			if cs.kind == "" {
				if m.Type != protocol.TypeTCPFailed {
					t.Fatalf("expected no reply, got %s", m.Name())
				}
				return
			}
			if m.Type != protocol.TypeError || m.Flags != protocol.FlagTerminal {
				t.Fatalf("got %s flags %d", m.Name(), m.Flags)
			}
			var e protocol.CoreError
			if err := protocol.Unmarshal(m.Payload, &e); err != nil {
				t.Fatal(err)
			}
			if e.Kind != cs.kind || e.OffendingType != cs.offending || e.Message == "" {
				t.Fatalf("got %+v", e)
			}
			if cs.kind == protocol.KindInvalidFlags && !strings.HasPrefix(e.Message, "invalid flags for ") {
				t.Fatalf("message %q", e.Message)
			}
		})
	}
	// Still serving.
	conn, err := c.DialTCP(Ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("alive"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "alive" {
		t.Fatalf("agent not responsive after bad frames: %q %v", buf, err)
	}
	conn.Close()
}

// DataAfterHostEOF: tcp.data after the host's own tcp.eof is a write to a socket whose write
// half is shut down: the session ends with the reference's one terminal tcp.failed (issue 16,
// item 9), and the id is then unknown.
func DataAfterHostEOF(t *testing.T, a Agent) {
	release := make(chan struct{})
	defer close(release)
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
		<-release
	})
	r := openRaw(t, a.Client)
	r.send(protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)})
	if m := r.recv(); m.Type != protocol.TypeTCPConnected {
		t.Fatalf("got %s", m.Name())
	}
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("before")})
	r.send(protocol.TypeTCPEOF, protocol.Empty{})
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte{}}) // empty: nothing to write, no error
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("after")})
	m := r.recv()
	var f protocol.TCPFailed
	protocol.Unmarshal(m.Payload, &f)
	if m.Type != protocol.TypeTCPFailed || m.Flags != protocol.FlagTerminal || f.Error != "write TCP stream: Broken pipe (os error 32)" {
		t.Fatalf("got %s %+v", m.Name(), f)
	}
	if s := <-got; s != "before" {
		t.Fatalf("destination got %q", s)
	}
	s2, err := a.Client.OpenID(r.s.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("x")})
	if m, err := s2.Recv(Ctx(t)); err != nil || m.Type != protocol.TypeTCPFailed {
		t.Fatalf("after the failure: %s %v", m.Name(), err)
	} else if protocol.Unmarshal(m.Payload, &f); f.Error != fmt.Sprintf("unknown TCP session: %d", r.s.ID) {
		t.Fatalf("after the failure: %+v", f)
	}
	a.Idle(t)
}

// NullData: a null tcp.data is core.error invalid_payload on the session's id, and the data
// around it still reaches the destination (issue 16, item 3).
func NullData(t *testing.T, a Agent) {
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	r := openRaw(t, a.Client)
	r.send(protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port)})
	if m := r.recv(); m.Type != protocol.TypeTCPConnected {
		t.Fatalf("got %s", m.Name())
	}
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("a")})
	if err := a.Client.Send(r.s.ID, protocol.TypeTCPData, []byte{0xa1, 0x64, 'd', 'a', 't', 'a', 0xf6}); err != nil {
		t.Fatal(err)
	}
	expectInvalidPayload(t, r.s, protocol.TypeTCPData)
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("b")})
	r.send(protocol.TypeTCPEOF, protocol.Empty{})
	if s := <-got; s != "ab" {
		t.Fatalf("destination got %q", s)
	}
	r.send(protocol.TypeTCPClose, protocol.Empty{})
	a.Idle(t)
}

// ConnectErrors: names that do not resolve get getaddrinfo's text, as from the reference; a
// bracketed IPv6 literal is not an address to it either (item 8).
func ConnectErrors(t *testing.T, a Agent) {
	for _, name := range []string{"no such host", "[::1]", ""} {
		_, err := a.Client.DialTCP(Ctx(t), name, 9)
		var te *host.TCPError
		want := fmt.Sprintf("connect %s:9: failed to lookup address information: Name or service not known", name)
		if !errors.As(err, &te) || te.Msg != want {
			t.Fatalf("host %q: %v, want %q", name, err, want)
		}
	}
	port := testutil.ClosedPort(t)
	_, err := a.Client.DialTCP(Ctx(t), "::1", uint16(port))
	var te *host.TCPError
	if want := fmt.Sprintf("connect ::1:%d: Connection refused (os error 111)", port); !errors.As(err, &te) || te.Msg != want {
		t.Fatalf("::1: %v, want %q", err, want)
	}
	a.Idle(t)
}
