package policy

import (
	"encoding/json"
	"fmt"
	"net/netip"
)

// DefaultFloor is the floor every agentd policy sits on unless the operator gives another:
// the cloud metadata address is never reachable from a workload, whatever the user's rules say.
var DefaultFloor = []Rule{
	{ID: "floor-metadata", Direction: Any, Destination: Destination{Group: GroupMetadata}, Action: Deny},
}

// WithFloor returns a policy whose floor rules are evaluated before p's own, so no user rule
// can widen what the floor denies. Floor rule ids are kept; they must not collide with p's.
func WithFloor(floor []Rule, p *Policy) (*Policy, error) {
	out := &Policy{DefaultEgress: p.DefaultEgress, DefaultIngress: p.DefaultIngress, NAT64: p.NAT64}
	ids := map[string]bool{}
	for _, r := range floor {
		ids[r.ID] = true
		out.Rules = append(out.Rules, r)
	}
	for _, r := range p.Rules {
		if ids[r.ID] {
			return nil, fmt.Errorf("policy: rule id %q is taken by the floor", r.ID)
		}
		out.Rules = append(out.Rules, r)
	}
	return out, nil
}

// DecideQuery rules on a DNS query for name sent to the resolver over proto/port, the way
// microsandbox evaluates DNS as egress: name rules match the query name and ignore their port
// and protocol filters; "any" rules match the transport's protocol and port; of the address
// rules only group "host" matches (it names the resolver itself). So a deny-by-default policy
// needs an explicit DNS allow.
func (p *Policy) DecideQuery(name string, proto Protocol, port uint16) Decision {
	name = CanonicalName(name)
	for i := range p.Rules {
		r := &p.Rules[i]
		if r.Direction == Ingress {
			continue
		}
		d := &r.Destination
		var hit bool
		switch {
		case d.Domain != "" || d.DomainSuffix != "":
			hit = d.matches(Flow{Names: []string{name}}, Context{})
		case d.Any || d.Group == GroupHost:
			hit = (len(r.Protocols) == 0 || contains(r.Protocols, proto)) && (len(r.Ports) == 0 || inRanges(r.Ports, port))
		}
		if hit {
			return Decision{Action: r.Action, RuleID: r.ID, Reason: "dns query matched " + d.String()}
		}
	}
	return Decision{Action: p.DefaultEgress, RuleID: "default", Reason: "no rule matched the query"}
}

// AllowsPrivateAnswer says whether a DNS answer that maps name to a non-public address (a
// rebinding answer) is wanted: only when an explicit rule names that address (its cidr or
// its group) or this exact name (a domain rule, not a suffix: allowing *.example.com must not
// let any of its names point into the private network), and the first such rule allows.
func (p *Policy) AllowsPrivateAnswer(name string, a netip.Addr, ctx Context) bool {
	f := Flow{Direction: Egress, Addr: a.Unmap(), Names: []string{name}}
	for i := range p.Rules {
		r := &p.Rules[i]
		d := &r.Destination
		if r.Direction == Ingress || d.Any || d.DomainSuffix != "" || !d.matches(f, ctx) {
			continue
		}
		return r.Action == Allow
	}
	return false
}

// Rule returns the rule with the given id.
func (p *Policy) Rule(id string) (Rule, bool) {
	for _, r := range p.Rules {
		if r.ID == id {
			return r, true
		}
	}
	return Rule{}, false
}

// MarshalJSON writes a destination in the policy file's own shape.
func (d Destination) MarshalJSON() ([]byte, error) {
	switch {
	case d.Any:
		return json.Marshal("any")
	case d.CIDR.IsValid():
		return json.Marshal(map[string]string{"cidr": d.CIDR.String()})
	case d.Group != "":
		return json.Marshal(map[string]string{"group": d.Group})
	case d.Domain != "":
		return json.Marshal(map[string]string{"domain": d.Domain})
	}
	return json.Marshal(map[string]string{"domain_suffix": d.DomainSuffix})
}
