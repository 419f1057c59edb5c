package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/exec"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/scenario"
	"github.com/agentd/agentd/internal/testkit/testutil"
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
	return startHost(t, host.Options{Features: features}, cfg)
}

// startHost is start with the host client's options (its generation, say).
func startHost(t *testing.T, opts host.Options, cfg Config) *harness {
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
	c, err := host.Direct(hostEnd, opts)
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

// TestScenarios runs the shared core.tcp behaviour tests against an in-process agent, with
// goroutine and fd leak checks around each: with a host at generation 5 (CBOR core.tcp.data,
// agentd's flow extension or none) and at the newest (raw bulk records).
func TestScenarios(t *testing.T) {
	for _, gen := range []uint8{5, protocol.Version} {
		t.Run(fmt.Sprintf("gen%d", gen), func(t *testing.T) {
			scenario.Run(t, func(t *testing.T, features []string) scenario.Agent {
				testutil.Leaks(t)
				h := startHost(t, host.Options{Features: features, Generation: gen}, Config{})
				return scenario.Agent{
					Client:   h.c,
					Sessions: func() int { return h.a.Stats().TCPSessions },
					Idle: func(t *testing.T) {
						testutil.WaitFor(t, func() bool { return h.a.Stats().TCPSessions == 0 }, "sessions to end")
					},
				}
			})
		})
	}
}

// TestExecScenarios runs the shared exec behaviour tests against an in-process agent.
func TestExecScenarios(t *testing.T) {
	t.Setenv("MSB_SECRET", "must-not-leak")
	scenario.RunExec(t, func(t *testing.T, features []string) scenario.Agent {
		testutil.Leaks(t)
		h := start(t, features, Config{})
		return scenario.Agent{
			Client: h.c,
			Idle: func(t *testing.T) {
				testutil.WaitFor(t, func() bool { return h.a.Stats().ExecSessions == 0 }, "exec sessions to end")
			},
		}
	})
}

// TestFsScenarios runs the shared filesystem behaviour tests against an in-process agent.
func TestFsScenarios(t *testing.T) {
	for _, gen := range []uint8{5, protocol.Version} {
		t.Run(fmt.Sprintf("gen%d", gen), func(t *testing.T) {
			scenario.RunFs(t, func(t *testing.T, features []string) scenario.Agent {
				testutil.Leaks(t)
				h := startHost(t, host.Options{Features: features, Generation: gen}, Config{})
				return scenario.Agent{Client: h.c, Idle: func(*testing.T) {}}
			}, 8<<20)
		})
	}
}

// TestMain lets the test binary act as agentd's pre-exec helper, as agentd itself does.
func TestMain(m *testing.M) {
	if exec.IsHelper() {
		exec.HelperMain()
	}
	os.Exit(m.Run())
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
	if n := h.a.Stats().TCPSessions; n != 0 {
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

func (hangingDialer) Dial(ctx context.Context, _ string, _ []netip.AddrPort) (net.Conn, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestSessionCap: a connect beyond MaxTCPSessions fails at once; the others are unaffected.
func TestSessionCap(t *testing.T) {
	srv := testutil.Serve(t, testutil.Echo)
	h := start(t, nil, Config{MaxTCPSessions: 3})
	var open []*host.TCPConn
	for i := 0; i < 3; i++ {
		c, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	_, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	var te *host.TCPError
	if !errors.As(err, &te) || !strings.Contains(te.Msg, "too many TCP sessions (limit 3)") {
		t.Fatalf("fourth connect: %v", err)
	}
	for _, c := range open {
		c.Close()
	}
	testutil.WaitFor(t, func() bool { return h.a.Stats().TCPSessions == 0 }, "sessions to end")
	c, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatalf("connect after the others closed: %v", err)
	}
	c.Close()
}

// TestBufferBudget: with a shared budget smaller than what stalled sessions could hold each,
// the total bytes buffered toward stalled destinations never exceed it.
func TestBufferBudget(t *testing.T) {
	const budget = 512 << 10
	stalled := make(chan *net.TCPConn, 8)
	srv := testutil.Serve(t, func(c *net.TCPConn) { c.SetReadBuffer(4096); stalled <- c })
	// A stock generation-5 host: the reader waits (TestBulkBudget has the bulk path).
	h := startHost(t, host.Options{Features: []string{}, Generation: 5}, Config{TCPBufferBudget: budget})
	var conns []*host.TCPConn
	for i := 0; i < 4; i++ {
		c, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Writers start only once every session is open: without flow control a full budget holds
	// the whole channel (by design), so a connect queued behind the data would never go out.
	for _, c := range conns {
		go c.Write(make([]byte, 8<<20))
	}
	var dsts []*net.TCPConn
	for range conns {
		dsts = append(dsts, <-stalled)
	}
	testutil.WaitFor(t, func() bool { return h.a.cfg.Relay.Inbound.Used() > 0 }, "buffers to fill")
	peak := int64(0)
	for i := 0; i < 200; i++ { // sample while the writers push against the stalled destinations
		peak = max(peak, h.a.cfg.Relay.Inbound.Used())
		time.Sleep(time.Millisecond)
	}
	if peak > budget+64<<10 {
		t.Fatalf("buffered %d bytes with a budget of %d", peak, budget)
	}
	for _, d := range dsts {
		d.Close()
	}
	for _, c := range conns {
		c.Close()
	}
}

// TestHeartbeat: the agent's heartbeat file counts host and guest messages and bytes, and shows
// live sessions.
func TestHeartbeat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "heartbeat.json")
	srv := testutil.Serve(t, testutil.Echo)
	// A generation-5 host without credit frames: every frame is counted here.
	h := startHost(t, host.Options{Features: []string{}, Generation: 5}, Config{HeartbeatPath: path, HeartbeatInterval: 5 * time.Millisecond})
	conn, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("12345"))
	io.ReadFull(conn, make([]byte, 5))
	var hb struct {
		ActivitySeq      uint64 `json:"activity_seq"`
		ActiveTCP        int    `json:"active_tcp_streams"`
		ActivityCounters struct {
			Host     uint64 `json:"host_messages"`
			Guest    uint64 `json:"guest_messages"`
			TCPBytes uint64 `json:"tcp_bytes"`
		} `json:"activity_counters"`
	}
	// connect + data from the host; connected + data from the agent; 5 bytes each way.
	testutil.WaitFor(t, func() bool {
		b, err := os.ReadFile(path)
		return err == nil && json.Unmarshal(b, &hb) == nil && hb.ActivityCounters.TCPBytes == 10 && hb.ActiveTCP == 1
	}, "the heartbeat to show the session")
	if c := hb.ActivityCounters; c.Host != 2 || c.Guest != 2 || hb.ActivitySeq != 4 {
		t.Fatalf("heartbeat %+v", hb)
	}
}
