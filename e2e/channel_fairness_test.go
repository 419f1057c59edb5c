package e2e

import (
	"context"
	"encoding/json"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

// TestChannelFairness: over a pty channel (as slow as a virtio port), 8 bulk downloads
// (iperf3 -R -P 8) and an interactive echo share the channel as guest-initiated streams. The
// echo's p99 round trip stays under 50 ms more than its p99 on the idle channel, measured first
// in the same run (the shared machine's own scheduling noise shows in both), and every bulk
// stream gets at least half its fair share.
func TestChannelFairness(t *testing.T) {
	tp := nettest.New(t)
	nettest.Hosts(t)
	agentLog := &testutil.Buffer{}
	tp.ChannelAgent(t, filepath.Join(binDir, "agentd"), agentLog)
	echo := testutil.ServeOn(t, nettest.Good.String(), testutil.Echo).Addr.String()
	nettest.Iperf3Server(t, nettest.Good, 5212, true)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := tp.Guest.DialContext(ctx, "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg, buf := make([]byte, 100), make([]byte, 100)
	roundTrip := func() time.Duration {
		start := time.Now()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	var idle []time.Duration
	for i := 0; i < 100; i++ {
		idle = append(idle, roundTrip())
		time.Sleep(5 * time.Millisecond)
	}
	sort.Slice(idle, func(i, j int) bool { return idle[i] < idle[j] })
	idleP99 := testutil.Percentile(idle, 99)

	bulk := tp.Cmd("iperf3", "-c", nettest.Good.String(), "-p", "5212", "-R", "-P", "8", "-t", "4", "-J")
	var bulkOut strings.Builder
	bulk.Stdout = &bulkOut
	if err := bulk.Start(); err != nil {
		t.Fatal(err)
	}
	bulkDone := make(chan error, 1)
	go func() { bulkDone <- bulk.Wait() }()

	time.Sleep(500 * time.Millisecond) // let the bulk streams ramp up first (no event marks it)
	var rtts []time.Duration
	for {
		select {
		case err := <-bulkDone:
			if err != nil {
				t.Fatalf("iperf3: %v\n%s", err, tail(bulkOut.String(), 2000))
			}
			goto measured
		default:
		}
		rtts = append(rtts, roundTrip())
		time.Sleep(5 * time.Millisecond)
	}
measured:
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	p50, p99 := testutil.Percentile(rtts, 50), testutil.Percentile(rtts, 99)
	var res struct {
		End struct {
			Streams []struct {
				Receiver struct {
					Bytes         int64   `json:"bytes"`
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"receiver"`
			} `json:"streams"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(bulkOut.String()), &res); err != nil || len(res.End.Streams) != 8 {
		t.Fatalf("iperf3 output (%v):\n%s", err, tail(bulkOut.String(), 2000))
	}
	var total int64
	for _, s := range res.End.Streams {
		total += s.Receiver.Bytes
	}
	fair := float64(total) / 8
	worst := 1e9
	for _, s := range res.End.Streams {
		worst = min(worst, float64(s.Receiver.Bytes)/fair)
	}
	t.Logf("8 bulk downloads over the pty channel: %.0f MB in all; the smallest stream got %.2f of its fair share", float64(total)/1e6, worst)
	t.Logf("echo during the downloads: %d round trips, p50 %v, p99 %v (idle p99 %v)", len(rtts), p50.Round(time.Microsecond),
		p99.Round(time.Microsecond), idleP99.Round(time.Microsecond))
	if len(rtts) < 20 {
		t.Fatalf("only %d echo round trips", len(rtts))
	}
	if p99 > idleP99+50*time.Millisecond {
		t.Errorf("echo p99 %v, want < 50 ms above the idle channel's %v", p99, idleP99)
	}
	if worst < 0.5 {
		t.Errorf("a bulk stream got %.2f of its fair share, want >= 0.5", worst)
	}
	if t.Failed() {
		t.Logf("agentd:\n%s", tail(agentLog.String(), 2000))
	}
}
