// Package host is the host side of the agent protocol: a client that talks to agentd either
// directly over the channel (doing the init handshake itself) or through a relay's unix
// socket (microsandbox's client handshake), and the relay server itself.
//
// The client reads the channel in its own goroutine, independently of writing: a pty or a
// virtio port buffers only a few KiB per direction, so a host that blocks on a write while not
// reading would deadlock against the agent.
package host

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// ErrClosed is returned once the client's connection is gone.
var ErrClosed = errors.New("agent connection closed")

// RemoteError is a core.error reply.
type RemoteError = protocol.CoreError

// UnsupportedError is returned, without sending anything, for a type the peer's generation
// does not know.
type UnsupportedError struct {
	Type    protocol.Type
	Needs   uint8
	PeerGen uint8
}

func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("%s needs protocol generation %d; the agent speaks %d", e.Type, e.Needs, e.PeerGen)
}

// Options configure a client.
type Options struct {
	// Features are the extensions requested in core.init.ack (direct mode only; behind a relay
	// the relay negotiates). Default: flow control.
	Features []string
	// SessionQueue bounds frames queued per session that has no flow control (exec output, fs
	// data). A full queue stalls the reader for every session, as in microsandbox's client.
	SessionQueue int
	// Window is the receive window granted per flow-controlled TCP stream.
	Window int
	// Generation is the protocol generation this host speaks (default protocol.Version): it
	// stamps it on every frame and runs each connection at the lower of it and the agent's
	// (Client.Generation). A lower one makes the host behave as a host of that generation.
	Generation uint8
	// BulkWindow is the receive credit a bulk stream grants ahead of what was read (default
	// protocol.BulkDefaultWindow, the reference's 8 MiB).
	BulkWindow int
	// HandshakeTimeout bounds the wait for init.resolved/ready (direct) or the relay greeting.
	HandshakeTimeout time.Duration
	// Bootstrap, when set, is written as the channel's first frame (direct mode only), as a
	// current host configures its guest: core.bootstrap, id 0, before anything else.
	Bootstrap *protocol.Bootstrap
	Log       *slog.Logger
}

// DefaultOptions for a client.
var DefaultOptions = Options{
	Features:         []string{protocol.FeatureFlow, protocol.FeaturePolicy},
	SessionQueue:     1024,
	Window:           1 << 20,
	HandshakeTimeout: 60 * time.Second,
}

func (o Options) withDefaults() Options {
	d := DefaultOptions
	if o.Features == nil {
		o.Features = d.Features
	}
	if o.SessionQueue <= 0 {
		o.SessionQueue = d.SessionQueue
	}
	if o.Window <= 0 {
		o.Window = d.Window
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = d.HandshakeTimeout
	}
	if o.Generation == 0 || o.Generation > protocol.Version {
		o.Generation = protocol.Version
	}
	if o.BulkWindow <= 0 || o.BulkWindow > protocol.BulkMaxWindow {
		o.BulkWindow = protocol.BulkDefaultWindow
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	return o
}

// Client is one connection to an agent.
type Client struct {
	Greeting // what the handshake told

	conn io.ReadWriteCloser
	opts Options
	fr   *protocol.FrameReader

	idMin, idEnd uint32 // ids this client may use: [idMin, idEnd)
	relayed      bool   // behind a relay server (FromRelay), not on the channel itself

	// ctx ends when the connection does (done is closed first).
	ctx    context.Context
	cancel context.CancelFunc

	wmu      sync.Mutex // serializes writes of whole frames
	mu       sync.Mutex
	next     uint32
	sessions map[uint32]*Session
	closed   bool
	err      error
	done     chan struct{}
}

// Greeting is what the host learns from the agent in the handshake.
type Greeting struct {
	Resolved   protocol.InitResolved // direct mode only
	Ready      protocol.Ready
	ReadyV     uint8
	ReadyFrame []byte // the raw core.ready frame (a relay server hands it to its clients)
}

// Handshake performs the host side of the init handshake on a raw agent channel: it waits for
// core.init.resolved (dropping anything else), acknowledges it with features and waits for
// core.ready. It returns the frame reader to go on with, which may hold bytes read past
// core.ready. Direct uses it; so does a relay server, which then owns the channel.
func Handshake(conn io.ReadWriteCloser, opts Options) (Greeting, *protocol.FrameReader, error) {
	opts = opts.withDefaults()
	var g Greeting
	if opts.Bootstrap != nil {
		p, err := protocol.Marshal(opts.Bootstrap)
		if err != nil {
			return g, nil, fmt.Errorf("handshake: encode core.bootstrap: %w", err)
		}
		// A host that sends it speaks at least the generation that introduced it.
		f, _ := protocol.AppendMessageV(nil, max(opts.Generation, protocol.BootstrapGeneration), 0, protocol.TypeBootstrap, p)
		if _, err := conn.Write(f); err != nil {
			return g, nil, fmt.Errorf("handshake: send core.bootstrap: %w", err)
		}
	}
	fr := protocol.NewFrameReader(conn)
	stop := watchdog(conn, opts.HandshakeTimeout)
	defer stop()
	for {
		m, raw, err := readMessage(fr)
		if err != nil {
			return g, nil, fmt.Errorf("handshake: %w", err)
		}
		switch m.Type {
		case protocol.TypeInitResolved:
			if err := protocol.Unmarshal(m.Payload, &g.Resolved); err != nil {
				return g, nil, fmt.Errorf("handshake: decode core.init.resolved: %w", err)
			}
			p, _ := protocol.Marshal(protocol.InitAck{Features: opts.Features})
			ack, _ := protocol.AppendMessageV(nil, opts.Generation, 0, protocol.TypeInitAck, p)
			if _, err := conn.Write(ack); err != nil {
				return g, nil, fmt.Errorf("handshake: send core.init.ack: %w", err)
			}
		case protocol.TypeReady:
			if err := g.setReady(m, raw); err != nil {
				return g, nil, err
			}
			return g, fr, nil
		default:
			opts.Log.Debug("dropped pre-ready frame", "type", m.Name())
		}
	}
}

// Direct performs the init handshake on a raw agent channel (see Handshake). The client then
// owns the whole id space.
func Direct(conn io.ReadWriteCloser, opts Options) (*Client, error) {
	opts = opts.withDefaults()
	g, fr, err := Handshake(conn, opts)
	if err != nil {
		return nil, err
	}
	c := newClient(conn, fr, opts, 1, 1<<32-1)
	c.Greeting = g
	go c.readLoop()
	return c, nil
}

// Connect dials a relay's unix socket and performs microsandbox's client handshake:
// [id_start u32 BE][id_end_exclusive u32 BE][core.ready frame].
func Connect(path string, opts Options) (*Client, error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to relay %s: %w", path, err)
	}
	c, err := FromRelay(conn, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// FromRelay performs the relay client handshake on an established connection.
func FromRelay(conn io.ReadWriteCloser, opts Options) (*Client, error) {
	opts = opts.withDefaults()
	stop := watchdog(conn, opts.HandshakeTimeout)
	defer stop()
	var hdr [8]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("relay handshake: read id range: %w", err)
	}
	start, end := binary.BigEndian.Uint32(hdr[:]), binary.BigEndian.Uint32(hdr[4:])
	if start == 0 || end <= start {
		return nil, fmt.Errorf("relay handshake: bad id range [%d, %d)", start, end)
	}
	c := newClient(conn, protocol.NewFrameReader(conn), opts, start, end)
	c.relayed = true
	m, raw, err := readMessage(c.fr)
	if err != nil {
		return nil, fmt.Errorf("relay handshake: read core.ready: %w", err)
	}
	if m.Type != protocol.TypeReady {
		return nil, fmt.Errorf("relay handshake: expected core.ready, got %s", m.Name())
	}
	if err := c.setReady(m, raw); err != nil {
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

// watchdog closes conn if the handshake takes longer than d.
func watchdog(conn io.Closer, d time.Duration) func() {
	t := time.AfterFunc(d, func() { conn.Close() })
	return func() { t.Stop() }
}

func newClient(conn io.ReadWriteCloser, fr *protocol.FrameReader, opts Options, start, end uint32) *Client {
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{conn: conn, opts: opts, fr: fr, idMin: start, idEnd: end, ctx: ctx, cancel: cancel,
		next: start, sessions: map[uint32]*Session{}, done: make(chan struct{})}
}

func readMessage(fr *protocol.FrameReader) (protocol.Message, []byte, error) {
	f, err := fr.Next()
	if err != nil {
		return protocol.Message{}, nil, err
	}
	m, err := protocol.DecodeMessage(f)
	if err != nil {
		return m, nil, err
	}
	raw, _ := protocol.AppendRawFrame(nil, f.ID, f.Flags, f.Body)
	m.Payload = append([]byte(nil), m.Payload...)
	return m, raw, nil
}

func (g *Greeting) setReady(m protocol.Message, raw []byte) error {
	if err := protocol.Unmarshal(m.Payload, &g.Ready); err != nil {
		return fmt.Errorf("handshake: decode core.ready: %w", err)
	}
	g.ReadyV, g.ReadyFrame = m.V, raw
	return nil
}

// Generation is the negotiated generation: min(ours, the agent's core.ready v).
func (c *Client) Generation() uint8 { return protocol.Negotiated(c.opts.Generation, c.ReadyV) }

// Bulk reports whether sessions use generation-8 raw bulk transfer (the negotiated generation
// has it).
func (c *Client) Bulk() bool { return protocol.TypeBulkAccepted.AvailableAt(c.Generation()) }

// HasFeature reports whether the agent enabled an extension for this host.
func (c *Client) HasFeature(name string) bool { return protocol.HasFeature(c.Ready.Features, name) }

// IDRange returns the ids this client may use.
func (c *Client) IDRange() (start, end uint32) { return c.idMin, c.idEnd }

// Done is closed when the connection ends; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns the error that ended the connection.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection; every session sees ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Send writes one frame with a raw payload. Frames are written whole, in call order.
func (c *Client) Send(id uint32, t protocol.Type, payload []byte) error {
	if !t.Info().Extension && !t.AvailableAt(c.Generation()) {
		return &UnsupportedError{t, t.Info().Generation, c.Generation()}
	}
	frame, err := protocol.AppendMessageV(nil, c.opts.Generation, id, t, payload)
	if err != nil {
		return err
	}
	return c.WriteFrame(frame)
}

// SendMsg marshals v and sends it.
func (c *Client) SendMsg(id uint32, t protocol.Type, v any) error {
	p, err := protocol.Marshal(v)
	if err != nil {
		return err
	}
	return c.Send(id, t, p)
}

// WriteFrame writes an already encoded frame (raw tier; used by tests and relays).
func (c *Client) WriteFrame(frame []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	if _, err := c.conn.Write(frame); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

// sendData writes a {"data": ...} frame straight from the caller's buffer: the header is
// built in a small array and both go out in one writev on sockets (no copy, no allocation).
func (c *Client) sendData(id uint32, t protocol.Type, data []byte) error {
	var hdr [64]byte
	h, err := protocol.AppendDataHeaderV(hdr[:0], c.opts.Generation, id, t, len(data))
	if err != nil {
		return err
	}
	return c.writeParts(h, data)
}

// sendRecord writes a raw bulk record straight from the caller's buffer, as sendData does.
func (c *Client) sendRecord(id uint32, kind protocol.BulkKind, flow protocol.BulkFlow, offset uint64, data []byte) error {
	var hdr [32]byte
	h, err := protocol.AppendBulkHeader(hdr[:0], id, kind, flow, offset, len(data))
	if err != nil {
		return err
	}
	return c.writeParts(h, data)
}

// writeParts writes a frame's header and body as one frame.
func (c *Client) writeParts(h, data []byte) error {
	var err error
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	if _, ok := c.conn.(net.Conn); ok {
		bufs := net.Buffers{h, data}
		_, err = bufs.WriteTo(c.conn) // one writev
	} else { // a tty or device: one write per frame, from a pooled buffer
		b := framePool.Get().(*[]byte)
		*b = append(append((*b)[:0], h...), data...)
		_, err = c.conn.Write(*b)
		if cap(*b) <= 1<<20 {
			framePool.Put(b)
		}
	}
	if err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

var framePool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10+64); return &b }}

// Shutdown sends core.shutdown (id 0, payload null).
func (c *Client) Shutdown() error {
	return c.Send(0, protocol.TypeShutdown, []byte{0xf6})
}

// Ping checks that the agent is alive and serving (core.ping, generation 6). It is not
// activity: the sandbox's idle time goes on.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.Request(ctx, protocol.TypePing, protocol.Empty{})
	return err
}

// Touch refreshes the sandbox's idle time without a session (core.touch, generation 6) and
// returns the agent's activity sequence number after it.
func (c *Client) Touch(ctx context.Context) (uint64, error) {
	m, err := c.Request(ctx, protocol.TypeTouch, protocol.Empty{})
	if err != nil {
		return 0, err
	}
	if m.Type != protocol.TypeTouched {
		return 0, fmt.Errorf("touch: unexpected reply %s", m.Name())
	}
	var p protocol.Touched
	if err := protocol.Unmarshal(m.Payload, &p); err != nil {
		return 0, fmt.Errorf("decode core.touched: %w", err)
	}
	return p.ActivitySeq, nil
}

// delivery is a message for a session; data payloads sit in a pooled buffer (buf) that the
// internal consumers return once used.
type delivery struct {
	m   protocol.Message
	buf *[]byte
	rec *protocol.BulkRecord // a raw bulk record (its payload in buf), instead of m
	err error                // the session's flow broke (a bad record or credit), instead of m
}

// Session is every frame of one id.
type Session struct {
	c   *Client
	ID  uint32
	ch  chan delivery // bounded; the reader waits when full (flow-controlled senders never fill it)
	tcp *TCPConn      // set for flow-controlled TCP sessions
	// ctx ends when the session is closed (or the client is); done is its Done channel.
	ctx    context.Context
	cancel context.CancelFunc
	done   <-chan struct{}

	// Send credit (agentd.flow.credit), taken in by the reader so that a sender waiting for
	// credit never depends on anyone draining ch.
	credit *sessionio.Credit
	// An fs bulk stream's flows (guarded by Client.mu until the request is sent): records it
	// receives are checked against bulkIn and delivered in order with its messages; the
	// agent's credit for what it sends is applied to bulkOut by the reader.
	bulkIn  *sessionio.BulkIn
	bulkOut *sessionio.BulkOut
}

// bulkError ends a session whose flow broke: a TCP stream fails, an fs stream's consumer gets
// the error in order.
func (s *Session) bulkError(err error) {
	if s.tcp != nil {
		s.tcp.fail(err)
		return
	}
	select {
	case s.ch <- delivery{err: err}:
	case <-s.done:
	default: // the queue is full of what came before: the consumer ends on the flow's state
	}
}

// takeCredit waits for credit and takes up to want bytes of it; it gives up when ctx ends or
// the session or the client is closed.
func (s *Session) takeCredit(ctx context.Context, want int) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	if n, ok := s.credit.Take(ctx, want); ok {
		return n, nil
	}
	if s.ctx.Err() != nil {
		return 0, ErrClosed
	}
	return 0, ctx.Err()
}

// Open allocates an id and registers a session for it, without sending anything. Ids are never
// reused (current relays reject a reused one): once the range is spent, Open fails.
func (c *Client) Open() (*Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	for c.next < c.idEnd {
		id := c.next
		c.next++
		if _, busy := c.sessions[id]; !busy { // taken by OpenID
			s := c.newSession(id)
			c.sessions[id] = s
			return s, nil
		}
	}
	return nil, errors.New("id range exhausted: ids are not reused; connect again")
}

// OpenID registers a session for a chosen id (raw tier: tests and tools that need exact ids).
func (c *Client) OpenID(id uint32) (*Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if _, busy := c.sessions[id]; busy {
		return nil, fmt.Errorf("id %d is in use", id)
	}
	s := c.newSession(id)
	c.sessions[id] = s
	return s, nil
}

func (c *Client) newSession(id uint32) *Session {
	ctx, cancel := context.WithCancel(c.ctx)
	return &Session{c: c, ID: id, ch: make(chan delivery, c.opts.SessionQueue), ctx: ctx, cancel: cancel, done: ctx.Done(),
		credit: sessionio.NewCredit(0)}
}

// Start opens a session and sends its first (session-start) message.
func (c *Client) Start(t protocol.Type, v any) (*Session, error) {
	s, err := c.Open()
	if err != nil {
		return nil, err
	}
	if err := c.SendMsg(s.ID, t, v); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Recv returns the session's next message. After the terminal message it returns io.EOF.
func (s *Session) Recv(ctx context.Context) (protocol.Message, error) {
	d, err := s.recv(ctx)
	return d.m, err // a pooled buffer is simply left to the garbage collector
}

// recv is Recv with the pooled buffer, for consumers that hand it back with release.
func (s *Session) recv(ctx context.Context) (delivery, error) {
	select {
	case d, ok := <-s.ch:
		if !ok {
			return d, io.EOF
		}
		return d, nil
	case <-ctx.Done():
		return delivery{}, ctx.Err()
	case <-s.c.done:
		select { // drain what arrived before the connection closed
		case d, ok := <-s.ch:
			if ok {
				return d, nil
			}
			return d, io.EOF
		default:
		}
		return delivery{}, ErrClosed
	}
}

// release returns a delivery's pooled buffer.
func (d *delivery) release() {
	if d.buf != nil {
		if cap(*d.buf) >= sessionio.BigChunkSize {
			sessionio.PutBuf(d.buf)
		} else {
			rpool.Put(d.buf)
		}
		d.buf = nil
	}
}

// Close unregisters the session (no frame is sent).
func (s *Session) Close() {
	s.c.mu.Lock()
	if s.c.sessions[s.ID] == s {
		delete(s.c.sessions, s.ID)
	}
	s.c.mu.Unlock()
	s.cancel()
}

// Request sends a session-start message and waits for its terminal reply. A core.error reply
// is returned as *RemoteError.
func (c *Client) Request(ctx context.Context, t protocol.Type, v any) (protocol.Message, error) {
	s, err := c.Start(t, v)
	if err != nil {
		return protocol.Message{}, err
	}
	defer s.Close()
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			return m, err
		}
		if m.Flags&protocol.FlagTerminal != 0 {
			return m, AsError(m)
		}
	}
}

// AsError returns a *RemoteError for a core.error message, else nil.
func AsError(m protocol.Message) error {
	if m.Type != protocol.TypeError {
		return nil
	}
	var e protocol.CoreError
	if err := protocol.Unmarshal(m.Payload, &e); err != nil {
		return fmt.Errorf("undecodable core.error: %w", err)
	}
	return &e
}

func (c *Client) readLoop() {
	var err error
	defer func() {
		c.mu.Lock()
		c.closed, c.err = true, err
		sessions := c.sessions
		c.sessions = map[uint32]*Session{}
		c.mu.Unlock()
		close(c.done)
		c.cancel()
		for _, s := range sessions {
			if s.tcp != nil {
				s.tcp.fail(ErrClosed)
			}
		}
	}()
	for {
		var f protocol.Frame
		f, err = c.fr.Next()
		if err != nil {
			if err == io.EOF {
				err = ErrClosed
			}
			return
		}
		if f.Flags == protocol.FlagBulk {
			c.record(f)
			continue
		}
		m, derr := protocol.DecodeMessage(f)
		if derr != nil {
			c.opts.Log.Warn("dropped undecodable frame from agent", "id", f.ID, "error", derr)
			continue
		}
		c.mu.Lock()
		s := c.sessions[m.ID]
		var tc *TCPConn
		if s != nil {
			tc = s.tcp
		}
		c.mu.Unlock()
		if s == nil {
			continue // no pending id: dropped, as microsandbox's client does
		}
		if tc != nil && tc.deliver(m) {
			continue
		}
		if m.Type == protocol.TypeFlowCredit {
			var p protocol.FlowCredit
			if protocol.Unmarshal(m.Payload, &p) == nil {
				s.credit.Add(int64(p.Bytes))
			}
			continue
		}
		if m.Type == protocol.TypeBulkCredit && s.bulkOut != nil { // taken in here, as flow credit is
			var p protocol.BulkCredit
			if err := protocol.Unmarshal(m.Payload, &p); err != nil {
				s.bulkError(fmt.Errorf("decode core.bulk.credit: %w", err))
			} else if p.Flow != protocol.BulkHostToGuest {
				s.bulkError(fmt.Errorf("core.bulk.credit for flow %d of a host -> guest stream", p.Flow))
			} else if err := s.bulkOut.Credit(p.ConsumedOffset, p.CreditLimit); err != nil {
				s.bulkError(fmt.Errorf("agent: core.bulk.credit: %w", err))
			}
			continue
		}
		d := delivery{m: m}
		if n := len(m.Payload); n <= 64<<10+64 && m.Type.IsData() {
			d.buf = rpool.Get().(*[]byte)
			if cap(*d.buf) < n {
				*d.buf = make([]byte, n)
			}
			d.m.Payload = (*d.buf)[:copy((*d.buf)[:cap(*d.buf)], m.Payload)]
		} else {
			d.m.Payload = append([]byte(nil), m.Payload...)
		}
		select {
		case s.ch <- d:
		case <-s.done:
			d.release()
		}
		if m.Flags&protocol.FlagTerminal != 0 {
			c.mu.Lock()
			if c.sessions[m.ID] == s {
				delete(c.sessions, m.ID)
			}
			c.mu.Unlock()
			close(s.ch)
			s.cancel() // the session is over: a sender waiting for credit gives up
		}
	}
}

// record routes a raw bulk record to the session of its id (a record for none is dropped, as
// any frame for no pending id is).
func (c *Client) record(f protocol.Frame) {
	r, err := protocol.ParseBulkRecord(f)
	c.mu.Lock()
	s := c.sessions[f.ID]
	c.mu.Unlock()
	switch {
	case s == nil:
	case err != nil:
		s.bulkError(fmt.Errorf("invalid raw bulk record: %w", err))
	case s.tcp != nil:
		s.tcp.record(r)
	case s.bulkIn != nil:
		// Checked here, against the credit this side granted: so the records queued for the
		// consumer never exceed it, and a misbehaving agent cannot make the reader wait.
		if err := s.bulkIn.Accept(r); err != nil {
			s.bulkError(fmt.Errorf("agent: %w", err))
			return
		}
		d := delivery{buf: sessionio.GetBigBuf()}
		if len(r.Payload) > cap(*d.buf) {
			*d.buf = make([]byte, len(r.Payload))
		}
		r.Payload = (*d.buf)[:copy((*d.buf)[:cap(*d.buf)], r.Payload)]
		d.rec = &r
		select {
		case s.ch <- d:
		case <-s.done:
			sessionio.PutBuf(d.buf)
		}
	default:
		s.bulkError(errors.New("raw bulk record on a session that accepted none"))
	}
}
