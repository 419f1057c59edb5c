package egress

import "net/netip"

// GuestNet is the addressing on the guest's side of the tun: the guest's own addresses, and
// the gateways the stack owns (the resolver the guest's resolv.conf names).
type GuestNet struct {
	Addr4, Addr6       netip.Prefix
	Gateway4, Gateway6 netip.Addr
}

// DefaultGuestNet is used when agentd is not told otherwise. Both ranges are private, so the
// policy's "private" group covers the gateway only through the "host" group that names it.
var DefaultGuestNet = GuestNet{
	Addr4: netip.MustParsePrefix("10.87.0.2/24"), Gateway4: netip.MustParseAddr("10.87.0.1"),
	Addr6: netip.MustParsePrefix("fd87::2/64"), Gateway6: netip.MustParseAddr("fd87::1"),
}

// Gateways lists the stack-owned addresses (policy group "host").
func (g GuestNet) Gateways() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{g.Gateway4, g.Gateway6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// ResolvConf is the guest's resolv.conf: the stack's resolver.
func (g GuestNet) ResolvConf() string {
	s := ""
	for _, a := range g.Gateways() {
		s += "nameserver " + a.String() + "\n"
	}
	return s
}

// IsGuest reports whether a is the guest itself: its loopback or its own tun address. A
// connection the host asks agentd to open to such an address is not egress (see Dialer).
func (g GuestNet) IsGuest(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsLoopback() || a == g.Addr4.Addr() || a == g.Addr6.Addr()
}

// Peer is the address a connection from the host into the guest comes from, as the guest sees
// it: the gateway of the destination's family.
func (g GuestNet) Peer(dst netip.Addr) netip.Addr {
	if dst.Unmap().Is4() {
		return g.Gateway4
	}
	return g.Gateway6
}
