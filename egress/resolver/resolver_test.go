package resolver_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
	"github.com/agentd/agentd/internal/testkit/nettest"
)

func query(t testing.TB, id uint16, name string, typ dnsmessage.Type) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET})
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return q
}

const pol = `{"default_egress": "deny", "rules": [
  {"id": "no-evil", "destination": {"domain": "evil.example.com"}, "action": "deny"},
  {"id": "example", "destination": {"domain_suffix": "example.com"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "allow"},
  {"id": "intranet", "destination": {"domain": "intranet.example.org"}, "action": "allow"},
  {"id": "lab", "destination": {"cidr": "10.20.0.0/16"}, "action": "allow"}
]}`

func TestAnswer(t *testing.T) {
	p, err := policy.Parse([]byte(pol))
	if err != nil {
		t.Fatal(err)
	}
	eg := egress.New(p, egress.Options{})
	ip := netip.MustParseAddr
	up := nettest.DNSServer(t, ip("127.0.0.1"), map[string][]netip.Addr{
		"www.example.com.":         {ip("93.184.216.34"), ip("2606:2800:220:1::1")},
		"evil.example.com.":        {ip("93.184.216.35")},
		"rebind.example.com.":      {ip("192.168.1.1")},
		"local.example.com.":       {ip("127.0.0.1")},
		"meta.example.com.":        {ip("169.254.169.254")},
		"lab.example.com.":         {ip("10.20.1.1")},
		"intranet.example.org.":    {ip("10.99.0.1")},
		"nonexistent.example.com.": nil, // known to the upstream, no addresses
	})
	r := resolver.New(eg, resolver.Options{Upstream: resolver.Servers{Addrs: []netip.AddrPort{up}}, Timeout: 2 * time.Second})
	cases := []struct {
		name  string
		typ   dnsmessage.Type
		rcode dnsmessage.RCode
		n     int // answers
	}{
		{"www.example.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},
		{"WWW.Example.COM.", dnsmessage.TypeAAAA, dnsmessage.RCodeNameError, 0}, // the rule matched (forwarded); the test upstream is case-exact
		{"www.example.com.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 1},
		{"evil.example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},      // deny rule first
		{"other.org.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},             // no rule: default deny
		{"rebind.example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},    // private answer
		{"local.example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},     // loopback answer
		{"meta.example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},      // metadata answer
		{"lab.example.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},         // a cidr rule allows that address
		{"intranet.example.org.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},    // an exact domain rule allows it
		{"nonexistent.example.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 0}, // upstream's own (empty) answer
	}
	for i, c := range cases {
		resp, err := r.Answer(context.Background(), netip.AddrPort{}, query(t, uint16(i+1), c.name, c.typ), policy.UDP)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var msg dnsmessage.Message
		if err := msg.Unpack(resp); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if msg.ID != uint16(i+1) || !msg.Response || msg.RCode != c.rcode || len(msg.Answers) != c.n || len(msg.Questions) != 1 {
			t.Errorf("%s %v: rcode %v, %d answers, id %d; want %v, %d", c.name, c.typ, msg.RCode, len(msg.Answers), msg.ID, c.rcode, c.n)
		}
	}
	// Pins: the answers handed out; none for refused ones.
	pins := eg.Pins()
	if !pins.Has(ip("93.184.216.34"), "www.example.com") || !pins.Has(ip("2606:2800:220:1::1"), "www.example.com") {
		t.Error("allowed answers not pinned")
	}
	if pins.Has(ip("192.168.1.1"), "rebind.example.com") || pins.Has(ip("93.184.216.35"), "evil.example.com") {
		t.Error("refused answers pinned")
	}
	if c := r.Counters(); c.Denied != 2 || c.Rebinding != 3 || c.Forwarded != 9 {
		t.Errorf("counters %+v", c)
	}
	// Malformed input: no header at all is an error; a header with no question gets FORMERR.
	if _, err := r.Answer(context.Background(), netip.AddrPort{}, []byte{1, 2, 3}, policy.UDP); err != resolver.ErrMalformed {
		t.Errorf("3 bytes: %v", err)
	}
	resp, err := r.Answer(context.Background(), netip.AddrPort{}, []byte{0, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}, policy.UDP)
	var msg dnsmessage.Message
	if err != nil || msg.Unpack(resp) != nil || msg.RCode != dnsmessage.RCodeFormatError || msg.ID != 7 {
		t.Errorf("no question: %v %+v", err, msg.Header)
	}
	// A dead upstream: SERVFAIL, not a hang.
	dead := resolver.New(eg, resolver.Options{Upstream: resolver.Servers{Addrs: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}, Timeout: 200 * time.Millisecond})
	resp, err = dead.Answer(context.Background(), netip.AddrPort{}, query(t, 9, "www.example.com.", dnsmessage.TypeA), policy.UDP)
	if err != nil || msg.Unpack(resp) != nil || msg.RCode != dnsmessage.RCodeServerFailure {
		t.Errorf("dead upstream: %v %+v", err, msg.Header)
	}
}

// FuzzAnswer: any bytes from the guest, and any bytes as the upstream's answer, give an error
// or a well-formed response with the query's id; never a panic.
func FuzzAnswer(f *testing.F) {
	f.Add(query(f, 1, "www.example.com.", dnsmessage.TypeA), []byte{})
	f.Add([]byte{0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}, []byte{0, 7, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0})
	f.Add(query(f, 2, "evil.example.com.", dnsmessage.TypeAAAA), []byte("garbage"))
	p, err := policy.Parse([]byte(pol))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, q, upstream []byte) {
		eg := egress.New(p, egress.Options{MaxPins: 64})
		r := resolver.New(eg, resolver.Options{Upstream: answer(upstream), Timeout: time.Second})
		resp, err := r.Answer(context.Background(), netip.AddrPort{}, q, policy.UDP)
		if err != nil {
			return
		}
		var h dnsmessage.Parser
		rh, err := h.Start(resp)
		if err != nil || !rh.Response || len(q) < 2 || rh.ID != uint16(q[0])<<8|uint16(q[1]) {
			t.Fatalf("response %x to %x: %v", resp, q, err)
		}
	})
}

// answer is an upstream that answers every query with the same bytes.
type answer []byte

func (a answer) Exchange(context.Context, []byte, bool) ([]byte, error) { return a, nil }
