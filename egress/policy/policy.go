// Package policy decides whether a network flow may go, and which rule said so, from plain
// values (addresses, ports, protocol, names). It reads microsandbox's policy format unchanged
// (default_egress/default_ingress, ordered first-match rules with direction, destination,
// protocols, ports, action). It does no I/O: DNS pins and SNI are passed in.
package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Action is allow or deny.
type Action string

const (
	Allow Action = "allow"
	Deny  Action = "deny"
)

// Direction of a rule.
type Direction string

const (
	Egress  Direction = "egress"
	Ingress Direction = "ingress"
	Any     Direction = "any"
)

// Protocol of a flow.
type Protocol string

const (
	TCP    Protocol = "tcp"
	UDP    Protocol = "udp"
	ICMPv4 Protocol = "icmpv4"
	ICMPv6 Protocol = "icmpv6"
)

// Group names, in the reference's (disjoint) classification order.
const (
	GroupHost      = "host"
	GroupMetadata  = "metadata"
	GroupLoopback  = "loopback"
	GroupPrivate   = "private"
	GroupLinkLocal = "link_local"
	GroupMulticast = "multicast"
	GroupPublic    = "public"
)

// PortRange is an inclusive port range.
type PortRange struct {
	Start uint16 `json:"start"`
	End   uint16 `json:"end"`
}

// Destination is exactly one of Any, CIDR, Domain, DomainSuffix or Group.
type Destination struct {
	Any          bool
	CIDR         netip.Prefix
	Domain       string
	DomainSuffix string
	Group        string
}

// Rule is one policy rule. ID is stable: the rule's own "id" if set, else its position ("rule-3").
type Rule struct {
	ID          string      `json:"id,omitempty"`
	Direction   Direction   `json:"direction"`
	Destination Destination `json:"destination"`
	Protocols   []Protocol  `json:"protocols,omitempty"`
	Ports       []PortRange `json:"ports,omitempty"`
	Action      Action      `json:"action"`
}

// Policy is a parsed policy.
type Policy struct {
	DefaultEgress  Action `json:"default_egress"`
	DefaultIngress Action `json:"default_ingress"`
	Rules          []Rule `json:"rules"`
	// NAT64 are the NAT64 prefixes (a network document's nat64_prefixes): an address in one is
	// classified into a group by the IPv4 address it embeds. None in a bare policy document.
	NAT64 []netip.Prefix `json:"-"`
}

// Flow is what is being decided.
type Flow struct {
	Direction Direction
	Protocol  Protocol
	Addr      netip.Addr // the destination (egress) or the peer (ingress)
	Port      uint16
	// Names the address is known by: the DNS pins for it and, on TLS, the ClientHello's SNI.
	Names []string
}

// Decision is the verdict and the rule that gave it ("default" when none matched).
type Decision struct {
	Action Action
	RuleID string
	Reason string
}

// Context supplies the environment-dependent groups: the gateway addresses ("host"), and the
// NAT64 prefixes (Decide takes the policy's).
type Context struct {
	HostAddrs []netip.Addr
	NAT64     []netip.Prefix
}

// Decide evaluates rules in order; the first that matches the flow decides.
func (p *Policy) Decide(f Flow, ctx Context) Decision {
	f.Addr = f.Addr.Unmap() // an IPv4-mapped IPv6 address is its IPv4 address
	if ctx.NAT64 == nil {
		ctx.NAT64 = p.NAT64
	}
	for i := range p.Rules {
		r := &p.Rules[i]
		if r.Direction != Any && r.Direction != f.Direction {
			continue
		}
		if len(r.Protocols) > 0 && !contains(r.Protocols, f.Protocol) {
			continue
		}
		if len(r.Ports) > 0 && !inRanges(r.Ports, f.Port) {
			continue
		}
		if !r.Destination.matches(f, ctx) {
			continue
		}
		return Decision{Action: r.Action, RuleID: r.ID, Reason: "matched " + r.Destination.String()}
	}
	def := p.DefaultEgress
	if f.Direction == Ingress {
		def = p.DefaultIngress
	}
	return Decision{Action: def, RuleID: "default", Reason: "no rule matched"}
}

func contains[T comparable](list []T, v T) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

func inRanges(rs []PortRange, p uint16) bool {
	for _, r := range rs {
		if p >= r.Start && p <= r.End {
			return true
		}
	}
	return false
}

func (d *Destination) matches(f Flow, ctx Context) bool {
	switch {
	case d.Any:
		return true
	case d.CIDR.IsValid():
		return d.CIDR.Contains(f.Addr)
	case d.Group != "":
		return Classify(f.Addr, ctx) == d.Group
	case d.Domain != "":
		for _, n := range f.Names {
			if CanonicalName(n) == d.Domain {
				return true
			}
		}
	case d.DomainSuffix != "":
		for _, n := range f.Names {
			n = CanonicalName(n)
			if n == d.DomainSuffix || strings.HasSuffix(n, "."+d.DomainSuffix) {
				return true
			}
		}
	}
	return false
}

func (d Destination) String() string {
	switch {
	case d.Any:
		return "any"
	case d.CIDR.IsValid():
		return "cidr " + d.CIDR.String()
	case d.Group != "":
		return "group " + d.Group
	case d.Domain != "":
		return "domain " + d.Domain
	}
	return "domain_suffix " + d.DomainSuffix
}

// CanonicalName is a DNS name as rules and pins compare it: ASCII letters lower-cased (DNS names
// are case-insensitive in ASCII only, RFC 4343; a Unicode case fold would let a look-alike such
// as the Kelvin sign match "k") and one trailing dot dropped.
func CanonicalName(name string) string {
	b := []byte(name)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	if n := len(b); n > 0 && b[n-1] == '.' {
		b = b[:n-1]
	}
	return string(b)
}

var (
	metadataAddr = netip.MustParseAddr("169.254.169.254")
	privateNets  = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fc00::/7")}
)

// Classify puts an address in exactly one group, in the reference's order: host (the gateway
// addresses) → metadata (169.254.169.254) → loopback → private → link-local → multicast → public.
func Classify(a netip.Addr, ctx Context) string {
	a = a.Unmap()
	for _, p := range ctx.NAT64 { // a NAT64 address is its embedded IPv4 address's group
		if a.Is6() && p.Contains(a) {
			b := a.As16()
			a = netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
			break
		}
	}
	switch {
	case contains(ctx.HostAddrs, a):
		return GroupHost
	case a == metadataAddr:
		return GroupMetadata
	case a.IsLoopback():
		return GroupLoopback
	case inPrefixes(privateNets, a):
		return GroupPrivate
	case a.IsLinkLocalUnicast():
		return GroupLinkLocal
	case a.IsMulticast():
		return GroupMulticast
	}
	return GroupPublic
}

func inPrefixes(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Parse reads a policy in microsandbox's shape, as JSON or YAML (anything that does not start
// with "{" is read as YAML): the rule document (0.5.7's shape, unchanged since) or the whole
// current network document that holds one under "policy" (network.go). Omitted defaults are
// deny (fail closed); unknown fields and bad values are errors that name the field.
func Parse(data []byte) (*Policy, error) {
	t := bytes.TrimSpace(data)
	if len(t) == 0 {
		return nil, fmt.Errorf("policy: empty document")
	}
	if t[0] != '{' {
		var doc any
		if err := yaml.Unmarshal(data, &doc); err != nil {
			return nil, fmt.Errorf("policy: yaml: %w", err)
		}
		if doc == nil {
			return nil, fmt.Errorf("policy: empty document")
		}
		j, err := json.Marshal(doc)
		if err != nil {
			return nil, fmt.Errorf("policy: yaml: %w", err)
		}
		data = j
	}
	if isNetworkDocument(data) { // the whole current NetworkConfig/NetworkSpec (network.go)
		return parseNetwork(data)
	}
	return parseJSON(data)
}

func parseJSON(data []byte) (*Policy, error) {
	var w struct {
		DefaultEgress  *Action           `json:"default_egress"`
		DefaultIngress *Action           `json:"default_ingress"`
		Rules          []json.RawMessage `json:"rules"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	p := &Policy{DefaultEgress: Deny, DefaultIngress: Deny}
	for name, a := range map[string]*Action{"default_egress": w.DefaultEgress, "default_ingress": w.DefaultIngress} {
		if a == nil {
			continue
		}
		if *a != Allow && *a != Deny {
			return nil, fmt.Errorf("policy: %s: %q is not allow or deny", name, *a)
		}
	}
	if w.DefaultEgress != nil {
		p.DefaultEgress = *w.DefaultEgress
	}
	if w.DefaultIngress != nil {
		p.DefaultIngress = *w.DefaultIngress
	}
	ids := map[string]bool{}
	for i, raw := range w.Rules {
		r, err := parseRule(raw)
		if err != nil {
			return nil, fmt.Errorf("policy: rules[%d]: %w", i, err)
		}
		if r.ID == "" {
			r.ID = fmt.Sprintf("rule-%d", i)
		}
		if ids[r.ID] {
			return nil, fmt.Errorf("policy: rules[%d]: duplicate id %q", i, r.ID)
		}
		ids[r.ID] = true
		p.Rules = append(p.Rules, r)
	}
	return p, nil
}

func parseRule(raw json.RawMessage) (Rule, error) {
	var w struct {
		ID          string            `json:"id"`
		Direction   *Direction        `json:"direction"`
		Destination json.RawMessage   `json:"destination"`
		Protocols   []Protocol        `json:"protocols"`
		Ports       []json.RawMessage `json:"ports"`
		Action      *Action           `json:"action"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return Rule{}, err
	}
	r := Rule{ID: w.ID, Direction: Egress, Protocols: w.Protocols}
	if w.Direction != nil {
		if !contains([]Direction{Egress, Ingress, Any}, *w.Direction) {
			return r, fmt.Errorf("direction: %q is not egress, ingress or any", *w.Direction)
		}
		r.Direction = *w.Direction
	}
	if w.Action == nil {
		return r, fmt.Errorf("action: missing (allow or deny)")
	}
	if *w.Action != Allow && *w.Action != Deny {
		return r, fmt.Errorf("action: %q is not allow or deny", *w.Action)
	}
	r.Action = *w.Action
	for j, pr := range w.Protocols {
		if !contains([]Protocol{TCP, UDP, ICMPv4, ICMPv6}, pr) {
			return r, fmt.Errorf("protocols[%d]: %q is not tcp, udp, icmpv4 or icmpv6", j, pr)
		}
	}
	for j, raw := range w.Ports {
		pr, err := parsePortRange(raw)
		if err != nil {
			return r, fmt.Errorf("ports[%d]: %w", j, err)
		}
		r.Ports = append(r.Ports, pr)
	}
	d, err := parseDestination(w.Destination)
	if err != nil {
		return r, fmt.Errorf("destination: %w", err)
	}
	r.Destination = d
	return r, nil
}

// parsePortRange reads {"start": N, "end": M} (end defaults to start). The format has no
// bare numbers or "A-B" strings; for those the error shows what to write instead.
func parsePortRange(raw json.RawMessage) (PortRange, error) {
	var n json.Number
	var s string
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	if d.Decode(&n) == nil {
		return PortRange{}, fmt.Errorf(`%s: a port is written {"start": %s, "end": %s} (a range: {"start": 8000, "end": 8100})`, n, n, n)
	}
	if json.Unmarshal(raw, &s) == nil {
		a, b, ok := strings.Cut(s, "-")
		if !ok {
			b = a
		}
		return PortRange{}, fmt.Errorf(`%q: a port range is written {"start": %s, "end": %s}`, s, strings.TrimSpace(a), strings.TrimSpace(b))
	}
	var w struct {
		Start *int64 `json:"start"`
		End   *int64 `json:"end"`
	}
	d = json.NewDecoder(bytes.NewReader(raw))
	d.DisallowUnknownFields()
	if err := d.Decode(&w); err != nil {
		return PortRange{}, fmt.Errorf(`want {"start": N, "end": M}: %w`, err)
	}
	if w.Start == nil {
		return PortRange{}, fmt.Errorf(`start: missing (want {"start": N, "end": M})`)
	}
	if w.End == nil || *w.End == 0 {
		w.End = w.Start
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"start", *w.Start}, {"end", *w.End}} {
		if f.v < 0 || f.v > 65535 {
			return PortRange{}, fmt.Errorf("%s: %d is not a port (0-65535)", f.name, f.v)
		}
	}
	if *w.Start > *w.End {
		return PortRange{}, fmt.Errorf("start %d is after end %d", *w.Start, *w.End)
	}
	return PortRange{Start: uint16(*w.Start), End: uint16(*w.End)}, nil
}

// parseDestination reads "any", {"cidr": ...}, {"domain": ...}, {"domain_suffix": ...} or
// {"group": ...} (serde's external tagging).
func parseDestination(raw json.RawMessage) (Destination, error) {
	var d Destination
	if len(raw) == 0 {
		return d, fmt.Errorf("missing")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if s == "any" {
			return Destination{Any: true}, nil
		}
		return d, fmt.Errorf("%q: want \"any\" or one of cidr, domain, domain_suffix, group", s)
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil || len(m) != 1 {
		return d, fmt.Errorf("want \"any\" or an object with exactly one of cidr, domain, domain_suffix, group")
	}
	for k, v := range m {
		switch k {
		case "cidr":
			p, err := netip.ParsePrefix(v)
			if err != nil {
				a, aerr := netip.ParseAddr(v)
				if aerr != nil {
					return d, fmt.Errorf("cidr: %q is not an address or prefix", v)
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			if p.Addr().Is4In6() { // normalize IPv4-mapped prefixes to IPv4
				p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
			}
			d.CIDR = p.Masked()
		case "domain", "domain_suffix":
			n := CanonicalName(v)
			if n == "" || strings.ContainsAny(n, " /*:") || strings.Contains(n, "..") {
				return d, fmt.Errorf("%s: %q is not a domain name", k, v)
			}
			if k == "domain" {
				d.Domain = n
			} else {
				d.DomainSuffix = n
			}
		case "group":
			if !contains([]string{GroupHost, GroupMetadata, GroupLoopback, GroupPrivate, GroupLinkLocal, GroupMulticast, GroupPublic}, v) {
				return d, fmt.Errorf("group: %q is not one of public, private, loopback, link_local, metadata, multicast, host", v)
			}
			d.Group = v
		default:
			return d, fmt.Errorf("unknown kind %q (want cidr, domain, domain_suffix or group)", k)
		}
	}
	return d, nil
}
