package netstack

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/egress"
)

// AttachGuest makes the tun the guest's only way out: it moves the device into the namespace
// nsFD (-1: leave it where it is), brings it up with the MTU and the guest addresses, and
// routes everything (v4 and v6 default routes) through it. h is a netlink handle in the
// guest's namespace.
func AttachGuest(h *netlink.Handle, tunName string, nsFD int, mtu uint32, g egress.GuestNet) error {
	if nsFD >= 0 {
		l, err := netlink.LinkByName(tunName)
		if err != nil {
			return fmt.Errorf("guest network: tun %s: %w", tunName, err)
		}
		if err := netlink.LinkSetNsFd(l, nsFD); err != nil {
			return fmt.Errorf("guest network: move %s into the guest namespace: %w", tunName, err)
		}
	}
	l, err := h.LinkByName(tunName)
	if err != nil {
		return fmt.Errorf("guest network: tun %s: %w", tunName, err)
	}
	if err := h.LinkSetMTU(l, int(mtu)); err != nil {
		return fmt.Errorf("guest network: %s: MTU %d: %w", tunName, mtu, err)
	}
	for _, p := range []netip.Prefix{g.Addr4, g.Addr6} {
		if !p.IsValid() {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD // usable at once; nothing else is on this link
		}
		if err := h.AddrAdd(l, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("guest network: %s: address %s: %w", tunName, p, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("guest network: %s up: %w", tunName, err)
	}
	for _, p := range []netip.Prefix{g.Addr4, g.Addr6} {
		if !p.IsValid() {
			continue
		}
		dst := &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
		if p.Addr().Is6() {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK, Src: p.Addr().AsSlice()}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("guest network: default route via %s: %w", tunName, err)
		}
	}
	return nil
}
