package bench

import (
	"flag"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/creack/pty"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/nettest"
	"github.com/agentd/agentd/internal/testutil"
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
	bin := filepath.Join(t.TempDir(), "agentd")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/agentd").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	tp := nettest.New(t)
	nettest.Hosts(t)
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer slave.Close()
	hostEnd, err := channel.Pollable(master)
	if err != nil {
		t.Fatal(err)
	}
	cmd := tp.Cmd(bin, "--standalone", "--port", slave.Name(), "--egress", "channel", "--egress-tun", "agtun"+tp.ID, "--log-level", "warn")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	r, err := host.NewRelay(hostEnd, host.RelayOptions{Log: quiet, Streams: &host.StreamOptions{Log: quiet}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	srv := exec.Command("iperf3", "-s", "-B", nettest.Good.String(), "-p", "5213")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	testutil.WaitFor(t, func() bool { return exec.Command("sh", "-c", "ss -ltn | grep -q '198.18.0.10:5213'").Run() == nil }, "iperf3 to listen")

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
