// Package resolver is the guest's DNS server: it lives at an address owned by the netstack,
// applies the egress policy to each query name (NXDOMAIN on deny), forwards allowed queries to
// the configured upstream resolvers, refuses rebinding answers (a name answered with a private,
// loopback or link-local address unless a rule allows that), and pins every address it hands
// out to the name asked for, so domain rules can recognise the connections that follow.
package resolver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
)

// Options configure a Resolver.
type Options struct {
	// Upstream is where allowed queries go: Servers (DNS servers reached over the uplink), or
	// in channel mode the host's resolver over the agent channel (hostdial.Endpoint).
	Upstream Upstream
	// Timeout bounds one upstream exchange (microsandbox uses 5 s).
	Timeout time.Duration
	// MaxInFlight bounds queries being forwarded at once; more are answered SERVFAIL.
	MaxInFlight int
	// AllowRebinding turns the rebinding check off (not recommended).
	AllowRebinding bool
}

// DefaultOptions are used for zero fields.
var DefaultOptions = Options{Timeout: 5 * time.Second, MaxInFlight: 256}

// Upstream forwards one query and returns the answer. tcp asks for the TCP transport (the
// retry of an answer too big for UDP).
type Upstream interface {
	Exchange(ctx context.Context, query []byte, tcp bool) ([]byte, error)
}

// Servers are DNS servers, tried in order until one answers.
type Servers struct {
	Addrs []netip.AddrPort
	// Dial opens upstream sockets ("udp" or "tcp"): the uplink's dialer (nil: kernel sockets).
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// MaxMessage is the largest DNS message handled (the TCP transport's limit).
const MaxMessage = 65535

// Counters are the resolver's totals.
type Counters struct{ Forwarded, Denied, Rebinding, Failed, Malformed, Busy int64 }

// Resolver answers guest queries.
type Resolver struct {
	opts Options
	eg   *egress.Service
	sem  chan struct{}
	c    counters
}

// New returns a resolver deciding with eg.
func New(eg *egress.Service, o Options) *Resolver {
	if o.Timeout <= 0 {
		o.Timeout = DefaultOptions.Timeout
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultOptions.MaxInFlight
	}
	return &Resolver{opts: o, eg: eg, sem: make(chan struct{}, o.MaxInFlight)}
}

// Counters returns a snapshot of the totals.
func (r *Resolver) Counters() Counters { return r.c.snapshot() }

// ErrMalformed is returned for a message that cannot be answered at all (no readable header).
var ErrMalformed = errors.New("resolver: malformed query")

// Answer returns the response to one query message from src over proto ("udp" or "tcp").
func (r *Resolver) Answer(ctx context.Context, src netip.AddrPort, query []byte, proto policy.Protocol) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		r.c.malformed.Add(1)
		return nil, ErrMalformed
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 || h.OpCode != 0 {
		r.c.malformed.Add(1)
		return reply(h, qs, dnsmessage.RCodeFormatError)
	}
	q := qs[0]
	name := q.Name.String()
	d := r.eg.Query(src, name, typeName(q.Type), proto, 53)
	if d.Action != policy.Allow {
		r.c.denied.Add(1)
		return reply(h, qs, dnsmessage.RCodeNameError)
	}
	select {
	case r.sem <- struct{}{}:
		defer func() { <-r.sem }()
	default:
		r.c.busy.Add(1)
		return reply(h, qs, dnsmessage.RCodeServerFailure)
	}
	up, err := upstreamQuery(h, q, &p)
	if err != nil {
		r.c.malformed.Add(1)
		return reply(h, qs, dnsmessage.RCodeFormatError)
	}
	resp, err := r.forward(ctx, up, proto)
	if err != nil {
		r.c.failed.Add(1)
		return reply(h, qs, dnsmessage.RCodeServerFailure)
	}
	r.c.forwarded.Add(1)
	return r.inspect(h, qs, resp)
}

// upstreamQuery is what goes upstream for an allowed query: a message built anew from its
// header flags and its one question, and of its additional records only EDNS's UDP size and
// DO bit. Nothing else the guest put in its query (answer, authority or additional records,
// EDNS options) leaves the guest, so no name the policy did not decide can ride along. p has
// read the questions; the additional records are read from it.
func upstreamQuery(h dnsmessage.Header, q dnsmessage.Question, p *dnsmessage.Parser) ([]byte, error) {
	var edns *dnsmessage.ResourceHeader
	if err := p.SkipAllAnswers(); err != nil {
		return nil, err
	}
	if err := p.SkipAllAuthorities(); err != nil {
		return nil, err
	}
	for {
		rh, err := p.AdditionalHeader()
		if err == dnsmessage.ErrSectionDone {
			break
		}
		if err != nil {
			return nil, err
		}
		if rh.Type == dnsmessage.TypeOPT && edns == nil {
			o := rh
			edns = &o
		}
		if err := p.SkipAdditional(); err != nil {
			return nil, err
		}
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), dnsmessage.Header{ID: h.ID, RecursionDesired: h.RecursionDesired,
		CheckingDisabled: h.CheckingDisabled, AuthenticData: h.AuthenticData})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if edns != nil {
		if err := b.StartAdditionals(); err != nil {
			return nil, err
		}
		var opt dnsmessage.ResourceHeader
		if err := opt.SetEDNS0(max(int(edns.Class), 512), dnsmessage.RCodeSuccess, edns.DNSSECAllowed()); err != nil {
			return nil, err
		}
		if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// inspect checks an upstream answer for rebinding and pins its addresses to the query name.
func (r *Resolver) inspect(h dnsmessage.Header, qs []dnsmessage.Question, resp []byte) ([]byte, error) {
	var p dnsmessage.Parser
	rh, err := p.Start(resp)
	if err != nil || rh.ID != h.ID || !rh.Response {
		r.c.failed.Add(1)
		return reply(h, qs, dnsmessage.RCodeServerFailure)
	}
	// The answer must be to the question asked (a spoofed or confused upstream reply for
	// another name must not pin addresses to this one).
	rqs, err := p.AllQuestions()
	if err != nil || len(rqs) != 1 || !sameQuestion(rqs[0], qs[0]) {
		r.c.failed.Add(1)
		return reply(h, qs, dnsmessage.RCodeServerFailure)
	}
	name := qs[0].Name.String()
	pol, ctx := r.eg.Policy(), r.eg.Context()
	type pin struct {
		a   netip.Addr
		ttl time.Duration
	}
	var pins []pin
	for {
		ah, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return reply(h, qs, dnsmessage.RCodeServerFailure)
		}
		var a netip.Addr
		switch ah.Type {
		case dnsmessage.TypeA:
			rr, err := p.AResource()
			if err != nil {
				return reply(h, qs, dnsmessage.RCodeServerFailure)
			}
			a = netip.AddrFrom4(rr.A)
		case dnsmessage.TypeAAAA:
			rr, err := p.AAAAResource()
			if err != nil {
				return reply(h, qs, dnsmessage.RCodeServerFailure)
			}
			a = netip.AddrFrom16(rr.AAAA).Unmap()
		default:
			if err := p.SkipAnswer(); err != nil {
				return reply(h, qs, dnsmessage.RCodeServerFailure)
			}
			continue
		}
		if !r.opts.AllowRebinding && policy.Classify(a, ctx) != policy.GroupPublic && !pol.AllowsPrivateAnswer(name, a, ctx) {
			r.c.rebinding.Add(1)
			return reply(h, qs, dnsmessage.RCodeNameError) // as microsandbox: the name does not exist
		}
		pins = append(pins, pin{a, time.Duration(ah.TTL) * time.Second})
	}
	for _, pn := range pins {
		r.eg.Pins().Add(name, pn.ttl, pn.a)
	}
	return resp, nil
}

// forward sends the query upstream over UDP; only an answer too big for it (TC set) is asked
// again over TCP, and only for a guest that asked over TCP (a UDP guest gets the truncated
// answer and retries over TCP itself).
func (r *Resolver) forward(ctx context.Context, query []byte, proto policy.Protocol) ([]byte, error) {
	if r.opts.Upstream == nil {
		return nil, errors.New("resolver: no upstream resolvers configured")
	}
	resp, err := r.exchange(ctx, query, false)
	if err == nil && proto == policy.TCP && truncated(resp) {
		resp, err = r.exchange(ctx, query, true)
	}
	return resp, err
}

func (r *Resolver) exchange(ctx context.Context, query []byte, tcp bool) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, r.opts.Timeout)
	defer cancel()
	return r.opts.Upstream.Exchange(ctx, query, tcp)
}

func sameQuestion(a, b dnsmessage.Question) bool {
	return a.Type == b.Type && a.Class == b.Class && strings.EqualFold(a.Name.String(), b.Name.String())
}

func truncated(msg []byte) bool { return len(msg) > 2 && msg[2]&0x02 != 0 }

// Exchange asks each server in turn until one answers.
func (s Servers) Exchange(ctx context.Context, query []byte, tcp bool) ([]byte, error) {
	if len(s.Addrs) == 0 {
		return nil, errors.New("resolver: no upstream resolvers configured")
	}
	var last error
	for _, up := range s.Addrs {
		resp, err := s.exchange(ctx, up, query, tcp)
		if err == nil {
			return resp, nil
		}
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, last
}

func (s Servers) exchange(ctx context.Context, up netip.AddrPort, query []byte, tcp bool) ([]byte, error) {
	dial := s.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	network := "udp"
	if tcp {
		network = "tcp"
	}
	c, err := dial(ctx, network, up.String())
	if err != nil {
		return nil, fmt.Errorf("resolver: upstream %s: %w", up, err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	if tcp {
		if err := WriteTCP(c, query); err != nil {
			return nil, fmt.Errorf("resolver: upstream %s: %w", up, err)
		}
		return ReadTCP(c)
	}
	if _, err := c.Write(query); err != nil {
		return nil, fmt.Errorf("resolver: upstream %s: %w", up, err)
	}
	buf := make([]byte, MaxMessage)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("resolver: upstream %s: %w", up, err)
	}
	return buf[:n], nil
}

// WriteTCP writes one message with its 2-byte length prefix (RFC 1035 4.2.2).
func WriteTCP(w io.Writer, msg []byte) error {
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}

// ReadTCP reads one length-prefixed message.
func ReadTCP(rd io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(rd, l[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(rd, msg); err != nil {
		return nil, err
	}
	return msg, nil
}

// reply builds a response with no records and the given code, echoing the question.
func reply(h dnsmessage.Header, qs []dnsmessage.Question, rc dnsmessage.RCode) ([]byte, error) {
	rh := dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true, RCode: rc}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	for _, q := range qs {
		if err := b.Question(q); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

func typeName(t dnsmessage.Type) string {
	s := t.String()
	if len(s) > 4 && s[:4] == "Type" {
		return s[4:]
	}
	return s
}

// LookupNetIP is Lookup in net.Resolver's shape (relay.Resolver): network "ip" asks for both
// families, "ip4" and "ip6" keep one.
func (r *Resolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	addrs, err := r.Lookup(ctx, host)
	if err != nil {
		return nil, err
	}
	switch network {
	case "ip4", "ip6":
		keep := addrs[:0]
		for _, a := range addrs {
			if a.Is4() == (network == "ip4") {
				keep = append(keep, a)
			}
		}
		if len(keep) == 0 {
			return nil, fmt.Errorf("resolve %s: no %s addresses", host, network)
		}
		return keep, nil
	}
	return addrs, nil
}

// Lookup resolves name for agentd itself (core.tcp destinations) through the same policy,
// rebinding check and pins as a guest query. It returns IPv4 answers before IPv6.
func (r *Resolver) Lookup(ctx context.Context, name string) ([]netip.Addr, error) {
	fq := name
	if len(fq) == 0 || fq[len(fq)-1] != '.' {
		fq += "."
	}
	qn, err := dnsmessage.NewName(fq)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", name, err)
	}
	var out []netip.Addr
	for i, t := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA} {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: uint16(0x4167 + i), RecursionDesired: true})
		b.StartQuestions()
		b.Question(dnsmessage.Question{Name: qn, Type: t, Class: dnsmessage.ClassINET})
		q, err := b.Finish()
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", name, err)
		}
		resp, err := r.Answer(ctx, netip.AddrPort{}, q, policy.UDP)
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", name, err)
		}
		var p dnsmessage.Parser
		h, err := p.Start(resp)
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", name, err)
		}
		if h.RCode == dnsmessage.RCodeNameError {
			// A *net.DNSError, as the system resolver's: core.tcp words it as getaddrinfo does.
			return nil, &net.DNSError{Err: "no such host (or denied by egress policy)", Name: name, IsNotFound: true}
		}
		p.SkipAllQuestions()
		answers, _ := p.AllAnswers()
		for _, a := range answers {
			switch rr := a.Body.(type) {
			case *dnsmessage.AResource:
				out = append(out, netip.AddrFrom4(rr.A))
			case *dnsmessage.AAAAResource:
				out = append(out, netip.AddrFrom16(rr.AAAA))
			}
		}
	}
	if len(out) == 0 {
		return nil, &net.DNSError{Err: "no addresses", Name: name, IsNotFound: true}
	}
	return out, nil
}

type counters struct {
	forwarded, denied, rebinding, failed, malformed, busy atomic.Int64
}

func (c *counters) snapshot() Counters {
	return Counters{Forwarded: c.forwarded.Load(), Denied: c.denied.Load(), Rebinding: c.rebinding.Load(),
		Failed: c.failed.Load(), Malformed: c.malformed.Load(), Busy: c.busy.Load()}
}
