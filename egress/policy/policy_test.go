package policy

import (
	"net/netip"
	"strings"
	"testing"
)

const sample = `{
  "default_egress": "deny",
  "default_ingress": "allow",
  "rules": [
    {"id": "no-metadata", "direction": "egress", "destination": {"group": "metadata"}, "action": "deny"},
    {"direction": "egress", "destination": {"domain_suffix": "Example.COM."}, "protocols": ["tcp"], "ports": [{"start": 443, "end": 443}], "action": "allow"},
    {"direction": "egress", "destination": {"cidr": "::ffff:10.1.0.0/112"}, "action": "allow"},
    {"direction": "any", "destination": {"cidr": "2001:db8::/32"}, "protocols": ["udp"], "ports": [{"start": 5000, "end": 5010}], "action": "allow"},
    {"direction": "egress", "destination": {"group": "public"}, "protocols": ["tcp"], "ports": [{"start": 80}], "action": "allow"},
    {"direction": "ingress", "destination": "any", "ports": [{"start": 22}], "action": "deny"}
  ]
}`

func TestDecide(t *testing.T) {
	p, err := Parse([]byte(sample))
	if err != nil {
		t.Fatal(err)
	}
	ctx := Context{HostAddrs: []netip.Addr{netip.MustParseAddr("100.96.0.1")}}
	ip := netip.MustParseAddr
	cases := []struct {
		name string
		flow Flow
		want Action
		rule string
	}{
		{"metadata denied first", Flow{Egress, TCP, ip("169.254.169.254"), 80, nil}, Deny, "no-metadata"},
		{"domain suffix, apex", Flow{Egress, TCP, ip("93.184.216.34"), 443, []string{"example.com"}}, Allow, "rule-1"},
		{"domain suffix, subdomain, trailing dot", Flow{Egress, TCP, ip("93.184.216.34"), 443, []string{"API.example.com."}}, Allow, "rule-1"},
		{"suffix is label-aligned", Flow{Egress, TCP, ip("93.184.216.34"), 443, []string{"badexample.com"}}, Deny, "default"},
		{"raw IP under a domain rule", Flow{Egress, TCP, ip("93.184.216.34"), 443, nil}, Deny, "default"},
		{"domain rule's port filter", Flow{Egress, TCP, ip("93.184.216.34"), 8443, []string{"example.com"}}, Deny, "default"},
		{"mapped prefix matches IPv4", Flow{Egress, UDP, ip("10.1.2.3"), 53, nil}, Allow, "rule-2"},
		{"mapped address matches too", Flow{Egress, UDP, ip("::ffff:10.1.2.3"), 53, nil}, Allow, "rule-2"},
		{"outside the prefix", Flow{Egress, UDP, ip("10.2.0.1"), 53, nil}, Deny, "default"},
		{"v6 cidr, udp range", Flow{Egress, UDP, ip("2001:db8::1"), 5005, nil}, Allow, "rule-3"},
		{"v6 cidr, wrong protocol", Flow{Egress, TCP, ip("2001:db8::1"), 5005, nil}, Deny, "default"},
		{"any direction applies to ingress", Flow{Ingress, UDP, ip("2001:db8::1"), 5000, nil}, Allow, "rule-3"},
		{"public port 80", Flow{Egress, TCP, ip("1.1.1.1"), 80, nil}, Allow, "rule-4"},
		{"private is not public", Flow{Egress, TCP, ip("192.168.1.1"), 80, nil}, Deny, "default"},
		{"host group is not public", Flow{Egress, TCP, ip("100.96.0.1"), 80, nil}, Deny, "default"},
		{"ingress rule", Flow{Ingress, TCP, ip("8.8.8.8"), 22, nil}, Deny, "rule-5"},
		{"ingress default", Flow{Ingress, TCP, ip("8.8.8.8"), 8080, nil}, Allow, "default"},
	}
	for _, c := range cases {
		d := p.Decide(c.flow, ctx)
		if d.Action != c.want || d.RuleID != c.rule {
			t.Errorf("%s: %s by %s (%s), want %s by %s", c.name, d.Action, d.RuleID, d.Reason, c.want, c.rule)
		}
	}
}

func TestClassify(t *testing.T) {
	ctx := Context{HostAddrs: []netip.Addr{netip.MustParseAddr("10.0.2.2")}}
	cases := map[string]string{
		"10.0.2.2": GroupHost, "169.254.169.254": GroupMetadata, "127.0.0.1": GroupLoopback, "::1": GroupLoopback,
		"10.1.1.1": GroupPrivate, "172.16.0.1": GroupPrivate, "192.168.0.1": GroupPrivate, "100.64.0.1": GroupPrivate,
		"fd00::1": GroupPrivate, "169.254.1.1": GroupLinkLocal, "fe80::1": GroupLinkLocal, "224.0.0.1": GroupMulticast,
		"ff02::1": GroupMulticast, "8.8.8.8": GroupPublic, "2606:4700::1111": GroupPublic, "::ffff:192.168.0.1": GroupPrivate,
	}
	for a, want := range cases {
		if got := Classify(netip.MustParseAddr(a), ctx); got != want {
			t.Errorf("%s: %s, want %s", a, got, want)
		}
	}
}

// TestParseErrors: a bad policy file gets a message naming the field and what is wrong.
func TestParseErrors(t *testing.T) {
	cases := map[string]string{
		`{"default_egress": "maybe"}`:                                                                                            `default_egress: "maybe" is not allow or deny`,
		`{"rules": [{"destination": "any"}]}`:                                                                                    `rules[0]: action: missing`,
		`{"rules": [{"destination": "any", "action": "permit"}]}`:                                                                `rules[0]: action: "permit" is not allow or deny`,
		`{"rules": [{"destination": "any", "action": "allow", "direction": "up"}]}`:                                              `rules[0]: direction: "up"`,
		`{"rules": [{"destination": {"cidr": "10.0.0.0/33"}, "action": "allow"}]}`:                                               `rules[0]: destination: cidr: "10.0.0.0/33"`,
		`{"rules": [{"destination": {"group": "intranet"}, "action": "allow"}]}`:                                                 `rules[0]: destination: group: "intranet"`,
		`{"rules": [{"destination": {"hostname": "x"}, "action": "allow"}]}`:                                                     `rules[0]: destination: unknown kind "hostname"`,
		`{"rules": [{"destination": {"domain": "a b"}, "action": "allow"}]}`:                                                     `rules[0]: destination: domain: "a b"`,
		`{"rules": [{"destination": "everything", "action": "allow"}]}`:                                                          `rules[0]: destination: "everything"`,
		`{"rules": [{"action": "allow"}]}`:                                                                                       `rules[0]: destination: missing`,
		`{"rules": [{"destination": "any", "action": "allow", "ports": [{"start": 9, "end": 1}]}]}`:                              `rules[0]: ports[0]: start 9 is after end 1`,
		`{"rules": [{"destination": "any", "action": "allow", "protocols": ["sctp"]}]}`:                                          `rules[0]: protocols[0]: "sctp"`,
		`{"rules": [{"destination": "any", "action": "allow", "colour": "red"}]}`:                                                `rules[0]: json: unknown field "colour"`,
		`{"rules": [{"id": "a", "destination": "any", "action": "allow"}, {"id": "a", "destination": "any", "action": "deny"}]}`: `rules[1]: duplicate id "a"`,
		`{"rules": [`: `policy: unexpected EOF`,
		// microsandbox's format has only {start, end}: the error shows the right form.
		`{"rules": [{"destination": "any", "action": "allow", "ports": [18601]}]}`:            `rules[0]: ports[0]: 18601: a port is written {"start": 18601, "end": 18601}`,
		`{"rules": [{"destination": "any", "action": "allow", "ports": ["8000-8100"]}]}`:      `rules[0]: ports[0]: "8000-8100": a port range is written {"start": 8000, "end": 8100}`,
		`{"rules": [{"destination": "any", "action": "allow", "ports": [{"start": 70000}]}]}`: `rules[0]: ports[0]: start: 70000 is not a port`,
		`{"rules": [{"destination": "any", "action": "allow", "ports": [{"end": 80}]}]}`:      `rules[0]: ports[0]: start: missing`,
		`{"rules": [{"destination": "any", "action": "allow", "ports": [{"from": 80}]}]}`:     `rules[0]: ports[0]: want {"start": N, "end": M}: json: unknown field "from"`,
		"rules:\n  - destination: any\n    action: allow\n    ports: [18601]\n":               `ports[0]: 18601: a port is written {"start": 18601, "end": 18601}`,
	}
	for in, want := range cases {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s:\n got %v\nwant %q", in, err, want)
		}
	}
	p, err := Parse([]byte(`{}`))
	if err != nil || p.DefaultEgress != Deny || p.DefaultIngress != Deny {
		t.Fatalf("empty policy must fail closed: %+v %v", p, err)
	}
}

// FuzzParse: no input makes the parser panic, and whatever parses can be decided on.
func FuzzParse(f *testing.F) {
	f.Add([]byte(sample))
	f.Add([]byte(`{"default_egress":"allow","rules":[{"destination":{"cidr":"::ffff:0.0.0.0/0"},"action":"deny"}]}`))
	f.Add([]byte(current)) // the whole current network document
	f.Add([]byte(`{"strict":false,"nat64_prefixes":["64:ff9b::/96"],"policy":{"rules":[{"destination":{"domain":"a.b"},"action":"allow"}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			return
		}
		for _, a := range []string{"1.2.3.4", "::ffff:10.0.0.1", "fe80::1", "64:ff9b::a00:1"} {
			d := p.Decide(Flow{Egress, TCP, netip.MustParseAddr(a), 443, []string{"x.example.com"}}, Context{})
			if d.Action != Allow && d.Action != Deny {
				t.Fatalf("decision %+v", d)
			}
		}
	})
}
