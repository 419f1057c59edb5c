// Package nettest builds the network topology the egress tests run in: a guest network
// namespace (whose only way out will be agentd's tun) and test hosts on a local veth in the
// test's own namespace, where the netstack dials. Everything is real: namespaces, links, routes.
package nettest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/agentd/agentd/namespace"
)

var seq atomic.Int32

// Hosts are the test destinations: Good is what test policies allow, Bad what they deny.
var (
	Good  = netip.MustParseAddr("198.18.0.10")
	Bad   = netip.MustParseAddr("198.18.0.11")
	Named = netip.MustParseAddr("198.18.0.12") // reachable only by name under the test policies
	Good6 = netip.MustParseAddr("2001:db8:18::10")
	Bad6  = netip.MustParseAddr("2001:db8:18::11")
)

// Topology is one test's guest namespace and test hosts.
type Topology struct {
	Name  string        // the guest namespace (ip netns name)
	Guest *namespace.NS // sockets inside the guest namespace
	ID    string        // unique suffix for device names
}

// Run runs a command and fails the test on error.
func Run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

// New creates the guest namespace and the test hosts (root only; the test is skipped otherwise).
func New(t testing.TB) *Topology {
	if os.Geteuid() != 0 {
		t.Skip("needs root for tun devices and network namespaces")
	}
	id := fmt.Sprintf("%d%d", os.Getpid()%1000, seq.Add(1))
	tp := &Topology{Name: "agns" + id, ID: id}
	Run(t, "ip", "netns", "add", tp.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", tp.Name).Run() })
	Run(t, "ip", "-n", tp.Name, "link", "set", "lo", "up")
	ns, err := namespace.Open("/var/run/netns/" + tp.Name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Close)
	tp.Guest = ns
	return tp
}

// hostLink carries the test host addresses. One fixed link shared by every test process (test
// packages run in parallel, and the same address on two links would leave it to chance which
// one a removal takes down); it is created when missing and left in place.
const hostLink = "aghost0"

// Hosts puts the test host addresses (Good, Bad, Named and the IPv6 ones) on a veth pair in
// this namespace (the kernel here has no dummy driver). Nothing is routed anywhere.
func Hosts(t testing.TB) {
	hostsMu.Lock()
	defer hostsMu.Unlock()
	if exec.Command("ip", "link", "show", hostLink).Run() != nil {
		// Another test process may create it at the same moment: "File exists" is fine.
		exec.Command("ip", "link", "add", hostLink, "type", "veth", "peer", "name", hostLink+"p").Run()
	}
	link := hostLink
	for _, a := range []string{Good.String() + "/32", Bad.String() + "/32", Named.String() + "/32"} {
		Run(t, "ip", "addr", "replace", a, "dev", link)
	}
	for _, a := range []string{Good6.String() + "/128", Bad6.String() + "/128"} {
		Run(t, "ip", "addr", "replace", a, "dev", link, "nodad")
	}
	Run(t, "ip", "link", "set", link, "up")
	Run(t, "ip", "link", "set", link+"p", "up")
}

var hostsMu sync.Mutex

// UseResolver makes programs run with Cmd use nameserver lines in resolv (ip netns exec
// bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf).
func (tp *Topology) UseResolver(t testing.TB, resolv string) {
	dir := "/etc/netns/" + tp.Name
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(dir+"/resolv.conf", []byte(resolv), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Cmd is a command run inside the guest namespace.
func (tp *Topology) Cmd(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", tp.Name}, args...)...)
}

// DNSServer answers A and AAAA queries from a fixed table (a stand-in for the upstream
// resolver); every other name gets NXDOMAIN. It returns the server's address.
func DNSServer(t testing.TB, ip netip.Addr, table map[string][]netip.Addr) netip.AddrPort {
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if resp := answer(buf[:n], table); resp != nil {
				pc.WriteToUDPAddrPort(resp, from)
			}
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

func answer(q []byte, table map[string][]netip.Addr) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	question, err := p.Question()
	if err != nil {
		return nil
	}
	addrs, known := table[question.Name.String()]
	rh := dnsmessage.Header{ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.StartQuestions()
	b.Question(question)
	b.StartAnswers()
	for _, a := range addrs {
		rr := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 60}
		switch {
		case a.Is4() && question.Type == dnsmessage.TypeA:
			b.AResource(rr, dnsmessage.AResource{A: a.As4()})
		case a.Is6() && question.Type == dnsmessage.TypeAAAA:
			b.AAAAResource(rr, dnsmessage.AAAAResource{AAAA: a.As16()})
		}
	}
	out, _ := b.Finish()
	return out
}
