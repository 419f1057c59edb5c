package bench

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"testing"

	"github.com/agentd/agentd/internal/testkit/nettest"
)

var streamsReport = flag.Bool("streams", false, "run the guest-initiated streams benchmark and print its report")

// TestStreamsReport: a guest namespace with no interface but agentd's tun, agentd in
// --egress channel mode on a pty (a channel as slow as a virtio port), the host relay dialing
// out. iperf3 single stream through the extension each way, against the raw pty measured in
// the same run:
//
//	go test ./bench -run TestStreamsReport -v -args -streams
func TestStreamsReport(t *testing.T) {
	if !*streamsReport {
		t.Skip("run with -args -streams (make bench-streams)")
	}
	bin := buildAgentd(t, t.TempDir(), false)
	tp := nettest.New(t)
	nettest.Hosts(t)
	tp.ChannelAgent(t, bin, os.Stderr)
	nettest.Iperf3Server(t, nettest.Good, 5213, false)

	fmt.Printf("guest-initiated streams over a pty channel: iperf3 %d s per run, one stream\n\n", *iperfSecs)
	fmt.Printf("%-40s %10s %10s %8s\n", "direction", "raw pty", "streams", "ratio")
	for _, run := range []struct {
		name    string
		args    []string
		toSlave bool
	}{
		{"guest -> host (upload)", nil, false},
		{"host -> guest (download, -R)", []string{"-R"}, true},
	} {
		raw := rawPTY(t, 256<<20, run.toSlave) // MB/s
		got, _ := iperf(t, tp.Cmd(append([]string{"iperf3", "-c", nettest.Good.String(), "-p", "5213", "-J", "-t", strconv.Itoa(*iperfSecs)}, run.args...)...))
		mb := got / 8 / 1e6
		fmt.Printf("%-40s %7.0f MB/s %7.0f MB/s %8.2f\n", run.name, raw, mb, mb/raw)
	}
	fmt.Printf("\ntarget: guest -> host >= 0.7 of the raw channel\n")
}
