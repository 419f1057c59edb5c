package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
)

// maxDatagram is the largest UDP payload relayed.
const maxDatagram = 65535

// handleUDP runs in the packet path for the first datagram of each new (source, destination)
// pair, so it only decides and starts a goroutine. Returning false makes the stack answer with
// ICMP port unreachable, which is how a refused UDP flow is reported to the guest.
func (st *Stack) handleUDP(r *udp.ForwarderRequest) bool {
	src, dst := endpoints(r.ID())
	if st.isGateway(dst.Addr()) {
		if dst.Port() != 53 || st.opts.DNS == nil {
			st.Counters.GatewayRefused.Add(1)
			return false
		}
		var wq waiter.Queue
		ep, err := r.CreateEndpoint(&wq)
		if err != nil {
			return true
		}
		st.wg.Add(1)
		go func() {
			defer st.wg.Done()
			st.serveDNS(gonet.NewUDPConn(&wq, ep), src)
		}()
		return true
	}
	if !st.reserve(dst) {
		return false
	}
	flow, _ := st.eg.Admit(policy.UDP, src, dst)
	if flow == nil {
		st.release(dst)
		return false
	}
	var wq waiter.Queue
	ep, err := r.CreateEndpoint(&wq)
	if err != nil {
		st.release(dst)
		flow.Close()
		return true
	}
	guest := gonet.NewUDPConn(&wq, ep)
	st.runFlow(&st.Counters.UDPActive, dst, flow, func() { st.relayUDP(guest, dst, flow) })
	return true
}

// relayUDP carries datagrams both ways until neither side has sent for UDPIdleTimeout.
func (st *Stack) relayUDP(guest *gonet.UDPConn, dst netip.AddrPort, flow *egress.Flow) {
	defer guest.Close()
	ctx, cancel := context.WithTimeout(st.ctx, st.opts.ConnectTimeout)
	up, err := st.opts.Dial(ctx, "udp", dst.String())
	cancel()
	if err != nil {
		st.Counters.DialFailed.Add(1)
		return
	}
	defer up.Close()
	var last atomic.Int64 // unix nanos of the latest datagram either way
	last.Store(time.Now().UnixNano())
	closeBoth := sync.OnceFunc(func() { guest.Close(); up.Close() })
	flow.OnRevoke(closeBoth)
	stop := context.AfterFunc(st.ctx, closeBoth)
	defer stop()
	pipe := func(dst, src net.Conn, up bool) {
		buf := make([]byte, maxDatagram)
		for {
			src.SetReadDeadline(time.Unix(0, last.Load()).Add(st.opts.UDPIdleTimeout))
			n, err := src.Read(buf)
			if err != nil && isRefused(err) {
				continue // an ICMP error from the destination; the association goes on
			}
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && time.Since(time.Unix(0, last.Load())) < st.opts.UDPIdleTimeout {
					continue // the other direction was active
				}
				closeBoth()
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err != nil && !isRefused(err) {
				closeBoth()
				return
			}
			if up {
				flow.Count(int64(n), 0)
			} else {
				flow.Count(0, int64(n))
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); pipe(guest, up, false) }()
	pipe(up, guest, true)
	wg.Wait()
}

// isRefused reports an ICMP error a connected UDP socket picked up; the flow goes on.
func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// serveDNS answers queries from one guest socket at the gateway until it goes quiet.
func (st *Stack) serveDNS(c *gonet.UDPConn, src netip.AddrPort) {
	defer c.Close()
	stop := context.AfterFunc(st.ctx, func() { c.Close() })
	defer stop()
	// Stub resolvers send A and AAAA queries together on one socket: answer them concurrently,
	// a few at a time.
	sem := make(chan struct{}, dnsPerSocket)
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, maxDatagram)
	for {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		st.Counters.DNSQueries.Add(1)
		q := append([]byte(nil), buf[:n]...)
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			resp, err := st.opts.DNS.Answer(st.ctx, src, q, policy.UDP)
			if err != nil {
				return // unanswerable (no header): dropped, as a server would
			}
			c.Write(resp)
		}()
	}
}

// dnsPerSocket bounds the queries answered at once for one guest socket.
const dnsPerSocket = 8
