package egress

import (
	"bytes"
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
// sinks: a file (optional) and the host (once attached, see Host). A nil *Audit records
// nothing.
type Audit struct {
	ch     chan Record
	done   chan struct{}
	w      io.Writer
	log    *slog.Logger
	mu     sync.RWMutex // held shared while sending, so Close never closes under a sender
	closed bool
	host   atomic.Pointer[chan []byte]
	// Dropped counts records lost before any sink (the queue was full, or closed); Written
	// those the file got; HostDropped those the host did not take in time.
	Dropped, Written, HostDropped atomic.Int64
}

// NewAudit starts writing to w (nil: no file; records then go only to the host).
func NewAudit(w io.Writer, log *slog.Logger) *Audit {
	a := &Audit{ch: make(chan Record, AuditQueue), done: make(chan struct{}), w: w, log: log}
	go a.run()
	return a
}

// Host starts sending every later record to the host too, as JSON lines on the returned
// channel (bounded: AuditQueue lines). Whoever drains it sends them on; when it falls behind,
// lines are dropped and counted in HostDropped, never waited for. Calling Host again returns
// the same channel.
func (a *Audit) Host() <-chan []byte {
	ch := make(chan []byte, AuditQueue)
	if a.host.CompareAndSwap(nil, &ch) {
		return ch
	}
	return *a.host.Load()
}

func (a *Audit) run() {
	defer close(a.done)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	failed := false
	for r := range a.ch {
		buf.Reset()
		enc.Encode(r) // a Record always encodes
		if a.w != nil {
			if _, err := a.w.Write(buf.Bytes()); err != nil {
				if !failed {
					a.log.Error("audit log write failed; records are being lost", "error", err)
					failed = true
				}
				a.Dropped.Add(1)
			} else {
				a.Written.Add(1)
			}
		}
		if h := a.host.Load(); h != nil {
			line := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
			select {
			case *h <- append([]byte(nil), line...):
			default:
				a.HostDropped.Add(1)
			}
		}
	}
	if h := a.host.Load(); h != nil {
		close(*h)
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

// Lost is how many records did not reach the host: dropped before any sink, or not taken by
// the host in time.
func (a *Audit) Lost() int64 { return a.Dropped.Load() + a.HostDropped.Load() }

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
