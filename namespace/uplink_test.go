package namespace

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestIsolateUplink moves a veth end with an address and a route into a fresh namespace: the
// link leaves this namespace, and there it is up with its address and its route, and sockets
// made in the namespace use it.
func TestIsolateUplink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for links and namespaces")
	}
	name := fmt.Sprintf("agup%d", os.Getpid()%100000)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	run("ip", "link", "add", name, "type", "veth", "peer", "name", name+"p")
	t.Cleanup(func() { exec.Command("ip", "link", "del", name+"p").Run() })
	run("ip", "addr", "add", "198.19.77.2/24", "dev", name)
	run("ip", "link", "set", name, "up")
	run("ip", "route", "add", "198.19.78.0/24", "via", "198.19.77.1", "dev", name)

	ns, err := IsolateUplink([]string{" " + name})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if _, err := netlink.LinkByName(name); err == nil {
		t.Fatal("the uplink is still in this namespace")
	}
	h, err := ns.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("not in the uplink namespace: %v", err)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		t.Fatal("the uplink is down after the move")
	}
	addrs, _ := h.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "198.19.77.2/24" {
		t.Fatalf("addresses %v", addrs)
	}
	routes, _ := h.RouteList(l, netlink.FAMILY_V4)
	var got []string
	for _, r := range routes {
		if r.Dst != nil {
			got = append(got, r.Dst.String()+" via "+r.Gw.String())
		}
	}
	if !strings.Contains(strings.Join(got, ","), "198.19.78.0/24 via 198.19.77.1") {
		t.Fatalf("routes %v", got)
	}
	if lo, err := h.LinkByName("lo"); err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("loopback in the uplink namespace: %v", err)
	}
}

func TestIsolateUplinkMissing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for namespaces")
	}
	if _, err := IsolateUplink([]string{"agnosuchlink0"}); err == nil || !strings.Contains(err.Error(), "agnosuchlink0") {
		t.Fatalf("got %v", err)
	}
}

// TestPin: a pinned uplink namespace outlives the handle agentd holds, with its interface in
// it (unpinned, the namespace would end with the handle and take the veth with it).
func TestPin(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for links and namespaces")
	}
	name := fmt.Sprintf("agpin%d", os.Getpid()%100000)
	if out, err := exec.Command("ip", "link", "add", name, "type", "veth", "peer", "name", name+"p").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", name+"p").Run() })
	ns, err := IsolateUplink([]string{name})
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(t.TempDir(), "uplink.net")
	if err := ns.Pin(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(pin, unix.MNT_DETACH) })
	ns.Close() // agentd gone
	again, err := Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	h, err := again.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.LinkByName(name); err != nil {
		t.Fatalf("the uplink is gone with agentd's handle: %v", err)
	}
}
