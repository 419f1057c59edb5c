// Package heartbeat writes the reference's heartbeat file: a JSON object the host reads to
// tell a live, idle agent from a hung one, replaced atomically every interval.
package heartbeat

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
)

// DefaultPath is where the reference writes it (the runtime share the host can read).
const DefaultPath = "/.msb/heartbeat.json"

// Counters is the agent's activity, updated with atomic adds by the loop and the writer.
type Counters struct {
	ActivitySeq     atomic.Uint64
	HostMessages    atomic.Uint64
	GuestMessages   atomic.Uint64
	ExecOutputBytes atomic.Uint64
	FsBytes         atomic.Uint64
	TCPBytes        atomic.Uint64
}

// HostMessage counts one dispatched host frame and returns the activity sequence number after
// it (the number core.touched reports and the next heartbeat shows).
func (c *Counters) HostMessage() uint64 {
	c.HostMessages.Add(1)
	return c.ActivitySeq.Add(1)
}

// GuestMessage counts one frame sent to the host.
func (c *Counters) GuestMessage() {
	c.GuestMessages.Add(1)
	c.ActivitySeq.Add(1)
}

// Gauges reports the live session counts.
type Gauges func() (exec, fs, tcp int)

// file is the JSON shape, keys in the reference's order.
type file struct {
	HeartbeatSeq       uint64         `json:"heartbeat_seq"`
	ActivitySeq        uint64         `json:"activity_seq"`
	Timestamp          string         `json:"timestamp"`
	LastActivity       string         `json:"last_activity"`
	ActiveExecSessions uint32         `json:"active_exec_sessions"`
	ActiveFsStreams    uint32         `json:"active_fs_streams"`
	ActiveTCPStreams   uint32         `json:"active_tcp_streams"`
	ActivityCounters   activityCounts `json:"activity_counters"`
}

type activityCounts struct {
	HostMessages    uint64 `json:"host_messages"`
	GuestMessages   uint64 `json:"guest_messages"`
	ExecOutputBytes uint64 `json:"exec_output_bytes"`
	FsBytes         uint64 `json:"fs_bytes"`
	TCPBytes        uint64 `json:"tcp_bytes"`
}

// Timestamp formats t as RFC 3339 UTC with 0, 3, 6 or 9 fraction digits, as few as represent
// it exactly (chrono's AutoSi, which the reference uses).
func Timestamp(t time.Time) string {
	t = t.UTC()
	ns := t.Nanosecond()
	base := t.Format("2006-01-02T15:04:05")
	switch {
	case ns == 0:
		return base + "Z"
	case ns%1_000_000 == 0:
		return fmt.Sprintf("%s.%03dZ", base, ns/1_000_000)
	case ns%1_000 == 0:
		return fmt.Sprintf("%s.%06dZ", base, ns/1_000)
	}
	return fmt.Sprintf("%s.%09dZ", base, ns)
}

// Run writes the file at path every interval until ctx ends, starting at once. A write is
// skipped while the directory does not exist; write errors are ignored (as by the reference).
func Run(ctx context.Context, path string, interval time.Duration, c *Counters, gauges Gauges) {
	tmp := filepath.Join(filepath.Dir(path), "heartbeat.tmp")
	start := time.Now()
	lastSeq, lastActivity := c.ActivitySeq.Load(), start
	t := time.NewTicker(interval)
	defer t.Stop()
	for seq := uint64(1); ; seq++ {
		now := time.Now()
		if s := c.ActivitySeq.Load(); s != lastSeq {
			lastSeq, lastActivity = s, now
		}
		if st, err := os.Stat(filepath.Dir(path)); err == nil && st.IsDir() {
			e, f, tc := gauges()
			b, _ := json.Marshal(file{
				HeartbeatSeq: seq, ActivitySeq: lastSeq, Timestamp: Timestamp(now), LastActivity: Timestamp(lastActivity),
				ActiveExecSessions: uint32(e), ActiveFsStreams: uint32(f), ActiveTCPStreams: uint32(tc),
				ActivityCounters: activityCounts{c.HostMessages.Load(), c.GuestMessages.Load(),
					c.ExecOutputBytes.Load(), c.FsBytes.Load(), c.TCPBytes.Load()},
			})
			if os.WriteFile(tmp, b, 0o644) == nil {
				os.Rename(tmp, path)
			}
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}
