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
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
)

// BufferSize is the size of the pooled relay buffers. A flow holds one per direction only
// while it has data in hand; an idle flow holds none. 256 KiB rather than 64: each read
// becomes one write on the other side, and fewer, fuller writes cut the CPU per byte by a
// fifth in measurement (and raised throughput as much).
const BufferSize = 256 << 10

var bufs = sync.Pool{New: func() any { b := make([]byte, BufferSize); return &b }}

// getBuf takes a relay buffer within the stack's budget (Options.MaxBuffers), waiting while
// the budget is spent; nil if the flow ended first.
func (t *tcpFlow) getBuf() *[]byte {
	select {
	case t.st.bufTokens <- struct{}{}:
		return bufs.Get().(*[]byte)
	case <-t.dead:
		return nil
	case <-t.st.ctx.Done():
		return nil
	}
}

func (t *tcpFlow) putBuf(b *[]byte) {
	bufs.Put(b)
	<-t.st.bufTokens
}

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
	t := &tcpFlow{st: st, ep: ep, wq: &wq, guest: gonet.NewTCPConn(&wq, ep), up: up, flow: flow, dead: make(chan struct{})}
	st.runFlow(&st.Counters.Active, dst, flow, t.run)
}

// tcpFlow relays one allowed connection.
type tcpFlow struct {
	st    *Stack
	ep    tcpip.Endpoint
	wq    *waiter.Queue
	guest *gonet.TCPConn
	up    net.Conn
	flow  *egress.Flow
	once  sync.Once
	dead  chan struct{} // closed by abort: ends a wait for a buffer
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
		t.up.Close()
	})
}

func (t *tcpFlow) run() {
	// A closing stack ends every flow, half-closed ones included (their upstream may never
	// send again, and nothing else would wake the relay waiting on it).
	stop := context.AfterFunc(t.st.ctx, func() { t.abort("stack closing", nil) })
	defer stop()
	t.flow.OnRevoke(func() { t.abort("revoked by a policy reload", nil) })
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); t.toUpstream() }()
	t.toGuest()
	wg.Wait()
	t.guest.Close()
	t.up.Close()
}

// toUpstream copies guest -> destination. It waits for the guest's data without a buffer,
// and reads only what is there, so an idle flow holds no memory here.
func (t *tcpFlow) toUpstream() {
	entry, notify := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	t.wq.EventRegister(&entry)
	defer t.wq.EventUnregister(&entry)
	var hello []byte // the start of a TLS ClientHello, held until its SNI is judged
	var helloDeadline time.Time
	checked := false
	for {
		bp := t.getBuf()
		if bp == nil { // the flow or the stack is ending: make sure both sides do
			t.abort("stopping", nil)
			return
		}
		w := tcpip.SliceWriter(*bp)
		res, err := t.ep.Read(&w, tcpip.ReadOptions{})
		if _, ok := err.(*tcpip.ErrWouldBlock); ok {
			t.putBuf(bp)
			if hello != nil {
				select {
				case <-notify:
				case <-time.After(time.Until(helloDeadline)):
					checked = true // judged by the pins alone
					if !t.send(hello) {
						return
					}
					hello = nil
				}
				continue
			}
			<-notify
			continue
		}
		if err != nil {
			t.putBuf(bp)
			if _, ok := err.(*tcpip.ErrClosedForReceive); ok {
				if hello != nil && !t.send(hello) {
					return
				}
				if hc, ok := t.up.(interface{ CloseWrite() error }); ok {
					hc.CloseWrite() // the guest's FIN, passed on
				}
				return
			}
			t.abort("guest read", err) // reset or error: pass it on as a RST
			return
		}
		data := (*bp)[:res.Count]
		if !checked {
			if hello == nil && !looksLikeTLS(data) {
				checked = true
			} else {
				if hello == nil {
					helloDeadline = time.Now().Add(t.st.opts.SNIWait)
				}
				hello = append(hello, data...)
				t.putBuf(bp)
				sni, done := clientHelloSNI(hello)
				if !done {
					continue
				}
				checked = true
				if sni != "" && !t.flow.CheckSNI(sni) {
					t.abort("sni denied", sni)
					return
				}
				if !t.send(hello) {
					return
				}
				hello = nil
				continue
			}
		}
		ok := t.send(data)
		t.putBuf(bp)
		if !ok {
			return
		}
	}
}

func (t *tcpFlow) send(b []byte) bool {
	n, err := t.up.Write(b)
	t.flow.Count(int64(n), 0)
	if err != nil {
		t.abort("upstream write", err)
		return false
	}
	return true
}

// toGuest copies destination -> guest, reading the kernel socket only when it is readable so
// that the pooled buffer is held just while there is data.
func (t *tcpFlow) toGuest() {
	sc, ok := t.up.(syscall.Conn)
	if !ok { // an upstream that is not a socket (a stream over the agent channel)
		t.toGuestCopy()
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.abort("upstream conn", err)
		return
	}
	var peek [1]byte
	for {
		// Wait until the socket has data (or EOF, or an error) holding no buffer: a peek.
		var perr error
		err := rc.Read(func(fd uintptr) bool {
			for {
				_, _, perr = unix.Recvfrom(int(fd), peek[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
				if perr != unix.EINTR {
					return perr != unix.EAGAIN
				}
			}
		})
		if err == nil {
			err = perr // a reset is reported (once) to whichever call sees it first: this one
		}
		if err != nil {
			t.abort("upstream read", err)
			return
		}
		bp := t.getBuf()
		if bp == nil { // the flow or the stack is ending: make sure both sides do
			t.abort("stopping", nil)
			return
		}
		var n int
		var rerr error
		rc.Read(func(fd uintptr) bool {
			for {
				n, rerr = unix.Read(int(fd), *bp)
				if rerr != unix.EINTR { // the runtime's preemption signals interrupt reads
					break
				}
			}
			return rerr != unix.EAGAIN
		})
		if rerr != nil || n == 0 {
			t.putBuf(bp)
			if rerr == nil { // EOF: the destination's FIN, passed on
				t.guest.CloseWrite()
				return
			}
			t.abort("upstream read", rerr) // a reset (or an error) is passed on as a RST
			return
		}
		_, werr := t.guest.Write((*bp)[:n])
		t.putBuf(bp)
		t.flow.Count(0, int64(n))
		if werr != nil {
			t.abort("guest write", werr)
			return
		}
	}
}

// toGuestCopy is toGuest for upstreams without a file descriptor (a stream over the agent
// channel, which buffers within its own window): a plain read loop with a small buffer of its
// own, outside the relay-buffer budget so that idle streams cannot starve it.
func (t *tcpFlow) toGuestCopy() {
	buf := make([]byte, streamReadSize)
	for {
		n, err := t.up.Read(buf)
		if n > 0 {
			if _, werr := t.guest.Write(buf[:n]); werr != nil {
				t.abort("guest write", werr)
				return
			}
			t.flow.Count(0, int64(n))
		}
		if errors.Is(err, io.EOF) {
			t.guest.CloseWrite()
			return
		}
		if err != nil {
			t.abort("upstream read", err)
			return
		}
	}
}

// streamReadSize is toGuestCopy's buffer: a channel stream's frames are at most 64 KiB.
const streamReadSize = 64 << 10

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
