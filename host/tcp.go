package host

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// TCPConn is a core.tcp session seen from the host: a net.Conn to a destination the agent
// dialed. At generation 8 and later its bytes travel as raw bulk records under absolute credit
// both ways; before that, with the "flow" extension, receiving is bounded by the window this
// side grants and sending by the agent's grants. Either way one slow stream never stalls the
// others.
type TCPConn struct {
	c      *Client
	s      *Session
	flow   bool
	win    int
	remote net.Addr
	credit *sessionio.Credit // bytes we may still send (flow)
	bulk   *tcpBulk          // offered (generation 8): the session's flows
	// ctx ends with the session (terminal frame, failure, Close): a writer waiting for credit
	// gives up.
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	accepted  bool // the agent accepted the bulk offer
	rbuf      []rchunk
	rbytes    int
	rEOF      bool
	err       error // terminal failure or local close
	consumed  int   // bytes read since the last credit sent
	connected bool
	terminal  bool
	rdl, wdl  time.Time
	// One wake channel per kind of waiter, so a token taken by one never strands another.
	rwake, swake chan struct{} // reader (and dialer), deliverer waiting for room
}

// DialTCP asks the agent to connect to host:port and returns the stream once the agent reports
// core.tcp.connected. A core.tcp.failed reply is returned as an error with the agent's text.
func (c *Client) DialTCP(ctx context.Context, host string, port uint16) (*TCPConn, error) {
	s, err := c.Open()
	if err != nil {
		return nil, err
	}
	t := &TCPConn{c: c, s: s, win: c.opts.Window, flow: c.HasFeature(protocol.FeatureFlow), remote: destAddr(host, port),
		credit: sessionio.NewCredit(0), rwake: make(chan struct{}, 1), swake: make(chan struct{}, 1)}
	t.ctx, t.cancel = context.WithCancel(s.ctx)
	c.mu.Lock()
	s.tcp = t
	c.mu.Unlock()
	req := protocol.TCPConnect{Host: host, Port: port}
	if c.Bulk() {
		t.flow = false
		offer := protocol.BulkOfferTCP
		offer.GuestToHostCreditLimit = uint64(c.opts.BulkWindow)
		req.Bulk = &offer
		t.bulk = newTCPBulk(t, offer)
	} else if t.flow {
		req.Window = uint32(t.win)
	}
	if err := c.SendMsg(s.ID, protocol.TypeTCPConnect, req); err != nil {
		s.Close()
		return nil, err
	}
	for {
		t.mu.Lock()
		connected, err := t.connected && (t.bulk == nil || t.accepted), t.err
		t.mu.Unlock()
		if connected {
			return t, nil
		}
		if err != nil {
			s.Close()
			return nil, err
		}
		select {
		case <-t.rwake:
		case <-ctx.Done():
			c.SendMsg(s.ID, protocol.TypeTCPClose, protocol.Empty{})
			s.Close()
			return nil, ctx.Err()
		}
	}
}

// ID returns the session id.
func (t *TCPConn) ID() uint32 { return t.s.ID }

func (t *TCPConn) signal() {
	for _, c := range [...]chan struct{}{t.rwake, t.swake} {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}

// TCPError is a core.tcp.failed from the agent.
type TCPError struct{ Msg string }

func (e *TCPError) Error() string { return "agent: " + e.Msg }

// deliver takes one frame for this session from the client's reader. Without flow control it
// waits while the receive buffer is over the window (backpressure for every stream, as in a
// stock client); with it the agent never sends beyond the window.
func (t *TCPConn) deliver(m protocol.Message) bool {
	switch m.Type {
	case protocol.TypeTCPData:
		d, err := protocol.DecodeData(m.Payload)
		if err != nil {
			t.fail(fmt.Errorf("bad core.tcp.data: %w", err))
			return true
		}
		for !t.flow {
			t.mu.Lock()
			full := t.rbytes >= t.win && t.err == nil
			t.mu.Unlock()
			if !full {
				break
			}
			select {
			case <-t.swake:
			case <-t.s.done:
				return true
			}
		}
		rc := newChunk(d)
		t.mu.Lock()
		if t.err == nil {
			t.rbuf = append(t.rbuf, rc)
			t.rbytes += len(d)
		} else {
			rc.release()
		}
		t.mu.Unlock()
	case protocol.TypeTCPConnected:
		var p protocol.TCPConnected
		protocol.Unmarshal(m.Payload, &p)
		t.mu.Lock()
		t.connected = true
		if t.flow && p.Window == 0 { // an agent that ignored our window: no flow control
			t.flow = false
		}
		t.mu.Unlock()
		t.credit.Add(int64(p.Window))
	case protocol.TypeTCPEOF:
		t.mu.Lock()
		t.rEOF = true
		t.mu.Unlock()
	case protocol.TypeFlowCredit:
		var p protocol.FlowCredit
		if protocol.Unmarshal(m.Payload, &p) == nil {
			t.credit.Add(int64(p.Bytes))
		}
	case protocol.TypeBulkAccepted, protocol.TypeBulkCredit, protocol.TypeBulkFinish, protocol.TypeBulkCancel:
		if t.bulk == nil {
			t.fail(fmt.Errorf("agent sent %s on a stream without bulk", m.Type))
			t.sendClose()
			return true
		}
		if err := t.bulk.control(m); err != nil {
			t.fail(err)
			t.sendClose()
			return true
		}
	case protocol.TypeTCPFailed:
		var p protocol.TCPFailed
		protocol.Unmarshal(m.Payload, &p)
		t.end(&TCPError{p.Error})
	case protocol.TypeTCPClosed:
		t.mu.Lock()
		t.rEOF = true
		t.mu.Unlock()
		t.end(nil)
	case protocol.TypeError:
		t.end(AsError(m))
	default:
		return true
	}
	t.signal()
	return true
}

// end marks the session finished by the agent (a terminal frame).
func (t *TCPConn) end(err error) {
	t.mu.Lock()
	t.terminal = true
	if t.err == nil && err != nil {
		t.err = err
	}
	t.mu.Unlock()
	t.s.Close()
	t.cancel()
	t.signal()
}

func (t *TCPConn) fail(err error) {
	t.mu.Lock()
	if t.err == nil {
		t.err = err
	}
	t.mu.Unlock()
	t.cancel()
	t.signal()
}

// Read reads destination bytes. It returns io.EOF after the destination's FIN.
func (t *TCPConn) Read(p []byte) (int, error) {
	for {
		t.mu.Lock()
		if len(t.rbuf) > 0 {
			head := &t.rbuf[0]
			n := copy(p, head.b)
			if n == len(head.b) {
				head.release()
				t.rbuf[0] = rchunk{}
				t.rbuf = t.rbuf[1:]
			} else {
				head.b = head.b[n:]
			}
			t.consumedLocked(n)
			return n, nil
		}
		eof, err, dl := t.rEOF, t.err, t.rdl
		t.mu.Unlock()
		if eof {
			return 0, io.EOF
		}
		if err != nil {
			return 0, err
		}
		if err := t.waitRead(dl); err != nil {
			return 0, err
		}
	}
}

// consumedLocked accounts n bytes taken from the receive buffer (t.mu held; it unlocks it)
// and grants the agent the credit they free.
func (t *TCPConn) consumedLocked(n int) {
	t.rbytes -= n
	t.consumed += n
	var grant int
	if t.flow && t.consumed >= t.win/4 && !t.terminal {
		grant, t.consumed = t.consumed, 0
	}
	t.mu.Unlock()
	t.signal() // a reader blocked on a full buffer may go on
	if grant > 0 {
		t.c.SendMsg(t.s.ID, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(grant)})
	}
	if t.bulk != nil {
		t.bulk.in.Consumed(n)
	}
}

// WriteTo writes the destination's bytes to w until its FIN (io.Copy uses it): each received
// chunk goes to w as it is, without a copy through another buffer.
func (t *TCPConn) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		t.mu.Lock()
		if len(t.rbuf) > 0 {
			head := t.rbuf[0]
			t.rbuf[0] = rchunk{}
			t.rbuf = t.rbuf[1:]
			t.consumedLocked(len(head.b))
			n, err := w.Write(head.b)
			head.release()
			total += int64(n)
			if err != nil {
				return total, err
			}
			continue
		}
		eof, err, dl := t.rEOF, t.err, t.rdl
		t.mu.Unlock()
		if eof {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if err := t.waitRead(dl); err != nil {
			return total, err
		}
	}
}

// waitRead blocks until the session's state changes or the read deadline passes.
func (t *TCPConn) waitRead(dl time.Time) error {
	err := sessionio.Wait(t.rwake, t.c.done, dl)
	select {
	case <-t.c.done:
		t.fail(ErrClosed)
	default:
	}
	return err
}

// Write sends bytes to the destination, in frames of at most 64 KiB, within the agent's grant.
// The write deadline bounds the wait for credit.
func (t *TCPConn) Write(p []byte) (int, error) {
	if t.bulk != nil {
		return t.bulk.write(p)
	}
	written := 0
	for len(p) > 0 {
		n := min(len(p), 64<<10)
		if t.flow {
			var err error
			if n, err = t.takeCredit(n); err != nil {
				return written, err
			}
		} else {
			t.mu.Lock()
			err := t.err
			t.mu.Unlock()
			if err != nil {
				return written, err
			}
		}
		if err := t.c.sendData(t.s.ID, protocol.TypeTCPData, p[:n]); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

func (t *TCPConn) takeCredit(want int) (int, error) {
	t.mu.Lock()
	err, dl := t.err, t.wdl
	t.mu.Unlock()
	if err != nil {
		return 0, err
	}
	ctx, cancel := t.ctx, context.CancelFunc(func() {})
	if !dl.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, dl)
	}
	defer cancel()
	if n, ok := t.credit.Take(ctx, want); ok {
		return n, nil
	}
	t.mu.Lock()
	err = t.err
	t.mu.Unlock()
	switch {
	case err != nil:
		return 0, err
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return 0, os.ErrDeadlineExceeded
	}
	return 0, ErrClosed
}

// CloseWrite sends core.tcp.eof (with bulk, core.bulk.finish): the destination sees FIN after
// all data written before.
func (t *TCPConn) CloseWrite() error {
	if t.bulk != nil {
		return t.c.SendMsg(t.s.ID, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkTCP,
			Flow: protocol.BulkHostToGuest, FinalOffset: t.bulk.out().Finish()})
	}
	return t.c.SendMsg(t.s.ID, protocol.TypeTCPEOF, protocol.Empty{})
}

// sendClose sends core.tcp.close unless the session already ended.
func (t *TCPConn) sendClose() {
	t.mu.Lock()
	already := t.terminal
	t.mu.Unlock()
	if !already {
		t.c.SendMsg(t.s.ID, protocol.TypeTCPClose, protocol.Empty{})
	}
}

// Close sends core.tcp.close (unless the agent already ended the session) and forgets it.
func (t *TCPConn) Close() error {
	t.mu.Lock()
	already := t.terminal
	if t.err == nil {
		t.err = errStreamClosed
	}
	for i := range t.rbuf {
		t.rbuf[i].release()
	}
	t.rbuf, t.rbytes = nil, 0
	t.mu.Unlock()
	t.s.Close()
	t.cancel()
	t.signal()
	if already {
		return nil
	}
	err := t.c.SendMsg(t.s.ID, protocol.TypeTCPClose, protocol.Empty{})
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// errStreamClosed is what a closed TCPConn's Read and Write return.
var errStreamClosed = errors.New("use of closed agent TCP stream")

// LocalAddr is the agent's end of the session, which has no address of its own here.
func (t *TCPConn) LocalAddr() net.Addr {
	return Addr("agent session " + strconv.FormatUint(uint64(t.s.ID), 10))
}

// RemoteAddr is the destination as it was asked for (an address, or a name the agent resolved).
func (t *TCPConn) RemoteAddr() net.Addr { return t.remote }

// SetDeadline sets both deadlines.
func (t *TCPConn) SetDeadline(d time.Time) error {
	t.SetReadDeadline(d)
	return t.SetWriteDeadline(d)
}

// SetReadDeadline bounds Read (os.ErrDeadlineExceeded once it passes); zero means none.
func (t *TCPConn) SetReadDeadline(d time.Time) error {
	t.mu.Lock()
	t.rdl = d
	t.mu.Unlock()
	t.signal() // a waiting reader re-reads its deadline
	return nil
}

// SetWriteDeadline bounds a Write's wait for the agent's credit; zero means none.
func (t *TCPConn) SetWriteDeadline(d time.Time) error {
	t.mu.Lock()
	t.wdl = d
	t.mu.Unlock()
	return nil
}

// Addr is an address that is not an IP socket address (a name, an agent session).
type Addr string

func (a Addr) Network() string { return "tcp" }
func (a Addr) String() string  { return string(a) }

// destAddr is a destination as a net.Addr: a *net.TCPAddr for an IP, else the name.
func destAddr(host string, port uint16) net.Addr {
	if ip, err := netip.ParseAddr(host); err == nil {
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, port))
	}
	return Addr(net.JoinHostPort(host, strconv.Itoa(int(port))))
}

var (
	_ net.Conn      = (*TCPConn)(nil)
	_ io.ReaderFrom = (*TCPConn)(nil)
	_ io.WriterTo   = (*TCPConn)(nil)
)

// rchunk is received data in a pooled buffer (frames of up to 64 KiB, the agent's chunk size)
// or, for larger frames, a buffer of its own.
type rchunk struct {
	b    []byte
	pool *[]byte
}

var rpool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

func newChunk(d []byte) rchunk {
	switch {
	case len(d) <= sessionio.ChunkSize:
		p := sessionio.GetBuf()
		return rchunk{b: (*p)[:copy(*p, d)], pool: p}
	case len(d) <= sessionio.BigChunkSize: // a raw bulk record
		p := sessionio.GetBigBuf()
		return rchunk{b: (*p)[:copy(*p, d)], pool: p}
	}
	return rchunk{b: append([]byte(nil), d...)}
}

func (r *rchunk) release() {
	if r.pool != nil {
		sessionio.PutBuf(r.pool)
		r.pool = nil
	}
}

// tcpBulk is a bulk stream's two flows: the destination's bytes come in as records within the
// credit this side grants (so taking them in never waits), and this side's go out within the
// agent's credit.
type tcpBulk struct {
	t     *TCPConn
	offer protocol.BulkOffer
	in    *sessionio.BulkIn // destination -> host

	mu     sync.Mutex
	sender *sessionio.BulkOut // host -> destination, once accepted
	record int
}

func newTCPBulk(t *TCPConn, offer protocol.BulkOffer) *tcpBulk {
	b := &tcpBulk{t: t, offer: offer}
	b.in = sessionio.NewBulkIn(sessionio.BulkInOptions{Kind: protocol.BulkTCP, Flow: protocol.BulkGuestToHost,
		MaxRecord: int(offer.MaxRecordPayload), Window: offer.GuestToHostCreditLimit,
		Grant: func(consumed, limit uint64) {
			t.c.SendMsg(t.s.ID, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkTCP,
				Flow: protocol.BulkGuestToHost, ConsumedOffset: consumed, CreditLimit: limit})
		}})
	b.in.Open() // no budget: the offer's credit
	b.sender = sessionio.NewBulkOut(0)
	return b
}

func (b *tcpBulk) out() *sessionio.BulkOut {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sender
}

// control applies the agent's core.bulk.* message.
func (b *tcpBulk) control(m protocol.Message) error {
	t := b.t
	switch m.Type {
	case protocol.TypeBulkAccepted:
		var p protocol.BulkAccepted
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			return fmt.Errorf("decode core.bulk.accepted: %w", err)
		}
		want := protocol.BulkHostToGuest.Bit() | protocol.BulkGuestToHost.Bit()
		switch {
		case p.Kind != protocol.BulkTCP || p.Flows != want || p.Format != protocol.BulkFormatRawV1:
			return fmt.Errorf("core.bulk.accepted: kind %d flows %d format %d, want a TCP session's", p.Kind, p.Flows, p.Format)
		case p.MaxRecordPayload < protocol.BulkMinRecordPayload || p.MaxRecordPayload > b.offer.MaxRecordPayload:
			return fmt.Errorf("core.bulk.accepted: max_record_payload %d outside %d..%d", p.MaxRecordPayload, protocol.BulkMinRecordPayload, b.offer.MaxRecordPayload)
		case p.GuestToHostCreditLimit != b.offer.GuestToHostCreditLimit || p.HostToGuestCreditLimit == 0:
			return fmt.Errorf("core.bulk.accepted: credit %d/%d does not answer the offer", p.HostToGuestCreditLimit, p.GuestToHostCreditLimit)
		}
		b.mu.Lock()
		b.record = int(p.MaxRecordPayload)
		b.mu.Unlock()
		if err := b.sender.Credit(0, p.HostToGuestCreditLimit); err != nil {
			return fmt.Errorf("core.bulk.accepted: %w", err)
		}
		t.mu.Lock()
		t.accepted = true
		t.mu.Unlock()
	case protocol.TypeBulkCredit:
		var p protocol.BulkCredit
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			return fmt.Errorf("decode core.bulk.credit: %w", err)
		}
		if p.Kind != protocol.BulkTCP || p.Flow != protocol.BulkHostToGuest {
			return fmt.Errorf("core.bulk.credit for kind %d flow %d on a TCP stream", p.Kind, p.Flow)
		}
		if err := b.sender.Credit(p.ConsumedOffset, p.CreditLimit); err != nil {
			return fmt.Errorf("core.bulk.credit: %w", err)
		}
	case protocol.TypeBulkFinish:
		var p protocol.BulkFinish
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			return fmt.Errorf("decode core.bulk.finish: %w", err)
		}
		if p.Kind != protocol.BulkTCP || p.Flow != protocol.BulkGuestToHost {
			return fmt.Errorf("core.bulk.finish for kind %d flow %d on a TCP stream", p.Kind, p.Flow)
		}
		complete, err := b.in.Finish(p.FinalOffset)
		if err != nil {
			return fmt.Errorf("core.bulk.finish: %w", err)
		}
		if complete {
			t.mu.Lock()
			t.rEOF = true
			t.mu.Unlock()
		}
	case protocol.TypeBulkCancel:
		var p protocol.BulkCancel
		protocol.Unmarshal(m.Payload, &p)
		return &TCPError{p.Message}
	}
	return nil
}

// record takes one of the destination's records (from the client's reader).
func (t *TCPConn) record(r protocol.BulkRecord) {
	if t.bulk == nil {
		t.fail(errors.New("raw bulk record on a stream without bulk"))
		t.sendClose()
		return
	}
	if err := t.bulk.in.Accept(r); err != nil {
		t.fail(fmt.Errorf("agent: %w", err))
		t.sendClose()
		return
	}
	rc := newChunk(r.Payload)
	t.mu.Lock()
	if t.err == nil {
		t.rbuf = append(t.rbuf, rc)
		t.rbytes += len(r.Payload)
		if t.bulk.in.Complete() {
			t.rEOF = true
		}
	} else {
		rc.release()
	}
	t.mu.Unlock()
	t.signal()
}

// write sends p as records within the agent's credit; the write deadline bounds the wait.
func (b *tcpBulk) write(p []byte) (int, error) {
	t := b.t
	b.mu.Lock()
	record := b.record
	b.mu.Unlock()
	written := 0
	for len(p) > 0 {
		t.mu.Lock()
		err, dl := t.err, t.wdl
		t.mu.Unlock()
		if err != nil {
			return written, err
		}
		ctx, cancel := t.ctx, context.CancelFunc(func() {})
		if !dl.IsZero() {
			ctx, cancel = context.WithDeadline(ctx, dl)
		}
		off, n, ok := b.sender.Wait(ctx, min(len(p), record))
		cancel()
		if !ok {
			t.mu.Lock()
			err = t.err
			t.mu.Unlock()
			switch {
			case err != nil:
				return written, err
			case errors.Is(ctx.Err(), context.DeadlineExceeded):
				return written, os.ErrDeadlineExceeded
			}
			return written, errStreamClosed // finished (CloseWrite) or closed
		}
		b.sender.Sent(n) // before the record goes out: the agent's credit may answer it at once
		if err := t.c.sendRecord(t.s.ID, protocol.BulkTCP, protocol.BulkHostToGuest, off, p[:n]); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// ReadFrom copies r to the stream in records of the negotiated size (io.Copy uses it): fewer,
// larger frames than io.Copy's 32 KiB buffer would make.
func (t *TCPConn) ReadFrom(r io.Reader) (int64, error) {
	size := 64 << 10
	if t.bulk != nil {
		size = sessionio.BigChunkSize
	}
	buf := sessionio.GetBigBuf()
	defer sessionio.PutBuf(buf)
	var total int64
	for {
		n, rerr := r.Read((*buf)[:size])
		if n > 0 {
			m, err := t.Write((*buf)[:n])
			total += int64(m)
			if err != nil {
				return total, err
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}
