package netstack

import (
	"errors"
	"io"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The relay moves a flow's bytes between gVisor's buffers and the upstream kernel socket with
// one copy each way, the one the kernel makes: guest -> upstream, gVisor's receive buffer is
// handed to non-blocking sends piece by piece (ep.Read with a writer on the socket); upstream
// -> guest, the socket is read straight into the chunks of gVisor's send buffer (ep.Write with
// a reader on the socket, sized by SIOCINQ so that every read it asks for is there). Neither
// direction holds a buffer of its own while it waits, so an idle flow holds none.

// BufferSize is the size of a relay's staging buffer, where pieces of the guest's stream
// smaller than directMin are gathered for one send (the plain tun endpoint receives a packet
// into a row of small chunks). A flow holds one only while it has such pieces in hand, and
// all flows together at most Options.MaxBuffers.
const BufferSize = 64 << 10

// directMin: a piece of the guest's stream this large goes to the socket from gVisor's own
// buffer (the offload endpoint's 64 KiB super-packets do); smaller ones are staged.
const directMin = 16 << 10

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

// tryBuf is getBuf without the wait (nil when the budget is spent).
func (t *tcpFlow) tryBuf() *[]byte {
	select {
	case t.st.bufTokens <- struct{}{}:
		return bufs.Get().(*[]byte)
	default:
		return nil
	}
}

func (t *tcpFlow) putBuf(b *[]byte) {
	bufs.Put(b)
	<-t.st.bufTokens
}

// errStop ends an ep.Read early: the writer took what the socket would take.
var errStop = errors.New("relay: socket full")

// upWriter is the io.Writer the guest's bytes are read into (ep.Read, with the endpoint's lock
// held, so it never waits): large pieces go to the socket directly, small ones are staged;
// when the socket is full it stops the read, and what it did not take stays in gVisor.
type upWriter struct {
	t       *tcpFlow
	stage   *[]byte // the staging buffer while one is held
	n       int     // bytes staged (taken from the guest, not yet sent)
	full    bool    // the socket took no more: wait until it is writable
	needBuf bool    // a small piece came and no buffer was free: get one, waiting
	err     error   // the socket failed

	// The poller callbacks, made once per flow (a closure per call would allocate).
	sendFn, pollFn func(fd uintptr) bool
	sendBuf        []byte // sendFn's argument ...
	sent           int    // ... and results
	sendErr        error
}

func (w *upWriter) init(t *tcpFlow) {
	w.t = t
	w.sendFn = w.send
	w.pollFn = pollWritable
}

func (w *upWriter) Write(b []byte) (int, error) {
	if w.full || w.err != nil || w.needBuf {
		return 0, errStop
	}
	if len(b) < directMin {
		if w.stage == nil {
			if w.stage = w.t.tryBuf(); w.stage == nil {
				w.needBuf = true
				return 0, errStop
			}
		}
		if w.n+len(b) > len(*w.stage) && !w.flushNB() {
			w.full = true
			return 0, errStop
		}
		copy((*w.stage)[w.n:], b)
		w.n += len(b)
		return len(b), nil
	}
	if w.n > 0 && !w.flushNB() { // staged bytes go first
		w.full = true
		return 0, errStop
	}
	n := w.sendNB(b)
	if n < len(b) {
		w.full = w.err == nil
		return n, errStop
	}
	return n, nil
}

// sendNB sends what the socket takes now (never waiting); a failure is kept in w.err.
func (w *upWriter) sendNB(b []byte) int {
	w.sendBuf, w.sent, w.sendErr = b, 0, nil
	if rerr := w.t.upRC.Write(w.sendFn); rerr != nil {
		w.sendErr = rerr
	}
	w.sendBuf = nil
	if w.sendErr == unix.EAGAIN {
		w.sendErr = nil
	}
	if w.sendErr != nil {
		w.err = w.sendErr
	}
	return max(w.sent, 0)
}

func (w *upWriter) send(fd uintptr) bool {
	for {
		w.sent, w.sendErr = unix.SendmsgN(int(fd), w.sendBuf, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		if w.sendErr != unix.EINTR {
			return true
		}
	}
}

// flushNB sends staged bytes without waiting; true once none are left.
func (w *upWriter) flushNB() bool {
	if w.n == 0 {
		return true
	}
	s := *w.stage
	sent := w.sendNB(s[:w.n])
	copy(s, s[sent:w.n])
	w.n -= sent
	return w.n == 0
}

// settle finishes what a read left: it sends staged bytes, waiting for the socket as needed,
// returns the staging buffer, waits for a full socket and gets a buffer that was missing.
// false: the flow is over (the socket failed or closed).
func (w *upWriter) settle() bool {
	for w.n > 0 {
		if w.flushNB() {
			break
		}
		if w.err != nil || !w.waitWritable() {
			return false
		}
	}
	if w.err != nil {
		return false
	}
	if w.stage != nil {
		w.t.putBuf(w.stage)
		w.stage = nil
	}
	if w.full {
		w.full = false
		if !w.waitWritable() {
			return false
		}
	}
	if w.needBuf {
		w.needBuf = false
		if w.stage = w.t.getBuf(); w.stage == nil {
			return false
		}
	}
	return true
}

// waitWritable waits until the socket may take more (false: it closed). The check runs
// inside the poller's callback: the poller only reports edges after it is armed, and the
// socket may have drained before.
func (w *upWriter) waitWritable() bool {
	return w.t.upRC.Write(w.pollFn) == nil
}

func pollWritable(fd uintptr) bool {
	for {
		p := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(p[:], 0)
		if err == unix.EINTR {
			continue
		}
		return err != nil || (n > 0 && p[0].Revents != 0)
	}
}

func (w *upWriter) release() {
	if w.stage != nil {
		w.t.putBuf(w.stage)
		w.stage = nil
	}
}

// toUpstream relays guest -> destination.
func (t *tcpFlow) toUpstream() {
	entry, notify := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	t.wq.EventRegister(&entry)
	defer t.wq.EventUnregister(&entry)
	if !t.checkHello(notify) {
		return
	}
	if t.upRC == nil {
		t.toUpstreamCopy(notify)
		return
	}
	var w upWriter
	w.init(t)
	defer w.release()
	for {
		res, err := t.ep.Read(&w, tcpip.ReadOptions{})
		if res.Count > 0 {
			// Receive-window auto-tuning runs only when the reader reports what it took.
			t.ep.ModerateRecvBuf(res.Count)
			t.flow.Count(int64(res.Count), 0)
		}
		if !w.settle() {
			t.abort("upstream write", w.err)
			return
		}
		switch err.(type) {
		case nil, *tcpip.ErrBadBuffer: // the writer stopped the read: go on
		case *tcpip.ErrWouldBlock:
			<-notify
		case *tcpip.ErrClosedForReceive:
			if hc, ok := t.up.(interface{ CloseWrite() error }); ok {
				hc.CloseWrite() // the guest's FIN, passed on
			}
			return
		default:
			t.abort("guest read", err) // reset or error: pass it on as a RST
			return
		}
	}
}

// helloBufs hold a flow's first bytes while its ClientHello is parsed (peeked, never kept).
var helloBufs = sync.Pool{New: func() any { b := make([]byte, maxHello); return &b }}

// checkHello holds a flow whose first bytes start a TLS handshake record until the ClientHello
// is complete (at most maxHello bytes, SNIWait), and judges its SNI. The bytes are peeked: they
// stay in gVisor's receive buffer and are relayed from there once judged. false: the flow was
// cut.
func (t *tcpFlow) checkHello(notify <-chan struct{}) bool {
	var timeout <-chan time.Time
	for {
		bp := helloBufs.Get().(*[]byte)
		w := tcpip.SliceWriter(*bp)
		res, err := t.ep.Read(&w, tcpip.ReadOptions{Peek: true})
		var sni string
		done := true
		if err == nil {
			data := (*bp)[:res.Count]
			if looksLikeTLS(data) {
				sni, done = clientHelloSNI(data)
			}
		}
		helloBufs.Put(bp)
		if _, ok := err.(*tcpip.ErrWouldBlock); ok {
			done = false
		} else if err != nil {
			return true // the relay loop sees the same end
		}
		if done {
			if sni != "" && !t.flow.CheckSNI(sni) {
				t.st.Counters.SNIDenied.Add(1)
				t.abort("sni denied", sni)
				return false
			}
			return true
		}
		if res.Count > 0 && timeout == nil {
			tm := time.NewTimer(t.st.opts.SNIWait)
			defer tm.Stop()
			timeout = tm.C
		}
		select {
		case <-notify:
		case <-timeout:
			return true // judged by the pins alone
		}
	}
}

// toUpstreamCopy is toUpstream for upstreams without a socket (a stream over the agent
// channel): read into a relay buffer, then write.
func (t *tcpFlow) toUpstreamCopy(notify <-chan struct{}) {
	for {
		bp := t.getBuf()
		if bp == nil { // the flow or the stack is ending: make sure both sides do
			t.abort("stopping", nil)
			return
		}
		w := tcpip.SliceWriter(*bp)
		res, err := t.ep.Read(&w, tcpip.ReadOptions{})
		if err == nil {
			t.ep.ModerateRecvBuf(res.Count)
			n, werr := t.up.Write((*bp)[:res.Count])
			t.putBuf(bp)
			t.flow.Count(int64(n), 0)
			if werr != nil {
				t.abort("upstream write", werr)
				return
			}
			continue
		}
		t.putBuf(bp)
		switch err.(type) {
		case *tcpip.ErrWouldBlock:
			<-notify
		case *tcpip.ErrClosedForReceive:
			if hc, ok := t.up.(interface{ CloseWrite() error }); ok {
				hc.CloseWrite()
			}
			return
		default:
			t.abort("guest read", err)
			return
		}
	}
}

// upReader is the tcpip.Payloader that gVisor's send buffer is filled from (ep.Write): it reads
// the socket directly into gVisor's chunks. Its Len is what the socket has queued (SIOCINQ),
// so every read it is asked for finds its bytes; a read that fails anyway loses what the
// write had taken, and the flow is then reset (never a silent gap).
type upReader struct {
	t    *tcpFlow
	left int
	err  error

	readFn func(fd uintptr) bool // made once (see upWriter)
	buf    []byte
	n      int
	rerr   error
}

func (r *upReader) init(t *tcpFlow) {
	r.t = t
	r.readFn = r.read
}

func (r *upReader) Len() int { return r.left }

func (r *upReader) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if r.left == 0 {
		return 0, io.EOF
	}
	r.buf, r.n, r.rerr = b[:min(len(b), r.left)], 0, nil
	if err := r.t.upRC.Read(r.readFn); err != nil {
		r.rerr = err
	}
	r.buf = nil
	if r.rerr == nil && r.n <= 0 {
		r.rerr = io.ErrUnexpectedEOF
	}
	if r.rerr != nil {
		r.err = r.rerr
		return 0, r.rerr
	}
	r.left -= r.n
	return r.n, nil
}

func (r *upReader) read(fd uintptr) bool {
	for {
		if r.n, r.rerr = unix.Read(int(fd), r.buf); r.rerr != unix.EINTR {
			return true
		}
	}
}

// toGuest relays destination -> guest.
func (t *tcpFlow) toGuest() {
	if t.upRC == nil {
		t.toGuestCopy()
		return
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	t.wq.EventRegister(&entry)
	defer t.wq.EventUnregister(&entry)
	var r upReader
	r.init(t)
	var q upQueued
	q.fn = q.check
	for {
		n, err := q.wait(t.upRC)
		if err == io.EOF { // the destination's FIN, passed on
			t.ep.Shutdown(tcpip.ShutdownWrite)
			return
		}
		if err != nil {
			t.abort("upstream read", err) // a reset (or an error) is passed on as a RST
			return
		}
		for n > 0 {
			r.left = n
			m, werr := t.ep.Write(&r, tcpip.WriteOptions{})
			if r.err != nil {
				t.abort("upstream read", r.err)
				return
			}
			n -= int(m)
			t.flow.Count(0, m)
			switch werr.(type) {
			case nil:
			case *tcpip.ErrWouldBlock: // gVisor's send buffer is full
				<-notify
			default:
				t.abort("guest write", werr)
				return
			}
		}
	}
}

// upQueued waits until the upstream socket has bytes queued (how many) or has ended
// (io.EOF, or its error), holding no buffer.
type upQueued struct {
	fn  func(fd uintptr) bool // check, made once
	n   int
	err error
}

func (q *upQueued) wait(rc syscall.RawConn) (int, error) {
	q.n, q.err = 0, nil
	if rerr := rc.Read(q.fn); rerr != nil && q.err == nil {
		q.err = rerr
	}
	return q.n, q.err
}

func (q *upQueued) check(fd uintptr) bool {
	for {
		if q.n, q.err = unix.IoctlGetInt(int(fd), unix.SIOCINQ); q.err == unix.EINTR {
			continue
		}
		if q.err != nil || q.n > 0 {
			return true
		}
		// Nothing queued: not yet, the end of the stream, or an error. A peek tells.
		var b [1]byte
		m, _, perr := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case perr == unix.EINTR || (perr == nil && m > 0): // raced with new data
			continue
		case perr == unix.EAGAIN:
			return false // the poller waits for readability
		case perr != nil:
			q.err = perr
		default:
			q.err = io.EOF
		}
		return true
	}
}

// toGuestCopy is toGuest for upstreams without a socket (a stream over the agent channel,
// which buffers within its own window): a plain read loop with a small buffer of its own,
// outside the relay-buffer budget so that idle streams cannot starve it.
func (t *tcpFlow) toGuestCopy() {
	guest := gonet.NewTCPConn(t.wq, t.ep)
	buf := make([]byte, streamReadSize)
	for {
		n, err := t.up.Read(buf)
		if n > 0 {
			if _, werr := guest.Write(buf[:n]); werr != nil {
				t.abort("guest write", werr)
				return
			}
			t.flow.Count(0, int64(n))
		}
		if errors.Is(err, io.EOF) {
			t.ep.Shutdown(tcpip.ShutdownWrite)
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
