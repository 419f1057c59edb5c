// Package relay implements core.tcp.* sessions: it resolves the destination through a
// Resolver, connects through a Dialer and moves bytes between that stream and the agent channel
// with bounded buffers in both directions: as CBOR core.tcp.data (generation 5, optionally with
// agentd's per-stream credit) or, when the host offers it, as generation-8 raw bulk records
// under absolute credit. It decides nothing itself: with egress on, the Dialer is the policy
// point's (egress.Dialer) and the Resolver the guest's resolver.
//
// A session ends with core.tcp.closed once both directions ended (the destination's end
// reported, the host's end applied), with core.tcp.failed, or at core.tcp.close, which drains
// the destination when the host's side had ended in order and resets it otherwise.
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

	"golang.org/x/sys/unix"

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
	// means only the per-session limits apply. A bulk session's host -> destination credit is
	// held in Inbound: every granted byte is backed by it.
	Inbound, Outbound *sessionio.Budget
	// BulkWindow is the host -> destination credit a bulk session grants ahead of what it wrote
	// (the reference's 8 MiB), less when Inbound runs short.
	BulkWindow int
	// DrainIdle and DrainTotal bound the drain after a core.tcp.close that followed the host's
	// orderly end: the destination is read (and discarded) until it closes, at most DrainIdle
	// without progress or DrainTotal in all (the reference's 10 s and 120 s).
	DrainIdle, DrainTotal time.Duration
}

// DefaultOptions: 64 KiB chunks, 256 KiB/64 KiB watermarks toward the host, 4 MiB inbound (a
// window that keeps one stream at channel speed while credit round trips are in flight).
var DefaultOptions = Options{
	ChunkSize:      sessionio.ChunkSize,
	HighWater:      sessionio.DefaultHighWater,
	LowWater:       sessionio.DefaultLowWater,
	InboundLimit:   4 << 20,
	ConnectTimeout: 30 * time.Second,
	BulkWindow:     protocol.BulkDefaultWindow,
	DrainIdle:      10 * time.Second,
	DrainTotal:     120 * time.Second,
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
	if o.BulkWindow <= 0 || o.BulkWindow > protocol.BulkMaxWindow {
		o.BulkWindow = d.BulkWindow
	}
	if o.DrainIdle <= 0 {
		o.DrainIdle = d.DrainIdle
	}
	if o.DrainTotal <= 0 {
		o.DrainTotal = d.DrainTotal
	}
	return o
}

// BulkRecordMax is the largest raw record a bulk session sends or accepts: the reference's
// TCP default (an offer may ask for less).
const BulkRecordMax = protocol.BulkDefaultRecordPayload

// BulkQueueRecords is how many records a bulk session may queue toward the host, so that
// reading the destination overlaps writing the channel (the host's credit bounds it too).
const BulkQueueRecords = 4

// CheckOffer validates a core.tcp.connect's bulk offer on a frame stamped with generation v,
// returning the core.tcp.failed text that refuses it ("" when it is acceptable).
func CheckOffer(o *protocol.BulkOffer, v uint8) string {
	switch {
	case v < protocol.TypeBulkAccepted.Info().Generation:
		return fmt.Sprintf("raw bulk offer requires protocol generation %d", protocol.TypeBulkAccepted.Info().Generation)
	case o.Validate() != nil:
		return "invalid TCP bulk offer: " + o.Validate().Error()
	case o.GuestToHostCreditLimit == 0:
		return "TCP bulk offer must grant guest-to-host credit"
	}
	return ""
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

	bulk    *bulkFlows // nil: the CBOR path
	current bool       // started by a host after generation 5: core.tcp.closed, drain or reset
	// sendCtx ends sending to the host without ending the session (a drain after tcp.close).
	sendCtx    context.Context
	stopSend   context.CancelFunc
	offerError string // the core.tcp.failed text refusing the connect's bulk offer

	mu        sync.Mutex
	conn      net.Conn
	ended     bool
	hostEnded bool // the host's end applied: its data written, the write side shut down
	destEnded bool // the destination's end reported to the host
	draining  bool
	finished  chan struct{}
}

// bulkFlows are a bulk session's two flows.
type bulkFlows struct {
	in     *sessionio.BulkIn  // host -> destination
	out    *sessionio.BulkOut // destination -> host
	record int                // max_record_payload, both ways
	offer  protocol.BulkOffer
}

// Go dials in the background: the caller's loop never waits for the connect. The session
// reports connected or a terminal failed. Register the session before calling Go, so the host
// never sees connected for a session the agent does not know.
func (s *Session) Go() { go s.run(s.host, s.port) }

// New creates the session for a core.tcp.connect without starting it. done is called once,
// when the session ends for any reason. v is the generation the connect frame was stamped
// with; a bulk offer in req is taken (or refused, see CheckOffer).
func New(id uint32, req protocol.TCPConnect, v uint8, out *sessionio.Writer, opts Options, log *slog.Logger, done func(*Session)) *Session {
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
	s.sendCtx, s.stopSend = context.WithCancel(ctx)
	s.current = v > protocol.ReferenceGeneration
	cfg := sessionio.SinkConfig{Limit: opts.InboundLimit, Budget: opts.Inbound}
	if s.flow {
		cfg.Grant = func(n int) {
			s.out.ControlMsg(s.ctx, s.id, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(n)})
		}
	}
	if req.Bulk != nil {
		if s.offerError = CheckOffer(req.Bulk, v); s.offerError == "" {
			s.flow = false
			s.bulk = newBulkFlows(s, *req.Bulk)
			// Room for a few records: the destination is read while the last record is written.
			s.q = out.NewQueue(max(opts.HighWater, BulkQueueRecords*s.bulk.record), max(opts.LowWater, (BulkQueueRecords-1)*s.bulk.record))
			// Only granted bytes arrive, and each is backed by Inbound: the sink never waits.
			cfg = sessionio.SinkConfig{Limit: protocol.BulkMaxWindow + BulkRecordMax, GrantEvery: sessionio.ChunkSize,
				Grant: s.bulk.in.Consumed, Big: true}
		}
	}
	s.in = sessionio.NewSink(ctx, cfg)
	s.host, s.port = req.Host, req.Port
	return s
}

func newBulkFlows(s *Session, offer protocol.BulkOffer) *bulkFlows {
	record := int(min(offer.MaxRecordPayload, BulkRecordMax))
	return &bulkFlows{
		offer: offer, record: record,
		out: sessionio.NewBulkOut(offer.GuestToHostCreditLimit),
		in: sessionio.NewBulkIn(sessionio.BulkInOptions{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest,
			MaxRecord: record, Window: uint64(s.opts.BulkWindow), Budget: s.opts.Inbound,
			Grant: func(consumed, limit uint64) {
				s.out.ControlMsg(s.ctx, s.id, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkTCP,
					Flow: protocol.BulkHostToGuest, ConsumedOffset: consumed, CreditLimit: limit})
			}}),
	}
}

// ID returns the session id.
func (s *Session) ID() uint32 { return s.id }

// Finished is closed when all of the session's goroutines have returned.
func (s *Session) Finished() <-chan struct{} { return s.finished }

func (s *Session) run(host string, port uint16) {
	defer close(s.finished)
	if s.offerError != "" {
		s.fail(s.offerError)
		return
	}
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
	if s.bulk != nil && !s.accept() {
		s.end()
		return
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.toDestination(conn) }()
	if s.bulk != nil {
		s.toHostBulk(conn)
	} else {
		s.toHost(conn)
	}
	wg.Wait()
}

// accept takes the bulk session's initial host -> destination credit and answers
// core.bulk.accepted, after core.tcp.connected (contract 6.5).
func (s *Session) accept() bool {
	b := s.bulk
	limit := b.in.Open()
	return s.q.PushMsg(s.ctx, s.id, protocol.TypeBulkAccepted, protocol.BulkAccepted{
		Kind: protocol.BulkTCP, Flows: protocol.BulkHostToGuest.Bit() | protocol.BulkGuestToHost.Bit(),
		Format: protocol.BulkFormatRawV1, MaxRecordPayload: uint32(b.record),
		HostToGuestCreditLimit: limit, GuestToHostCreditLimit: b.offer.GuestToHostCreditLimit}) == nil
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
		waitReadable(conn) // an idle session holds no buffer and none of the budget
		n := s.opts.ChunkSize
		if s.flow {
			var ok bool
			if n, ok = s.credit.Take(s.sendCtx, n); !ok {
				s.drain(conn)
				return
			}
		}
		if err := s.opts.Outbound.Acquire(s.sendCtx, n); err != nil {
			s.drain(conn)
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
			if perr := s.q.PushDataRelease(s.sendCtx, s.id, protocol.TypeTCPData, buf, m, rel); perr != nil {
				s.drain(conn)
				return
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err == io.EOF {
			if s.q.PushMsg(s.sendCtx, s.id, protocol.TypeTCPEOF, protocol.Empty{}) == nil {
				s.halfEnded(false) // the session stays open for host writes
			} else {
				s.drain(conn) // stopped by a close: the drain ends the session
			}
			return
		}
		if err != nil {
			if s.ctx.Err() == nil {
				s.fail("read TCP stream: " + describe(err))
			}
			return
		}
	}
}

// toHostBulk reads the destination into raw records, each within the host's credit, and
// finishes the flow at the destination's EOF.
func (s *Session) toHostBulk(conn net.Conn) {
	b := s.bulk
	var rel sessionio.Releaser
	if s.opts.Outbound != nil {
		rel = s.opts.Outbound
	}
	full := false // the last read filled its buffer: more is likely there, no need to wait
	for {
		off, n, ok := b.out.Wait(s.sendCtx, b.record)
		if !ok {
			s.drain(conn)
			return
		}
		if !full {
			waitReadable(conn) // an idle session holds no buffer and none of the budget
		}
		if err := s.opts.Outbound.Acquire(s.sendCtx, n); err != nil {
			s.drain(conn)
			return
		}
		buf := sessionio.GetBigBuf()
		if n <= sessionio.ChunkSize {
			sessionio.PutBuf(buf)
			buf = sessionio.GetBuf()
		}
		m, err := conn.Read((*buf)[:n])
		full = m == n
		s.opts.Outbound.Release(n - m)
		if m > 0 {
			b.out.Sent(m)
			if s.q.PushRecord(s.sendCtx, s.id, protocol.TypeTCPData, protocol.BulkTCP, protocol.BulkGuestToHost, off, buf, m, rel) != nil {
				s.drain(conn)
				return
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err == io.EOF {
			final := b.out.Finish()
			if s.q.PushMsg(s.sendCtx, s.id, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkTCP,
				Flow: protocol.BulkGuestToHost, FinalOffset: final}) == nil {
				s.halfEnded(false)
			} else {
				s.drain(conn)
			}
			return
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
			if err := cw.CloseWrite(); err != nil {
				if s.ctx.Err() == nil {
					s.fail("shutdown TCP stream: " + describe(err))
				}
				return
			}
		}
		if s.bulk != nil {
			s.bulk.in.Drained() // the reference's last credit once a finished flow is written
		}
		s.halfEnded(true)
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

// halfEnded records the end of one direction (host: the host's end was applied; else the
// destination's end was reported). Once both ended a current host's session ends with
// core.tcp.closed; a 0.5.7 host's waits for its core.tcp.close, as with the reference.
func (s *Session) halfEnded(host bool) {
	s.mu.Lock()
	if host {
		s.hostEnded = true
	} else {
		s.destEnded = true
	}
	both := s.hostEnded && s.destEnded && !s.ended && !s.draining && s.current
	s.mu.Unlock()
	if both && s.endKeepQueue() { // out of the table first, as for a failure
		s.q.PushMsg(context.Background(), s.id, protocol.TypeTCPClosed, protocol.Empty{})
	}
}

// drain reads and discards the destination until it closes, within DrainIdle of progress and
// DrainTotal in all, when sending to the host was stopped by a core.tcp.close (see Close); the
// session then ends. It does nothing for a session that is ending otherwise.
func (s *Session) drain(conn net.Conn) {
	s.mu.Lock()
	draining := s.draining && !s.ended
	s.mu.Unlock()
	if !draining {
		return
	}
	buf := sessionio.GetBuf()
	defer sessionio.PutBuf(buf)
	total := time.Now().Add(s.opts.DrainTotal)
	for s.ctx.Err() == nil {
		dl := time.Now().Add(s.opts.DrainIdle)
		if dl.After(total) {
			dl = total
		}
		conn.SetReadDeadline(dl)
		if _, err := conn.Read(*buf); err != nil {
			break
		}
	}
	s.end()
}

// waitReadable waits until a socket has bytes to read (or has ended), without reading them:
// a session then takes a buffer and budget only for data that is there, so any number of idle
// sessions hold neither. A connection without a descriptor returns at once; its read blocks.
func waitReadable(conn net.Conn) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	rc.Read(func(fd uintptr) bool { // an error (closed, deadline) is the next Read's too
		n, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return n > 0
	})
}

// errSessionClosed is the reference's text for data sent to a session that is over.
var errSessionClosed = errors.New("TCP session is closed")

// errCBORAfterBulk is the reference's text for CBOR data on a bulk session.
var errCBORAfterBulk = errors.New("CBOR TCP data is invalid after raw bulk acceptance")

// Write queues host data for the destination (copying it: it aliases the channel's read
// buffer). It waits while the session's buffer is full, which only a host without flow
// control can cause. Data after the host's own EOF is a write to a shut-down socket: once
// everything before the EOF is written, the session fails as the reference's does.
func (s *Session) Write(data []byte) error {
	if s.bulk != nil {
		return errCBORAfterBulk
	}
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
	if s.bulk != nil {
		return errCBORAfterBulk
	}
	if err := s.in.CloseWrite(); err != nil {
		return errSessionClosed
	}
	s.hostEOF.Store(true)
	return nil
}

// Record takes one raw bulk record from the host (its payload aliases the channel's read
// buffer and is copied). A record the session's flow does not allow fails the session.
func (s *Session) Record(r protocol.BulkRecord) {
	if s.bulk == nil {
		s.fail("raw bulk record received on a generation-6 TCP stream")
		return
	}
	if err := s.bulk.in.Accept(r); err != nil {
		s.fail("invalid TCP bulk record: " + err.Error())
		return
	}
	if s.in.Write(r.Payload) != nil {
		return // ending
	}
	if s.bulk.in.Complete() {
		s.in.CloseWrite()
	}
}

// BulkCredit applies the host's core.bulk.credit (for the destination -> host flow).
func (s *Session) BulkCredit(p protocol.BulkCredit) {
	switch {
	case s.bulk == nil:
		s.fail("core.bulk.credit received on a generation-6 TCP stream")
	case p.Kind != protocol.BulkTCP || p.Flow != protocol.BulkGuestToHost:
		s.fail(fmt.Sprintf("invalid TCP bulk credit: kind %d flow %d", p.Kind, p.Flow))
	default:
		if err := s.bulk.out.Credit(p.ConsumedOffset, p.CreditLimit); err != nil {
			s.fail("invalid TCP bulk credit: " + err.Error())
		}
	}
}

// BulkFinish applies the host's core.bulk.finish (its half-close): once every byte before it
// is written, the destination's write side is shut down.
func (s *Session) BulkFinish(p protocol.BulkFinish) {
	switch {
	case s.bulk == nil:
		s.fail("core.bulk.finish received on a generation-6 TCP stream")
	case p.Kind != protocol.BulkTCP || p.Flow != protocol.BulkHostToGuest:
		s.fail(fmt.Sprintf("invalid TCP bulk finish: kind %d flow %d", p.Kind, p.Flow))
	default:
		complete, err := s.bulk.in.Finish(p.FinalOffset)
		switch {
		case err != nil && strings.HasPrefix(err.Error(), "duplicate"):
			s.fail("duplicate TCP bulk finish")
		case err != nil:
			s.fail("invalid TCP bulk finish: " + err.Error())
		case complete:
			s.in.CloseWrite()
		}
	}
}

// BulkCancel ends the session at the host's core.bulk.cancel, with its message.
func (s *Session) BulkCancel(p protocol.BulkCancel) {
	if s.bulk == nil {
		s.fail("core.bulk.cancel received on a generation-6 TCP stream")
		return
	}
	s.fail(p.Message)
}

// Close is core.tcp.close. It sends nothing. If the host's side had ended in order (all its
// data written, the write side shut down), nothing more goes to the host but the destination
// is drained until it closes, so what was written reaches it whole and ends with a FIN;
// otherwise the destination is reset, so it cannot take a truncated stream for a whole one.
// A 0.5.7 host's session is closed at once, as the reference does.
func (s *Session) Close() {
	if !s.current {
		s.end()
		return
	}
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	if !s.hostEnded {
		conn := s.conn
		s.mu.Unlock()
		if l, ok := conn.(interface{ SetLinger(int) error }); ok && conn != nil {
			l.SetLinger(0)
		}
		s.end()
		return
	}
	s.draining = true
	s.mu.Unlock()
	s.q.Close() // queued output is dropped: no frame is owed after a close
	s.stopSend()
}

// Credit adds flow-control credit granted by the host.
func (s *Session) Credit(n uint32) { s.credit.Add(int64(n)) }

// Abort tears the session down at once without a frame (core.tcp.close, relay client
// disconnect, shutdown): queued data in both directions is dropped.
func (s *Session) Abort() { s.end() }

// Fail ends the session with a terminal core.tcp.failed carrying msg (a protocol error of the
// host's on this session).
func (s *Session) Fail(msg string) { s.fail(msg) }

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
	if s.bulk != nil {
		s.bulk.in.Close() // its credit's budget
	}
	s.cancel()
	if conn != nil {
		conn.Close()
	}
	if s.done != nil {
		s.done(s)
	}
	return true
}
