// Package tunlink opens the guest's tun device and is the gVisor link endpoint on it. Where the
// kernel offers it, the tun is opened with a virtio-net header and offloads (TUNSETOFFLOAD:
// checksums, TSO4/6, USO4/6), so the guest's kernel hands over 64 KiB super-packets and takes
// 64 KiB segments back at any guest MTU: per-packet cost, the limit of a userspace stack on a
// tun, is paid once per 64 KiB instead of once per MTU. Otherwise (or when asked) it is
// gVisor's fdbased endpoint on a plain tun, one packet per MTU. The choice is made once, at
// Open, and reported in Link.
//
// Every descriptor is opened close-on-exec: agentd starts workload processes, which must not
// inherit the guest's tun.
package tunlink

import (
	"fmt"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Mode selects the endpoint.
type Mode string

const (
	// Auto uses the offload endpoint when the kernel supports it, else the plain one.
	Auto Mode = "auto"
	// Offload requires the offload endpoint (Open fails without kernel support).
	Offload Mode = "offload"
	// Plain is gVisor's fdbased endpoint on a tun without offloads (the former default).
	Plain Mode = "plain"
)

// ParseMode checks a mode's name ("" is Auto).
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case "":
		return Auto, nil
	case Auto, Offload, Plain:
		return m, nil
	}
	return "", fmt.Errorf("tun link %q: want auto, offload or plain", s)
}

// Options describe the device.
type Options struct {
	// Name of the tun device to create.
	Name string
	// MTU the stack uses (the guest side is set by whoever configures the device).
	MTU uint32
	// Queues opens the device IFF_MULTI_QUEUE with this many descriptors, each read by its own
	// goroutine (a flow stays on one queue).
	Queues int
	Mode   Mode
}

// Link is an open tun and its endpoint.
type Link struct {
	// Endpoint is the gVisor link endpoint for the NIC (itself, not wrapped: the stack finds
	// GSO support by asserting its type).
	Endpoint stack.LinkEndpoint
	// Offload is true when the offload endpoint runs.
	Offload bool
	// Features lists the offloads the kernel granted ("csum tso4 tso6 uso4 uso6"); with the
	// plain endpoint in Auto mode, it says why offloads are off.
	Features string

	fds       []int
	ep        *endpoint // the offload endpoint, or nil
	closeOnce sync.Once
}

// Open creates the tun device and its endpoint.
func Open(o Options) (*Link, error) {
	if o.Queues < 1 {
		o.Queues = 1
	}
	if o.Mode == "" {
		o.Mode = Auto
	}
	why := ""
	if o.Mode != Plain {
		l, err := openOffload(o)
		if err == nil {
			return l, nil
		}
		if o.Mode == Offload {
			return nil, err
		}
		why = "no offloads: " + err.Error()
	}
	fds, err := openQueues(o.Name, o.Queues, unix.IFF_TUN|unix.IFF_NO_PI)
	if err != nil {
		return nil, err
	}
	ep, err := fdbased.New(&fdbased.Options{
		FDs: fds,
		MTU: o.MTU,
		// The guest kernel computes full checksums on a tun without offloads, so checking
		// them again is wasted work.
		RXChecksumOffload: true,
	})
	if err != nil {
		closeAll(fds)
		return nil, fmt.Errorf("tun %s: link endpoint: %w", o.Name, err)
	}
	return &Link{Endpoint: ep, Features: why, fds: fds}, nil
}

// tunOffloads are the offloads asked for: checksums (required by the others), TSO for IPv4
// and IPv6 (Linux 2.6), and USO (Linux 6.2, asked for separately).
const (
	tcpOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
	udpOffloads = unix.TUN_F_USO4 | unix.TUN_F_USO6
)

func openOffload(o Options) (*Link, error) {
	fds, err := openQueues(o.Name, o.Queues, unix.IFF_TUN|unix.IFF_NO_PI|unix.IFF_VNET_HDR)
	if err != nil {
		return nil, err
	}
	features := "csum tso4 tso6 uso4 uso6"
	for _, fd := range fds {
		err = unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, vnetHdrLen)
		if err == nil {
			if err = unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tcpOffloads|udpOffloads); err != nil {
				features = "csum tso4 tso6"
				err = unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tcpOffloads)
			}
		}
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("tun %s: offloads: %w", o.Name, err)
		}
	}
	ep := newEndpoint(fds, o.MTU)
	return &Link{Endpoint: ep, Offload: true, Features: features, fds: fds, ep: ep}, nil
}

// openQueues creates the device (the first TUNSETIFF) and attaches its queues, each descriptor
// non-blocking and close-on-exec.
func openQueues(name string, queues int, flags uint16) ([]int, error) {
	if queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	var fds []int
	for i := 0; i < queues; i++ {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err == nil {
			var ifr *unix.Ifreq
			if ifr, err = unix.NewIfreq(name); err == nil {
				ifr.SetUint16(flags)
				err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
			}
			if err != nil {
				unix.Close(fd)
			}
		}
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("open tun %s queue %d: %w", name, i, err)
		}
		fds = append(fds, fd)
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// Close releases the device; call it after the stack has stopped (stack.Close and Wait).
// Later calls do nothing.
func (l *Link) Close() {
	l.closeOnce.Do(func() {
		if l.ep != nil {
			l.ep.closeFiles()
			return
		}
		closeAll(l.fds)
	})
}

// Stats are the offload endpoint's inbound counters (zero on the plain endpoint).
type Stats struct {
	// SuperTCP counts the guest's TSO super-packets taken whole, SuperUDP its USO ones split
	// into datagrams, and Dropped the packets refused as malformed. SYNs counts the SYN and
	// SYN-ACK segments written (retransmissions included).
	SuperTCP, SuperUDP, Dropped, SYNs uint64
}

// Stats returns the endpoint's counters.
func (l *Link) Stats() Stats {
	if l.ep == nil {
		return Stats{}
	}
	s := &l.ep.stats
	return Stats{SuperTCP: s.superTCP.Load(), SuperUDP: s.superUDP.Load(), Dropped: s.dropped.Load(), SYNs: s.syns.Load()}
}

// String describes the endpoint for logs.
func (l *Link) String() string {
	kind := "plain"
	if l.Offload {
		kind = "offload"
	}
	return strings.TrimSpace(kind + " " + l.Features)
}
