package hostserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
	"github.com/agentd/agentd/internal/oserr"
	"github.com/agentd/agentd/internal/resolvconf"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// DialOutOptions make a server serve guest-initiated streams (feature "streams"): the host
// dials out for the guest, which has no network device of its own.
type DialOutOptions struct {
	// Dial opens destinations (default: kernel sockets).
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// Egress is the host's own policy point (nil: allow every stream agentd asks for), with
	// the full rule set, as if the guest had none: each tcp and udp stream is admitted there
	// once, tracked (a reload can revoke it) and audited; the guest's DNS is answered by a
	// resolver of the host's that decides each query by name, refuses rebinding answers and
	// pins what it hands out, so domain rules hold here too; and a tcp stream's ClientHello
	// must pass the SNI check before a byte of it is sent on. A guest taken over completely
	// (its own policy gone) still reaches only what this allows.
	Egress *egress.Service
	// SNIWait bounds how long a TLS stream's ClientHello may take to arrive whole; a slower
	// one is refused (default 5 s).
	SNIWait time.Duration
	// DNS are the resolvers "dns" streams go to (default: /etc/resolv.conf's nameservers).
	DNS []netip.AddrPort
	// Window is the receive window granted to agentd per stream (default 256 KiB).
	Window int
	// MaxStreams bounds open streams; more are refused.
	MaxStreams     int
	ConnectTimeout time.Duration
	Log            *slog.Logger
}

// DefaultDialOutOptions are used for zero fields.
var DefaultDialOutOptions = DialOutOptions{Window: sessionio.DefaultStreamWindow, MaxStreams: 4096, ConnectTimeout: 30 * time.Second,
	SNIWait: 5 * time.Second}

// DialOutCounters are the totals of guest-initiated streams.
type DialOutCounters struct {
	Opened, Refused, Active, BytesUp, BytesDown atomic.Int64
}

// dialOut is the host end of guest-initiated streams on one channel.
type dialOut struct {
	opts     DialOutOptions
	send     func(frame []byte, after func()) bool // to the agent, in order; after runs once written
	log      *slog.Logger
	ctx      context.Context
	Counters *DialOutCounters

	res *resolver.Resolver // the host's resolver for the guest's DNS (with Egress)

	mu      sync.Mutex
	streams map[uint32]*hostStream
}

func newDialOut(ctx context.Context, o DialOutOptions, send func([]byte, func()) bool, c *DialOutCounters) *dialOut {
	d := DefaultDialOutOptions
	if o.Window <= 0 {
		o.Window = d.Window
	}
	if o.MaxStreams <= 0 {
		o.MaxStreams = d.MaxStreams
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = d.ConnectTimeout
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{}).DialContext
	}
	if o.DNS == nil {
		o.DNS = resolvconf.Servers(resolvconf.Path)
	}
	if o.SNIWait <= 0 {
		o.SNIWait = d.SNIWait
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	s := &dialOut{opts: o, send: send, log: o.Log, ctx: ctx, Counters: c, streams: map[uint32]*hostStream{}}
	if o.Egress != nil {
		s.res = resolver.New(o.Egress, resolver.Options{Upstream: resolver.Servers{Addrs: o.DNS, Dial: o.Dial}})
	}
	return s
}

func (s *dialOut) msg(id uint32, t protocol.Type, v any) bool {
	f, err := protocol.EncodeFrame(id, t, v)
	if err != nil {
		return false
	}
	return s.send(f, nil)
}

// handle takes one agentd.stream.* message from the agent (called by the server's reader, so
// it never blocks on a destination).
func (s *dialOut) handle(m protocol.Message) {
	if m.Type == protocol.TypeStreamOpen {
		var p protocol.StreamOpen
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			s.msg(m.ID, protocol.TypeStreamClose, protocol.StreamClose{Error: "bad open: " + err.Error()})
			return
		}
		s.open(m.ID, p)
		return
	}
	s.mu.Lock()
	st := s.streams[m.ID]
	s.mu.Unlock()
	if st == nil {
		return // ended here first
	}
	switch m.Type {
	case protocol.TypeStreamData:
		data, err := protocol.DecodeData(m.Payload)
		if err != nil {
			st.abort("bad data frame")
			return
		}
		st.fromGuest(data)
	case protocol.TypeStreamEOF:
		if st.gateHolding() { // the guest's side ended inside its ClientHello
			st.expireGate()
			return
		}
		if in := st.sink(); in != nil {
			in.CloseWrite()
		}
	case protocol.TypeStreamCredit:
		var p protocol.StreamCredit
		if protocol.Unmarshal(m.Payload, &p) == nil {
			st.credit.Add(int64(p.Bytes))
		}
	case protocol.TypeStreamClose:
		st.end("", false)
	}
}

// hostStream is one guest-initiated stream on the host.
type hostStream struct {
	s        *dialOut
	id       uint32
	proto    string
	dst      string
	ctx      context.Context
	cancel   context.CancelFunc
	credit   *sessionio.Credit // agentd's grant for host -> guest data
	start    time.Time
	up, down atomic.Int64
	flow     *egress.Flow // the host's decision (nil without a host policy)

	gmu      sync.Mutex
	gate     *egress.SNIGate // a tcp stream's first bytes, until its ClientHello is judged
	gateTime *time.Timer

	mu   sync.Mutex
	in   *sessionio.Sink // guest -> destination bytes (tcp)
	conn net.Conn
	once sync.Once
}

func (s *dialOut) open(id uint32, p protocol.StreamOpen) {
	dst := net.JoinHostPort(p.Addr, fmt.Sprint(p.Port))
	var ap netip.AddrPort
	refuse := func(why string) {
		s.Counters.Refused.Add(1)
		s.log.Info("stream refused", "id", id, "proto", p.Proto, "dst", dst, "reason", why)
		s.msg(id, protocol.TypeStreamClose, protocol.StreamClose{Error: why})
	}
	switch p.Proto {
	case "tcp", "udp":
		var err error
		if ap, err = netip.ParseAddrPort(dst); err != nil {
			refuse("bad destination " + dst)
			return
		}
	case "dns":
		if len(s.opts.DNS) == 0 {
			refuse("no resolver on the host")
			return
		}
		ap = s.opts.DNS[0]
		dst = ap.String()
	default:
		refuse("unsupported protocol " + p.Proto)
		return
	}
	var flow *egress.Flow
	if s.opts.Egress != nil && p.Proto != "dns" { // a dns stream's queries are decided one by one, by name
		var d policy.Decision
		if flow, d = s.opts.Egress.AdmitRequest(egress.Request{Protocol: policy.Protocol(p.Proto), Dsts: []netip.AddrPort{ap}, Via: "host"}); flow == nil {
			refuse("denied by the host's policy: rule " + d.RuleID)
			return
		}
	}
	ctx, cancel := context.WithCancel(s.ctx)
	st := &hostStream{s: s, id: id, proto: p.Proto, dst: dst, ctx: ctx, cancel: cancel,
		credit: sessionio.NewCredit(int64(p.Window)), start: time.Now(), flow: flow}
	if flow != nil && p.Proto == "tcp" {
		st.gate = flow.NewSNIGate()
	}
	s.mu.Lock()
	if len(s.streams) >= s.opts.MaxStreams || s.streams[id] != nil {
		s.mu.Unlock()
		cancel()
		flow.Close()
		refuse("too many streams (or a duplicate id)")
		return
	}
	s.streams[id] = st
	s.mu.Unlock()
	if flow != nil {
		flow.OnRevoke(func() { st.abort("revoked by the host's policy") })
	}
	go st.run(p.Window)
}

func (st *hostStream) run(window uint32) {
	s := st.s
	network := "tcp"
	if st.proto != "tcp" {
		network = "udp"
	}
	dctx, cancel := context.WithTimeout(st.ctx, s.opts.ConnectTimeout)
	var conn net.Conn
	var err error
	if st.proto == "dns" && s.res != nil {
		conn = newResolverConn(st.ctx, s.res)
	} else {
		conn, err = s.opts.Dial(dctx, network, st.dst)
	}
	cancel()
	if err != nil {
		s.Counters.Refused.Add(1)
		st.end(oserr.Text(err), true)
		return
	}
	st.mu.Lock()
	st.conn = conn
	st.mu.Unlock()
	if st.ctx.Err() != nil { // the guest gave up while we dialed
		st.end("", false)
		return
	}
	if st.proto == "tcp" {
		in := sessionio.NewSink(st.ctx, sessionio.SinkConfig{Limit: s.opts.Window, Grant: func(n int) {
			s.msg(st.id, protocol.TypeStreamCredit, protocol.StreamCredit{Bytes: uint32(n)})
		}})
		st.mu.Lock()
		st.in = in
		st.mu.Unlock()
	}
	s.Counters.Opened.Add(1)
	s.Counters.Active.Add(1)
	defer s.Counters.Active.Add(-1)
	s.log.Info("stream opened", "id", st.id, "proto", st.proto, "dst", st.dst)
	if !s.msg(st.id, protocol.TypeStreamOpened, protocol.StreamOpened{Window: uint32(s.opts.Window)}) {
		st.end("", false)
		return
	}
	var wg sync.WaitGroup
	if in := st.sink(); in != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := in.Run(countingWriter{conn, &st.up})
			if errors.Is(err, io.EOF) {
				if hc, ok := conn.(interface{ CloseWrite() error }); ok {
					hc.CloseWrite() // the guest's half-close
				}
			} else if err != nil {
				st.end(oserr.Text(err), true)
			}
		}()
	}
	st.toGuest(conn)
	wg.Wait()
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// maxChunk is the largest data frame a stream sends (and the largest UDP datagram).
const maxChunk = 64 << 10

// toGuest reads the destination within agentd's grants and sends data frames.
func (st *hostStream) toGuest(conn net.Conn) {
	buf := make([]byte, maxChunk) // also the largest datagram
	packet := st.proto != "tcp"
	// One data frame of this stream at a time in the channel's queue: the queue stays short
	// for everyone else, and the stream still keeps the channel busy (the next read overlaps
	// the write of the previous frame).
	slot := make(chan struct{}, 1)
	for {
		want := len(buf)
		got := 0
		for got < want { // a datagram needs room for the largest one; a stream any credit
			n, ok := st.credit.Take(st.ctx, want-got)
			if !ok {
				st.end("", false)
				return
			}
			got += n
			if !packet {
				break
			}
		}
		n, err := conn.Read(buf[:got])
		st.credit.Add(int64(got - max(n, 0)))
		if n > 0 {
			st.down.Add(int64(n))
			f, ferr := protocol.AppendData(nil, st.id, protocol.TypeStreamData, buf[:n])
			select {
			case slot <- struct{}{}:
			case <-st.ctx.Done():
				st.end("", false)
				return
			}
			if ferr != nil || !st.s.send(f, func() { <-slot }) {
				st.end("", false)
				return
			}
		}
		if err != nil {
			if packet && errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			if errors.Is(err, io.EOF) {
				st.s.msg(st.id, protocol.TypeStreamEOF, protocol.Empty{})
				return // the guest closes the stream when it is done with its side
			}
			st.end(oserr.Text(err), true)
			return
		}
	}
}

// sink is the guest -> destination queue of a tcp stream (nil until it is connected).
func (st *hostStream) sink() *sessionio.Sink {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.in
}

// fromGuest takes guest data: into the sink for tcp (through the SNI gate), straight out as
// one datagram for udp. It runs on the server's reader, so it never waits: data beyond the
// window the host granted is a protocol violation that ends the stream.
func (st *hostStream) fromGuest(data []byte) {
	if in := st.sink(); in != nil {
		if in.Buffered()+len(data) > st.s.opts.Window {
			st.abort("the guest sent beyond its window")
			return
		}
		data, ok := st.passGate(data)
		if !ok {
			st.abort("refused by the host's policy: TLS server name")
			return
		}
		if len(data) > 0 && in.Write(data) != nil {
			st.abort("write to the destination failed")
		}
		return
	}
	st.mu.Lock()
	conn := st.conn
	st.mu.Unlock()
	if conn != nil {
		if _, err := conn.Write(data); err != nil { // a datagram: lost or sent, as UDP is
			st.s.log.Debug("datagram not sent", "id", st.id, "dst", st.dst, "error", err)
		}
		st.up.Add(int64(len(data)))
	}
	st.s.msg(st.id, protocol.TypeStreamCredit, protocol.StreamCredit{Bytes: uint32(len(data))})
}

func (st *hostStream) abort(why string) { st.end(why, true) }

// end closes the stream once; tell says whether agentd must be told (it did not end it).
func (st *hostStream) end(why string, tell bool) {
	st.once.Do(func() {
		s := st.s
		s.mu.Lock()
		if s.streams[st.id] == st {
			delete(s.streams, st.id)
		}
		s.mu.Unlock()
		st.cancel()
		if in := st.sink(); in != nil {
			in.Close()
		}
		st.mu.Lock()
		if st.conn != nil {
			st.conn.Close()
		}
		st.mu.Unlock()
		if tell {
			s.msg(st.id, protocol.TypeStreamClose, protocol.StreamClose{Error: why})
		}
		s.log.Info("stream closed", "id", st.id, "proto", st.proto, "dst", st.dst, "bytes_up", st.up.Load(),
			"bytes_down", st.down.Load(), "duration", time.Since(st.start).Round(time.Millisecond).String(), "error", why)
		s.Counters.BytesUp.Add(st.up.Load())
		s.Counters.BytesDown.Add(st.down.Load())
		st.flow.Count(st.up.Load(), st.down.Load())
		st.flow.Close()
	})
}

// closeAll ends every stream (the channel is gone).
func (s *dialOut) closeAll() {
	s.mu.Lock()
	all := make([]*hostStream, 0, len(s.streams))
	for _, st := range s.streams {
		all = append(all, st)
	}
	s.mu.Unlock()
	for _, st := range all {
		st.end("", false)
	}
}

// passGate runs a tcp stream's data through its SNI gate (all of it passes once the gate has
// judged). The first bytes held start the SNIWait deadline.
func (st *hostStream) passGate(data []byte) ([]byte, bool) {
	st.gmu.Lock()
	defer st.gmu.Unlock()
	g := st.gate
	if g == nil || g.Done() {
		return data, true
	}
	pass, ok := g.Feed(data)
	if g.Holding() && st.gateTime == nil {
		st.gateTime = time.AfterFunc(st.s.opts.SNIWait, st.expireGate)
	}
	if g.Done() && st.gateTime != nil {
		st.gateTime.Stop()
	}
	return pass, ok
}

func (st *hostStream) gateHolding() bool {
	st.gmu.Lock()
	defer st.gmu.Unlock()
	return st.gate != nil && st.gate.Holding()
}

// expireGate refuses a ClientHello still incomplete at the deadline (or at the guest's EOF).
func (st *hostStream) expireGate() {
	st.gmu.Lock()
	held := st.gate.Holding()
	if held {
		st.gate.Expire()
	}
	st.gmu.Unlock()
	if held {
		st.abort("refused by the host's policy: incomplete TLS ClientHello")
	}
}

// resolverConn is a dns stream answered by the host's resolver: each datagram written is a
// query (decided by name), each read returns an answer. At most resolverQueries per stream
// are in flight; more are dropped, as datagrams may be.
type resolverConn struct {
	res      *resolver.Resolver
	ctx      context.Context
	cancel   context.CancelFunc
	inflight chan struct{}
	answers  chan []byte
}

const resolverQueries = 8

func newResolverConn(ctx context.Context, res *resolver.Resolver) *resolverConn {
	ctx, cancel := context.WithCancel(ctx)
	return &resolverConn{res: res, ctx: ctx, cancel: cancel, inflight: make(chan struct{}, resolverQueries),
		answers: make(chan []byte, resolverQueries)}
}

func (c *resolverConn) Write(q []byte) (int, error) {
	select {
	case c.inflight <- struct{}{}:
	default:
		return len(q), nil // dropped
	}
	q = append([]byte(nil), q...)
	go func() {
		defer func() { <-c.inflight }()
		resp, err := c.res.Answer(c.ctx, netip.AddrPort{}, q, policy.UDP)
		if err != nil {
			return // unanswerable (no header): dropped, as a DNS server drops it
		}
		select {
		case c.answers <- resp:
		case <-c.ctx.Done():
		}
	}()
	return len(q), nil
}

func (c *resolverConn) Read(b []byte) (int, error) {
	select {
	case a := <-c.answers:
		return copy(b, a), nil
	case <-c.ctx.Done():
		return 0, net.ErrClosed
	}
}

func (c *resolverConn) Close() error                     { c.cancel(); return nil }
func (c *resolverConn) LocalAddr() net.Addr              { return &net.UDPAddr{} }
func (c *resolverConn) RemoteAddr() net.Addr             { return &net.UDPAddr{} }
func (c *resolverConn) SetDeadline(time.Time) error      { return nil }
func (c *resolverConn) SetReadDeadline(time.Time) error  { return nil }
func (c *resolverConn) SetWriteDeadline(time.Time) error { return nil }
