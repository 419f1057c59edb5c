package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// current is a NetworkConfig as a current microsandbox host persists it (contract 11.3) with
// the values agentd takes: the profiles "public" and "private" with an explicit rule in front
// (--net public,private --net-rule deny@10.9.0.0/16), each key present.
const current = `{
  "enabled": true,
  "interface": {"mac": null, "mtu": null, "ipv4_address": null, "ipv4_pool": null, "ipv6_address": null, "ipv6_pool": null},
  "ports": [],
  "policy": {
    "default_egress": "deny",
    "default_ingress": "allow",
    "rules": [
      {"direction": "egress", "destination": {"cidr": "10.9.0.0/16"}, "protocols": [], "ports": [], "action": "deny"},
      {"direction": "egress", "destination": {"group": "host"}, "protocols": ["udp", "tcp"], "ports": [{"start": 53, "end": 53}], "action": "allow"},
      {"direction": "egress", "destination": {"group": "public"}, "protocols": [], "ports": [], "action": "allow"},
      {"direction": "egress", "destination": {"group": "private"}, "protocols": [], "ports": [], "action": "allow"}
    ]
  },
  "dns": {"rebind_protection": true, "nameservers": [], "query_timeout_ms": 5000},
  "tls": {"enabled": false, "intercepted_ports": [443], "bypass": [], "verify_upstream": true, "block_quic_on_intercept": true},
  "strict": true,
  "secrets": {"secrets": [], "on_violation": "block-and-log"},
  "max_connections": 0,
  "max_udp_connections": null,
  "rate_limiter": null,
  "trust_host_cas": false,
  "outbound_proxy": null,
  "tcp_accept_queue_size": 1024,
  "nat64_prefixes": ["64:ff9b::/96"],
  "http": {"deny_response": false},
  "deployment_profile": "single_tenant"
}`

var (
	hostGW = netip.MustParseAddr("10.87.0.1")
	netCtx = Context{HostAddrs: []netip.Addr{hostGW}}
)

func decide(t *testing.T, p *Policy, proto Protocol, addr string, port uint16) Action {
	t.Helper()
	return p.Decide(Flow{Direction: Egress, Protocol: proto, Addr: netip.MustParseAddr(addr), Port: port}, netCtx).Action
}

// TestNetworkDocument: the current network document imports unchanged, as JSON and as YAML,
// and agentd enforces its policy (profiles and allow@dns are ordinary rules by then).
func TestNetworkDocument(t *testing.T) {
	p, err := Parse([]byte(current))
	if err != nil {
		t.Fatal(err)
	}
	y, err := Parse([]byte(`
enabled: true
policy:
  default_egress: deny
  rules:
    - {direction: egress, destination: {cidr: 10.9.0.0/16}, action: deny}
    - {direction: egress, destination: {group: host}, protocols: [udp, tcp], ports: [{start: 53, end: 53}], action: allow}
    - {direction: egress, destination: {group: public}, action: allow}
    - {direction: egress, destination: {group: private}, action: allow}
strict: true
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, pol := range []*Policy{p, y} {
		for _, c := range []struct {
			proto Protocol
			addr  string
			port  uint16
			want  Action
		}{
			{UDP, "10.87.0.1", 53, Allow}, // allow@dns
			{TCP, "10.87.0.1", 22, Deny},
			{TCP, "93.184.216.34", 443, Allow},
			{TCP, "192.168.1.5", 80, Allow},
			{TCP, "10.9.1.1", 80, Deny},           // the explicit rule in front
			{TCP, "64:ff9b::a09:101", 80, Allow},  // NAT64 of 10.9.1.1: cidr rules match the address given; its group is private
			{TCP, "64:ff9b::c0a8:105", 80, Allow}, // NAT64 of 192.168.1.5: private
			{TCP, "169.254.169.254", 80, Deny},    // metadata is not private: default deny
		} {
			if got := decide(t, pol, c.proto, c.addr, c.port); got != c.want {
				t.Errorf("%s %s:%d: %s, want %s", c.proto, c.addr, c.port, got, c.want)
			}
		}
	}
	// A bare policy document keeps the 0.5.7 semantics: no NAT64 classification.
	bare, err := Parse([]byte(`{"default_egress": "deny", "rules": [{"destination": {"group": "private"}, "action": "allow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := decide(t, bare, TCP, "64:ff9b::c0a8:105", 80); got != Deny {
		t.Errorf("bare policy: a NAT64 address classified by its IPv4 (%s)", got)
	}
}

// TestNetworkDefaults: without a policy the document means microsandbox's default, the public
// profile; enabled false denies everything whatever the rules say.
func TestNetworkDefaults(t *testing.T) {
	p, err := Parse([]byte(`{"enabled": true}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		proto Protocol
		addr  string
		port  uint16
		want  Action
	}{{UDP, "10.87.0.1", 53, Allow}, {TCP, "1.1.1.1", 443, Allow}, {TCP, "10.0.0.1", 80, Deny}, {TCP, "10.87.0.1", 80, Deny}} {
		if got := decide(t, p, c.proto, c.addr, c.port); got != c.want {
			t.Errorf("public profile, %s %s:%d: %s, want %s", c.proto, c.addr, c.port, got, c.want)
		}
	}
	if d := p.Decide(Flow{Direction: Ingress, Protocol: TCP, Addr: netip.MustParseAddr("10.0.0.1"), Port: 22}, netCtx); d.Action != Allow {
		t.Errorf("public profile ingress: %s", d.Action)
	}
	off, err := Parse([]byte(`{"enabled": false, "policy": {"default_egress": "allow", "default_ingress": "allow"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if decide(t, off, UDP, "10.87.0.1", 53) != Deny || decide(t, off, TCP, "1.1.1.1", 443) != Deny {
		t.Error("enabled false: a flow went")
	}
}

// TestNetworkStrict: name rules need strict mode off (the current default is on, which checks
// an HTTP authority agentd cannot see); off, they work as agentd's pins and SNI.
func TestNetworkStrict(t *testing.T) {
	rules := `"policy": {"rules": [{"destination": {"domain_suffix": "example.com"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "allow"}]}`
	for _, doc := range []string{`{` + rules + `}`, `{"strict": true, ` + rules + `}`} {
		if _, err := Parse([]byte(doc)); err == nil || !strings.Contains(err.Error(), `network: strict: policy.rules[0] allows by name`) {
			t.Errorf("%s: %v", doc, err)
		}
	}
	p, err := Parse([]byte(`{"strict": false, ` + rules + `}`))
	if err != nil {
		t.Fatal(err)
	}
	f := Flow{Direction: Egress, Protocol: TCP, Addr: netip.MustParseAddr("93.184.216.34"), Port: 443, Names: []string{"www.example.com"}}
	if d := p.Decide(f, netCtx); d.Action != Allow {
		t.Fatalf("a pinned name under strict false: %+v", d)
	}
	// A deny by name needs no authority check: it is taken under strict mode.
	if _, err := Parse([]byte(`{"policy": {"default_egress": "allow", "rules": [{"destination": {"domain": "evil.example"}, "action": "deny"}]}}`)); err != nil {
		t.Fatalf("a deny-by-name rule under strict mode: %v", err)
	}
}

// TestNetworkRefusals: every field that asks for something agentd does not do is refused,
// naming the field; the same keys with the values agentd takes (null, empty, 0, off) import.
func TestNetworkRefusals(t *testing.T) {
	for _, c := range []struct{ doc, want string }{
		{`{"interface": {"mtu": 1400}}`, "interface.mtu: the guest's interface is configured by the host"},
		{`{"ports": [{"host_port": 8080, "guest_port": 80, "protocol": "tcp", "host_bind": "127.0.0.1"}]}`, "ports: published ports are the host's"},
		{`{"dns": {"rebind_protection": false}}`, "dns.rebind_protection: agentd always refuses"},
		{`{"dns": {"nameservers": ["1.1.1.1"]}}`, "dns.nameservers: agentd's upstream resolvers are its own setting"},
		{`{"dns": {"query_timeout_ms": 100}}`, "dns.query_timeout_ms"},
		{`{"dns": {"bogus": 1}}`, `dns: json: unknown field "bogus"`},
		{`{"tls": {"enabled": true}}`, "tls.enabled: agentd does not intercept TLS"},
		{`{"secrets": {"secrets": [{"env_var": "K", "value": "v", "placeholder": "$MSB_K"}]}}`, "secrets: agentd does not substitute secrets"},
		{`{"max_connections": 256}`, "max_connections: agentd's netstack caps flows with its own limit"},
		{`{"max_tcp_connections": 10}`, "max_tcp_connections"},
		{`{"max_udp_connections": 1024}`, "max_udp_connections"},
		{`{"rate_limiter": {"egress": {"bandwidth": {"size": 1048576, "refill_time_ms": 1000}}}}`, "rate_limiter: agentd's netstack has no rate limiter"},
		{`{"outbound_proxy": {"protocol": "socks5", "address": "10.0.0.1:1080"}}`, "outbound_proxy: agentd dials destinations itself"},
		{`{"http": {"deny_response": true, "deny_message": "no"}}`, "http.deny_response"},
		{`{"deployment_profile": "shared"}`, `deployment_profile: "shared"`},
		{`{"nat64_prefixes": ["64:ff9b::/64"]}`, "nat64_prefixes[0]: \"64:ff9b::/64\" is not an IPv6 /96 prefix"},
		{`{"policy": {"rules": [{"destination": {"group": "intranet"}, "action": "allow"}]}}`, `network: policy: rules[0]: destination: group: "intranet"`},
		{`{"enabled": true, "unknown_key": 1}`, `network: json: unknown field "unknown_key"`},
	} {
		if _, err := Parse([]byte(c.doc)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.doc, err, c.want)
		}
	}
	for _, ok := range []string{
		`{"max_connections": 0, "max_udp_connections": null, "rate_limiter": {}, "outbound_proxy": null, "ports": [], "secrets": null}`,
		`{"rate_limiter": {"egress": null, "ingress": null}, "tls": {"enabled": false, "bypass": ["x"]}, "trust_host_cas": true}`,
		`{"deployment_profile": "multi_tenant", "tcp_accept_queue_size": 4096, "http": {"deny_response": false}}`,
	} {
		if _, err := Parse([]byte(ok)); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}
