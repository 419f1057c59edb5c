package namespace

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Netlink returns a netlink handle that acts on the namespace (close it when done).
func (ns *NS) Netlink() (*netlink.Handle, error) {
	h, err := netlink.NewHandleAt(vnetns.NsHandle(ns.fd), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("namespace: netlink: %w", err)
	}
	return h, nil
}

// IsolateUplink moves the named interfaces (in this process's namespace) into a new network
// namespace that only agentd's upstream sockets use: workloads, left with the tun, cannot bind
// to them, route to them or send raw packets out of them. The interfaces keep their addresses
// (link-local ones come back by themselves) and their routes are added again there, since a
// move drops them. On error nothing is left half-moved in the new namespace's favour: the
// namespace is closed, and an interface already moved goes with it.
func IsolateUplink(names []string) (*NS, error) {
	ns, err := New()
	if err != nil {
		return nil, err
	}
	if err := moveLinks(ns, names); err != nil {
		ns.Close()
		return nil, err
	}
	return ns, nil
}

func moveLinks(ns *NS, names []string) error {
	h, err := ns.Netlink()
	if err != nil {
		return err
	}
	defer h.Close()
	if lo, err := h.LinkByName("lo"); err == nil {
		h.LinkSetUp(lo)
	}
	for _, name := range names {
		name = strings.TrimSpace(name)
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("uplink %s: %w", name, err)
		}
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
		routes, _ := netlink.RouteList(l, netlink.FAMILY_ALL)
		if err := netlink.LinkSetNsFd(l, ns.FD()); err != nil {
			return fmt.Errorf("uplink %s: move into the uplink namespace: %w", name, err)
		}
		nl, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("uplink %s: %w", name, err)
		}
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() {
				continue
			}
			a.Label = ""
			if err := h.AddrAdd(nl, &a); err != nil {
				return fmt.Errorf("uplink %s: address %s: %w", name, a.IPNet, err)
			}
		}
		if err := h.LinkSetUp(nl); err != nil {
			return fmt.Errorf("uplink %s: up: %w", name, err)
		}
		for _, r := range routes {
			if r.Protocol == unix.RTPROT_KERNEL { // kernel routes come back with the address
				continue
			}
			r.LinkIndex = nl.Attrs().Index
			// Flags the kernel reports but refuses in a request (EINVAL): a route over a link
			// without carrier is listed as linkdown.
			r.Flags &^= unix.RTNH_F_LINKDOWN | unix.RTNH_F_DEAD
			if err := h.RouteReplace(&r); err != nil {
				return fmt.Errorf("uplink %s: route %s: %w", name, r, err)
			}
		}
	}
	return nil
}

// Pin keeps the namespace alive without this process: it is bind-mounted on path (as `ip netns
// add` does), so it outlives agentd. If agentd dies, the uplink then stays where no workload can
// reach it instead of the kernel handing its interface back to the guest's namespace (which a
// namespace's end does to physical devices); the guest keeps no way out.
func (ns *NS) Pin(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("namespace: pin: %w", err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o400)
	if err != nil {
		return fmt.Errorf("namespace: pin: %w", err)
	}
	f.Close()
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", ns.fd), path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("namespace: pin at %s: %w", path, err)
	}
	return nil
}
