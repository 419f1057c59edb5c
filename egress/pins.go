package egress

import (
	"github.com/agentd/agentd/egress/policy"

	"net/netip"
	"sync"
	"time"
)

// MinPinTTL is the shortest life a pin gets, whatever the answer's TTL (microsandbox uses 1 s;
// a little more keeps a client that connects right after a TTL-0 answer working).
const MinPinTTL = 5 * time.Second

// Pins maps addresses to the names the guest resolved them from, each until its answer's TTL
// runs out. Domain rules see an address through these names: an address nobody resolved for
// an allowed name matches no domain rule.
type Pins struct {
	mu    sync.Mutex
	max   int
	n     int
	byIP  map[netip.Addr]map[string]time.Time
	now   func() time.Time
	Drops int64 // pins not stored because the table was full of live entries
}

// NewPins returns a table of at most max name->address entries.
func NewPins(max int) *Pins {
	return &Pins{max: max, byIP: map[netip.Addr]map[string]time.Time{}, now: time.Now}
}

// Add pins name to each address for ttl (at least MinPinTTL).
func (p *Pins) Add(name string, ttl time.Duration, addrs ...netip.Addr) {
	name = policy.CanonicalName(name)
	exp := p.now().Add(max(ttl, MinPinTTL))
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range addrs {
		a = a.Unmap()
		names := p.byIP[a]
		if _, ok := names[name]; !ok {
			if p.n >= p.max {
				p.sweepLocked()
			}
			if p.n >= p.max {
				p.Drops++
				continue
			}
			if names == nil {
				names = map[string]time.Time{}
				p.byIP[a] = names
			}
			p.n++
		}
		if exp.After(names[name]) {
			names[name] = exp
		}
	}
}

func (p *Pins) sweepLocked() {
	now := p.now()
	for a, names := range p.byIP {
		for n, exp := range names {
			if now.After(exp) {
				delete(names, n)
				p.n--
			}
		}
		if len(names) == 0 {
			delete(p.byIP, a)
		}
	}
}

// Names returns the live names pinned to a.
func (p *Pins) Names(a netip.Addr) []string {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for n, exp := range p.byIP[a.Unmap()] {
		if !now.After(exp) {
			out = append(out, n)
		}
	}
	return out
}

// Has reports whether name is pinned to a right now.
func (p *Pins) Has(a netip.Addr, name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	exp, ok := p.byIP[a.Unmap()][policy.CanonicalName(name)]
	return ok && !p.now().After(exp)
}

// Len is the number of entries held (live or not yet swept).
func (p *Pins) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}
