// Package relay implements core.tcp.* sessions: it resolves the destination through a
// Resolver, connects through a Dialer and moves bytes between that stream and the agent channel
// with bounded buffers in both directions. It decides nothing itself: with egress on, the
// Dialer is the policy point's (egress.Dialer) and the Resolver the guest's resolver.
package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/agentd/agentd/internal/oserr"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Dialer opens the destination stream of a session: a connection to the first of addrs it can
// reach (in the resolver's order). name is the host name the addresses were resolved from ("",
// when the host gave an address).
type Dialer interface {
	Dial(ctx context.Context, name string, addrs []netip.AddrPort) (net.Conn, error)
}

// Resolver resolves a destination name (net.Resolver has this method).
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// DialFunc makes a Dialer of a net.Dialer-style function: each address is tried in turn, as
// the reference's connect does, and the last error is returned.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// Dial implements Dialer.
func (f DialFunc) Dial(ctx context.Context, _ string, addrs []netip.AddrPort) (net.Conn, error) {
	var err error
	for _, a := range addrs {
		var c net.Conn
		if c, err = f(ctx, "tcp", a.String()); err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	if err == nil {
		err = errors.New("no address to connect to")
	}
	return nil, err
}

// Options are the per-session limits. Zero fields take DefaultOptions' values.
type Options struct {
	// ChunkSize is the most destination bytes read into one core.tcp.data frame (the
	// reference's 64 KiB; at most sessionio.ChunkSize).
	ChunkSize int
	// HighWater and LowWater bound the bytes queued toward the host: at HighWater the session
	// stops reading its destination (TCP backpressure reaches the sender) until the writer
	// drains the queue to LowWater.
	HighWater, LowWater int
	// InboundLimit bounds host -> destination bytes queued per session. With flow control it
	// is also the window granted to the host, so a well-behaved host never exceeds it; a
	// stock host that does waits for room (the reference's backpressure).
	InboundLimit int
	// ConnectTimeout bounds one dial (the reference's 30 s).
	ConnectTimeout time.Duration
	// Dialer opens destinations (default: kernel sockets, each address in turn).
	Dialer Dialer
	// Resolver resolves destination names (default: the system's resolver).
	Resolver Resolver
	// Inbound and Outbound are byte budgets shared by all sessions (host -> destination and
	// destination -> host buffers). The agent makes them from its TCPBufferBudget; nil
	// means only the per-session limits apply.
	Inbound, Outbound *sessionio.Budget
}

// DefaultOptions: 64 KiB chunks, 256 KiB/64 KiB watermarks toward the host, 4 MiB inbound (a
// window that keeps one stream at channel speed while credit round trips are in flight).
var DefaultOptions = Options{
	ChunkSize:      sessionio.ChunkSize,
	HighWater:      sessionio.DefaultHighWater,
	LowWater:       sessionio.DefaultLowWater,
	InboundLimit:   4 << 20,
	ConnectTimeout: 30 * time.Second,
	Dialer:         DialFunc((&net.Dialer{}).DialContext),
	Resolver:       net.DefaultResolver,
}

func (o Options) withDefaults() Options {
	d := DefaultOptions
	if o.ChunkSize <= 0 || o.ChunkSize > sessionio.ChunkSize {
		o.ChunkSize = d.ChunkSize
	}
	if o.HighWater <= 0 {
		o.HighWater = d.HighWater
	}
	if o.LowWater <= 0 || o.LowWater > o.HighWater {
		o.LowWater = min(d.LowWater, o.HighWater)
	}
	if o.InboundLimit <= 0 {
		o.InboundLimit = d.InboundLimit
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = d.ConnectTimeout
	}
	if o.Dialer == nil {
		o.Dialer = d.Dialer
	}
	if o.Resolver == nil {
		o.Resolver = d.Resolver
	}
	return o
}

// Session is one core.tcp stream.
type Session struct {
	id   uint32
	opts Options
	out  *sessionio.Writer
	q    *sessionio.Queue
	log  *slog.Logger
	done func(*Session) // called once when the session ends, to drop it from the table
	flow bool

	ctx    context.Context
	cancel context.CancelFunc

	in   *sessionio.Sink // host -> destination
	host string
	port uint16

	credit *sessionio.Credit // flow: bytes we may still send to the host

	hostEOF atomic.Bool   // the host sent tcp.eof
	late    chan struct{} // host data arrived after the host's eof

	mu       sync.Mutex
	conn     net.Conn
	ended    bool
	finished chan struct{}
}

// Go dials in the background: the caller's loop never waits for the connect. The session
// reports connected or a terminal failed. Register the session before calling Go, so the host
// never sees connected for a session the agent does not know.
func (s *Session) Go() { go s.run(s.host, s.port) }

// New creates the session for a core.tcp.connect without starting it. done is called once,
// when the session ends for any reason.
func New(id uint32, req protocol.TCPConnect, out *sessionio.Writer, opts Options, log *slog.Logger, done func(*Session)) *Session {
	opts = opts.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Session{
		id: id, opts: opts, out: out, log: log, done: done,
		q:        out.NewQueue(opts.HighWater, opts.LowWater),
		flow:     req.Window > 0,
		credit:   sessionio.NewCredit(int64(req.Window)),
		ctx:      ctx,
		cancel:   cancel,
		late:     make(chan struct{}, 1),
		finished: make(chan struct{}),
	}
	cfg := sessionio.SinkConfig{Limit: opts.InboundLimit, Budget: opts.Inbound}
	if s.flow {
		cfg.Grant = func(n int) {
			s.out.ControlMsg(s.ctx, s.id, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(n)})
		}
	}
	s.in = sessionio.NewSink(ctx, cfg)
	s.host, s.port = req.Host, req.Port
	return s
}

// ID returns the session id.
func (s *Session) ID() uint32 { return s.id }

// Finished is closed when all of the session's goroutines have returned.
func (s *Session) Finished() <-chan struct{} { return s.finished }

func (s *Session) run(host string, port uint16) {
	defer close(s.finished)
	if !resolvable(host) {
		s.fail(fmt.Sprintf("connect %s:%d: %s", host, port, lookupText(nil)))
		return
	}
	dctx, dcancel := context.WithTimeout(s.ctx, s.opts.ConnectTimeout)
	conn, err := s.dial(dctx, host, port)
	dcancel()
	if err != nil {
		if s.ctx.Err() != nil { // aborted while dialing: no frame is owed
			s.end()
			return
		}
		msg := fmt.Sprintf("connect %s:%d: %s", host, port, dialText(err))
		if errors.Is(err, context.DeadlineExceeded) {
			msg = fmt.Sprintf("connect %s:%d timed out", host, port)
		}
		s.fail(msg)
		return
	}
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.conn = conn
	s.mu.Unlock()
	var grant uint32
	if s.flow {
		grant = uint32(s.opts.InboundLimit)
	}
	if err := s.q.PushMsg(s.ctx, s.id, protocol.TypeTCPConnected, protocol.TCPConnected{Window: grant}); err != nil {
		s.end()
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.toDestination(conn) }()
	s.toHost(conn)
	wg.Wait()
}

// dial resolves host (unless it is an address) and connects through the Dialer.
func (s *Session) dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	var addrs []netip.Addr
	name := ""
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a}
	} else if a, ok := inetAton(host); ok {
		addrs = []netip.Addr{a}
	} else {
		name = host
		if addrs, err = s.opts.Resolver.LookupNetIP(ctx, "ip", host); err != nil {
			return nil, err
		}
	}
	dsts := make([]netip.AddrPort, len(addrs))
	for i, a := range addrs {
		dsts[i] = netip.AddrPortFrom(a.Unmap(), port)
	}
	return s.opts.Dialer.Dial(ctx, name, dsts)
}

// describe renders an error the way the reference's messages read: the OS error text.
func describe(err error) string { return oserr.Text(err) }

// dialText renders a connect failure as the reference's does: a name that does not resolve
// is getaddrinfo's failure, anything else the OS error text.
func dialText(err error) string {
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return lookupText(dns)
	}
	return describe(err)
}

// lookupText is Rust's text for a failed getaddrinfo: a name that does not exist is
// EAI_NONAME, a resolver that did not answer EAI_AGAIN (glibc's gai_strerror wording).
func lookupText(dns *net.DNSError) string {
	if dns != nil && !dns.IsNotFound && (dns.IsTimeout || dns.IsTemporary) {
		return "failed to lookup address information: Temporary failure in name resolution"
	}
	return "failed to lookup address information: Name or service not known"
}

// inetAton parses the IPv4 forms getaddrinfo takes besides dotted quads (inet_aton's: "127.1",
// "0x7f000001", "2130706433": one to four parts, decimal, octal or hex, the last filling the
// remaining bytes). A dotted quad is left to netip.
func inetAton(host string) (netip.Addr, bool) {
	parts := strings.Split(host, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var ip uint32
	for i, p := range parts {
		v, err := strconv.ParseUint(p, 0, 32) // base from the prefix: 0x hex, 0 octal
		if err != nil || p == "" || p[0] == '+' || strings.ContainsAny(p, "_oObB") {
			return netip.Addr{}, false
		}
		if i < len(parts)-1 {
			if v > 255 {
				return netip.Addr{}, false
			}
			ip |= uint32(v) << (8 * (3 - i))
		} else {
			if bits := 8 * (5 - len(parts)); bits < 32 && v >= 1<<bits {
				return netip.Addr{}, false
			}
			ip |= uint32(v)
		}
	}
	return netip.AddrFrom4([4]byte{byte(ip >> 24), byte(ip >> 16), byte(ip >> 8), byte(ip)}), true
}

// resolvable reports whether getaddrinfo could take host at all: the reference passes it as
// is, so "" and a bracketed IPv6 literal are names that do not resolve (where Go would dial
// the local host, or refuse the address form).
func resolvable(host string) bool {
	return host != "" && !strings.ContainsAny(host, "[]")
}

// toHost reads the destination and queues core.tcp.data. The queue's high watermark (and,
// with flow control, the host's credit) stops the reads, so the destination feels TCP
// backpressure instead of agentd buffering without bound.
func (s *Session) toHost(conn net.Conn) {
	for {
		n := s.opts.ChunkSize
		if s.flow {
			var ok bool
			if n, ok = s.credit.Take(s.ctx, n); !ok {
				return
			}
		}
		if err := s.opts.Outbound.Acquire(s.ctx, n); err != nil {
			return
		}
		buf := sessionio.GetBuf()
		m, err := conn.Read((*buf)[:n])
		s.opts.Outbound.Release(n - m) // keep only what was read, until it is written
		if s.flow && m < n {
			s.credit.Add(int64(n - m)) // the unread part of the grant goes back
		}
		if m > 0 {
			var rel sessionio.Releaser
			if s.opts.Outbound != nil {
				rel = s.opts.Outbound
			}
			if perr := s.q.PushDataRelease(s.ctx, s.id, protocol.TypeTCPData, buf, m, rel); perr != nil {
				return
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err == io.EOF {
			s.q.PushMsg(s.ctx, s.id, protocol.TypeTCPEOF, protocol.Empty{})
			return // the session stays open for host writes
		}
		if err != nil {
			if s.ctx.Err() == nil {
				s.fail("read TCP stream: " + describe(err))
			}
			return
		}
	}
}

// toDestination writes host data to the destination in order, then shuts the write half
// down at the host's EOF. Under flow control the sink grants the host credit as bytes leave.
func (s *Session) toDestination(conn net.Conn) {
	err := s.in.Run(conn)
	switch {
	case err == io.EOF:
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil && s.ctx.Err() == nil {
				s.fail("shutdown TCP stream: " + describe(err))
				return
			}
		}
		// Host data after its EOF: a write after shutdown(SHUT_WR) is EPIPE on Linux, so the
		// reference's relay fails with exactly this (one terminal frame; the data is not sent).
		select {
		case <-s.late:
			s.fail("write TCP stream: " + oserr.Errno(syscall.EPIPE))
		case <-s.ctx.Done():
		}
	case err != nil && s.ctx.Err() == nil:
		s.fail("write TCP stream: " + describe(err))
	}
}

// errSessionClosed is the reference's text for data sent to a session that is over.
var errSessionClosed = errors.New("TCP session is closed")

// Write queues host data for the destination (copying it: it aliases the channel's read
// buffer). It waits while the session's buffer is full, which only a host without flow
// control can cause. Data after the host's own EOF is a write to a shut-down socket: once
// everything before the EOF is written, the session fails as the reference's does.
func (s *Session) Write(data []byte) error {
	if len(data) > 0 && s.hostEOF.Load() {
		select {
		case s.late <- struct{}{}:
		default:
		}
		return nil
	}
	if err := s.in.Write(data); err != nil {
		return errSessionClosed
	}
	return nil
}

// CloseWrite queues the host's EOF after all queued data.
func (s *Session) CloseWrite() error {
	if err := s.in.CloseWrite(); err != nil {
		return errSessionClosed
	}
	s.hostEOF.Store(true)
	return nil
}

// Credit adds flow-control credit granted by the host.
func (s *Session) Credit(n uint32) { s.credit.Add(int64(n)) }

// Abort tears the session down at once without a frame (core.tcp.close, relay client
// disconnect, shutdown): queued data in both directions is dropped.
func (s *Session) Abort() { s.end() }

// fail ends the session and sends its terminal core.tcp.failed. The session leaves the table
// first, as the reference's does before its terminal frame goes out: a host that saw the
// failure finds the id unknown.
func (s *Session) fail(msg string) {
	if !s.endKeepQueue() {
		return // already over: one terminal frame per session
	}
	// The failure goes behind any data already queued, so the host sees it last.
	s.q.PushMsg(context.Background(), s.id, protocol.TypeTCPFailed, protocol.TCPFailed{Error: msg})
	s.log.Debug("tcp session failed", "id", s.id, "error", msg)
}

func (s *Session) end() {
	if s.endKeepQueue() {
		s.q.Close()
	}
}

// endKeepQueue marks the session ended, closes the destination and releases buffers; the
// output queue stays open so a terminal frame already queued still goes out.
func (s *Session) endKeepQueue() bool {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return false
	}
	s.ended = true
	conn := s.conn
	s.mu.Unlock()
	s.in.Close()
	s.cancel()
	if conn != nil {
		conn.Close()
	}
	if s.done != nil {
		s.done(s)
	}
	return true
}
