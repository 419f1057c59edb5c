package sessionio

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/protocol"
)

type grants struct{ got [][2]uint64 }

func (g *grants) grant(consumed, limit uint64) { g.got = append(g.got, [2]uint64{consumed, limit}) }

func rec(off uint64, n int) protocol.BulkRecord {
	return protocol.BulkRecord{ID: 7, Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, Offset: off, Payload: make([]byte, n)}
}

// TestBulkInRecords: each record is checked against the flow's state; the finish applies once
// every byte before it arrived.
func TestBulkInRecords(t *testing.T) {
	g := &grants{}
	b := NewBulkIn(BulkInOptions{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, MaxRecord: 1000, Window: 4000, Grant: g.grant})
	if limit := b.Open(); limit != 4000 {
		t.Fatalf("open: %d", limit)
	}
	other := rec(0, 10)
	other.Flow = protocol.BulkGuestToHost
	for _, c := range []struct {
		r   protocol.BulkRecord
		err string
	}{
		{other, "kind 2 flow 2 on a kind 2 flow 1 session"},
		{rec(5, 10), "at offset 5, expected 0"},
		{rec(0, 1001), "exceeds max_record_payload 1000"},
		{rec(0, 1000), ""},
		{rec(1000, 1000), ""},
		{rec(2000, 1000), ""},
		{rec(3000, 1000), ""},
		{rec(4000, 1), "exceeds the credit limit 4000"},
	} {
		err := b.Accept(c.r)
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("record at %d (%d bytes): %v, want %q", c.r.Offset, len(c.r.Payload), err, c.err)
		}
	}
	if _, err := b.Finish(3999); err == nil || !strings.Contains(err.Error(), "4000 bytes arrived") {
		t.Errorf("finish below what arrived: %v", err)
	}
	b.Consumed(2000) // half the window left: grants consumed + window
	if len(g.got) != 1 || g.got[0] != [2]uint64{2000, 6000} {
		t.Fatalf("grants %v, want [2000 6000]", g.got)
	}
	if err := b.Accept(rec(4000, 500)); err != nil {
		t.Fatal(err)
	}
	if done, err := b.Finish(5000); done || err != nil {
		t.Fatalf("finish ahead of the data: complete %v %v", done, err)
	}
	if _, err := b.Finish(5000); err == nil || !strings.Contains(err.Error(), "duplicate") {
		t.Errorf("second finish: %v", err)
	}
	if err := b.Accept(rec(4500, 600)); err == nil || !strings.Contains(err.Error(), "after the finish at 5000") {
		t.Errorf("record past the finish: %v", err)
	}
	if err := b.Accept(rec(4500, 500)); err != nil || !b.Complete() {
		t.Fatalf("last record: %v complete %v", err, b.Complete())
	}
	b.Consumed(3000) // finished: no more grants
	if len(g.got) != 1 {
		t.Fatalf("granted after the finish: %v", g.got)
	}
}

// TestBulkInBudget: granted bytes are held in the budget until consumed; each grant takes at
// most half of what is free, so stalled flows never take all of it, and a flow left without
// credit when nothing is free still gets MinGrant: no flow waits for another.
func TestBulkInBudget(t *testing.T) {
	budget := NewBudget(1 << 20)
	g := &grants{}
	opts := BulkInOptions{Kind: protocol.BulkTCP, Flow: protocol.BulkHostToGuest, MaxRecord: 64 << 10, Window: 768 << 10, Budget: budget, Grant: g.grant}
	var flows []*BulkIn
	for i, want := range []uint64{512 << 10, 256 << 10, 128 << 10} { // half of what is free, each
		f := NewBulkIn(opts)
		if l := f.Open(); l != want {
			t.Fatalf("flow %d opened with %d, want %d", i, l, want)
		}
		flows = append(flows, f)
	}
	for budget.Free() > 1 { // more stalled flows, until nothing is free
		f := NewBulkIn(opts)
		f.Open()
		flows = append(flows, f)
	}
	late := NewBulkIn(opts)
	if l := late.Open(); l != MinGrant {
		t.Fatalf("a flow opened on a spent budget got %d, want MinGrant %d", l, MinGrant)
	}
	if used := budget.Used(); used > 1<<20 {
		t.Fatalf("budget holds %d, more than its limit", used)
	}
	// The late flow consumes its unbacked grant: with nothing free it gets MinGrant again.
	if err := late.Accept(rec(0, MinGrant)); err != nil {
		t.Fatal(err)
	}
	late.Consumed(MinGrant)
	if len(g.got) != 1 || g.got[0] != [2]uint64{MinGrant, 2 * MinGrant} {
		t.Fatalf("grants %v, want [%d %d]", g.got, MinGrant, 2*MinGrant)
	}
	// A flow consuming what it holds releases it to the others.
	if err := flows[0].Accept(rec(0, 64<<10)); err != nil {
		t.Fatal(err)
	}
	flows[0].Consumed(64 << 10)
	if free := budget.Free(); free < 32<<10 {
		t.Fatalf("%d free after a flow consumed 64 KiB", free)
	}
	for _, f := range append(flows, late) {
		f.Close()
	}
	if used := budget.Used(); used != 0 {
		t.Fatalf("budget holds %d after every flow closed", used)
	}
}

// TestBulkOut: the sender never passes the receiver's absolute credit, and bad credit is refused.
func TestBulkOut(t *testing.T) {
	o := NewBulkOut(100)
	off, n, ok := o.Wait(context.Background(), 1000)
	if !ok || off != 0 || n != 100 {
		t.Fatalf("wait: %d %d %v", off, n, ok)
	}
	o.Sent(100)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, _, ok := o.Wait(ctx, 1); ok {
		t.Fatal("sent beyond the credit")
	}
	for _, c := range []struct {
		consumed, limit uint64
		err             string
	}{
		{0, 50, "below the previous 100"},
		{101, 200, "beyond the 100 bytes sent"},
		{0, protocol.BulkMaxWindow + 1, "exceeds the maximum"},
		{100, 300, ""},
		{100, 300, ""}, // a duplicate is harmless
		{50, 300, "below the previous 100"},
	} {
		err := o.Credit(c.consumed, c.limit)
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("credit %d/%d: %v, want %q", c.consumed, c.limit, err, c.err)
		}
	}
	if off, n, ok := o.Wait(context.Background(), 1000); !ok || off != 100 || n != 200 {
		t.Fatalf("after credit: %d %d %v", off, n, ok)
	}
	o.Sent(20)
	if final := o.Finish(); final != 120 {
		t.Fatalf("final %d", final)
	}
	if _, _, ok := o.Wait(context.Background(), 1); ok {
		t.Fatal("wait after finish")
	}
}
