package initfs

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ConfigureNetwork applies MSB_NET/MSB_NET_IPV4/MSB_NET_IPV6 as the reference does, in its order:
// MAC, MTU, IPv4 address, IPv6 address (no DAD), link up, default routes, resolv.conf (written
// only when a DNS server is given). root is "/" as PID 1. Without MSB_NET nothing happens (the
// address variables then only feed /etc/hosts).
func ConfigureNetwork(root string, c Config) error {
	if c.Net == nil {
		return nil
	}
	link, err := netlink.LinkByName(c.Net.Iface)
	if err != nil {
		return fmt.Errorf("network: interface %s: %w", c.Net.Iface, err)
	}
	if err := netlink.LinkSetHardwareAddr(link, net.HardwareAddr(c.Net.MAC[:])); err != nil {
		return fmt.Errorf("network: %s: set MAC: %w", c.Net.Iface, err)
	}
	if err := netlink.LinkSetMTU(link, int(c.Net.MTU)); err != nil {
		return fmt.Errorf("network: %s: set MTU %d: %w", c.Net.Iface, c.Net.MTU, err)
	}
	for _, ip := range []*IPConfig{c.IPv4, c.IPv6} {
		if ip == nil {
			continue
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.Addr.Addr().AsSlice(), Mask: net.CIDRMask(ip.Addr.Bits(), ip.Addr.Addr().BitLen())}}
		if ip.Addr.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("network: %s: add address %s: %w", c.Net.Iface, ip.Addr, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("network: %s: up: %w", c.Net.Iface, err)
	}
	for _, ip := range []*IPConfig{c.IPv4, c.IPv6} {
		if ip == nil {
			continue
		}
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: ip.GW.AsSlice(), Protocol: unix.RTPROT_BOOT}
		if err := netlink.RouteAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("network: default route via %s: %w", ip.GW, err)
		}
	}
	return writeResolvConf(root, c)
}

// ResolvConf renders resolv.conf: the IPv4 server, then the IPv6 one ("" when neither is set).
func ResolvConf(c Config) string {
	var b strings.Builder
	for _, ip := range []*IPConfig{c.IPv4, c.IPv6} {
		if ip != nil && ip.DNS != nil {
			fmt.Fprintf(&b, "nameserver %s\n", ip.DNS)
		}
	}
	return b.String()
}

func writeResolvConf(root string, c Config) error {
	s := ResolvConf(c)
	if s == "" {
		return nil // no DNS given: leave the file alone, as the reference does
	}
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(s), 0o644); err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	return nil
}
