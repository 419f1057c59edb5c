package host

import (
	"context"
	"errors"
	"fmt"

	"github.com/agentd/agentd/protocol"
)

// PolicyError is a policy document the agent refused; State is what stays in force.
type PolicyError struct{ State protocol.PolicyState }

func (e *PolicyError) Error() string { return "policy refused: " + e.State.Error }

// ErrNoPolicy is returned when the agent does not offer the host-owned policy (feature
// "policy"): it runs no egress policy.
var ErrNoPolicy = errors.New("the agent runs no egress policy (feature \"policy\" not offered)")

// SetPolicy sends a policy document (microsandbox's format, JSON or YAML) for the agent to
// enforce from now on and returns the state it reports: the new generation and rule count,
// or a *PolicyError with what is wrong and where (the old policy stays).
func (c *Client) SetPolicy(ctx context.Context, doc []byte) (protocol.PolicyState, error) {
	return c.policy(ctx, protocol.TypePolicySet, protocol.PolicySet{Document: doc})
}

// Policy returns the live policy: its generation, rule count and normalized JSON document.
func (c *Client) Policy(ctx context.Context) (protocol.PolicyState, error) {
	return c.policy(ctx, protocol.TypePolicyGet, protocol.PolicyGet{})
}

func (c *Client) policy(ctx context.Context, t protocol.Type, v any) (protocol.PolicyState, error) {
	var st protocol.PolicyState
	if !c.HasFeature(protocol.FeaturePolicy) {
		return st, ErrNoPolicy
	}
	m, err := c.Request(ctx, t, v)
	if err != nil {
		return st, err
	}
	if m.Type != protocol.TypePolicyState {
		return st, fmt.Errorf("%s: unexpected reply %s", t, m.Name())
	}
	if err := protocol.Unmarshal(m.Payload, &st); err != nil {
		return st, fmt.Errorf("decode %s: %w", m.Type, err)
	}
	if st.Error != "" {
		return st, &PolicyError{st}
	}
	return st, nil
}

// ErrNoAudit is returned by FollowAudit when there is no audit to follow: the agent does not
// send one, or this client talks to the agent directly (the records are kept by a relay
// server, agentctl serve).
var ErrNoAudit = errors.New("no audit records here: the agent sends none, or this is not a relay server's client")

// FollowAudit calls fn with the guest's audit records the relay server holds (JSON lines, and
// how many records were lost on the way), and with follow every new batch after them, until
// ctx ends, fn returns an error or the connection does. Without follow it returns once the
// held records are delivered.
func (c *Client) FollowAudit(ctx context.Context, follow bool, fn func(records [][]byte, lost uint64) error) error {
	if !c.relayed || !c.HasFeature(protocol.FeatureAudit) {
		return ErrNoAudit
	}
	s, err := c.Start(protocol.TypeAuditFollow, protocol.AuditFollow{Follow: follow})
	if err != nil {
		return err
	}
	defer s.Close()
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			return err
		}
		switch m.Type {
		case protocol.TypeAuditRecords:
			var p protocol.AuditRecords
			if err := protocol.Unmarshal(m.Payload, &p); err != nil {
				return fmt.Errorf("decode %s: %w", m.Type, err)
			}
			if err := fn(p.Records, p.Dropped); err != nil {
				return err
			}
		case protocol.TypeAuditEnd:
			return nil
		default:
			if err := AsError(m); err != nil {
				return err
			}
		}
	}
}
