// Package egress is agentd's policy point: it holds the live policy (swapped atomically on
// reload), the DNS pins that give domain rules their addresses, the table of open flows (so a
// reload can revoke what it no longer allows), per-destination counters and the audit log. The
// netstack, the resolver and the core.tcp relay all ask it; it does no network I/O itself.
package egress

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentd/agentd/egress/policy"
)

// Options configure a Service.
type Options struct {
	// HostAddrs are the addresses that stand for the gateway: the netstack's own addresses,
	// where the resolver answers (policy group "host").
	HostAddrs []netip.Addr
	// Audit receives one record per decision and one per closed flow (nil: no audit).
	Audit *Audit
	// MaxPins bounds the DNS pin table (name->address entries).
	MaxPins int
	// MaxDestinations bounds the per-destination counter table; later destinations are
	// counted under the zero address.
	MaxDestinations int
}

// DefaultOptions are the limits used when a field is zero.
var DefaultOptions = Options{MaxPins: 65536, MaxDestinations: 4096}

// Counters are the decisions over the service's life (the netstack and the resolver count
// what happens on the data path; these count what was decided).
type Counters struct {
	TCPAllowed, TCPDenied, UDPAllowed, UDPDenied atomic.Int64
	Revoked, SNIDenied, Queries, QueriesDenied   atomic.Int64
}

// Allowed is the flows admitted, all protocols.
func (c *Counters) Allowed() int64 { return c.TCPAllowed.Load() + c.UDPAllowed.Load() }

// Denied is the flows refused, all protocols.
func (c *Counters) Denied() int64 { return c.TCPDenied.Load() + c.UDPDenied.Load() }

func (c *Counters) count(p policy.Protocol, allowed bool) {
	switch {
	case p == policy.UDP && allowed:
		c.UDPAllowed.Add(1)
	case p == policy.UDP:
		c.UDPDenied.Add(1)
	case allowed:
		c.TCPAllowed.Add(1)
	default:
		c.TCPDenied.Add(1)
	}
}

// DestStats are one destination's counters.
type DestStats struct {
	Allowed, Denied, BytesUp, BytesDown int64
}

// Service is the policy point. Safe for concurrent use.
type Service struct {
	opts     Options
	pol      atomic.Pointer[policy.Policy]
	pins     *Pins
	audit    *Audit
	Counters Counters

	mu    sync.Mutex
	flows map[*Flow]struct{}
	dests map[netip.Addr]*DestStats
}

// New returns a service enforcing p (which should already include its floor).
func New(p *policy.Policy, o Options) *Service {
	if o.MaxPins <= 0 {
		o.MaxPins = DefaultOptions.MaxPins
	}
	if o.MaxDestinations <= 0 {
		o.MaxDestinations = DefaultOptions.MaxDestinations
	}
	s := &Service{opts: o, pins: NewPins(o.MaxPins), audit: o.Audit, flows: map[*Flow]struct{}{}, dests: map[netip.Addr]*DestStats{}}
	s.pol.Store(p)
	return s
}

// Policy returns the policy in force.
func (s *Service) Policy() *policy.Policy { return s.pol.Load() }

// Pins returns the DNS pin table.
func (s *Service) Pins() *Pins { return s.pins }

// Context is the environment the policy's groups are resolved in.
func (s *Service) Context() policy.Context { return policy.Context{HostAddrs: s.opts.HostAddrs} }

// Decide rules on a flow without opening it or recording anything (agentctl policy explain).
func (s *Service) Decide(f policy.Flow) policy.Decision { return s.pol.Load().Decide(f, s.Context()) }

// Flow is an admitted connection or UDP association.
type Flow struct {
	svc       *Service
	Direction policy.Direction
	Protocol  policy.Protocol
	Src, Dst  netip.AddrPort
	Names     []string // what the destination is known as: requested name, DNS pins
	Via       string   // who opened it (audit): "" for a guest flow, "core.tcp", "host"
	peer      netip.Addr
	start     time.Time

	mu       sync.Mutex // guards sni and decision, which reloads and the relay both touch
	sni      string
	decision policy.Decision
	onRevoke func()

	up, down atomic.Int64
	revoked  chan struct{}
	once     sync.Once
	closed   atomic.Bool
}

// Request is a flow asking to be admitted: every flow agentd carries (netstack TCP and UDP,
// core.tcp, the host end of guest streams) is decided through one.
type Request struct {
	// Direction is Egress unless set. A connection from the host to the guest itself (a
	// core.tcp forward to a guest service) is Ingress: Dsts is then the guest's listening
	// address and Peer the address the connection comes from.
	Direction policy.Direction
	Protocol  policy.Protocol
	Src       netip.AddrPort
	// Dsts are the candidate destinations, best first (one for a guest flow; the resolved
	// addresses of a name for core.tcp): the first the policy allows is the flow's destination.
	Dsts []netip.AddrPort
	// Names are what the destination was asked for by (core.tcp's host name), besides its pins.
	Names []string
	// Peer is the address an ingress decision matches (rules match the peer, as microsandbox's
	// published ports do); the ports matched are the guest's.
	Peer netip.Addr
	Via  string
}

// Admit decides a new flow from src to dst (names: names it was asked for by, if any, besides
// its DNS pins): AdmitRequest with one candidate.
func (s *Service) Admit(proto policy.Protocol, src, dst netip.AddrPort, names ...string) (*Flow, policy.Decision) {
	return s.AdmitRequest(Request{Protocol: proto, Src: src, Dsts: []netip.AddrPort{dst}, Names: names})
}

// AdmitRequest decides a flow once, over its candidate destinations, and records that one
// decision. An allowed flow is returned tracked (a reload re-decides it and may revoke it);
// the caller closes it when done. A denied one returns nil and the decision for the first
// candidate.
func (s *Service) AdmitRequest(r Request) (*Flow, policy.Decision) {
	if r.Direction == "" {
		r.Direction = policy.Egress
	}
	var f *Flow
	for i, dst := range r.Dsts {
		dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
		names := append(slices.Clip(r.Names), s.pins.Names(dst.Addr())...)
		cand := &Flow{svc: s, Direction: r.Direction, Protocol: r.Protocol, Src: r.Src, Dst: dst, Names: names, Via: r.Via,
			peer: r.Peer, start: time.Now(), revoked: make(chan struct{})}
		cand.decision = s.Decide(cand.policyFlow())
		if i == 0 || cand.decision.Action == policy.Allow {
			f = cand
		}
		if cand.decision.Action == policy.Allow {
			break
		}
	}
	if f == nil {
		return nil, policy.Decision{Action: policy.Deny, RuleID: "none", Reason: "no destination"}
	}
	allowed := f.decision.Action == policy.Allow
	s.mu.Lock()
	ds := s.destLocked(f.Dst.Addr())
	if allowed {
		ds.Allowed++
		s.flows[f] = struct{}{}
	} else {
		ds.Denied++
	}
	s.mu.Unlock()
	s.Counters.count(f.Protocol, allowed)
	s.audit.record(f.record("decision"))
	if !allowed {
		return nil, f.decision
	}
	return f, f.decision
}

// Decision is the flow's latest verdict.
func (f *Flow) Decision() policy.Decision {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.decision
}

func (f *Flow) setDecision(d policy.Decision) {
	f.mu.Lock()
	f.decision = d
	f.mu.Unlock()
}

func (s *Service) destLocked(a netip.Addr) *DestStats {
	ds := s.dests[a]
	if ds == nil {
		if len(s.dests) >= s.opts.MaxDestinations {
			a = netip.Addr{}
			if ds = s.dests[a]; ds != nil {
				return ds
			}
		}
		ds = &DestStats{}
		s.dests[a] = ds
	}
	return ds
}

// Destinations returns a copy of the per-destination counters.
func (s *Service) Destinations() map[netip.Addr]DestStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[netip.Addr]DestStats, len(s.dests))
	for a, d := range s.dests {
		out[a] = *d
	}
	return out
}

// Open reports how many admitted flows are still open.
func (s *Service) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.flows)
}

// Query rules on a DNS query from the guest and records the decision.
func (s *Service) Query(src netip.AddrPort, name string, qtype string, proto policy.Protocol, port uint16) policy.Decision {
	d := s.pol.Load().DecideQuery(name, proto, port)
	s.Counters.Queries.Add(1)
	if d.Action != policy.Allow {
		s.Counters.QueriesDenied.Add(1)
	}
	s.audit.record(Record{Event: "dns", Protocol: string(proto), Src: src.String(), Name: name, QType: qtype,
		Rule: d.RuleID, Verdict: string(d.Action), Reason: d.Reason})
	return d
}

// Reload swaps in a new policy and re-decides every open flow under it; the flows it no longer
// allows are revoked (their relays reset both sides). It returns how many were revoked.
func (s *Service) Reload(p *policy.Policy) int {
	s.pol.Store(p)
	s.mu.Lock()
	open := make([]*Flow, 0, len(s.flows))
	for f := range s.flows {
		open = append(open, f)
	}
	s.mu.Unlock()
	n := 0
	for _, f := range open {
		d := s.Decide(f.policyFlow())
		f.mu.Lock()
		sni := f.sni
		f.mu.Unlock()
		if d.Action == policy.Allow && sni != "" {
			d = f.decideSNI(sni)
		}
		if d.Action != policy.Allow {
			f.setDecision(d)
			f.revoke("revoked")
			n++
		}
	}
	return n
}

func (f *Flow) policyFlow() policy.Flow {
	if f.Direction == policy.Ingress {
		return policy.Flow{Direction: policy.Ingress, Protocol: f.Protocol, Addr: f.peer, Port: f.Dst.Port()}
	}
	return policy.Flow{Direction: policy.Egress, Protocol: f.Protocol, Addr: f.Dst.Addr(), Port: f.Dst.Port(), Names: f.Names}
}

// CheckSNI applies domain rules to a TLS flow's ClientHello name, as microsandbox does: the SNI
// alone can deny; to be allowed by a domain rule the SNI must also be pinned (resolved through
// the guest's resolver) to this destination address, so a forged SNI cannot ride an allowed
// name onto another address. It returns false (and records why) when the flow must end.
func (f *Flow) CheckSNI(sni string) bool {
	f.mu.Lock()
	f.sni = sni
	f.mu.Unlock()
	d := f.decideSNI(sni)
	if d.Action == policy.Allow {
		return true
	}
	f.setDecision(d)
	f.svc.Counters.SNIDenied.Add(1)
	f.svc.audit.record(f.record("sni"))
	return false
}

func (f *Flow) decideSNI(sni string) policy.Decision {
	pf := f.policyFlow()
	pf.Names = []string{sni}
	d := f.svc.Decide(pf)
	if d.Action != policy.Allow {
		return d
	}
	r, _ := f.svc.Policy().Rule(d.RuleID)
	isDomainRule := r.Destination.Domain != "" || r.Destination.DomainSuffix != ""
	if isDomainRule && !f.svc.pins.Has(f.Dst.Addr(), sni) {
		return policy.Decision{Action: policy.Deny, RuleID: d.RuleID, Reason: "sni " + sni + " is not pinned to " + f.Dst.Addr().String()}
	}
	return d
}

func (f *Flow) revoke(why string) {
	f.once.Do(func() {
		f.svc.Counters.Revoked.Add(1)
		f.svc.audit.record(f.record(why))
		f.mu.Lock() // with OnRevoke's check: the callback runs exactly once, here or there
		close(f.revoked)
		fn := f.onRevoke
		f.mu.Unlock()
		if fn != nil {
			fn()
		}
	})
}

// OnRevoke sets what to do when a reload revokes the flow (at once if it already has): the
// data path resets both sides.
func (f *Flow) OnRevoke(fn func()) {
	f.mu.Lock()
	f.onRevoke = fn
	var done bool
	select {
	case <-f.revoked:
		done = true
	default:
	}
	f.mu.Unlock()
	if done {
		fn()
	}
}

// Revoked is closed when a reload no longer allows the flow.
func (f *Flow) Revoked() <-chan struct{} { return f.revoked }

// Count adds bytes relayed: up is guest->destination, down the reverse. A nil flow counts
// nothing.
func (f *Flow) Count(up, down int64) {
	if f == nil {
		return
	}
	f.up.Add(up)
	f.down.Add(down)
}

// Close records the flow's end (bytes each way, duration) and forgets it. Idempotent.
func (f *Flow) Close() {
	if f == nil || f.closed.Swap(true) {
		return
	}
	s := f.svc
	s.mu.Lock()
	delete(s.flows, f)
	ds := s.destLocked(f.Dst.Addr())
	ds.BytesUp += f.up.Load()
	ds.BytesDown += f.down.Load()
	s.mu.Unlock()
	s.audit.record(f.record("close"))
}

func (f *Flow) record(event string) Record {
	f.mu.Lock()
	d, sni := f.decision, f.sni
	f.mu.Unlock()
	r := Record{Event: event, Protocol: string(f.Protocol), Src: f.Src.String(), Dst: f.Dst.String(), SNI: sni,
		Rule: d.RuleID, Verdict: string(d.Action), Reason: d.Reason, Via: f.Via}
	if f.Direction == policy.Ingress {
		r.Direction, r.Peer = string(policy.Ingress), f.peer.String()
	}
	if !f.Src.IsValid() {
		r.Src = ""
	}
	if len(f.Names) > 0 {
		r.Name = f.Names[0]
	}
	if event == "close" || event == "revoked" {
		up, down := f.up.Load(), f.down.Load()
		ms := float64(time.Since(f.start).Microseconds()) / 1000
		r.BytesUp, r.BytesDown, r.DurationMs = &up, &down, &ms
	}
	return r
}
