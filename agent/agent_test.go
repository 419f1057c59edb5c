package agent

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testutil"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/relay"
)

type harness struct {
	a      *Agent
	c      *host.Client
	served chan error
}

// start runs an agent in-process on one end of a socket pair and a host client on the other.
func start(t *testing.T, features []string, cfg Config) *harness {
	t.Helper()
	agentEnd, hostEnd := testutil.SocketPair(t)
	cfg.Port = agentEnd
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	a := New(cfg)
	h := &harness{a: a, served: make(chan error, 1)}
	hsErr := make(chan error, 1)
	go func() {
		if err := a.Handshake(); err != nil {
			hsErr <- err
			agentEnd.Close()
			return
		}
		hsErr <- nil
		h.served <- a.Serve(context.Background())
		agentEnd.Close()
	}()
	c, err := host.Direct(hostEnd, host.Options{Features: features})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-hsErr; err != nil {
		t.Fatal(err)
	}
	h.c = c
	t.Cleanup(func() {
		c.Close()
		select {
		case <-h.served:
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop after the host closed the channel")
		}
	})
	return h
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

var flowModes = []struct {
	name     string
	features []string
}{{"flow", []string{protocol.FeatureFlow}}, {"stock-host", []string{}}}

func TestEcho(t *testing.T) {
	for _, mode := range flowModes {
		t.Run(mode.name, func(t *testing.T) {
			testutil.Leaks(t)
			srv := testutil.Serve(t, testutil.Echo)
			h := start(t, mode.features, Config{})
			conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
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
		})
	}
}

func TestConnectRefused(t *testing.T) {
	testutil.Leaks(t)
	h := start(t, nil, Config{})
	port := testutil.ClosedPort(t)
	_, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(port))
	var te *host.TCPError
	if !errors.As(err, &te) {
		t.Fatalf("want a core.tcp.failed, got %v", err)
	}
	want := fmt.Sprintf("connect 127.0.0.1:%d: Connection refused (os error 111)", port)
	if te.Msg != want {
		t.Fatalf("error %q, want %q", te.Msg, want)
	}
}

func TestConnectTimeout(t *testing.T) {
	h := start(t, nil, Config{Relay: relayOpts(func(o *relayOptions) {
		o.ConnectTimeout = 50 * time.Millisecond
		o.Dialer = hangingDialer{}
	})})
	_, err := h.c.DialTCP(ctx(t), "192.0.2.1", 80)
	var te *host.TCPError
	if !errors.As(err, &te) || te.Msg != "connect 192.0.2.1:80 timed out" {
		t.Fatalf("got %v", err)
	}
}

// TestDestinationHalfClose: the destination's FIN reaches the host as a non-terminal eof and
// the session stays open for host writes, which still reach the destination.
func TestDestinationHalfClose(t *testing.T) {
	testutil.Leaks(t)
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		c.Write([]byte("bye"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	h := start(t, nil, Config{})
	conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
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
}

// TestHostHalfClose: the host's eof becomes a write shutdown after all queued data; the
// destination can still answer.
func TestHostHalfClose(t *testing.T) {
	testutil.Leaks(t)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "got %d bytes", len(b))
	})
	h := start(t, nil, Config{})
	conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
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
}

// rawSession drives the agent with hand-built frames, to check exact replies.
type rawSession struct {
	t *testing.T
	c *host.Client
	s *host.Stream
}

func openRaw(t *testing.T, c *host.Client) *rawSession {
	s, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &rawSession{t, c, s}
}

func (r *rawSession) send(t protocol.Type, v any) {
	if err := r.c.SendMsg(r.s.ID, t, v); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawSession) recv() protocol.Message {
	m, err := r.s.Recv(ctx(r.t))
	if err != nil {
		r.t.Fatalf("recv on %d: %v", r.s.ID, err)
	}
	return m
}

// TestCloseSendsNothing: core.tcp.close aborts at once with no reply; the id is then unknown.
func TestCloseSendsNothing(t *testing.T) {
	testutil.Leaks(t)
	closed := make(chan struct{})
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c)
		close(closed)
		c.Close()
	})
	h := start(t, nil, Config{})
	r := openRaw(t, h.c)
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
}

func TestUnknownSession(t *testing.T) {
	h := start(t, nil, Config{})
	r := openRaw(t, h.c)
	r.send(protocol.TypeTCPEOF, protocol.Empty{})   // ignored
	r.send(protocol.TypeTCPClose, protocol.Empty{}) // ignored
	r.send(protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: 1})
	r.send(protocol.TypeTCPData, protocol.Data{Data: []byte("x")})
	m := r.recv()
	if m.Type != protocol.TypeTCPFailed || m.Flags != protocol.FlagTerminal {
		t.Fatalf("got %s flags %d", m.Name(), m.Flags)
	}
}

// TestManySessions runs 1,000 concurrent sessions, then checks that nothing leaks.
func TestManySessions(t *testing.T) {
	testutil.Leaks(t)
	srv := testutil.Serve(t, testutil.Echo)
	h := start(t, nil, Config{})
	const n = 1000
	var wg sync.WaitGroup
	errs := make(chan error, n)
	conns := make(chan *host.TCPConn, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
			if err != nil {
				errs <- err
				return
			}
			msg := []byte(fmt.Sprintf("session %d", i))
			conn.Write(msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil || !bytes.Equal(buf, msg) {
				errs <- fmt.Errorf("session %d: %q %v", i, buf, err)
			}
			conns <- conn
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := h.a.Sessions(); got != n {
		t.Fatalf("%d live sessions, want %d", got, n)
	}
	close(conns)
	for c := range conns {
		c.Close()
	}
	waitFor(t, func() bool { return h.a.Sessions() == 0 }, "sessions to end")
}

// waitFor polls a condition owned by another goroutine (no event exists for it), bounded.
func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestMalformedFrames sends every kind of bad frame; each gets the right core.error on its id
// (or, for a pre-generation-5 sender, nothing), and the agent keeps serving.
func TestMalformedFrames(t *testing.T) {
	srv := testutil.Serve(t, testutil.Echo)
	h := start(t, nil, Config{})
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
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, _ := h.c.Open()
			defer s.Close()
			frame, _ := protocol.AppendRawFrame(nil, s.ID, c.flags, c.body)
			if err := h.c.WriteFrame(frame); err != nil {
				t.Fatal(err)
			}
			// A probe on the same id: tcp.data for no session answers with tcp.failed, so
			// whatever arrives first tells whether the bad frame got a reply.
			h.c.SendMsg(s.ID, protocol.TypeTCPData, protocol.Data{Data: []byte("probe")})
			m, err := s.Recv(ctx(t))
			if err != nil {
				t.Fatal(err)
			}
			if c.kind == "" {
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
			if e.Kind != c.kind || e.OffendingType != c.offending || e.Message == "" {
				t.Fatalf("got %+v", e)
			}
			if c.kind == protocol.KindInvalidFlags && !strings.HasPrefix(e.Message, "invalid flags for ") {
				t.Fatalf("message %q", e.Message)
			}
		})
	}
	// Still serving.
	conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
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

// TestDesyncClosesChannel: a length prefix over the cap cannot be resynchronized; the agent
// closes the channel with an error instead of guessing.
func TestDesyncClosesChannel(t *testing.T) {
	h := start(t, nil, Config{})
	h.c.WriteFrame([]byte{0x00, 0x40, 0x00, 0x01, 0, 0, 0, 1, 0})
	select {
	case err := <-h.served:
		if !errors.Is(err, protocol.ErrFrameTooLarge) {
			t.Fatalf("served returned %v", err)
		}
		h.served <- err // for cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("agent kept reading after a desync")
	}
	<-h.c.Done()
}

func TestShutdown(t *testing.T) {
	h := start(t, nil, Config{})
	srv := testutil.Serve(t, testutil.Echo)
	conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	h.c.Shutdown()
	err = <-h.served
	if !errors.Is(err, ErrShutdown) {
		t.Fatalf("served returned %v", err)
	}
	h.served <- err
	if n := h.a.Sessions(); n != 0 {
		t.Fatalf("%d sessions left after shutdown", n)
	}
}

func TestHandshakeErrors(t *testing.T) {
	cases := []struct {
		name  string
		reply func(c net.Conn)
		want  string
	}{
		{"wrong first frame", func(c net.Conn) {
			f, _ := protocol.EncodeFrame(0, protocol.TypeClockSync, protocol.ClockSync{UnixTimeNanos: 1})
			c.Write(f)
		}, "got core.clock.sync"},
		{"ack not a map", func(c net.Conn) {
			f, _ := protocol.AppendMessage(nil, 0, protocol.TypeInitAck, []byte{0xf6})
			c.Write(f)
		}, "decode core.init.ack"},
		{"eof", func(c net.Conn) { c.Close() }, "EOF"},
		{"timeout", func(c net.Conn) {}, "no reply within"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			agentEnd, hostEnd := testutil.SocketPair(t)
			defer agentEnd.Close()
			defer hostEnd.Close()
			a := New(Config{Port: agentEnd, InitAckTimeout: 200 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
			go func() {
				protocol.NewFrameReader(hostEnd).Next() // init.resolved
				c.reply(hostEnd)
			}()
			err := a.Handshake()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
}

func TestClockDrift(t *testing.T) {
	ms := int64(time.Millisecond)
	cases := []struct {
		guest, host int64
		want        bool
	}{{0, 100 * ms, false}, {100 * ms, 0, false}, {0, 100*ms + 1, true}, {100*ms + 1, 0, true}, {5, 5, false}}
	for _, c := range cases {
		if got := ClockDriftExceeds(c.guest, c.host); got != c.want {
			t.Errorf("drift(%d,%d)=%v", c.guest, c.host, got)
		}
	}
}

type relayOptions = relay.Options

func relayOpts(f func(*relay.Options)) relay.Options {
	var o relay.Options
	f(&o)
	return o
}

// hangingDialer never connects: it models a destination that drops SYNs.
type hangingDialer struct{}

func (hangingDialer) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}
