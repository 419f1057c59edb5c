package egress

import (
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Record is one audit line. Decisions carry the verdict and the rule; "close" and "revoked"
// records also carry the bytes each way and the duration.
type Record struct {
	Time       time.Time `json:"time"`
	Event      string    `json:"event"` // decision, sni, dns, revoked, close
	Protocol   string    `json:"proto"`
	Direction  string    `json:"direction,omitempty"` // ingress (a host connection into the guest); omitted for egress
	Via        string    `json:"via,omitempty"`       // core.tcp or host: a flow agentd (or the host) opened, not the guest
	Peer       string    `json:"peer,omitempty"`      // ingress: the address the connection comes from
	Src        string    `json:"src,omitempty"`
	Dst        string    `json:"dst,omitempty"`
	Name       string    `json:"name,omitempty"`
	QType      string    `json:"qtype,omitempty"`
	SNI        string    `json:"sni,omitempty"`
	Rule       string    `json:"rule"`
	Verdict    string    `json:"verdict"`
	Reason     string    `json:"reason,omitempty"`
	BytesUp    *int64    `json:"bytes_up,omitempty"`
	BytesDown  *int64    `json:"bytes_down,omitempty"`
	DurationMs *float64  `json:"duration_ms,omitempty"`
}

// AuditQueue is how many records may wait for a slow sink; beyond it records are counted as
// dropped rather than holding up the packet path.
const AuditQueue = 4096

// Audit writes records as JSON lines from one goroutine, so the data path never waits on the
// sink. A nil *Audit records nothing.
type Audit struct {
	ch      chan Record
	done    chan struct{}
	w       io.Writer
	log     *slog.Logger
	mu      sync.RWMutex // held shared while sending, so Close never closes under a sender
	closed  bool
	Dropped atomic.Int64
	Written atomic.Int64
}

// NewAudit starts writing to w.
func NewAudit(w io.Writer, log *slog.Logger) *Audit {
	a := &Audit{ch: make(chan Record, AuditQueue), done: make(chan struct{}), w: w, log: log}
	go a.run()
	return a
}

func (a *Audit) run() {
	defer close(a.done)
	enc := json.NewEncoder(a.w)
	failed := false
	for r := range a.ch {
		if err := enc.Encode(r); err != nil {
			if !failed {
				a.log.Error("audit log write failed; records are being lost", "error", err)
				failed = true
			}
			a.Dropped.Add(1)
			continue
		}
		a.Written.Add(1)
	}
}

func (a *Audit) record(r Record) {
	if a == nil {
		return
	}
	r.Time = time.Now().UTC()
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.closed {
		a.Dropped.Add(1)
		return
	}
	select {
	case a.ch <- r:
	default:
		a.Dropped.Add(1)
	}
}

// Close writes out the queued records and stops; later records are counted as dropped.
func (a *Audit) Close() {
	if a == nil {
		return
	}
	a.mu.Lock()
	if !a.closed {
		a.closed = true
		close(a.ch)
	}
	a.mu.Unlock()
	<-a.done
}
