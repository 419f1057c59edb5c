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
