package hostdial

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// harness: an Endpoint writing through a real sessionio.Writer into a socket; the test plays the
// host, reading the frames agentd sends and answering through Handle.
type harness struct {
	ep *Endpoint
	fr *protocol.FrameReader
}

func newHarness(t *testing.T, o Options) *harness {
	a, b := testutil.SocketPair(t)
	w := sessionio.NewWriter(a, sessionio.DefaultWriterOptions)
	t.Cleanup(w.Close)
	ep := New(o)
	ep.Attach(w)
	return &harness{ep: ep, fr: protocol.NewFrameReader(b)}
}

func (h *harness) next(t *testing.T) protocol.Message {
	t.Helper()
	f, err := h.fr.Next()
	if err != nil {
		t.Fatal(err)
	}
	m, err := protocol.DecodeMessage(f)
	if err != nil {
		t.Fatal(err)
	}
	m.Payload = append([]byte(nil), m.Payload...)
	return m
}

func (h *harness) host(t *testing.T, id uint32, ty protocol.Type, v any) {
	t.Helper()
	p, err := protocol.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.ep.Handle(protocol.Message{ID: id, Type: ty, Payload: p}); err != nil {
		t.Fatal(err)
	}
}

// dial opens a stream and has the host accept it with the given window.
func (h *harness) dial(t *testing.T, network, addr string, window uint32) (*Conn, uint32) {
	t.Helper()
	type res struct {
		c   *Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := h.ep.DialContext(context.Background(), network, addr)
		cc, _ := c.(*Conn)
		ch <- res{cc, err}
	}()
	m := h.next(t)
	var open protocol.StreamOpen
	if m.Type != protocol.TypeStreamOpen || protocol.Unmarshal(m.Payload, &open) != nil {
		t.Fatalf("got %s", m.Name())
	}
	h.host(t, m.ID, protocol.TypeStreamOpened, protocol.StreamOpened{Window: window})
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.c, m.ID
}

func TestCreditBoundsWhatAgentdSends(t *testing.T) {
	h := newHarness(t, Options{Window: 1000})
	c, id := h.dial(t, "tcp", "192.0.2.1:80", 10)
	done := make(chan error, 1)
	go func() { _, err := c.Write([]byte("0123456789abcdefghijklmno")); done <- err }()
	m := h.next(t)
	d, _ := protocol.DecodeData(m.Payload)
	if m.Type != protocol.TypeStreamData || string(d) != "0123456789" {
		t.Fatalf("first frame %s %q: want the 10 bytes granted", m.Name(), d)
	}
	select {
	case <-done:
		t.Fatal("Write finished without credit for the rest")
	case <-time.After(50 * time.Millisecond): // proving a negative: nothing may arrive
	}
	h.host(t, id, protocol.TypeStreamCredit, protocol.StreamCredit{Bytes: 100})
	m = h.next(t)
	d, _ = protocol.DecodeData(m.Payload)
	if string(d) != "abcdefghijklmno" || <-done != nil {
		t.Fatalf("rest %q", d)
	}
}

func TestReadGrantsCreditAndWindowIsEnforced(t *testing.T) {
	h := newHarness(t, Options{Window: 100})
	c, id := h.dial(t, "tcp", "192.0.2.1:80", 1000)
	h.host(t, id, protocol.TypeStreamData, protocol.Data{Data: []byte(strings.Repeat("x", 60))})
	buf := make([]byte, 100)
	if n, err := c.Read(buf); n != 60 || err != nil {
		t.Fatalf("read %d %v", n, err)
	}
	m := h.next(t)
	var cr protocol.StreamCredit
	if m.Type != protocol.TypeStreamCredit || protocol.Unmarshal(m.Payload, &cr) != nil || cr.Bytes != 60 {
		t.Fatalf("want a 60-byte grant, got %s %+v", m.Name(), cr)
	}
	// The host overruns the window: the stream ends, the channel goes on.
	h.host(t, id, protocol.TypeStreamData, protocol.Data{Data: make([]byte, 101)})
	if m := h.next(t); m.Type != protocol.TypeStreamClose {
		t.Fatalf("after an overrun: %s", m.Name())
	}
	if h.ep.Open() != 0 {
		t.Fatal("stream still registered")
	}
	// Deadlines work on an idle stream.
	c2, _ := h.dial(t, "udp", "192.0.2.1:53", 1000)
	c2.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := c2.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("deadline: %v", err)
	}
}

func TestDatagramsKeepBoundaries(t *testing.T) {
	h := newHarness(t, Options{})
	c, id := h.dial(t, "udp", "192.0.2.1:53", 1<<20)
	h.host(t, id, protocol.TypeStreamData, protocol.Data{Data: []byte("one")})
	h.host(t, id, protocol.TypeStreamData, protocol.Data{Data: []byte("two!")})
	buf := make([]byte, 10)
	for _, want := range []string{"one", "two!"} {
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("datagram %q %v, want %q", buf[:n], err, want)
		}
	}
	h.host(t, id, protocol.TypeStreamEOF, protocol.Empty{})
	if _, err := c.Read(buf); err != io.EOF {
		t.Fatalf("after eof: %v", err)
	}
}

func TestRefusedAndDetached(t *testing.T) {
	h := newHarness(t, Options{})
	errc := make(chan error, 1)
	go func() { _, err := h.ep.DialContext(context.Background(), "tcp", "192.0.2.9:25"); errc <- err }()
	m := h.next(t)
	h.host(t, m.ID, protocol.TypeStreamClose, protocol.StreamClose{Error: "denied by the host's policy: rule no-smtp"})
	err := <-errc
	if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "rule no-smtp") {
		t.Fatalf("refusal: %v", err)
	}
	c, _ := h.dial(t, "tcp", "192.0.2.1:80", 100)
	h.ep.Detach()
	if _, err := c.Read(make([]byte, 1)); err == nil || !strings.Contains(err.Error(), "channel closed") {
		t.Fatalf("after detach: %v", err)
	}
	if _, err := h.ep.DialContext(context.Background(), "tcp", "192.0.2.1:80"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("dial after detach: %v", err)
	}
}
