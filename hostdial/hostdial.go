// Package hostdial is agentd's end of guest-initiated streams (protocol feature "streams"): a
// Dialer whose connections are carried over the agent channel and dialed by the host. The
// netstack uses it as its upstream dialer in a sandbox with no network device: every allowed
// guest flow becomes a stream, and the host decides again and dials out.
//
// Flow control is per stream in both directions: agentd sends at most what the host granted
// (agentd.stream.credit) and buffers at most the window it granted the host, so one slow
// stream holds back only itself and memory stays bounded however many streams are open.
package hostdial

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Options configure an Endpoint.
type Options struct {
	// Window is the receive window granted to the host per stream: the most bytes of one
	// stream agentd buffers for a slow reader.
	Window int
	// MaxStreams bounds open streams; more dials fail at once.
	MaxStreams int
	// QueueHigh and QueueLow are the watermarks of a stream's outgoing frame queue.
	QueueHigh, QueueLow int
}

// DefaultOptions: a 256 KiB window keeps a gigabit stream busy over a ~1 ms channel, and 4,096
// streams of it is at most 1 GiB only if every one of them stalls with a full window.
var DefaultOptions = Options{Window: sessionio.DefaultStreamWindow, MaxStreams: 4096,
	QueueHigh: sessionio.DefaultHighWater, QueueLow: sessionio.DefaultLowWater}

// ErrUnavailable is returned by Dial before the host enabled streams (or after the channel
// ended).
var ErrUnavailable = errors.New("streams: the host did not enable guest-initiated streams")

// Endpoint is the guest's end of all streams on one channel.
type Endpoint struct {
	opts Options

	mu    sync.Mutex
	out   *sessionio.Writer
	next  uint32
	conns map[uint32]*Conn
}

// New returns an endpoint; it dials nothing until Attach.
func New(o Options) *Endpoint {
	d := DefaultOptions
	if o.Window <= 0 {
		o.Window = d.Window
	}
	if o.MaxStreams <= 0 {
		o.MaxStreams = d.MaxStreams
	}
	if o.QueueHigh <= 0 {
		o.QueueHigh, o.QueueLow = d.QueueHigh, d.QueueLow
	}
	return &Endpoint{opts: o, conns: map[uint32]*Conn{}}
}

// Attach starts dialing over w (the agent's writer, once the host enabled the feature).
func (e *Endpoint) Attach(w *sessionio.Writer) {
	e.mu.Lock()
	e.out = w
	e.mu.Unlock()
}

// Detach fails every open stream and stops dialing (the channel ended).
func (e *Endpoint) Detach() {
	e.mu.Lock()
	e.out = nil
	conns := e.conns
	e.conns = map[uint32]*Conn{}
	e.mu.Unlock()
	for _, c := range conns {
		c.fail(errors.New("agent channel closed"))
	}
}

// Open reports the open streams.
func (e *Endpoint) Open() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// Handle takes one agentd.stream.* message from the host. Unknown ids are ignored (the
// stream ended on this side first).
func (e *Endpoint) Handle(m protocol.Message) error {
	e.mu.Lock()
	c := e.conns[m.ID]
	e.mu.Unlock()
	if c == nil {
		return nil
	}
	switch m.Type {
	case protocol.TypeStreamOpened:
		var p protocol.StreamOpened
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			return err
		}
		c.credit.Add(int64(p.Window))
		c.signalOpen(nil)
	case protocol.TypeStreamData:
		data, err := protocol.DecodeData(m.Payload)
		if err != nil {
			return err
		}
		if !c.deliver(data) {
			c.Close() // the host overran its window: end the stream, keep the channel
		}
	case protocol.TypeStreamEOF:
		c.mu.Lock()
		c.eof = true
		c.mu.Unlock()
		c.wake()
	case protocol.TypeStreamCredit:
		var p protocol.StreamCredit
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			return err
		}
		c.credit.Add(int64(p.Bytes))
	case protocol.TypeStreamClose:
		var p protocol.StreamClose
		protocol.Unmarshal(m.Payload, &p)
		msg := p.Error
		if msg == "" {
			msg = "closed by the host"
		}
		e.forget(c)
		c.fail(&StreamError{Msg: msg})
	}
	return nil
}

// StreamError is the host's reason for refusing or ending a stream. It unwraps to
// ECONNREFUSED, so a dialer's caller sees a refused connection.
type StreamError struct{ Msg string }

func (e *StreamError) Error() string { return "stream: " + e.Msg }
func (e *StreamError) Unwrap() error { return syscall.ECONNREFUSED }

func (e *Endpoint) forget(c *Conn) {
	e.mu.Lock()
	if e.conns[c.id] == c {
		delete(e.conns, c.id)
	}
	e.mu.Unlock()
}

// DialContext opens a stream to address ("tcp" or "udp" with an IP:port, or "dns" for a
// datagram stream to the host's resolver) and waits for the host to connect it.
func (e *Endpoint) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	proto := network
	var ap netip.AddrPort
	switch network {
	case "tcp", "tcp4", "tcp6":
		proto = "tcp"
	case "udp", "udp4", "udp6":
		proto = "udp"
	case "dns":
	default:
		return nil, fmt.Errorf("stream dial %s: unsupported network %q", address, network)
	}
	if proto != "dns" {
		var err error
		if ap, err = netip.ParseAddrPort(address); err != nil {
			return nil, fmt.Errorf("stream dial %s: %w", address, err)
		}
	}
	e.mu.Lock()
	if e.out == nil {
		e.mu.Unlock()
		return nil, ErrUnavailable
	}
	if len(e.conns) >= e.opts.MaxStreams {
		e.mu.Unlock()
		return nil, fmt.Errorf("stream dial %s: %d streams open (the limit)", address, len(e.conns))
	}
	for { // ids: a space of their own, skipping any still in use
		e.next++
		if e.next == 0 {
			e.next = 1
		}
		if e.conns[e.next] == nil {
			break
		}
	}
	c := &Conn{ep: e, id: e.next, proto: proto, remote: ap, window: e.opts.Window, out: e.out,
		q: e.out.NewQueue(e.opts.QueueHigh, e.opts.QueueLow), credit: sessionio.NewCredit(0),
		opened: make(chan error, 1), notify: make(chan struct{}, 1)}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	e.conns[c.id] = c
	e.mu.Unlock()
	open := protocol.StreamOpen{Proto: proto, Window: uint32(e.opts.Window)}
	if ap.IsValid() {
		open.Addr, open.Port = ap.Addr().String(), ap.Port()
	}
	if err := c.q.PushMsg(ctx, c.id, protocol.TypeStreamOpen, open); err != nil {
		e.forget(c)
		c.q.Close()
		return nil, fmt.Errorf("stream dial %s: %w", address, err)
	}
	select {
	case err := <-c.opened:
		if err != nil {
			return nil, &net.OpError{Op: "dial", Net: proto, Addr: net.UDPAddrFromAddrPort(ap), Err: err}
		}
		return c, nil
	case <-ctx.Done():
		c.Close()
		return nil, fmt.Errorf("stream dial %s: %w", address, ctx.Err())
	}
}

// Exchange sends one DNS query to the host's resolver on a datagram stream and returns the
// answer: the guest resolver's upstream in channel mode (resolver.Upstream). DNS over TCP is
// not carried over the channel, so an answer too big for one datagram is a SERVFAIL.
func (e *Endpoint) Exchange(ctx context.Context, query []byte, tcp bool) ([]byte, error) {
	if tcp {
		return nil, errors.New("stream dns: tcp is not carried over the channel")
	}
	c, err := e.DialContext(ctx, "dns", "")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	if _, err := c.Write(query); err != nil {
		return nil, fmt.Errorf("stream dns: %w", err)
	}
	buf := make([]byte, 64<<10)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("stream dns: %w", err)
	}
	return buf[:n], nil
}

// Conn is one stream: a net.Conn (byte stream for tcp, one datagram per Read/Write for udp
// and dns).
type Conn struct {
	ep     *Endpoint
	id     uint32
	proto  string
	remote netip.AddrPort
	window int
	out    *sessionio.Writer
	q      *sessionio.Queue
	credit *sessionio.Credit
	opened chan error
	once   sync.Once
	ctx    context.Context // ends when the stream does: unblocks writers waiting for credit
	cancel context.CancelFunc

	mu       sync.Mutex
	in       [][]byte // received data (datagrams keep their boundaries)
	inBytes  int
	consumed int // read since the last credit grant
	eof      bool
	err      error // set when the stream failed or was closed
	rdl, wdl time.Time
	notify   chan struct{}
}

func (c *Conn) packet() bool { return c.proto != "tcp" }

func (c *Conn) signalOpen(err error) {
	select {
	case c.opened <- err:
	default:
	}
}

func (c *Conn) wake() {
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// deliver queues data from the host; false if that overran the window granted.
func (c *Conn) deliver(data []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return true
	}
	if c.inBytes+len(data) > c.window {
		return false
	}
	c.in = append(c.in, append([]byte(nil), data...))
	c.inBytes += len(data)
	c.wake()
	return true
}

// fail ends the stream on this side with err (the host closed or refused it).
func (c *Conn) fail(err error) {
	c.signalOpen(err)
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.cancel()
	c.q.Close() // the host is done with the stream: what is still queued is dropped
	c.wake()
}

// Read reads stream data (tcp) or one datagram (udp, dns; truncated to b as recv(2) does).
func (c *Conn) Read(b []byte) (int, error) {
	for {
		c.mu.Lock()
		if len(c.in) > 0 {
			n := copy(b, c.in[0])
			if c.packet() || n == len(c.in[0]) {
				c.inBytes -= len(c.in[0])
				c.consumed += len(c.in[0])
				c.in[0] = nil
				c.in = c.in[1:]
			} else {
				c.in[0] = c.in[0][n:]
				c.inBytes -= n
				c.consumed += n
			}
			grant := 0
			if c.consumed >= c.window/4 || c.inBytes == 0 {
				grant, c.consumed = c.consumed, 0
			}
			c.mu.Unlock()
			if grant > 0 {
				// Through the control queue: a grant must never wait behind data.
				c.out.ControlMsg(context.Background(), c.id, protocol.TypeStreamCredit, protocol.StreamCredit{Bytes: uint32(grant)})
			}
			return n, nil
		}
		if c.eof {
			c.mu.Unlock()
			return 0, io.EOF
		}
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return 0, err
		}
		dl := c.rdl
		c.mu.Unlock()
		if err := sessionio.Wait(c.notify, nil, dl); err != nil {
			return 0, err
		}
	}
}

// Write sends b within the host's grants (a datagram whole, as one data frame).
func (c *Conn) Write(b []byte) (int, error) {
	c.mu.Lock()
	err, dl := c.err, c.wdl
	c.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if c.packet() && len(b) > 64<<10 {
		return 0, fmt.Errorf("stream write: datagram of %d bytes is too large", len(b))
	}
	if len(b) == 0 && !c.packet() {
		return 0, nil
	}
	ctx, cancel := c.writeContext(dl)
	defer cancel()
	sent := 0
	for sent < len(b) || len(b) == 0 {
		n := min(len(b)-sent, 64<<10)
		got := 0
		for got < n { // a datagram waits for all of its credit
			g, ok := c.credit.Take(ctx, n-got)
			if !ok {
				c.credit.Add(int64(got))
				return sent, c.writeErr(ctx)
			}
			got += g
			if !c.packet() {
				break
			}
		}
		buf := sessionio.GetBuf()
		copy((*buf)[:got], b[sent:sent+got])
		if err := c.q.PushData(ctx, c.id, protocol.TypeStreamData, buf, got); err != nil {
			return sent, c.writeErr(ctx)
		}
		sent += got
		if len(b) == 0 {
			break
		}
	}
	return sent, nil
}

func (c *Conn) writeContext(dl time.Time) (context.Context, context.CancelFunc) {
	if dl.IsZero() {
		return c.ctx, func() {}
	}
	return context.WithDeadline(c.ctx, dl)
}

func (c *Conn) writeErr(ctx context.Context) error {
	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return os.ErrDeadlineExceeded
	}
	return net.ErrClosed
}

// CloseWrite sends EOF (tcp): the host half-closes its connection.
func (c *Conn) CloseWrite() error {
	return c.q.PushMsg(context.Background(), c.id, protocol.TypeStreamEOF, protocol.Empty{})
}

// Close ends the stream: agentd.stream.close goes to the host (after the data queued), and
// this side forgets it.
func (c *Conn) Close() error {
	c.once.Do(func() {
		c.ep.forget(c)
		c.mu.Lock()
		open := c.err == nil
		if open {
			c.err = net.ErrClosed
		}
		c.mu.Unlock()
		c.cancel()
		if open {
			// After the data already queued; the queue is then left to drain and be dropped.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c.q.PushMsg(ctx, c.id, protocol.TypeStreamClose, protocol.StreamClose{})
			cancel()
		}
		c.signalOpen(net.ErrClosed)
		c.wake()
	})
	return nil
}

func (c *Conn) LocalAddr() net.Addr { return &net.TCPAddr{} }

func (c *Conn) RemoteAddr() net.Addr {
	if c.packet() {
		return net.UDPAddrFromAddrPort(c.remote)
	}
	return net.TCPAddrFromAddrPort(c.remote)
}

func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.rdl = t
	c.mu.Unlock()
	c.wake() // a reader waiting re-reads its deadline
	return nil
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.wdl = t
	c.mu.Unlock()
	return nil
}
