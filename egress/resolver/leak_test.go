package resolver_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/agentd/agentd/egress"
	"github.com/agentd/agentd/egress/policy"
	"github.com/agentd/agentd/egress/resolver"
)

// loggingUpstream is a DNS server on UDP and TCP (one port) that records every message it is
// sent, byte for byte, and answers NOERROR with no records (TC set over UDP for names that
// start with "big.", so the resolver retries over TCP).
type loggingUpstream struct {
	mu   sync.Mutex
	seen [][]byte
	addr netip.AddrPort
}

func (u *loggingUpstream) log(q []byte) {
	u.mu.Lock()
	u.seen = append(u.seen, append([]byte(nil), q...))
	u.mu.Unlock()
}

func (u *loggingUpstream) all() []byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	return bytes.Join(u.seen, []byte("|"))
}

func answerEmpty(q []byte, tc bool) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	qq, err := p.Question()
	if err != nil {
		return nil
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Truncated: tc && bytes.HasPrefix([]byte(qq.Name.String()), []byte("big."))})
	b.StartQuestions()
	b.Question(qq)
	out, _ := b.Finish()
	return out
}

func startLoggingUpstream(t *testing.T) *loggingUpstream {
	u := &loggingUpstream{}
	var pc *net.UDPConn
	var l net.Listener
	for i := 0; ; i++ { // one port for both transports
		var err error
		if pc, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			t.Fatal(err)
		}
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if i > 20 {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { pc.Close(); l.Close() })
	u.addr = netip.MustParseAddrPort(pc.LocalAddr().String())
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			u.log(buf[:n])
			pc.WriteToUDPAddrPort(answerEmpty(buf[:n], true), from)
		}
	}()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				q, err := resolver.ReadTCP(c)
				if err != nil {
					return
				}
				u.log(q)
				resolver.WriteTCP(c, answerEmpty(q, false))
			}()
		}
	}()
	return u
}

// TestNoNameLeaksUpstream: with a policy that decides DNS by name (no blanket DNS allow), a
// name no rule allows never reaches the upstream resolver, over UDP or TCP, for any query
// type; and what an allowed query carries besides its question (records in its other
// sections, EDNS options) does not go upstream either.
func TestNoNameLeaksUpstream(t *testing.T) {
	p, err := policy.Parse([]byte(`{"default_egress": "deny", "rules": [
		{"id": "ok", "destination": {"domain_suffix": "allowed.test"}, "protocols": ["tcp"], "ports": [{"start": 443}], "action": "allow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	up := startLoggingUpstream(t)
	r := resolver.New(egress.New(p, egress.Options{}), resolver.Options{Upstream: resolver.Servers{Addrs: []netip.AddrPort{up.addr}}, Timeout: 2 * time.Second})
	ctx := context.Background()
	types := []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypeTXT, dnsmessage.TypeMX, dnsmessage.TypeNS,
		dnsmessage.TypeCNAME, dnsmessage.TypeSOA, dnsmessage.TypePTR, dnsmessage.TypeSRV, dnsmessage.TypeALL, dnsmessage.Type(65), dnsmessage.Type(16384)}
	denied := []string{"secret1.exfil.test.", "allowed.test.exfil.test.", "xallowed.test.", "1.0.0.127.in-addr.arpa.", "exfil.test."}
	for _, proto := range []policy.Protocol{policy.UDP, policy.TCP} {
		for _, name := range denied {
			for _, typ := range types {
				resp, err := r.Answer(ctx, netip.AddrPort{}, query(t, 7, name, typ), proto)
				var ph dnsmessage.Parser
				h, perr := ph.Start(resp)
				if err != nil || perr != nil || h.RCode != dnsmessage.RCodeNameError {
					t.Fatalf("%s %v over %s: %v %v rcode %v", name, typ, proto, err, perr, h.RCode)
				}
			}
		}
	}
	if len(up.all()) != 0 {
		t.Fatalf("the upstream saw queries for names no rule allows: %q", up.all())
	}

	// An allowed question with passengers: a record naming another name in each section, and
	// an EDNS option with data.
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 9, RecursionDesired: true})
	b.EnableCompression()
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("big.www.allowed.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	passenger := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("secret2.exfil.test."), Class: dnsmessage.ClassINET, TTL: 1}
	b.StartAnswers()
	b.TXTResource(passenger, dnsmessage.TXTResource{TXT: []string{"secret-payload-1"}})
	b.StartAuthorities()
	b.TXTResource(passenger, dnsmessage.TXTResource{TXT: []string{"secret-payload-2"}})
	b.StartAdditionals()
	b.TXTResource(passenger, dnsmessage.TXTResource{TXT: []string{"secret-payload-3"}})
	var opt dnsmessage.ResourceHeader
	opt.SetEDNS0(1232, dnsmessage.RCodeSuccess, true)
	b.OPTResource(opt, dnsmessage.OPTResource{Options: []dnsmessage.Option{{Code: 65001, Data: []byte("secret-payload-4")}}})
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	for _, proto := range []policy.Protocol{policy.UDP, policy.TCP} {
		if _, err := r.Answer(ctx, netip.AddrPort{}, q, proto); err != nil {
			t.Fatal(err)
		}
	}
	seen := up.all()
	if !bytes.Contains(seen, []byte("allowed")) {
		t.Fatalf("the allowed question did not reach the upstream: %q", seen)
	}
	for _, secret := range []string{"secret", "exfil"} {
		if bytes.Contains(seen, []byte(secret)) {
			t.Fatalf("the upstream saw %q: %q", secret, seen)
		}
	}
	// The TCP retry (TC over UDP) happened: the upstream saw the question over both.
	if n := bytes.Count(seen, []byte("allowed")); n < 3 {
		t.Fatalf("upstream saw the allowed question %d times, want UDP twice and TCP once", n)
	}
}
