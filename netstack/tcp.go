package netstack

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
)

// handleTCP runs for each SYN (in its own goroutine, at most MaxInFlight at once).
func (st *Stack) handleTCP(r *tcp.ForwarderRequest) {
	src, dst := endpoints(r.ID())
	if st.isGateway(dst.Addr()) {
		if dst.Port() == 53 && st.opts.DNS != nil {
			st.acceptDNS(r, src)
			return
		}
		st.Counters.GatewayRefused.Add(1)
		r.Complete(true)
		return
	}
	if !st.reserve(dst) {
		r.Complete(true)
		return
	}
	flow, d := st.eg.Admit(policy.TCP, src, dst)
	if flow == nil {
		st.release(dst)
		st.log.Debug("tcp denied", "src", src, "dst", dst, "rule", d.RuleID)
		r.Complete(true) // RST: the guest sees ECONNREFUSED at once
		return
	}
	ctx, cancel := context.WithTimeout(st.ctx, st.opts.ConnectTimeout)
	up, err := st.opts.Dial(ctx, "tcp", dst.String())
	cancel()
	if err != nil {
		st.release(dst)
		flow.Close()
		st.Counters.DialFailed.Add(1)
		st.log.Debug("tcp upstream dial failed", "dst", dst, "error", err)
		r.Complete(true) // never "connected, then reset"
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(terr != nil)
	if terr != nil {
		st.release(dst)
		flow.Close()
		up.Close()
		st.Counters.HandshakeFailed.Add(1)
		st.log.Debug("tcp handshake with the guest failed", "src", src, "dst", dst, "error", terr)
		return
	}
	ep.SocketOptions().SetKeepAlive(true) // notice a guest that vanished
	t := &tcpFlow{st: st, ep: ep, wq: &wq, up: up, flow: flow, dst: dst, dead: make(chan struct{})}
	if sc, ok := up.(syscall.Conn); ok {
		t.upRC, _ = sc.SyscallConn()
	}
	if t.upRC == nil { // a stream over the agent channel
		st.runFlow(&st.Counters.Active, dst, flow, t.run)
		return
	}
	t.start()
}

// tcpFlow relays one allowed connection.
type tcpFlow struct {
	st   *Stack
	ep   tcpip.Endpoint
	wq   *waiter.Queue
	up   net.Conn
	upRC syscall.RawConn // up's socket, for the direct relay (nil: an upstream without one)
	flow *egress.Flow
	dst  netip.AddrPort
	once sync.Once
	dead chan struct{} // closed by abort

	// The event-driven relay (tcprelay.go), for an upstream socket.
	upFD     int
	entry    waiter.Entry // gVisor's callbacks
	upw, dnw worker       // guest -> upstream, upstream -> guest
	stopCtx  func() bool
	finished atomic.Int32 // directions over

	mu              sync.Mutex // the reactor interest, and whether the socket is closed
	wantIn, wantOut bool
	registered      bool // the upstream socket, with the reactor
	upClosed        bool
	guestFull       atomic.Bool // dnw waits for room in gVisor's send buffer
	finPending      bool        // upw: the guest's FIN, to pass on after staged bytes
	downPending     int         // dnw: bytes queued on the socket, not yet taken
	w               upWriter
	r               upReader
	q               upQueued
	hello           helloState
}

// abort resets both sides (a RST propagated, a revoked flow, a refused SNI).
func (t *tcpFlow) abort(why string, err any) {
	t.once.Do(func() {
		close(t.dead)
		t.st.log.Debug("tcp flow reset", "dst", t.flow.Dst, "why", why, "error", err)
		t.ep.Abort()
		if tc, ok := t.up.(*net.TCPConn); ok {
			tc.SetLinger(0) // close with a RST
		}
		t.closeUp()
		if t.upw.run != nil { // parked directions see the end
			t.upw.kick()
			t.dnw.kick()
		}
	})
}

// looksLikeTLS reports whether a flow's first bytes start a TLS handshake record.
func looksLikeTLS(b []byte) bool { return len(b) > 0 && b[0] == 0x16 }

// maxHello bounds how much of a ClientHello is held back while waiting for all of it.
const maxHello = 16 << 10

// clientHelloSNI extracts the server name from a ClientHello in b. done is false while more
// bytes are needed; a message that is not a ClientHello (or has no SNI) gives "", true.
func clientHelloSNI(b []byte) (sni string, done bool) {
	if len(b) < 5 {
		return "", len(b) >= maxHello
	}
	if b[0] != 0x16 || b[1] != 3 {
		return "", true
	}
	recLen := int(b[3])<<8 | int(b[4])
	if len(b) < 5+recLen && len(b) < maxHello {
		return "", false
	}
	// crypto/tls parses the ClientHello for us: it calls GetConfigForClient with the parsed
	// hello, where we take the name and stop the handshake.
	errStop := errors.New("stop")
	var name string
	srv := tls.Server(&helloConn{r: bytes.NewReader(b)}, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		name = h.ServerName
		return nil, errStop
	}})
	srv.Handshake()
	return name, true
}

// helloConn feeds recorded bytes to crypto/tls and swallows what it writes back.
type helloConn struct {
	r io.Reader
}

func (c *helloConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *helloConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *helloConn) Close() error                     { return nil }
func (c *helloConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *helloConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *helloConn) SetDeadline(time.Time) error      { return nil }
func (c *helloConn) SetReadDeadline(time.Time) error  { return nil }
func (c *helloConn) SetWriteDeadline(time.Time) error { return nil }

// acceptDNS serves DNS over TCP at the gateway: length-prefixed queries, answered in turn.
func (st *Stack) acceptDNS(r *tcp.ForwarderRequest, src netip.AddrPort) {
	var wq waiter.Queue
	ep, err := r.CreateEndpoint(&wq)
	r.Complete(err != nil)
	if err != nil {
		return
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		c := gonet.NewTCPConn(&wq, ep)
		defer c.Close()
		stop := context.AfterFunc(st.ctx, func() { c.Close() })
		defer stop()
		for {
			c.SetReadDeadline(time.Now().Add(10 * time.Second)) // idle DNS connections end
			q, err := resolver.ReadTCP(c)
			if err != nil {
				return
			}
			st.Counters.DNSQueries.Add(1)
			resp, err := st.opts.DNS.Answer(st.ctx, src, q, policy.TCP)
			if err != nil {
				return
			}
			if err := resolver.WriteTCP(c, resp); err != nil {
				return
			}
		}
	}()
}
