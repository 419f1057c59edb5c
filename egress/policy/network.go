package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"sort"
)

// microsandbox's current network document: the engine's NetworkConfig, or the SDK's
// NetworkSpec (contract section 11.3 and 11.4), whose "policy" is the rule document Parse
// reads. agentd takes it as a policy file too. Each field is honoured, or refused with an
// error naming it when it asks for something agentd does not do; nothing is silently dropped.
// What agentd does with each field (docs/egress.md has the table):
//
//	enabled          false: every flow is denied (no networking); true or absent: as policy
//	policy           enforced; absent: microsandbox's default, the public profile
//	strict           name rules are agentd's: an address pinned to the name by the guest's
//	                 resolver, and on TLS a matching SNI; it cannot check an HTTP authority
//	                 (no interception), so a document whose name rules need strict mode (the
//	                 default) is refused unless it says "strict": false
//	nat64_prefixes   addresses in them are classified by their embedded IPv4 address
//	                 (default 64:ff9b::/96)
//	dns              rebind_protection true (agentd always refuses rebinding answers); other
//	                 nameservers or timeouts are agentd's own settings (--egress-dns): refused
//	tls, secrets     interception and secret substitution: agentd does neither; refused when on
//	interface, ports the guest NIC and published ports are the host's: refused when set
//	max_connections, max_udp_connections, rate_limiter, outbound_proxy, http.deny_response:
//	                 not implemented by agentd's netstack: refused when set (0 and null are
//	                 unlimited/none, and accepted)
//	trust_host_cas   the host copies its CAs into the runtime share, which agentd installs
//	tcp_accept_queue_size, deployment_profile: the host's listeners and tenancy; agentd's floor
//	                 is its platform policy (multi_tenant forbids what is refused above anyway)

// networkKeys are the keys that mark a network document (a policy document has none of them).
var networkKeys = map[string]bool{"enabled": true, "interface": true, "ports": true, "policy": true, "dns": true,
	"tls": true, "strict": true, "secrets": true, "max_connections": true, "max_tcp_connections": true,
	"max_udp_connections": true, "rate_limiter": true, "trust_host_cas": true, "outbound_proxy": true,
	"tcp_accept_queue_size": true, "nat64_prefixes": true, "http": true, "deployment_profile": true}

// DefaultNAT64 is microsandbox's default NAT64 prefix.
var DefaultNAT64 = netip.MustParsePrefix("64:ff9b::/96")

// isNetworkDocument reports whether a JSON object has any network-document key.
func isNetworkDocument(data []byte) bool {
	var top map[string]json.RawMessage
	if json.Unmarshal(data, &top) != nil {
		return false
	}
	for k := range top {
		if networkKeys[k] {
			return true
		}
	}
	return false
}

// PublicProfile is the policy microsandbox applies when a network document has none: DNS to
// the host's resolver, then the public internet, everything else denied (egress); ingress
// allowed (contract 11.2: from_profiles with the public profile).
func PublicProfile() *Policy {
	return &Policy{DefaultEgress: Deny, DefaultIngress: Allow, Rules: []Rule{
		{ID: "rule-0", Direction: Egress, Destination: Destination{Group: GroupHost}, Protocols: []Protocol{UDP, TCP},
			Ports: []PortRange{{53, 53}}, Action: Allow},
		{ID: "rule-1", Direction: Egress, Destination: Destination{Group: GroupPublic}, Action: Allow},
	}}
}

// network is the shape of the document, each field raw so presence and null can be told apart.
type network struct {
	Enabled            *bool           `json:"enabled"`
	Interface          json.RawMessage `json:"interface"`
	Ports              json.RawMessage `json:"ports"`
	Policy             json.RawMessage `json:"policy"`
	DNS                json.RawMessage `json:"dns"`
	TLS                json.RawMessage `json:"tls"`
	Strict             *bool           `json:"strict"`
	Secrets            json.RawMessage `json:"secrets"`
	MaxConnections     json.RawMessage `json:"max_connections"`
	MaxTCPConnections  json.RawMessage `json:"max_tcp_connections"`
	MaxUDPConnections  json.RawMessage `json:"max_udp_connections"`
	RateLimiter        json.RawMessage `json:"rate_limiter"`
	TrustHostCAs       *bool           `json:"trust_host_cas"`
	OutboundProxy      json.RawMessage `json:"outbound_proxy"`
	TCPAcceptQueueSize *uint32         `json:"tcp_accept_queue_size"`
	NAT64Prefixes      []string        `json:"nat64_prefixes"`
	HTTP               json.RawMessage `json:"http"`
	DeploymentProfile  *string         `json:"deployment_profile"`
}

// null reports whether a raw value is absent or null.
func null(r json.RawMessage) bool { return len(r) == 0 || string(bytes.TrimSpace(r)) == "null" }

// parseNetwork maps a network document onto the policy agentd enforces.
func parseNetwork(data []byte) (*Policy, error) {
	var n network
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&n); err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	if err := n.refuseUnsupported(); err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	p := PublicProfile()
	if !null(n.Policy) {
		var err error
		if p, err = parseJSON(n.Policy); err != nil {
			return nil, fmt.Errorf("network: %w", err) // "network: policy: rules[0]: ..."
		}
	}
	if n.Enabled != nil && !*n.Enabled { // networking off: nothing goes, whatever the rules say
		p = &Policy{DefaultEgress: Deny, DefaultIngress: Deny}
	}
	strict := n.Strict == nil || *n.Strict // the current default
	if strict {
		for i, r := range p.Rules {
			if r.Action == Allow && (r.Destination.Domain != "" || r.Destination.DomainSuffix != "") {
				return nil, fmt.Errorf("network: strict: policy.rules[%d] allows by name, which strict mode admits only after checking "+
					"each flow's HTTP authority, and agentd does not intercept TLS or read HTTP; with \"strict\": false its name rules "+
					"need the guest's resolver to pin the address to the name, and a TLS flow's SNI to match", i)
			}
		}
	}
	p.NAT64 = []netip.Prefix{DefaultNAT64}
	if n.NAT64Prefixes != nil {
		p.NAT64 = nil
		for i, s := range n.NAT64Prefixes {
			pr, err := netip.ParsePrefix(s)
			if err != nil || !pr.Addr().Is6() || pr.Bits() != 96 {
				return nil, fmt.Errorf("network: nat64_prefixes[%d]: %q is not an IPv6 /96 prefix", i, s)
			}
			p.NAT64 = append(p.NAT64, pr.Masked())
		}
	}
	return p, nil
}

// refuseUnsupported returns an error naming the first field that asks agentd for something it
// does not do.
func (n *network) refuseUnsupported() error {
	if !null(n.Interface) {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(n.Interface, &m); err != nil {
			return fmt.Errorf("interface: %w", err)
		}
		for _, k := range sortedKeys(m) {
			if !null(m[k]) {
				return fmt.Errorf("interface.%s: the guest's interface is configured by the host (core.bootstrap's network), not by agentd's policy", k)
			}
		}
	}
	if err := emptyList("ports", n.Ports, "published ports are the host's; agentd's policy cannot publish one"); err != nil {
		return err
	}
	if !null(n.DNS) {
		var d struct {
			RebindProtection *bool           `json:"rebind_protection"`
			Nameservers      []string        `json:"nameservers"`
			QueryTimeoutMs   json.RawMessage `json:"query_timeout_ms"`
		}
		dec := json.NewDecoder(bytes.NewReader(n.DNS))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&d); err != nil {
			return fmt.Errorf("dns: %w", err)
		}
		switch {
		case d.RebindProtection != nil && !*d.RebindProtection:
			return fmt.Errorf("dns.rebind_protection: agentd always refuses DNS answers that rebind a public name to a private address")
		case len(d.Nameservers) > 0:
			return fmt.Errorf("dns.nameservers: agentd's upstream resolvers are its own setting (--egress-dns, AGENTD_EGRESS_DNS)")
		case !null(d.QueryTimeoutMs) && string(d.QueryTimeoutMs) != "5000":
			return fmt.Errorf("dns.query_timeout_ms: agentd's resolver keeps its own timeout (5000)")
		}
	}
	if !null(n.TLS) {
		var t struct {
			Enabled *bool `json:"enabled"`
		}
		if err := json.Unmarshal(n.TLS, &t); err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		if t.Enabled != nil && *t.Enabled {
			return fmt.Errorf("tls.enabled: agentd does not intercept TLS (it checks a TLS flow's SNI against the policy instead)")
		}
	}
	if !null(n.Secrets) {
		var s struct {
			Secrets []json.RawMessage `json:"secrets"`
			Entries []json.RawMessage `json:"entries"`
		}
		if err := json.Unmarshal(n.Secrets, &s); err != nil {
			return fmt.Errorf("secrets: %w", err)
		}
		if len(s.Secrets)+len(s.Entries) > 0 {
			return fmt.Errorf("secrets: agentd does not substitute secrets (that needs TLS interception)")
		}
	}
	for _, c := range []struct {
		name string
		v    json.RawMessage
	}{{"max_connections", n.MaxConnections}, {"max_tcp_connections", n.MaxTCPConnections}, {"max_udp_connections", n.MaxUDPConnections}} {
		if !null(c.v) && string(bytes.TrimSpace(c.v)) != "0" {
			return fmt.Errorf("%s: agentd's netstack caps flows with its own limit (TCP and UDP together), not per document; use 0 or null", c.name)
		}
	}
	if !null(n.RateLimiter) && string(bytes.TrimSpace(n.RateLimiter)) != "{}" {
		var rl struct {
			Egress, Ingress json.RawMessage
		}
		if err := json.Unmarshal(n.RateLimiter, &rl); err != nil {
			return fmt.Errorf("rate_limiter: %w", err)
		}
		if !null(rl.Egress) || !null(rl.Ingress) {
			return fmt.Errorf("rate_limiter: agentd's netstack has no rate limiter")
		}
	}
	if !null(n.OutboundProxy) {
		return fmt.Errorf("outbound_proxy: agentd dials destinations itself (or through the host channel), never through a proxy")
	}
	if !null(n.HTTP) {
		var h struct {
			DenyResponse bool `json:"deny_response"`
		}
		if err := json.Unmarshal(n.HTTP, &h); err != nil {
			return fmt.Errorf("http: %w", err)
		}
		if h.DenyResponse {
			return fmt.Errorf("http.deny_response: agentd refuses a denied flow (a reset), it does not answer HTTP")
		}
	}
	if n.DeploymentProfile != nil && *n.DeploymentProfile != "single_tenant" && *n.DeploymentProfile != "multi_tenant" {
		return fmt.Errorf("deployment_profile: %q is not single_tenant or multi_tenant", *n.DeploymentProfile)
	}
	return nil
}

func emptyList(name string, v json.RawMessage, why string) error {
	if null(v) {
		return nil
	}
	var l []json.RawMessage
	if err := json.Unmarshal(v, &l); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if len(l) > 0 {
		return fmt.Errorf("%s: %s", name, why)
	}
	return nil
}

func sortedKeys(m map[string]json.RawMessage) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
