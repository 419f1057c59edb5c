package netstack

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
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
// a reader on the socket, sized by SIOCINQ so that every read it asks for is there).
//
// Each direction is a worker that runs while it has work, waits a little (linger) for more on
// its own goroutine, and then parks: an idle flow holds no goroutine and no buffer. A parked
// direction is started again by gVisor's waiter callbacks (guest data, room in the send
// buffer) or by the reactor (upstream data, room in the socket).

// linger is how long a direction with nothing to do keeps its goroutine waiting for more
// before it parks: a busy flow never pays for parking and waking, an idle one holds nothing.
const linger = 50 * time.Millisecond

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

// worker runs one direction of a flow on a goroutine that exists only while there is work.
type worker struct {
	running atomic.Bool
	wake    chan struct{} // a kick while running
	run     func()
	pool    *pool
	timer   *time.Timer
}

func (w *worker) init(p *pool, run func()) {
	w.wake = make(chan struct{}, 1)
	w.run = run
	w.pool = p
}

// kick makes the direction look for work: it wakes a running worker or starts one.
func (w *worker) kick() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
	if w.running.CompareAndSwap(false, true) {
		w.pool.run(w.run)
	}
}

// wait waits up to linger for a kick; true if one came.
func (w *worker) wait() bool {
	select {
	case <-w.wake:
		return true
	default:
	}
	if w.timer == nil {
		w.timer = time.NewTimer(linger)
	} else {
		w.timer.Reset(linger)
	}
	select {
	case <-w.wake:
		w.timer.Stop()
		return true
	case <-w.timer.C:
		return false
	}
}

// park gives the goroutine up; true if a kick came meanwhile and the caller goes on instead.
func (w *worker) park() bool {
	w.running.Store(false)
	select {
	case <-w.wake:
		return w.running.CompareAndSwap(false, true)
	default:
		return false
	}
}

func (w *worker) stop() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

// step is what a direction's work came to.
type step int

const (
	stepDone       step = iota // the direction is over (passed its FIN on, or the flow was reset)
	stepWaitGuest              // it needs the guest's data, or room in gVisor's send buffer
	stepWaitSocket             // it needs the socket to be readable, or writable
)

// start relays a flow whose upstream is a socket with event-driven workers; the forwarder's
// goroutine runs the guest side's first turn.
func (t *tcpFlow) start() {
	st := t.st
	st.flowStarted(&st.Counters.Active)
	t.upw.init(st.pool, t.upRun)
	t.dnw.init(st.pool, t.downRun)
	t.upw.running.Store(true) // this goroutine is the guest side's first worker (below)
	t.w.init(t)
	t.r.init(t)
	t.q.fn = t.q.check
	t.q.readableFn = t.q.readable
	t.hello.wake = t.upw.kick
	t.upRC.Control(func(fd uintptr) { t.upFD = int(fd) })
	t.entry = waiter.NewFunctionEntry(waiter.ReadableEvents|waiter.WritableEvents|waiter.EventHUp|waiter.EventErr, t.guestEvent)
	t.wq.EventRegister(&t.entry)
	// A closing stack ends every flow, half-closed ones included (their upstream may never
	// send again).
	t.stopCtx = context.AfterFunc(st.ctx, func() { t.abort("stack closing", nil) })
	t.flow.OnRevoke(func() { t.abort("revoked by a policy reload", nil) })
	t.dnw.kick() // waits for upstream data (on the poller, then parked in the reactor)
	t.upRun()
}

// guestEvent is gVisor's waiter callback: it must not block.
func (t *tcpFlow) guestEvent(m waiter.EventMask) {
	if m&(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
		t.upw.kick()
	}
	// gVisor tells writers of room only once half the send buffer is free again after it
	// filled (no wake-ups to queue a segment or two): only a blocked writer gets these.
	if m&(waiter.WritableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
		t.dnw.kick()
	}
}

// socketEvent is the reactor's callback. The interest was one-shot: what is still wanted is
// armed again.
func (t *tcpFlow) socketEvent(ev uint32) {
	t.mu.Lock()
	if t.upClosed {
		t.mu.Unlock()
		return
	}
	problem := ev&(unix.EPOLLERR|unix.EPOLLHUP|unix.EPOLLRDHUP) != 0
	kickDown := problem || (t.wantIn && ev&unix.EPOLLIN != 0)
	kickUp := t.wantOut && (problem || ev&unix.EPOLLOUT != 0)
	if kickDown {
		t.wantIn = false
	}
	if kickUp {
		t.wantOut = false
	}
	t.armLocked()
	t.mu.Unlock()
	if kickDown {
		t.dnw.kick()
	}
	if kickUp {
		t.upw.kick()
	}
}

// want arms the reactor for upstream readability (in) or writability (out). The socket is
// registered with the reactor the first time a direction parks on it: a short flow never is.
func (t *tcpFlow) want(in, out bool) {
	t.mu.Lock()
	t.wantIn = t.wantIn || in
	t.wantOut = t.wantOut || out
	t.armLocked()
	t.mu.Unlock()
}

func (t *tcpFlow) armLocked() {
	if t.upClosed || (!t.wantIn && !t.wantOut) {
		return // a fired one-shot interest stays disarmed
	}
	var ev uint32
	if t.wantIn {
		ev |= unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if t.wantOut {
		ev |= unix.EPOLLOUT
	}
	if !t.registered {
		if err := t.st.reactor.add(t.upFD, t, ev); err != nil {
			t.st.log.Warn("tcp flow: upstream socket not polled", "dst", t.dst, "error", err)
			return // the flow's directions still wake on the guest's side and on Close
		}
		t.registered = true
		return
	}
	t.st.reactor.arm(t.upFD, ev)
}

// closeUp unregisters and closes the upstream socket (once; the reactor must forget it before
// its descriptor number can be reused).
func (t *tcpFlow) closeUp() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.upClosed {
		return
	}
	t.upClosed = true
	if t.registered {
		t.st.reactor.remove(t.upFD)
	}
	t.up.Close()
}

// dirDone ends a direction; the second one ends the flow.
func (t *tcpFlow) dirDone() {
	if t.finished.Add(1) == 2 {
		t.finish()
	}
}

func (t *tcpFlow) finish() {
	t.wq.EventUnregister(&t.entry)
	t.stopCtx()
	t.closeUp()
	t.ep.Close()
	t.w.release()
	t.upw.stop()
	t.dnw.stop()
	if t.hello.timer != nil {
		t.hello.timer.Stop()
	}
	t.st.flowEnded(&t.st.Counters.Active, t.dst, t.flow)
}

func (t *tcpFlow) aborted() bool {
	select {
	case <-t.dead:
		return true
	default:
		return false
	}
}

// upRun is the guest -> upstream worker.
func (t *tcpFlow) upRun() {
	for {
		switch t.upStep() {
		case stepDone:
			t.dirDone() // running stays set: nothing starts this worker again
			return
		case stepWaitGuest:
			if t.upw.wait() {
				continue
			}
		case stepWaitSocket:
			if t.waitSocket(true) {
				continue
			}
			t.want(false, true)
		}
		if !t.upw.park() {
			return
		}
	}
}

func (t *tcpFlow) upStep() step {
	if t.aborted() {
		return stepDone
	}
	if !t.hello.done {
		switch t.helloStep() {
		case helloWait:
			return stepWaitGuest
		case helloCut:
			return stepDone
		}
	}
	w := &t.w
	for {
		if !w.settle() {
			if w.err != nil {
				t.abort("upstream write", w.err)
				return stepDone
			}
			return stepWaitSocket
		}
		if t.finPending {
			if hc, ok := t.up.(interface{ CloseWrite() error }); ok {
				hc.CloseWrite() // the guest's FIN, passed on
			}
			return stepDone
		}
		res, err := t.ep.Read(w, tcpip.ReadOptions{})
		if res.Count > 0 {
			// Receive-window auto-tuning runs only when the reader reports what it took.
			t.ep.ModerateRecvBuf(res.Count)
			t.flow.Count(int64(res.Count), 0)
		}
		switch err.(type) {
		case nil, *tcpip.ErrBadBuffer: // the writer stopped the read: settle and go on
		case *tcpip.ErrWouldBlock:
			if w.n == 0 && !w.full {
				return stepWaitGuest
			}
		case *tcpip.ErrClosedForReceive:
			t.finPending = true // after what is staged
		default:
			t.abort("guest read", err) // reset or error: pass it on as a RST
			return stepDone
		}
	}
}

// waitSocket waits up to linger on the runtime's poller for the upstream socket to be
// writable (out) or readable; true if it became so.
func (t *tcpFlow) waitSocket(out bool) bool {
	deadline := time.Now().Add(linger)
	var err error
	if out {
		t.up.SetWriteDeadline(deadline)
		err = t.upRC.Write(pollWritable)
		t.up.SetWriteDeadline(time.Time{})
	} else {
		t.up.SetReadDeadline(deadline)
		err = t.upRC.Read(t.q.readableFn)
		t.up.SetReadDeadline(time.Time{})
	}
	return err == nil
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

// downRun is the upstream -> guest worker.
func (t *tcpFlow) downRun() {
	for {
		switch t.downStep() {
		case stepDone:
			t.dirDone()
			return
		case stepWaitSocket:
			if t.waitSocket(false) {
				continue
			}
			t.want(true, false)
		case stepWaitGuest: // room in gVisor's send buffer: the waiter callback kicks
			if t.dnw.wait() {
				continue
			}
		}
		if !t.dnw.park() {
			return
		}
	}
}

func (t *tcpFlow) downStep() step {
	for {
		if t.aborted() {
			return stepDone
		}
		if t.downPending == 0 {
			n, err := t.q.now(t.upRC)
			if err == unix.EAGAIN {
				return stepWaitSocket
			}
			if err == io.EOF { // the destination's FIN, passed on
				t.ep.Shutdown(tcpip.ShutdownWrite)
				return stepDone
			}
			if err != nil {
				t.abort("upstream read", err) // a reset (or an error) is passed on as a RST
				return stepDone
			}
			t.downPending = n
		}
		t.r.left = t.downPending
		m, werr := t.ep.Write(&t.r, tcpip.WriteOptions{})
		if t.r.err != nil { // bytes taken from the socket went with the failed write
			t.abort("upstream read", t.r.err)
			return stepDone
		}
		t.downPending -= int(m)
		t.flow.Count(0, m)
		switch werr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			return stepWaitGuest
		default:
			t.abort("guest write", werr)
			return stepDone
		}
	}
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

	// The poller callback, made once per flow (a closure per call would allocate).
	sendFn  func(fd uintptr) bool
	sendBuf []byte // sendFn's argument ...
	sent    int    // ... and results
	sendErr error
}

func (w *upWriter) init(t *tcpFlow) {
	w.t = t
	w.sendFn = w.send
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

// settle finishes what a read left, without waiting: it sends staged bytes and returns the
// staging buffer, and gets one that was missing (waiting for the budget). false: the socket
// is full (wait until it is writable, then settle again) or failed (err).
func (w *upWriter) settle() bool {
	if w.err != nil || (w.n > 0 && !w.flushNB()) {
		return false
	}
	if w.stage != nil {
		w.t.putBuf(w.stage)
		w.stage = nil
	}
	if w.full {
		w.full = false
		return false
	}
	if w.needBuf {
		w.needBuf = false
		if w.stage = w.t.getBuf(); w.stage == nil {
			w.err = errors.New("relay: stopping")
			return false
		}
	}
	return true
}

func (w *upWriter) release() {
	if w.stage != nil {
		w.t.putBuf(w.stage)
		w.stage = nil
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

// upQueued tells how many bytes the upstream socket has queued, or that it has ended (io.EOF,
// or its error), without a buffer.
type upQueued struct {
	fn         func(fd uintptr) bool // check, made once
	readableFn func(fd uintptr) bool // check that reports "not yet" to the poller
	n          int
	err        error
	fresh      bool // n and err are what the last wait saw, not yet used
}

// now looks without waiting (unix.EAGAIN: nothing yet), or returns what a wait saw: a
// socket reports an error (a reset) once, to whichever call sees it first.
func (q *upQueued) now(rc syscall.RawConn) (int, error) {
	if q.fresh {
		q.fresh = false
		return q.n, q.err
	}
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
		case perr != nil:
			q.err = perr // EAGAIN: not yet
		default:
			q.err = io.EOF
		}
		return true
	}
}

// readable is check for the poller: "not yet" makes it wait.
func (q *upQueued) readable(fd uintptr) bool {
	q.check(fd)
	q.fresh = q.err != unix.EAGAIN
	return q.fresh
}

// The TLS check: a flow whose first bytes start a TLS handshake record is held until its
// ClientHello is complete (at most maxHello bytes, SNIWait) and its SNI judged. The bytes are
// peeked, never taken: they stay in gVisor's receive buffer and are relayed from there.

type helloState struct {
	done    bool
	timer   *time.Timer
	expired atomic.Bool
	wake    func() // what the SNIWait timer calls
}

const (
	helloOK   = iota // judged (or not TLS): relay
	helloWait        // more of the ClientHello is needed
	helloCut         // the SNI was refused: the flow is reset
)

// helloBufs hold a flow's first bytes while its ClientHello is parsed (peeked, never kept).
var helloBufs = sync.Pool{New: func() any { b := make([]byte, maxHello); return &b }}

func (t *tcpFlow) helloStep() int {
	bp := helloBufs.Get().(*[]byte)
	defer helloBufs.Put(bp)
	w := tcpip.SliceWriter(*bp)
	res, err := t.ep.Read(&w, tcpip.ReadOptions{Peek: true})
	if _, ok := err.(*tcpip.ErrWouldBlock); ok {
		return helloWait
	}
	if err != nil { // the relay sees the same end
		t.hello.done = true
		return helloOK
	}
	data := (*bp)[:res.Count]
	if !looksLikeTLS(data) {
		t.hello.done = true
		return helloOK
	}
	sni, complete := clientHelloSNI(data)
	if !complete && !t.hello.expired.Load() {
		if t.hello.timer == nil {
			t.hello.timer = time.AfterFunc(t.st.opts.SNIWait, func() {
				t.hello.expired.Store(true) // judged by the pins alone
				t.hello.wake()
			})
		}
		return helloWait
	}
	t.hello.done = true
	if sni != "" && !t.flow.CheckSNI(sni) {
		t.abort("sni denied", sni)
		return helloCut
	}
	return helloOK
}

// run relays a flow whose upstream has no socket (a stream over the agent channel) with a
// goroutine per direction and plain copies.
func (t *tcpFlow) run() {
	stop := context.AfterFunc(t.st.ctx, func() { t.abort("stack closing", nil) })
	defer stop()
	t.flow.OnRevoke(func() { t.abort("revoked by a policy reload", nil) })
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); t.toUpstreamCopy() }()
	t.toGuestCopy()
	wg.Wait()
	if t.hello.timer != nil {
		t.hello.timer.Stop()
	}
	t.ep.Close()
	t.up.Close()
}

// toUpstreamCopy reads into a relay buffer, then writes.
func (t *tcpFlow) toUpstreamCopy() {
	entry, notify := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	t.wq.EventRegister(&entry)
	defer t.wq.EventUnregister(&entry)
	expired := make(chan struct{}, 1)
	t.hello.wake = func() { expired <- struct{}{} }
	for !t.hello.done {
		switch t.helloStep() {
		case helloCut:
			return
		case helloWait:
			select {
			case <-notify:
			case <-expired:
			}
		}
	}
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

// toGuestCopy is a plain read loop with a small buffer of its own (a channel stream buffers
// within its own window), outside the relay-buffer budget so that idle streams cannot starve
// it.
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
