package hostserver

import (
	"io"
	"sync"

	"github.com/agentd/agentd/protocol"
)

// AuditKeep is how many of the guest's latest audit records the server holds for a client
// that asks (agentctl audit).
const AuditKeep = 4096

// followerQueue bounds the batches waiting for one following client; a follower that falls
// further behind loses batches, counted in its end frame, and holds up nobody.
const followerQueue = 64

// auditLog is the host's copy of the guest's audit records (feature "audit"): a ring of the
// latest AuditKeep, an optional file that gets every record, and the clients following it.
type auditLog struct {
	w io.Writer // nil: no file

	mu        sync.Mutex
	ring      [][]byte // the latest records, oldest first
	lost      uint64   // records the guest reported it dropped
	followers map[*follower]struct{}
}

type follower struct {
	c       *relayClient
	id      uint32
	batches chan [][]byte
	dropped uint64 // batches lost because this follower was slow (guarded by auditLog.mu)
}

func newAuditLog(w io.Writer) *auditLog { return &auditLog{w: w, followers: map[*follower]struct{}{}} }

// add takes an agentd.audit.records frame from the guest (on the server's reader: it never
// waits for a client).
func (a *auditLog) add(m protocol.Message) {
	var p protocol.AuditRecords
	if protocol.Unmarshal(m.Payload, &p) != nil {
		return
	}
	if a.w != nil {
		for _, r := range p.Records {
			a.w.Write(append(r, '\n'))
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.lost = p.Dropped
	a.ring = append(a.ring, p.Records...)
	if n := len(a.ring) - AuditKeep; n > 0 {
		a.ring = append(a.ring[:0:0], a.ring[n:]...)
	}
	for f := range a.followers {
		select {
		case f.batches <- p.Records:
		default:
			f.dropped++
		}
	}
}

// follow answers a client's agentd.audit.follow on its id: the records held, then (with
// follow) every new batch until the client leaves; without follow, agentd.audit.end.
func (a *auditLog) follow(r *Server, c *relayClient, id uint32, m protocol.Message) {
	var p protocol.AuditFollow
	protocol.Unmarshal(m.Payload, &p) // a bad payload is a plain dump
	a.mu.Lock()
	held := append([][]byte(nil), a.ring...)
	lost := a.lost
	f := &follower{c: c, id: id, batches: make(chan [][]byte, followerQueue)}
	if p.Follow {
		a.followers[f] = struct{}{}
	}
	a.mu.Unlock()
	go func() {
		defer func() {
			a.mu.Lock()
			delete(a.followers, f)
			a.mu.Unlock()
		}()
		for len(held) > 0 {
			n := min(len(held), 256)
			if !r.toClient(c, id, protocol.TypeAuditRecords, protocol.AuditRecords{Records: held[:n], Dropped: lost}) {
				return
			}
			held = held[n:]
		}
		if !p.Follow {
			r.toClient(c, id, protocol.TypeAuditEnd, protocol.AuditEnd{Dropped: lost})
			return
		}
		for {
			select {
			case b := <-f.batches:
				a.mu.Lock()
				lost := a.lost + f.dropped
				a.mu.Unlock()
				if !r.toClient(c, id, protocol.TypeAuditRecords, protocol.AuditRecords{Records: b, Dropped: lost}) {
					return
				}
			case <-c.gone:
				return
			case <-r.done:
				return
			}
		}
	}()
}
