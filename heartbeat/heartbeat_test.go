package heartbeat

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestTimestamp(t *testing.T) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := map[int]string{
		0:           "2026-01-01T00:00:00Z",
		123_000_000: "2026-01-01T00:00:00.123Z",
		123_456_000: "2026-01-01T00:00:00.123456Z",
		123_456_789: "2026-01-01T00:00:00.123456789Z",
		1:           "2026-01-01T00:00:00.000000001Z",
	}
	for ns, want := range cases {
		if got := Timestamp(base.Add(time.Duration(ns))); got != want {
			t.Errorf("%d ns: %s, want %s", ns, got, want)
		}
	}
}

// TestFile: the file appears at once with the reference's keys in order, and is replaced with
// increasing sequence numbers and the live counters.
func TestFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "heartbeat.json")
	var c Counters
	c.HostMessage()
	c.GuestMessage()
	c.TCPBytes.Add(7)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Run(ctx, path, 5*time.Millisecond, &c, func() (int, int, int) { return 1, 2, 3 }); close(done) }()
	var seqs []uint64
	deadline := time.Now().Add(10 * time.Second)
	for len(seqs) < 3 && time.Now().Before(deadline) {
		b, err := os.ReadFile(path)
		if err != nil {
			time.Sleep(time.Millisecond) // the writer owns the file; poll it
			continue
		}
		keys := []string{"heartbeat_seq", "activity_seq", "timestamp", "last_activity", "active_exec_sessions",
			"active_fs_streams", "active_tcp_streams", "activity_counters", "host_messages", "guest_messages",
			"exec_output_bytes", "fs_bytes", "tcp_bytes"}
		last := -1
		for _, k := range keys {
			i := strings.Index(string(b), `"`+k+`"`)
			if i <= last {
				t.Fatalf("key %s missing or out of order in %s", k, b)
			}
			last = i
		}
		var f file
		if err := json.Unmarshal(b, &f); err != nil {
			t.Fatal(err)
		}
		if f.ActivitySeq != 2 || f.ActiveExecSessions != 1 || f.ActiveFsStreams != 2 || f.ActiveTCPStreams != 3 || f.ActivityCounters.TCPBytes != 7 {
			t.Fatalf("content %s", b)
		}
		if len(seqs) == 0 || seqs[len(seqs)-1] != f.HeartbeatSeq {
			seqs = append(seqs, f.HeartbeatSeq)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	if len(seqs) < 3 || seqs[0] > seqs[1] || seqs[1] > seqs[2] {
		t.Fatalf("sequence %v", seqs)
	}
	if _, err := os.Stat(filepath.Join(dir, "heartbeat.tmp")); err == nil {
		t.Fatal("temporary file left behind")
	}
}

func TestSkippedWithoutDir(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent", "heartbeat.json")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	Run(ctx, path, 5*time.Millisecond, &Counters{}, func() (int, int, int) { return 0, 0, 0 })
	if _, err := os.Stat(path); err == nil {
		t.Fatal("wrote into a missing directory")
	}
}
