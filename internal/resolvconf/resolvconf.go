// Package resolvconf reads the nameservers of a resolv.conf: the upstream resolvers of the
// guest's DNS server (agentd) and of guest DNS streams the host serves (hostserver).
package resolvconf

import (
	"net/netip"
	"os"
	"strings"
)

// Path is the system's resolv.conf.
const Path = "/etc/resolv.conf"

// Servers reads the nameserver lines of the resolv.conf at path (port 53); nil if it cannot.
func Servers(path string) []netip.AddrPort {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return Parse(string(data))
}

// Parse returns the nameservers of resolv.conf text, in order, as address:53. Lines that are
// not nameserver lines, and addresses that do not parse, are skipped.
func Parse(text string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "nameserver" {
			if a, err := netip.ParseAddr(f[1]); err == nil {
				out = append(out, netip.AddrPortFrom(a, 53))
			}
		}
	}
	return out
}
