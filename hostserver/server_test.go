package hostserver_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/hostserver"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// startRelay runs an in-process agent behind a relay and returns the relay's socket path.
func startRelay(t *testing.T) (string, *agent.Agent) {
	t.Helper()
	agentEnd, hostEnd := testutil.SocketPair(t)
	a := agent.New(agent.Config{Port: agentEnd, Log: quiet})
	served := make(chan struct{})
	go func() {
		defer close(served)
		if a.Handshake() == nil {
			a.Serve(context.Background())
		}
		agentEnd.Close()
	}()
	r, err := hostserver.New(hostEnd, hostserver.Options{Log: quiet, ClockSyncEvery: -1})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "relay.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go r.Serve(l)
	t.Cleanup(func() {
		r.Close()
		<-served
	})
	return sock, a
}

func TestRelayClientRanges(t *testing.T) {
	sock, _ := startRelay(t)
	for slot := 0; slot < 3; slot++ {
		c, err := host.Connect(sock, host.Options{Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start, end := c.IDRange()
		ws, we := protocol.RelaySlotRange(slot)
		if start != ws || end != we {
			t.Fatalf("client %d got [%d,%d), want [%d,%d)", slot, start, end, ws, we)
		}
		if c.Ready.AgentVersion != protocol.AgentVersion || !c.HasFeature(protocol.FeatureFlow) {
			t.Fatalf("ready %+v", c.Ready)
		}
	}
}

// TestRelaySlotsRotate: a slot a client just left is not the next one handed out (the agent
// may still send frames for the old client's sessions, which a new client there would take
// for answers to its own first ids); slots go round in turn.
func TestRelaySlotsRotate(t *testing.T) {
	agentEnd, hostEnd := testutil.SocketPair(t)
	a := agent.New(agent.Config{Port: agentEnd, Log: quiet})
	go func() {
		if a.Handshake() == nil {
			a.Serve(context.Background())
		}
		agentEnd.Close()
	}()
	logs := &testutil.Buffer{}
	r, err := hostserver.New(hostEnd, hostserver.Options{Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), ClockSyncEvery: -1})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "relay.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go r.Serve(l)
	defer r.Close()
	for i := 0; i < 3; i++ {
		c, err := host.Connect(sock, host.Options{Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		start, _ := c.IDRange()
		if want, _ := protocol.RelaySlotRange(i); start != want {
			t.Fatalf("client %d (each after the last left) got id range from %d, want slot %d's %d", i, start, i, want)
		}
		c.Close()
		// The relay has freed the slot once it says so.
		for n := strings.Count(logs.String(), "client disconnected"); n < i+1; n = strings.Count(logs.String(), "client disconnected") {
			time.Sleep(time.Millisecond) // the log is the only sign of the relay's bookkeeping
		}
	}
}

// TestRelayHandshakeBytes checks microsandbox's client greeting byte for byte.
func TestRelayHandshakeBytes(t *testing.T) {
	sock, _ := startRelay(t)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var hdr [8]byte
	io.ReadFull(conn, hdr[:])
	if binary.BigEndian.Uint32(hdr[:]) != 1 || binary.BigEndian.Uint32(hdr[4:]) != protocol.RelayIDRangeStep {
		t.Fatalf("greeting %x", hdr)
	}
	f, err := protocol.NewFrameReader(conn).Next()
	if err != nil {
		t.Fatal(err)
	}
	m, _ := protocol.DecodeMessage(f)
	if m.Type != protocol.TypeReady || m.ID != 0 || m.V != protocol.Version {
		t.Fatalf("got %s id %d v %d", m.Name(), m.ID, m.V)
	}
}

// TestRelayClientDisconnect: when a client leaves, the agent closes exactly the sessions in
// that client's range; another client's sessions keep working.
func TestRelayClientDisconnect(t *testing.T) {
	closed := make(chan string, 10)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		var name [1]byte
		if _, err := io.ReadFull(c, name[:]); err != nil {
			return
		}
		c.Write(name[:])
		io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c}) // until the agent closes it
		closed <- string(name[:])
	})
	sock, a := startRelay(t)
	ca, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	cb, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	open := func(c *host.Client, name string) *host.TCPConn {
		conn, err := c.DialTCP(ctx, "127.0.0.1", uint16(srv.Addr.Port))
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte(name))
		var b [1]byte
		if _, err := io.ReadFull(conn, b[:]); err != nil || string(b[:]) != name {
			t.Fatalf("session %s: %q %v", name, b, err)
		}
		return conn
	}
	open(ca, "a")
	open(ca, "A")
	kept := open(cb, "b")
	if _, err := ca.Fs(ctx, &protocol.FsOpenFile{Path: "/dev/null", Options: protocol.FsOpenOptions{Read: true}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Exec(ctx, protocol.ExecRequest{Cmd: "sleep", Args: []string{"60"}}); err != nil {
		t.Fatal(err)
	}
	if a.Stats().FsHandles+a.Stats().FsStreams != 1 || a.Stats().ExecSessions != 1 {
		t.Fatalf("before: %d handles, %d exec sessions", a.Stats().FsHandles+a.Stats().FsStreams, a.Stats().ExecSessions)
	}
	ca.Close() // the relay SIGKILLs A's exec sessions, then sends core.relay.client.disconnected
	got := map[string]bool{<-closed: true, <-closed: true}
	if !got["a"] || !got["A"] {
		t.Fatalf("closed %v, want a and A", got)
	}
	kept.Write([]byte("still here"))
	buf := make([]byte, 10)
	if _, err := io.ReadFull(kept, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("b after a left: %q %v", buf, err)
	}
	if n := a.Stats().TCPSessions; n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	testutil.WaitFor(t, func() bool { return a.Stats().FsHandles+a.Stats().FsStreams == 0 && a.Stats().ExecSessions == 0 }, "A's handles and exec sessions to close")
	select {
	case name := <-closed:
		t.Fatalf("session %s closed too", name)
	default:
	}
	kept.Close()
}

// TestRelayRejectsForeignIDs: a client that uses an id outside its range is disconnected.
func TestRelayRejectsForeignIDs(t *testing.T) {
	sock, _ := startRelay(t)
	c, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, end := c.IDRange()
	c.SendMsg(end, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: 1})
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("relay kept a client that used a foreign id")
	}
}

// TestStockClientThroughRelay: a client that does not use flow control (a microsandbox SDK)
// works through a relay that negotiated it.
func TestStockClientThroughRelay(t *testing.T) {
	srv := testutil.Serve(t, testutil.Echo)
	sock, _ := startRelay(t)
	c, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Ready.Features = nil // behave as a stock client: no window in connect
	conn, err := c.DialTCP(context.Background(), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte{1, 2, 3}, 1<<20)
	go func() { conn.Write(msg); conn.CloseWrite() }()
	got, err := io.ReadAll(conn)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("%d bytes %v", len(got), err)
	}
	conn.Close()
}

// TestRelayRejectsReusedIDs: correlation ids are single-use behind the relay: once a session's
// terminal frame reached the client, another frame on that id is not forwarded to the agent
// and the client gets core.error invalid_session for it; other ids go on working.
func TestRelayRejectsReusedIDs(t *testing.T) {
	sock, _ := startRelay(t)
	c, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start, _ := c.IDRange()
	ping := func(id uint32) protocol.Message {
		t.Helper()
		s, err := c.OpenID(id)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if err := c.SendMsg(id, protocol.TypePing, protocol.Empty{}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		m, err := s.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := ping(start + 5); m.Type != protocol.TypePong {
		t.Fatalf("first ping: %s", m.Name())
	}
	m := ping(start + 5)
	var e protocol.CoreError
	protocol.Unmarshal(m.Payload, &e)
	if m.Type != protocol.TypeError || e.Kind != protocol.KindInvalidSession || e.OffendingType != "core.ping" {
		t.Fatalf("reused id: %s %+v", m.Name(), e)
	}
	if m := ping(start + 6); m.Type != protocol.TypePong {
		t.Fatalf("a fresh id after the rejection: %s", m.Name())
	}
	if err := c.Ping(context.Background()); err != nil { // the client's own allocator never reuses
		t.Fatal(err)
	}
}

// TestRelayBulk: bulk TCP through the relay: raw records are routed by id both ways, never
// decoded, and a stream moves its bytes exactly.
func TestRelayBulk(t *testing.T) {
	sock, _ := startRelay(t)
	c, err := host.Connect(sock, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.Bulk() || c.Generation() != protocol.Version {
		t.Fatalf("behind the relay: generation %d, bulk %v", c.Generation(), c.Bulk())
	}
	srv := testutil.Serve(t, testutil.Echo)
	conn, err := c.DialTCP(context.Background(), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msg := bytes.Repeat([]byte("bulk through the relay "), 1<<20) // 23 MiB: several credit windows
	go func() { conn.Write(msg); conn.CloseWrite() }()
	got, err := io.ReadAll(conn)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %d of %d bytes, %v", len(got), len(msg), err)
	}
}
