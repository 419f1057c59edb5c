package hostserver

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// fakeAgent collects the frames a stream server sends toward the agent.
type fakeAgent struct{ ch chan protocol.Message }

func (f *fakeAgent) send(frame []byte, after func()) bool {
	if after != nil {
		defer after()
	}
	fr, err := protocol.NewFrameReader(bytes.NewReader(frame)).Next()
	if err != nil {
		return false
	}
	m, err := protocol.DecodeMessage(fr)
	if err != nil {
		return false
	}
	m.Payload = append([]byte(nil), m.Payload...)
	f.ch <- m
	return true
}

func (f *fakeAgent) next(t *testing.T) protocol.Message {
	t.Helper()
	select {
	case m := <-f.ch:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no frame from the stream server")
	}
	return protocol.Message{}
}

func msg(t *testing.T, id uint32, ty protocol.Type, v any) protocol.Message {
	p, err := protocol.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return protocol.Message{ID: id, Type: ty, Payload: p}
}

func TestDialOutDatagrams(t *testing.T) {
	echo := testutil.UDPEcho(t, net.IPv4(127, 0, 0, 1), "re:")
	fa := &fakeAgent{ch: make(chan protocol.Message, 16)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newDialOut(ctx, DialOutOptions{DNS: []netip.AddrPort{echo.AddrPort()}}, fa.send, &DialOutCounters{})
	s.handle(msg(t, 7, protocol.TypeStreamOpen, protocol.StreamOpen{Proto: "dns", Window: 1 << 20}))
	if m := fa.next(t); m.Type != protocol.TypeStreamOpened || m.ID != 7 {
		t.Fatalf("got %s", m.Name())
	}
	s.handle(msg(t, 7, protocol.TypeStreamData, protocol.Data{Data: []byte("query")}))
	for i := 0; i < 2; i++ {
		m := fa.next(t)
		switch m.Type {
		case protocol.TypeStreamCredit:
		case protocol.TypeStreamData:
			d, _ := protocol.DecodeData(m.Payload)
			if string(d) != "re:query" {
				t.Fatalf("datagram %q", d)
			}
		default:
			t.Fatalf("got %s", m.Name())
		}
	}
}
