package egress

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

func mustParse(t *testing.T, s string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const pol = `{"default_egress": "deny", "rules": [
  {"id": "shop", "destination": {"domain": "shop.example"}, "protocols": ["tcp"], "action": "allow"},
  {"id": "cdn", "destination": {"cidr": "203.0.113.0/24"}, "protocols": ["tcp"], "action": "allow"}
]}`

func TestAdmitPinsAndSNI(t *testing.T) {
	var out bytes.Buffer
	a := NewAudit(&out, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s := New(mustParse(t, pol), Options{Audit: a})
	shop := netip.MustParseAddrPort("198.51.100.7:443")
	src := netip.MustParseAddrPort("10.87.0.2:40000")
	if f, d := s.Admit(policy.TCP, src, shop); f != nil || d.RuleID != "default" {
		t.Fatalf("unresolved address under a domain rule: %+v", d)
	}
	s.Pins().Add("Shop.Example.", 0, shop.Addr())
	f, d := s.Admit(policy.TCP, src, shop)
	if f == nil || d.RuleID != "shop" {
		t.Fatalf("pinned address: %+v", d)
	}
	if f.CheckSNI("evil.example") {
		t.Fatal("an SNI no rule allows passed")
	}
	f.Close()
	f, _ = s.Admit(policy.TCP, src, shop)
	if !f.CheckSNI("shop.example") {
		t.Fatal("the pinned, allowed SNI was refused")
	}
	f.Count(100, 2000)
	f.Close()
	f.Close() // idempotent
	// On the CDN range (a cidr rule), an SNI for the shop is not pinned there: refused, since
	// the name would be what allows it; a name no rule mentions is fine (the cidr allows it).
	cdn := netip.MustParseAddrPort("203.0.113.9:443")
	f, _ = s.Admit(policy.TCP, src, cdn)
	if f == nil || !f.CheckSNI("unrelated.example") {
		t.Fatal("cidr-allowed flow with an unrelated SNI refused")
	}
	f.Close()
	f, _ = s.Admit(policy.TCP, src, cdn)
	if f.CheckSNI("shop.example") {
		t.Fatal("an allowed SNI not pinned to this address passed (forged SNI)")
	}
	f.Close()
	if s.Open() != 0 {
		t.Fatalf("%d flows open", s.Open())
	}
	a.Close()
	var events []string
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var r Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		events = append(events, r.Event+":"+r.Verdict+":"+r.Rule)
		if r.Event == "close" && r.SNI == "shop.example" && r.Dst == shop.String() && (*r.BytesUp != 100 || *r.BytesDown != 2000) {
			t.Errorf("close record bytes: %+v", r)
		}
	}
	want := "decision:deny:default decision:allow:shop sni:deny:default close:deny:default decision:allow:shop close:allow:shop " +
		"decision:allow:cdn close:allow:cdn decision:allow:cdn sni:deny:shop close:deny:shop"
	if strings.Join(events, " ") != want {
		t.Fatalf("audit events:\n%s\nwant\n%s", strings.Join(events, " "), want)
	}
	st := s.Destinations()[shop.Addr()]
	if st.Allowed != 2 || st.Denied != 1 || st.BytesUp != 100 || st.BytesDown != 2000 {
		t.Fatalf("destination counters %+v", st)
	}
}

func TestReloadRevokes(t *testing.T) {
	s := New(mustParse(t, pol), Options{})
	src := netip.MustParseAddrPort("10.87.0.2:40000")
	keep, _ := s.Admit(policy.TCP, src, netip.MustParseAddrPort("203.0.113.1:80"))
	cut, _ := s.Admit(policy.TCP, src, netip.MustParseAddrPort("203.0.113.200:80"))
	var called int
	cut.OnRevoke(func() { called++ })
	n := s.Reload(mustParse(t, strings.Replace(pol, "203.0.113.0/24", "203.0.113.0/25", 1)))
	if n != 1 || called != 1 {
		t.Fatalf("revoked %d, callback %d", n, called)
	}
	select {
	case <-cut.Revoked():
	default:
		t.Fatal("Revoked not closed")
	}
	select {
	case <-keep.Revoked():
		t.Fatal("an allowed flow was revoked")
	default:
	}
	late := 0
	cut.OnRevoke(func() { late++ }) // set after the fact: runs at once
	if late != 1 || s.Counters.Revoked.Load() != 1 {
		t.Fatalf("late callback %d, counter %d", late, s.Counters.Revoked.Load())
	}
}

func TestPinsExpireAndStayBounded(t *testing.T) {
	p := NewPins(3)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	a := netip.MustParseAddr("192.0.2.1")
	p.Add("a.example", 10*time.Second, a)
	p.Add("b.example", time.Second, a) // raised to MinPinTTL
	p.Add("c.example", time.Hour, netip.MustParseAddr("::ffff:192.0.2.2"))
	if !p.Has(netip.MustParseAddr("192.0.2.2"), "C.EXAMPLE.") {
		t.Fatal("mapped address or name case not normalized")
	}
	p.Add("d.example", time.Hour, a) // full of live entries: dropped
	if p.Drops != 1 || p.Has(a, "d.example") {
		t.Fatalf("full table: drops %d", p.Drops)
	}
	now = now.Add(6 * time.Second) // b expired
	if p.Has(a, "b.example") || !p.Has(a, "a.example") {
		t.Fatal("expiry")
	}
	p.Add("d.example", time.Hour, a) // the expired entry is swept to make room
	if !p.Has(a, "d.example") || p.Len() != 3 {
		t.Fatalf("after sweep: len %d", p.Len())
	}
}

// TestAuditNeverBlocks: a sink that never returns costs records, counted, not the caller.
func TestAuditNeverBlocks(t *testing.T) {
	block := make(chan struct{})
	a := NewAudit(writerFunc(func(p []byte) (int, error) { <-block; return len(p), nil }), slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := 0; i < AuditQueue+100; i++ {
		a.record(Record{Event: "decision"})
	}
	if a.Dropped.Load() < 99 {
		t.Fatalf("dropped %d", a.Dropped.Load())
	}
	close(block)
	a.Close()
	a.record(Record{}) // after Close: dropped, no panic
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestSNIGate: whatever the split, an allowed SNI passes (whole, in order) and a forbidden one
// never does; a hello that is malformed or still incomplete at the deadline is refused and
// audited; a flow that is not TLS passes untouched.
func TestSNIGate(t *testing.T) {
	var out bytes.Buffer
	a := NewAudit(&out, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s := New(mustParse(t, pol), Options{Audit: a})
	shop := netip.MustParseAddrPort("198.51.100.7:443")
	s.Pins().Add("shop.example", time.Minute, shop.Addr())
	src := netip.MustParseAddrPort("10.87.0.2:40000")
	good, bad := testutil.ClientHello(t, "shop.example"), testutil.ClientHello(t, "evil.example")
	feed := func(g *SNIGate, stream []byte, chunk int) (passed []byte, ok bool) {
		for len(stream) > 0 {
			n := min(chunk, len(stream))
			p, ok := g.Feed(stream[:n])
			passed = append(passed, p...)
			if !ok {
				return passed, false
			}
			stream = stream[n:]
		}
		return passed, true
	}
	for _, split := range []struct {
		name    string
		records int // handshake bytes per record (0: one record)
		chunk   int // bytes per Feed (a TCP segment)
	}{{"one record, one segment", 0, 1 << 20}, {"two records", 700, 1 << 20}, {"1-byte segments", 0, 1}, {"1-byte records and segments", 1, 1}} {
		framed := func(h []byte) []byte {
			if split.records == 0 {
				return h
			}
			return testutil.SplitRecords(h, split.records)
		}
		f, _ := s.Admit(policy.TCP, src, shop)
		stream := append(framed(good), "GET /"...)
		if passed, ok := feed(f.NewSNIGate(), stream, split.chunk); !ok || !bytes.Equal(passed, stream) {
			t.Errorf("%s: allowed SNI: ok %v, passed %d of %d bytes", split.name, ok, len(passed), len(stream))
		}
		f.Close()
		f, _ = s.Admit(policy.TCP, src, shop)
		if passed, ok := feed(f.NewSNIGate(), framed(bad), split.chunk); ok || len(passed) != 0 {
			t.Errorf("%s: forbidden SNI: ok %v, %d bytes passed", split.name, ok, len(passed))
		}
		f.Close()
	}
	f, _ := s.Admit(policy.TCP, src, shop)
	g := f.NewSNIGate()
	if p, ok := g.Feed(good[:100]); !ok || p != nil || !g.Holding() {
		t.Fatalf("a partial hello: %v %d %v", ok, len(p), g.Holding())
	}
	g.Expire()
	if !g.Done() || f.Decision().Action != policy.Deny {
		t.Fatalf("an expired hello was not refused: %+v", f.Decision())
	}
	f.Close()
	f, _ = s.Admit(policy.TCP, src, shop)
	if _, ok := f.NewSNIGate().Feed([]byte{0x16, 3, 1, 0, 4, 2, 0, 0, 0}); ok {
		t.Fatal("a handshake that is not a ClientHello passed")
	}
	f.Close()
	f, _ = s.Admit(policy.TCP, src, shop)
	if p, ok := f.NewSNIGate().Feed([]byte("GET / HTTP/1.1\r\n")); !ok || string(p) != "GET / HTTP/1.1\r\n" {
		t.Fatal("a flow that is not TLS was held")
	}
	f.Close()
	a.Close()
	var refused int
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.Contains(l, `"event":"sni"`) {
			refused++
		}
	}
	if want := 4 + 2; refused != want { // four forbidden SNIs, the expired and the bogus hello
		t.Fatalf("%d sni records, want %d:\n%s", refused, want, out.String())
	}
}

// TestAuditHostBounded: a host that never reads its audit records costs nothing on the data
// path: records for it beyond the queue are dropped and counted, the file still gets every
// record, and nothing waits.
func TestAuditHostBounded(t *testing.T) {
	var file bytes.Buffer
	a := NewAudit(&file, slog.New(slog.NewTextHandler(io.Discard, nil)))
	host := a.Host()
	s := New(mustParse(t, pol), Options{Audit: a})
	src := netip.MustParseAddrPort("10.87.0.2:40000")
	n := 3 * AuditQueue
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; i++ {
			s.Admit(policy.TCP, src, netip.MustParseAddrPort("192.0.2.1:80")) // denied: one record each
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("decisions waited for a host that does not read")
	}
	a.Close()
	got := 0
	for range host {
		got++
	}
	if got > AuditQueue || got == 0 {
		t.Fatalf("the host queue held %d records, want 1..%d", got, AuditQueue)
	}
	lines := strings.Count(file.String(), "\n")
	if int64(lines)+a.Dropped.Load() != int64(n) || int64(got)+a.Lost() < int64(n) {
		t.Fatalf("%d records: file %d, dropped %d, host %d, lost %d", n, lines, a.Dropped.Load(), got, a.Lost())
	}
	if a.HostDropped.Load() == 0 {
		t.Fatal("no host drop counted")
	}
}
