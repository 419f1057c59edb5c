package host_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/relay"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// direct runs an in-process agent on a socket pair and returns a client on the other end.
func direct(t *testing.T, cfg agent.Config) *host.Client {
	t.Helper()
	agentEnd, hostEnd := testutil.SocketPair(t)
	cfg.Port, cfg.Log = agentEnd, quiet
	a := agent.New(cfg)
	served := make(chan struct{})
	go func() {
		defer close(served)
		if a.Handshake() == nil {
			a.Serve(context.Background())
		}
	}()
	c, err := host.Direct(hostEnd, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); <-served })
	return c
}

// TestTCPConnIsNetConn: a TCPConn behaves as a net.Conn: read deadlines expire with
// os.ErrDeadlineExceeded and can be moved or cleared, a write deadline bounds the wait for
// the agent's credit, and the addresses say what was dialed.
func TestTCPConnIsNetConn(t *testing.T) {
	var _ net.Conn = (*host.TCPConn)(nil)
	release := make(chan struct{})
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		<-release // neither reads nor writes until told: a stalled destination
		c.Write([]byte("late"))
		io.Copy(io.Discard, c)
	})
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	c := direct(t, agent.Config{Relay: relay.Options{InboundLimit: 64 << 10}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.DialTCP(ctx, "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if ra, ok := conn.RemoteAddr().(*net.TCPAddr); !ok || ra.Port != srv.Addr.Port || !ra.IP.IsLoopback() {
		t.Fatalf("remote address %v", conn.RemoteAddr())
	}
	if conn.LocalAddr() == nil || conn.LocalAddr().Network() != "tcp" {
		t.Fatalf("local address %v", conn.LocalAddr())
	}

	buf := make([]byte, 4)
	conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := conn.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v", err)
	}
	// The destination reads nothing: once the agent's window and the socket buffers are full
	// the agent grants no more credit, and the write deadline ends the wait.
	conn.SetWriteDeadline(time.Now().Add(time.Second))
	n, err := conn.Write(make([]byte, 64<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) || n >= 64<<20 {
		t.Fatalf("write to a stalled destination: %d bytes, %v", n, err)
	}
	conn.SetDeadline(time.Time{})
	close(release)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "late" {
		t.Fatalf("read after clearing the deadline: %q %v", buf, err)
	}

	named, err := c.DialTCP(ctx, "localhost", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer named.Close()
	if got, want := named.RemoteAddr().String(), net.JoinHostPort("localhost", strconv.Itoa(srv.Addr.Port)); got != want {
		t.Fatalf("remote address by name %q, want %q", got, want)
	}
}
