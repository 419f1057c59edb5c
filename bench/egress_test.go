package bench

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

var (
	egressReport = flag.Bool("egress", false, "run the egress (netstack) benchmark and print its report")
	iperfSecs    = flag.Int("iperf-seconds", 5, "seconds per iperf3 run")
	idleConns    = flag.Int("idle-conns", 1000, "idle connections held open for the memory measurement")
)

// TestEgressReport: guest -> tun -> agentd's netstack -> kernel socket -> server, against the
// same iperf3 over kernel loopback in the same namespace setup, in one run:
//
//	go test ./bench -run TestEgressReport -v -args -egress
func TestEgressReport(t *testing.T) {
	if !*egressReport {
		t.Skip("run with -args -egress (make bench-egress)")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Fatal("iperf3 is needed")
	}
	bin := buildAgentd(t, t.TempDir(), false)
	tp := nettest.New(t)
	nettest.Hosts(t)
	pol := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(pol, []byte(`{"default_egress":"deny","rules":[{"destination":{"cidr":"198.18.0.10/32"},"protocols":["tcp"],"action":"allow"}]}`), 0o644)
	_, cmd := startBinaryCmd(t, bin, 0, "--egress", "netstack", "--egress-guest-netns", "/var/run/netns/"+tp.Name,
		"--egress-policy", pol, "--egress-tun", "agtun"+tp.ID)
	pid := cmd.Process.Pid
	nettest.Iperf3Server(t, nettest.Good, 5201, false)

	fmt.Printf("agentd egress benchmark: iperf3 %d s per run; guest namespace -> tun (MTU 65520) -> netstack -> kernel socket -> iperf3 server\n\n", *iperfSecs)
	fmt.Printf("%-34s %10s %10s %8s %12s\n", "run", "loopback", "netstack", "ratio", "agentd CPU-s/GB")
	for _, run := range []struct {
		name string
		args []string
	}{
		{"1 stream, guest -> server", nil},
		{"1 stream, server -> guest (-R)", []string{"-R"}},
		{"4 streams, guest -> server", []string{"-P", "4"}},
		{"4 streams, server -> guest (-R)", []string{"-P", "4", "-R"}},
	} {
		base, _ := iperf(t, exec.Command("iperf3", append([]string{"-c", nettest.Good.String(), "-J", "-t", strconv.Itoa(*iperfSecs)}, run.args...)...))
		cpu0 := cpuSeconds(t, pid)
		got, bytes := iperf(t, tp.Cmd(append([]string{"iperf3", "-c", nettest.Good.String(), "-J", "-t", strconv.Itoa(*iperfSecs)}, run.args...)...))
		cpu := cpuSeconds(t, pid) - cpu0
		fmt.Printf("%-34s %8.2f Gb %8.2f Gb %8.2f %12.2f\n", run.name, base/1e9, got/1e9, got/base, cpu/(float64(bytes)/1e9))
	}

	// Connections per second through the forwarder with the policy, against the same client
	// connecting over loopback.
	echo := testutil.ServeOn(t, nettest.Good.String(), testutil.Echo).Addr.String()
	const nConns, par = 2000, 8
	kernel := connRate(t, nConns, par, func(ctx context.Context) (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, "tcp", echo) })
	through := connRate(t, nConns, par, func(ctx context.Context) (net.Conn, error) { return tp.Guest.DialContext(ctx, "tcp", echo) })
	fmt.Printf("\nconnections/s (connect, 1-byte echo, close; %d connections, %d at a time): loopback %.0f, through agentd %.0f (ratio %.2f)\n",
		nConns, par, kernel, through, through/kernel)

	// Memory: agentd's RSS with idle relayed connections open.
	time.Sleep(2 * time.Second) // let the closed connections' endpoints go (TIME_WAIT is gVisor's)
	before := testutil.RSS(t, pid)
	conns := make([]net.Conn, 0, *idleConns)
	for i := 0; i < *idleConns; i++ {
		c, err := tp.Guest.DialContext(context.Background(), "tcp", echo)
		if err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
		c.Write([]byte("x"))
		c.Read(make([]byte, 1))
		conns = append(conns, c)
	}
	time.Sleep(time.Second)
	after := testutil.RSS(t, pid)
	for _, c := range conns {
		c.Close()
	}
	fmt.Printf("agentd RSS: %.1f MiB before, %.1f MiB with %d idle relayed connections: %.1f KiB per connection\n",
		float64(before)/(1<<20), float64(after)/(1<<20), *idleConns, float64(after-before)/float64(*idleConns)/1024)
	fmt.Printf("\ntargets: single stream >= 0.4 of loopback each way; <= 64 KiB of agent memory per idle connection\n")
}

// iperf runs an iperf3 client with -J and returns the received bits/s and bytes.
func iperf(t *testing.T, cmd *exec.Cmd) (float64, int64) {
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Bytes         int64   `json:"bytes"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("iperf3 output: %v", err)
	}
	return r.End.SumReceived.BitsPerSecond, r.End.SumReceived.Bytes
}

// cpuSeconds is a process's user+system CPU time.
func cpuSeconds(t *testing.T, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func connRate(t *testing.T, n, par int, dial func(context.Context) (net.Conn, error)) float64 {
	var wg sync.WaitGroup
	work := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		work <- struct{}{}
	}
	close(work)
	errs := make(chan error, par)
	start := time.Now()
	for i := 0; i < par; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1)
			for range work {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := dial(ctx)
				cancel()
				if err != nil {
					errs <- err
					return
				}
				c.Write(buf)
				if _, err := c.Read(buf); err != nil {
					errs <- err
					c.Close()
					return
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return float64(n) / time.Since(start).Seconds()
}
