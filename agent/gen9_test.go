package agent

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// wire drives the agent with frames built by hand on one id and reads every reply to it.
type wire struct {
	t *testing.T
	c *host.Client
	s *host.Session
}

func openWire(t *testing.T, c *host.Client, id uint32) *wire {
	s, err := c.OpenID(id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &wire{t, c, s}
}

// send sends a message stamped with generation v.
func (w *wire) send(v uint8, typ protocol.Type, p any) {
	w.t.Helper()
	b, err := protocol.Marshal(p)
	if err != nil {
		w.t.Fatal(err)
	}
	f, _ := protocol.AppendMessageV(nil, v, w.s.ID, typ, b)
	if err := w.c.WriteFrame(f); err != nil {
		w.t.Fatal(err)
	}
}

func (w *wire) record(flow protocol.BulkFlow, off uint64, payload []byte) {
	w.t.Helper()
	f, err := protocol.AppendBulkRecord(nil, protocol.BulkRecord{ID: w.s.ID, Kind: protocol.BulkTCP, Flow: flow, Offset: off, Payload: payload})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := w.c.WriteFrame(f); err != nil {
		w.t.Fatal(err)
	}
}

// recv returns the next message on the wire's id (raw records, which this client has no
// stream for, are skipped).
func (w *wire) recv() protocol.Message {
	w.t.Helper()
	for {
		m, err := w.s.Recv(ctx(w.t))
		if err != nil {
			w.t.Fatalf("recv on %d: %v", w.s.ID, err)
		}
		if m.Type != 0 {
			return m
		}
	}
}

func (w *wire) expect(typ protocol.Type, v any) protocol.Message {
	w.t.Helper()
	m := w.recv()
	if m.Type != typ {
		w.t.Fatalf("got %s (%x), want %s", m.Name(), m.Payload, typ)
	}
	if v != nil {
		if err := protocol.Unmarshal(m.Payload, v); err != nil {
			w.t.Fatal(err)
		}
	}
	return m
}

func (w *wire) expectError(kind, offending string) protocol.CoreError {
	w.t.Helper()
	var e protocol.CoreError
	m := w.expect(protocol.TypeError, &e)
	if m.Flags != protocol.FlagTerminal || e.Kind != kind || e.OffendingType != offending || e.Message == "" {
		w.t.Fatalf("core.error %+v flags %d, want %s for %s", e, m.Flags, kind, offending)
	}
	return e
}

// TestPingTouch: ping gets pong and is not activity; touch counts once and reports the
// activity sequence number it made, the one the heartbeat shows; both replies are terminal.
func TestPingTouch(t *testing.T) {
	h := start(t, nil, Config{})
	if h.c.Generation() != protocol.Version || h.c.ReadyV != protocol.Version {
		t.Fatalf("negotiated %d (ready v %d), want %d", h.c.Generation(), h.c.ReadyV, protocol.Version)
	}
	before := h.a.act.ActivitySeq.Load()
	for i := 0; i < 3; i++ {
		if err := h.c.Ping(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	if after := h.a.act.ActivitySeq.Load(); after != before {
		t.Fatalf("pings moved activity_seq from %d to %d", before, after)
	}
	seq, err := h.c.Touch(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if seq != before+1 || h.a.act.ActivitySeq.Load() != seq {
		t.Fatalf("touched %d (activity_seq now %d), want %d", seq, h.a.act.ActivitySeq.Load(), before+1)
	}
	w := openWire(t, h.c, 40)
	w.send(9, protocol.TypePing, protocol.Empty{})
	if m := w.expect(protocol.TypePong, nil); m.Flags != protocol.FlagTerminal || string(m.Payload) != "\xa0" {
		t.Fatalf("pong flags %d payload %x", m.Flags, m.Payload)
	}
	w = openWire(t, h.c, 41)
	w.send(9, protocol.TypePing, 7) // not a map
	w.expectError(protocol.KindInvalidPayload, "core.ping")
}

// TestGenerationGates: a host type of a later generation than the agent announces, and a
// guest -> host type of generations 6 to 9, are answered as unknown types; ping is refused by
// an agent announcing 5, which also ignores a bulk offer (it knows no such key). The client
// refuses locally what the negotiated generation lacks.
func TestGenerationGates(t *testing.T) {
	h := start(t, nil, Config{})
	for i, typ := range []protocol.Type{protocol.TypeBulkAccepted, protocol.TypePong, protocol.TypeTouched, protocol.TypeWorkloadFrozen} {
		w := openWire(t, h.c, uint32(50+i))
		w.send(9, typ, protocol.Empty{})
		w.expectError(protocol.KindUnsupportedMessageType, typ.String())
	}
	old := start(t, nil, Config{Generation: 5})
	if old.c.ReadyV != 5 || old.c.Generation() != 5 || old.c.Bulk() {
		t.Fatalf("agent at 5: ready v %d, negotiated %d, bulk %v", old.c.ReadyV, old.c.Generation(), old.c.Bulk())
	}
	var ue *host.UnsupportedError
	if err := old.c.Ping(ctx(t)); err == nil || !asUnsupported(err, &ue) || ue.Needs != 6 {
		t.Fatalf("client ping toward an agent at 5: %v", err)
	}
	w := openWire(t, old.c, 60)
	w.send(9, protocol.TypePing, protocol.Empty{})
	w.expectError(protocol.KindUnsupportedMessageType, "core.ping")
	srv := testutil.Serve(t, testutil.Echo)
	w = openWire(t, old.c, 61)
	offer := protocol.BulkOfferTCP
	w.send(9, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(srv.Addr.Port), Bulk: &offer})
	if m := w.recv(); m.Type != protocol.TypeTCPConnected || m.V != 5 {
		t.Fatalf("connect with an offer to an agent at 5: %s v %d", m.Name(), m.V)
	}
	w.send(9, protocol.TypeTCPData, protocol.Data{Data: []byte("cbor")})
	var d protocol.Data
	if w.expect(protocol.TypeTCPData, &d); string(d.Data) != "cbor" {
		t.Fatalf("echo %q", d.Data)
	}
}

func asUnsupported(err error, ue **host.UnsupportedError) bool {
	e, ok := err.(*host.UnsupportedError)
	*ue = e
	return ok
}

// TestGen9Answers: root-disk requests get capability_unavailable on their id; a freeze or thaw
// (on the host's lifecycle id) gets core.error with workload_failure "unavailable", so the host
// falls back; a late core.bootstrap is refused.
func TestGen9Answers(t *testing.T) {
	h := start(t, nil, Config{})
	for i, typ := range []protocol.Type{protocol.TypeRootDiskPrepare, protocol.TypeRootDiskGrow} {
		w := openWire(t, h.c, uint32(70+i))
		w.send(9, typ, protocol.RootDiskSize{SizeBytes: 4 << 30})
		w.expectError(protocol.KindCapabilityUnavailable, typ.String())
	}
	w := openWire(t, h.c, protocol.WorkloadControlID)
	w.send(9, protocol.TypeWorkloadFreeze, protocol.WorkloadFreeze{ExternalMountTags: []string{}, AttemptID: "a1"})
	e := w.expectError(protocol.KindCapabilityUnavailable, "core.workload.freeze")
	if e.WorkloadFailure == nil || *e.WorkloadFailure != (protocol.WorkloadFailure{AttemptID: "a1", Disposition: protocol.WorkloadUnavailable}) {
		t.Fatalf("workload_failure %+v", e.WorkloadFailure)
	}
	w = openWire(t, h.c, 72)
	w.send(9, protocol.TypeBootstrap, protocol.Bootstrap{})
	w.expectError(protocol.KindUnsupportedMessageType, "core.bootstrap")
}

// TestBulkTCPProtocol: a bulk session's wire rules (contract 6.2 to 6.5), frame by frame.
func TestBulkTCPProtocol(t *testing.T) {
	h := start(t, nil, Config{})
	srv := testutil.Serve(t, testutil.Echo)
	port := uint16(srv.Addr.Port)
	offer := func(mut func(*protocol.BulkOffer)) *protocol.BulkOffer {
		o := protocol.BulkOfferTCP
		if mut != nil {
			mut(&o)
		}
		return &o
	}
	id := uint32(100)
	next := func() *wire { id++; return openWire(t, h.c, id) }
	failed := func(w *wire, want string) {
		t.Helper()
		var f protocol.TCPFailed
		for {
			m := w.recv()
			if m.Type == protocol.TypeTCPFailed {
				protocol.Unmarshal(m.Payload, &f)
				if m.Flags != protocol.FlagTerminal || !strings.Contains(f.Error, want) {
					t.Fatalf("tcp.failed %q flags %d, want %q", f.Error, m.Flags, want)
				}
				return
			}
			if m.Flags&protocol.FlagTerminal != 0 {
				t.Fatalf("got %s, want tcp.failed %q", m.Name(), want)
			}
		}
	}
	// Refused offers: a terminal tcp.failed before any dial.
	for _, c := range []struct {
		v     uint8
		offer *protocol.BulkOffer
		want  string
	}{
		{7, offer(nil), "raw bulk offer requires protocol generation 8"},
		{9, offer(func(o *protocol.BulkOffer) { o.GuestToHostCreditLimit = 0 }), "TCP bulk offer must grant guest-to-host credit"},
		{9, offer(func(o *protocol.BulkOffer) { o.Format = 2 }), "invalid TCP bulk offer: unsupported bulk format 2"},
		{9, offer(func(o *protocol.BulkOffer) { o.MaxRecordPayload = 100 }), "invalid TCP bulk offer: max_record_payload 100"},
	} {
		w := next()
		w.send(c.v, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: port, Bulk: c.offer})
		failed(w, c.want)
	}
	// Accepted: connected, then accepted with the reference's answers.
	accept := func(o *protocol.BulkOffer) (*wire, protocol.BulkAccepted) {
		w := next()
		w.send(9, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: port, Bulk: o})
		w.expect(protocol.TypeTCPConnected, nil)
		var a protocol.BulkAccepted
		if m := w.expect(protocol.TypeBulkAccepted, &a); m.Flags != 0 || m.V != protocol.Version {
			t.Fatalf("accepted flags %d v %d", m.Flags, m.V)
		}
		return w, a
	}
	w, a := accept(offer(func(o *protocol.BulkOffer) { o.MaxRecordPayload = 1 << 20 }))
	if a != (protocol.BulkAccepted{Kind: protocol.BulkTCP, Flows: 3, Format: 1, MaxRecordPayload: 256 << 10,
		HostToGuestCreditLimit: 8 << 20, GuestToHostCreditLimit: 8 << 20}) {
		t.Fatalf("accepted %+v", a)
	}
	// Echo through records: the destination's bytes come back as g2h records... which the
	// wire does not see (the client drops records of a session it does not know as bulk), but
	// the finish and the final credit do arrive; both finished: tcp.closed.
	w.record(protocol.BulkHostToGuest, 0, []byte("hello"))
	w.send(9, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, FinalOffset: 5})
	var gotFinish, gotDrained bool
	for !gotFinish || !gotDrained {
		m := w.recv()
		switch m.Type {
		case protocol.TypeBulkCredit:
			var c protocol.BulkCredit
			protocol.Unmarshal(m.Payload, &c)
			gotDrained = c.ConsumedOffset == 5 && c.Flow == protocol.BulkHostToGuest
		case protocol.TypeBulkFinish:
			var f protocol.BulkFinish
			protocol.Unmarshal(m.Payload, &f)
			if f != (protocol.BulkFinish{Kind: protocol.BulkTCP, Flow: protocol.BulkGuestToHost, FinalOffset: 5}) {
				t.Fatalf("finish %+v", f)
			}
			gotFinish = true
		default:
			t.Fatalf("unexpected %s", m.Name())
		}
	}
	if m := w.recv(); m.Type != protocol.TypeTCPClosed || m.Flags != protocol.FlagTerminal {
		t.Fatalf("after both finishes: %s flags %d", m.Name(), m.Flags)
	}
	// Protocol violations end the session with the reference's texts.
	for _, c := range []struct {
		act  func(w *wire)
		want string
	}{
		{func(w *wire) { w.send(9, protocol.TypeTCPData, protocol.Data{Data: []byte("x")}) }, "CBOR TCP data is invalid after raw bulk acceptance"},
		{func(w *wire) { w.send(9, protocol.TypeTCPEOF, protocol.Empty{}) }, "CBOR TCP data is invalid after raw bulk acceptance"},
		{func(w *wire) { w.record(protocol.BulkHostToGuest, 3, []byte("x")) }, "invalid TCP bulk record: raw bulk record at offset 3, expected 0"},
		{func(w *wire) { w.record(protocol.BulkHostToGuest, 0, make([]byte, 256<<10+1)) }, "exceeds max_record_payload"},
		{func(w *wire) { w.record(protocol.BulkGuestToHost, 0, []byte("x")) }, "invalid TCP bulk record"},
		{func(w *wire) {
			w.send(9, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkTCP, Flow: protocol.BulkGuestToHost, CreditLimit: 1})
		}, "invalid TCP bulk credit: credit limit 1 below the previous"},
		{func(w *wire) { // the finish waits for bytes that have not arrived; a second one is refused
			w.send(9, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, FinalOffset: 5})
			w.send(9, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, FinalOffset: 5})
		}, "duplicate TCP bulk finish"},
		{func(w *wire) {
			w.send(9, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkTCP, Reason: protocol.BulkCancelCaller, Message: "the caller gave up"})
		}, "the caller gave up"},
	} {
		w, _ := accept(offer(nil))
		c.act(w)
		failed(w, c.want)
	}
	// Bulk messages on a CBOR session.
	w = next()
	w.send(9, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: port})
	w.expect(protocol.TypeTCPConnected, nil)
	w.send(9, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkTCP, Flow: protocol.BulkGuestToHost, CreditLimit: 1})
	failed(w, "core.bulk.credit received on a generation-6 TCP stream")
	// A record for no session is answered as data for no session is.
	w = next()
	w.record(protocol.BulkHostToGuest, 0, []byte("x"))
	failed(w, fmt.Sprintf("unknown TCP session: %d", w.s.ID))
}

// TestBulkBudget: many bulk sessions toward stalled destinations with a shared budget far
// smaller than their windows: each still opens (no flow waits for another), a fresh session
// still echoes at full speed, and the bytes granted (and so buffered) stay within the budget
// plus the small unbacked grant each session may hold.
func TestBulkBudget(t *testing.T) {
	const budget = 4 << 20
	stalled := make(chan *net.TCPConn, 16)
	sink := testutil.Serve(t, func(c *net.TCPConn) { c.SetReadBuffer(4096); stalled <- c })
	h := start(t, nil, Config{TCPBufferBudget: budget})
	var conns []*host.TCPConn
	for i := 0; i < 12; i++ {
		c, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(sink.Addr.Port))
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		conns = append(conns, c)
		go c.Write(make([]byte, 16<<20))
	}
	var dsts []*net.TCPConn
	for range conns {
		dsts = append(dsts, <-stalled)
	}
	time.Sleep(200 * time.Millisecond) // let the writers run against the stalled destinations
	if used := h.a.cfg.Relay.Inbound.Used(); used > budget {
		t.Fatalf("granted %d bytes with a budget of %d", used, budget)
	}
	echo := testutil.Serve(t, testutil.Echo)
	e, err := h.c.DialTCP(ctx(t), "127.0.0.1", uint16(echo.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, 1<<20)
	binary.BigEndian.PutUint64(msg, 42)
	go func() { e.Write(msg); e.CloseWrite() }()
	if got, err := io.ReadAll(e); err != nil || len(got) != len(msg) {
		t.Fatalf("echo beside the stalled sessions: %d bytes %v", len(got), err)
	}
	for _, d := range dsts {
		d.Close()
	}
	for _, c := range conns {
		c.Close()
	}
}

// TestTCPClosed: on the CBOR path too (a current host without a bulk offer), once both
// directions ended (the destination's EOF reported, the host's EOF applied) the agent ends the
// session with a terminal core.tcp.closed (contract 10.3), whichever side ended first. (A
// 0.5.7 host's session waits for its core.tcp.close, as the differential test holds.)
func TestTCPClosed(t *testing.T) {
	h := start(t, []string{}, Config{})
	echo := testutil.Serve(t, testutil.Echo)          // ends after the host's EOF
	early := testutil.Serve(t, func(c *net.TCPConn) { // ends first, then reads to EOF
		c.Write([]byte("bye"))
		c.CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
	})
	w := openWire(t, h.c, 200)
	w.send(9, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(echo.Addr.Port)})
	w.expect(protocol.TypeTCPConnected, nil)
	w.send(9, protocol.TypeTCPData, protocol.Data{Data: []byte("ping")})
	w.expect(protocol.TypeTCPData, nil)
	w.send(9, protocol.TypeTCPEOF, protocol.Empty{})
	w.expect(protocol.TypeTCPEOF, nil)
	if m := w.recv(); m.Type != protocol.TypeTCPClosed || m.Flags != protocol.FlagTerminal {
		t.Fatalf("host ended first, then the destination: %s flags %d", m.Name(), m.Flags)
	}
	w = openWire(t, h.c, 201)
	w.send(9, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(early.Addr.Port)})
	w.expect(protocol.TypeTCPConnected, nil)
	w.expect(protocol.TypeTCPData, nil)
	w.expect(protocol.TypeTCPEOF, nil)
	w.send(9, protocol.TypeTCPData, protocol.Data{Data: []byte("still open")})
	w.send(9, protocol.TypeTCPEOF, protocol.Empty{})
	if m := w.recv(); m.Type != protocol.TypeTCPClosed || m.Flags != protocol.FlagTerminal {
		t.Fatalf("destination ended first, then the host: %s flags %d", m.Name(), m.Flags)
	}
	testutil.WaitFor(t, func() bool { return h.a.Stats().TCPSessions == 0 }, "sessions to end")
}

// TestBulkFsProtocol: fs Read and Write with a bulk offer (contract 6.2, 6.5), frame by frame.
func TestBulkFsProtocol(t *testing.T) {
	h := start(t, nil, Config{})
	dir := t.TempDir()
	file := dir + "/f"
	content := make([]byte, 300<<10) // more than one record
	for i := range content {
		content[i] = byte(i * 7)
	}
	if err := os.WriteFile(file, content, 0o600); err != nil {
		t.Fatal(err)
	}
	open := func(write bool) uint64 {
		d, err := h.c.Fs(ctx(t), &protocol.FsOpenFile{Path: file, Options: protocol.FsOpenOptions{Read: !write, Write: write}})
		if err != nil {
			t.Fatal(err)
		}
		return d.Handle
	}
	id := uint32(300)
	next := func() *wire { id++; return openWire(t, h.c, id) }
	response := func(w *wire, wantErr string) {
		t.Helper()
		var r protocol.FsResponse
		m := w.expect(protocol.TypeFsResponse, &r)
		if m.Flags != protocol.FlagTerminal || wantErr == "" && !r.OK || wantErr != "" && (r.OK || r.Error == nil || !strings.Contains(*r.Error, wantErr)) {
			t.Fatalf("fs.response %+v (error %v), want %q", r, r.Error, wantErr)
		}
	}
	read, write := protocol.BulkOfferFSRead, protocol.BulkOfferFSWrite
	rh, wh := open(false), open(true)
	// Refused offers.
	for _, c := range []struct {
		v     uint8
		op    protocol.FsOp
		offer protocol.BulkOffer
		want  string
	}{
		{7, &protocol.FsRead{Handle: rh}, read, "raw bulk offer requires protocol generation 8"},
		{9, &protocol.FsRead{Handle: rh}, write, "filesystem read bulk offer must grant guest-to-host credit"},
		{9, &protocol.FsWrite{Handle: wh}, read, "filesystem write bulk offer must not grant guest-to-host credit"},
		{9, &protocol.FsRead{Handle: rh}, protocol.BulkOffer{Format: 1, MaxRecordPayload: 1, GuestToHostCreditLimit: 1}, "invalid filesystem bulk offer: max_record_payload 1"},
		{9, &protocol.FsRead{Handle: 99999}, read, "read: invalid handle: 99999"},
	} {
		w := next()
		w.send(c.v, protocol.TypeFsRequest, protocol.FsRequest{Op: c.op, Bulk: &c.offer})
		response(w, c.want)
	}
	// A read: accepted (kind 1, flows 2), records within the credit, the finish, then ok.
	w := next()
	w.send(9, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsRead{Handle: rh}, Bulk: &read})
	var a protocol.BulkAccepted
	w.expect(protocol.TypeBulkAccepted, &a)
	if a != (protocol.BulkAccepted{Kind: protocol.BulkFS, Flows: 2, Format: 1, MaxRecordPayload: 256 << 10, GuestToHostCreditLimit: 8 << 20}) {
		t.Fatalf("read accepted %+v", a)
	}
	var f protocol.BulkFinish
	w.expect(protocol.TypeBulkFinish, &f)
	if f != (protocol.BulkFinish{Kind: protocol.BulkFS, Flow: protocol.BulkGuestToHost, FinalOffset: uint64(len(content))}) {
		t.Fatalf("read finish %+v", f)
	}
	response(w, "")
	// A write: accepted (flows 1, credit for the host), records, finish: the length is checked.
	w = next()
	nine := uint64(9)
	w.send(9, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsWrite{Handle: wh, Len: &nine}, Bulk: &write})
	w.expect(protocol.TypeBulkAccepted, &a)
	if a.Kind != protocol.BulkFS || a.Flows != 1 || a.HostToGuestCreditLimit == 0 || a.GuestToHostCreditLimit != 0 || a.MaxRecordPayload != 256<<10 {
		t.Fatalf("write accepted %+v", a)
	}
	w.recordFs(0, []byte("short"))
	w.send(9, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkFS, Flow: protocol.BulkHostToGuest, FinalOffset: 5})
	response(w, "write length mismatch: expected 9, wrote 5")
	// A record past the credit: core.bulk.cancel (protocol state), then the terminal error.
	w = next()
	w.send(9, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsWrite{Handle: wh}, Bulk: &write})
	w.expect(protocol.TypeBulkAccepted, &a)
	w.recordFs(1, []byte("x"))
	var c protocol.BulkCancel
	w.expect(protocol.TypeBulkCancel, &c)
	if c.Kind != protocol.BulkFS || c.Reason != protocol.BulkCancelProtocolState || !strings.Contains(c.Message, "at offset 1, expected 0") {
		t.Fatalf("cancel %+v", c)
	}
	response(w, "invalid filesystem bulk record")
	// The host's cancel ends a write with its message (and no cancel back).
	w = next()
	w.send(9, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsWrite{Handle: wh}, Bulk: &write})
	w.expect(protocol.TypeBulkAccepted, &a)
	w.send(9, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS, Reason: protocol.BulkCancelCaller, Message: "gave up"})
	response(w, "gave up")
}

func (w *wire) recordFs(off uint64, payload []byte) {
	w.t.Helper()
	f, err := protocol.AppendBulkRecord(nil, protocol.BulkRecord{ID: w.s.ID, Kind: protocol.BulkFS, Flow: protocol.BulkHostToGuest, Offset: off, Payload: payload})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := w.c.WriteFrame(f); err != nil {
		w.t.Fatal(err)
	}
}
