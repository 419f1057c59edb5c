package egress

import (
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/tlshello"
)

// SNIGate holds a TCP flow's first bytes until the ClientHello they start with is judged,
// so that no byte of a TLS flow reaches the destination before its SNI passed the policy. It
// never fails open: a hello that is malformed, larger than tlshello.MaxHello, or still
// incomplete at the caller's deadline (Expire) refuses the flow and is audited, like a denied
// SNI. A flow that does not start with a TLS handshake record passes at once (its address and
// pins were decided at admission). One goroutine feeds a gate.
type SNIGate struct {
	flow *Flow
	held []byte
	done bool
}

// NewSNIGate starts a gate for f.
func (f *Flow) NewSNIGate() *SNIGate { return &SNIGate{flow: f} }

// Done reports whether the gate has judged (everything after passes unchanged).
func (g *SNIGate) Done() bool { return g.done }

// Holding reports whether bytes are held waiting for the rest of a ClientHello (the caller's
// deadline runs while this is true).
func (g *SNIGate) Holding() bool { return !g.done && len(g.held) > 0 }

// Feed takes the next bytes the client sent. It returns what may be sent on now (nil while
// the hello is incomplete; the bytes are copied, so b may be reused) and false when the flow
// must be reset: its hello was refused, and recorded.
func (g *SNIGate) Feed(b []byte) (pass []byte, ok bool) {
	if g.done {
		return b, true
	}
	if len(g.held) == 0 && len(b) > 0 && b[0] != 0x16 {
		g.done = true // not TLS: nothing to check, nothing to copy
		return b, true
	}
	g.held = append(g.held, b...)
	st, sni, _ := tlshello.Parse(g.held)
	switch st {
	case tlshello.Incomplete:
		return nil, true
	case tlshello.NotTLS:
		g.done = true
		return g.release(), true
	case tlshello.Complete:
		if sni != "" && !g.flow.CheckSNI(sni) {
			g.done = true
			g.held = nil
			return nil, false
		}
		g.done = true // no SNI (an IP literal): the pins decided at admission
		return g.release(), true
	}
	g.refuse("the flow began a TLS handshake that is not a well-formed ClientHello of at most 16 KiB")
	return nil, false
}

// Expire judges a ClientHello still incomplete when the caller's deadline passed: the flow
// is refused and recorded (a client too slow to send its hello gets no exception).
func (g *SNIGate) Expire() {
	if !g.done {
		g.refuse("the ClientHello was still incomplete at the deadline")
	}
}

func (g *SNIGate) release() []byte {
	out := g.held
	g.held = nil
	return out
}

func (g *SNIGate) refuse(why string) {
	g.done = true
	g.held = nil
	f := g.flow
	f.setDecision(policy.Decision{Action: policy.Deny, RuleID: "tls", Reason: why})
	f.svc.Counters.SNIDenied.Add(1)
	f.svc.audit.record(f.record("sni"))
}
