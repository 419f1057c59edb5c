package policy

import (
	"net/netip"
	"strings"
	"testing"
)

func TestYAMLImportsTheSamePolicy(t *testing.T) {
	y := `
default_egress: deny
default_ingress: allow
rules:
  - id: no-metadata
    direction: egress
    destination: {group: metadata}
    action: deny
  - direction: egress
    destination: {domain_suffix: Example.COM.}
    protocols: [tcp]
    ports: [{start: 443, end: 443}]
    action: allow
  - direction: egress
    destination: {cidr: "::ffff:10.1.0.0/112"}
    action: allow
  - direction: any
    destination: {cidr: 2001:db8::/32}
    protocols: [udp]
    ports: [{start: 5000, end: 5010}]
    action: allow
  - direction: egress
    destination: {group: public}
    protocols: [tcp]
    ports: [{start: 80}]
    action: allow
  - direction: ingress
    destination: any
    ports: [{start: 22}]
    action: deny
`
	py, err := Parse([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	pj, err := Parse([]byte(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(py.Rules) != len(pj.Rules) || py.DefaultEgress != pj.DefaultEgress || py.DefaultIngress != pj.DefaultIngress {
		t.Fatalf("yaml %+v\njson %+v", py, pj)
	}
	for i := range py.Rules {
		a, b := py.Rules[i], pj.Rules[i]
		if a.ID != b.ID || a.Destination != b.Destination || a.Action != b.Action || a.Direction != b.Direction ||
			len(a.Ports) != len(b.Ports) || len(a.Protocols) != len(b.Protocols) {
			t.Errorf("rule %d: yaml %+v json %+v", i, a, b)
		}
	}
	for _, bad := range []struct{ in, want string }{
		{"default_egress: maybe\n", `default_egress: "maybe" is not allow or deny`},
		{"rules:\n  - destination: {cidr: 10.0.0.300/8}\n    action: allow\n", `rules[0]: destination: cidr: "10.0.0.300/8" is not an address or prefix`},
		{"rules:\n  - destination: any\n    action: allow\n    prots: [tcp]\n", `rules[0]: json: unknown field "prots"`},
		{"rules: [\n", "policy: yaml:"},
		{"\n", "policy: empty document"},
	} {
		if _, err := Parse([]byte(bad.in)); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: %v, want %q", bad.in, err, bad.want)
		}
	}
}

func TestFloorCannotBeWidened(t *testing.T) {
	user, err := Parse([]byte(`{"default_egress": "allow", "rules": [
		{"id": "everything", "destination": "any", "action": "allow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	p, err := WithFloor(DefaultFloor, user)
	if err != nil {
		t.Fatal(err)
	}
	d := p.Decide(Flow{Direction: Egress, Protocol: TCP, Addr: netip.MustParseAddr("169.254.169.254"), Port: 80}, Context{})
	if d.Action != Deny || d.RuleID != "floor-metadata" {
		t.Fatalf("metadata: %+v", d)
	}
	d = p.Decide(Flow{Direction: Egress, Protocol: TCP, Addr: netip.MustParseAddr("::ffff:169.254.169.254"), Port: 80}, Context{})
	if d.Action != Deny {
		t.Fatalf("mapped metadata: %+v", d)
	}
	if _, err := WithFloor(DefaultFloor, &Policy{Rules: []Rule{{ID: "floor-metadata"}}}); err == nil {
		t.Fatal("a user rule took the floor's id")
	}
}

func TestDecideQuery(t *testing.T) {
	p, err := Parse([]byte(`{"default_egress": "deny", "rules": [
		{"id": "no-ads", "destination": {"domain_suffix": "ads.example"}, "action": "deny"},
		{"id": "api", "destination": {"domain": "api.example"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "allow"},
		{"id": "lan", "destination": {"cidr": "10.0.0.0/8"}, "action": "allow"},
		{"id": "dns-tcp", "destination": {"group": "host"}, "protocols": ["tcp"], "ports": [{"start": 53}], "action": "allow"}
	]}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		proto Protocol
		want  string
	}{
		{"api.example", UDP, "api"},       // name rules ignore their port/protocol filters
		{"x.ads.example.", UDP, "no-ads"}, // suffix deny
		{"other.example", UDP, "default"}, // cidr rules never match a query
		{"other.example", TCP, "dns-tcp"}, // the host group names the resolver
		{"API.EXAMPLE.", UDP, "api"},      // case and the root dot do not matter
		{"x.ads.example", TCP, "no-ads"},  // first match wins
	} {
		if d := p.DecideQuery(c.name, c.proto, 53); d.RuleID != c.want {
			t.Errorf("%s/%s: %+v, want %s", c.name, c.proto, d, c.want)
		}
	}
	for _, c := range []struct {
		name string
		addr string
		ok   bool
	}{
		{"db.corp", "10.1.2.3", true},           // the address is allowed by a cidr rule
		{"api.example", "192.168.1.1", true},    // an exact domain rule names it
		{"x.ads.example", "10.1.2.3", true},     // the cidr rule is explicit about the address
		{"y.ads.example", "192.168.1.1", false}, // a suffix rule never allows a private answer
		{"other", "127.0.0.1", false},
	} {
		if got := p.AllowsPrivateAnswer(c.name, netip.MustParseAddr(c.addr), Context{}); got != c.ok {
			t.Errorf("private answer %s -> %s: %v, want %v", c.name, c.addr, got, c.ok)
		}
	}
}
