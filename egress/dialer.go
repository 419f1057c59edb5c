package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/agentd/agentd/egress/policy"
)

// DialFunc opens one connection (net.Dialer.DialContext's shape).
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// Dialer opens the connections agentd itself starts for the host (core.tcp destinations)
// through the policy point: each connect is one decision over its candidate addresses,
// recorded once, and the connection is tracked like a guest flow, so a reload that no longer
// allows it closes it. A destination that is the guest itself (its loopback, its own address)
// is not egress: it is decided as ingress from the host's side (Guest.Peer) and dialed by
// Local; everything else is decided as egress and dialed by Upstream, which leaves through the
// same path as the guest's own flows (the uplink, or the host in channel mode), never back
// through the tun to be decided a second time.
type Dialer struct {
	Service *Service
	// Guest is the guest's network when agentd is its gateway (netstack or channel egress);
	// nil when agentd only filters core.tcp destinations (--egress off with a policy), where
	// every destination is decided as egress.
	Guest    *GuestNet
	Upstream DialFunc
	Local    DialFunc
}

// DeniedError is a connect the policy refused.
type DeniedError struct{ Decision policy.Decision }

func (e *DeniedError) Error() string {
	return fmt.Sprintf("denied by egress policy (rule %s)", e.Decision.RuleID)
}

// Dial connects to the first of dsts the policy allows. name is the host name they were
// resolved from ("" for an address), which domain rules match.
func (d *Dialer) Dial(ctx context.Context, name string, dsts []netip.AddrPort) (net.Conn, error) {
	if len(dsts) == 0 {
		return nil, fmt.Errorf("no address to connect to")
	}
	req := Request{Protocol: policy.TCP, Dsts: dsts, Via: "core.tcp"}
	dial := d.Upstream
	if d.Guest != nil && d.Guest.IsGuest(dsts[0].Addr()) {
		req.Direction, req.Peer, req.Dsts = policy.Ingress, d.Guest.Peer(dsts[0].Addr()), dsts[:1]
		dial = d.Local
	} else if name != "" {
		req.Names = []string{name}
	}
	flow, dec := d.Service.AdmitRequest(req)
	if flow == nil {
		return nil, &DeniedError{dec}
	}
	conn, err := dial(ctx, "tcp", flow.Dst.String())
	if err != nil {
		flow.Close()
		return nil, err
	}
	fc := &flowConn{Conn: conn, flow: flow}
	flow.OnRevoke(func() { fc.reset() })
	return fc, nil
}

// flowConn is a connection tracked as a flow: bytes are counted, Close ends the flow, and a
// revocation resets the connection under whoever is using it.
type flowConn struct {
	net.Conn
	flow *Flow
	once sync.Once
}

func (c *flowConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.flow.Count(0, int64(n))
	return n, err
}

func (c *flowConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.flow.Count(int64(n), 0)
	return n, err
}

// CloseWrite half-closes the connection when it can (the host's EOF).
func (c *flowConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// SyscallConn passes on to the connection's descriptor when it has one (a relay waits on it
// for data before it takes a buffer).
func (c *flowConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.New("connection has no file descriptor")
}

// SetLinger passes on to the connection when it has the option (a reset on close).
func (c *flowConn) SetLinger(sec int) error {
	if l, ok := c.Conn.(interface{ SetLinger(int) error }); ok {
		return l.SetLinger(sec)
	}
	return nil
}

func (c *flowConn) reset() {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		tc.SetLinger(0) // the destination sees a RST, as a revoked guest flow's does
	}
	c.Conn.Close()
}

func (c *flowConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.flow.Close)
	return err
}
