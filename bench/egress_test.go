package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/nettest"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

var (
	egressReport  = flag.Bool("egress", false, "run the egress (netstack) benchmark and print its report")
	iperfSecs     = flag.Int("iperf-seconds", 4, "seconds per iperf3 run")
	idleConns     = flag.Int("idle-conns", 1000, "idle connections held open for the per-connection memory measurement")
	rateConns     = flag.Int("rate-conns", 2000, "connections per connection-rate measurement")
	ratePar       = flag.Int("rate-par", 8, "connections at a time in the connection-rate measurement")
	egressSystems = flag.String("systems", "", "comma-separated subset of the systems to measure (default: all)")
	egressProfile = flag.String("egress-profile", "", "write each agentd's CPU profile into this directory")
	egressParts   = flag.String("parts", "throughput,rate,idle", "which measurements to run")
)

// relayMain is the plain copy relay (AGENTD_BENCH_RELAY="LISTEN>DEST,..."): per accepted
// connection it dials DEST and copies both ways with io.Copy, which splices between the two
// kernel sockets (no user-space copy), passing each FIN on. With AGENTD_BENCH_RELAY_COPY set
// it copies through a 256 KiB user-space buffer instead (what a relay that must see the bytes
// does). It prints "ready" once listening.
func relayMain(spec string) {
	copyFn := func(dst, src net.Conn) { io.Copy(dst, src) }
	if os.Getenv("AGENTD_BENCH_RELAY_COPY") != "" {
		copyFn = func(dst, src net.Conn) {
			io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 256<<10))
		}
	}
	for _, pair := range strings.Split(spec, ",") {
		listen, dst, _ := strings.Cut(pair, ">")
		l, err := net.Listen("tcp", listen)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					os.Exit(1)
				}
				go func() {
					defer c.Close()
					d, err := net.Dial("tcp", dst)
					if err != nil {
						return
					}
					defer d.Close()
					done := make(chan struct{})
					go func() {
						copyFn(d, c)
						d.(*net.TCPConn).CloseWrite()
						close(done)
					}()
					copyFn(c, d)
					c.(*net.TCPConn).CloseWrite()
					<-done
				}()
			}
		}()
	}
	fmt.Println("ready")
	select {}
}

// egressSystem is one way from a client to the servers.
type egressSystem struct {
	name  string
	proxy int // the proxy's pid (agentd or the relay), 0 for none
	// iperf runs an iperf3 client against the iperf3 server with extra arguments.
	iperf func(args ...string) *exec.Cmd
	// dial connects to the echo server through this system (the connection-rate client).
	dial func(ctx context.Context) (net.Conn, error)
	// netstack: the endpoint is a netstack (the ratios and targets apply).
	netstack bool

	up, down, up4, down4 []float64 // Gbit/s per round
	cpuUp, cpuDown       []float64 // proxy CPU-s per GB
	rate                 []float64 // connections/s
	cpuConn              []float64 // proxy CPU-µs per connection
	rssStart, rssPeak    int64
	rssAfter             int64
}

// TestEgressReport measures, in one run with the systems alternating, iperf3 and a connection
// rate through: kernel loopback, plain veth routing from a namespace, a plain copy relay
// (io.Copy, splice) reached over that veth and the same relay copying in user space, and
// agentd's netstack on the offload and the plain tun endpoints at guest MTU 1500 and 65520;
// then memory per idle connection on fresh processes. Ratios (and the targets) are against the
// splicing copy relay measured in the same rounds.
//
//	go test ./bench -run TestEgressReport -v -args -egress
func TestEgressReport(t *testing.T) {
	if !*egressReport {
		t.Skip("run with -args -egress (make bench-egress)")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Fatal("iperf3 is needed")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (namespaces, veth, tun)")
	}
	bin := buildAgentd(t, t.TempDir(), false)
	nettest.Hosts(t)
	nettest.Iperf3Server(t, nettest.Good, 5201, false)
	iperfDst := nettest.Good.String()
	load0, _ := os.ReadFile("/proc/loadavg")

	// Each system gets its own echo server, so that TIME_WAIT ports of one never slow another.
	echoAt := func() string { return testutil.ServeOn(t, nettest.Good.String(), testutil.Echo).Addr.String() }

	var systems []*egressSystem
	want := func(name string) bool {
		return *egressSystems == "" || slices.Contains(strings.Split(*egressSystems, ","), name)
	}
	if want("loopback") {
		echo := echoAt()
		systems = append(systems, &egressSystem{name: "loopback",
			iperf: func(a ...string) *exec.Cmd { return exec.Command("iperf3", append([]string{"-c", iperfDst}, a...)...) },
			dial:  func(ctx context.Context) (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, "tcp", echo) }})
	}
	vt, gw := vethNamespace(t)
	if want("veth") {
		echo := echoAt()
		systems = append(systems, &egressSystem{name: "veth",
			iperf: func(a ...string) *exec.Cmd { return vt.Cmd(append([]string{"iperf3", "-c", iperfDst}, a...)...) },
			dial:  func(ctx context.Context) (net.Conn, error) { return vt.Guest.DialContext(ctx, "tcp", echo) }})
	}
	for _, name := range []string{"relay", "relay-copy"} {
		if !want(name) {
			continue
		}
		pid, iperfAt, echoVia := startRelay(t, gw, nettest.Good.String()+":5201", echoAt(), name == "relay-copy")
		host, port, _ := net.SplitHostPort(iperfAt)
		systems = append(systems, &egressSystem{name: name, proxy: pid,
			iperf: func(a ...string) *exec.Cmd {
				return vt.Cmd(append([]string{"iperf3", "-c", host, "-p", port}, a...)...)
			},
			dial: func(ctx context.Context) (net.Conn, error) { return vt.Guest.DialContext(ctx, "tcp", echoVia) }})
	}
	for _, c := range []struct {
		link string
		mtu  int
	}{{"offload", 1500}, {"offload", 65520}, {"plain", 1500}, {"plain", 65520}} {
		name := fmt.Sprintf("%s-%d", c.link, c.mtu)
		if !want(name) {
			continue
		}
		tp, pid := startNetstack(t, bin, c.link, c.mtu, name)
		echo := echoAt()
		systems = append(systems, &egressSystem{name: name, proxy: pid, netstack: true,
			iperf: func(a ...string) *exec.Cmd { return tp.Cmd(append([]string{"iperf3", "-c", iperfDst}, a...)...) },
			dial:  func(ctx context.Context) (net.Conn, error) { return tp.Guest.DialContext(ctx, "tcp", echo) }})
	}
	time.Sleep(time.Second) // let start-up settle before the idle RSS
	for _, s := range systems {
		if s.proxy != 0 {
			s.rssStart = testutil.RSS(t, s.proxy)
		}
	}

	fmt.Printf("agentd egress benchmark: %d alternating rounds, iperf3 %d s per run, %d connections per rate run (%d at a time)\n",
		*rounds, *iperfSecs, *rateConns, *ratePar)
	fmt.Printf("load average at start: %s", load0)
	runs := []struct {
		args []string
		res  func(*egressSystem) *[]float64
		cpu  func(*egressSystem) *[]float64
	}{
		{nil, func(s *egressSystem) *[]float64 { return &s.up }, func(s *egressSystem) *[]float64 { return &s.cpuUp }},
		{[]string{"-R"}, func(s *egressSystem) *[]float64 { return &s.down }, func(s *egressSystem) *[]float64 { return &s.cpuDown }},
		{[]string{"-P", "4"}, func(s *egressSystem) *[]float64 { return &s.up4 }, nil},
		{[]string{"-P", "4", "-R"}, func(s *egressSystem) *[]float64 { return &s.down4 }, nil},
	}
	part := func(p string) bool { return slices.Contains(strings.Split(*egressParts, ","), p) }
	for r := 0; r < *rounds && part("throughput"); r++ {
		for _, run := range runs {
			for i := range systems {
				s := systems[(i+r)%len(systems)] // each round starts with another system
				var cpu0 float64
				if s.proxy != 0 {
					cpu0 = cpuSeconds(t, s.proxy)
				}
				bps, bytes := iperf(t, s.iperf(append([]string{"-J", "-t", strconv.Itoa(*iperfSecs)}, run.args...)...))
				*run.res(s) = append(*run.res(s), bps/1e9)
				if s.proxy != 0 && run.cpu != nil {
					*run.cpu(s) = append(*run.cpu(s), (cpuSeconds(t, s.proxy)-cpu0)/(float64(bytes)/1e9))
				}
			}
		}
	}
	for _, s := range systems {
		if s.proxy != 0 {
			s.rssPeak = peakRSS(t, s.proxy)
		}
	}
	if part("throughput") {
		time.Sleep(10 * time.Second) // memory that comes back does so within seconds
	}
	for _, s := range systems {
		if s.proxy != 0 {
			s.rssAfter = testutil.RSS(t, s.proxy)
		}
	}
	for r := 0; r < *rounds && part("rate"); r++ {
		for i := range systems {
			s := systems[(i+r)%len(systems)]
			var cpu0 float64
			if s.proxy != 0 {
				cpu0 = cpuSeconds(t, s.proxy)
			}
			s.rate = append(s.rate, connRate(t, *rateConns, *ratePar, s.dial))
			if s.proxy != 0 {
				s.cpuConn = append(s.cpuConn, (cpuSeconds(t, s.proxy)-cpu0)/float64(*rateConns)*1e6)
			}
		}
	}
	load1, _ := os.ReadFile("/proc/loadavg")

	// Per idle connection, each on a fresh process.
	type idle struct {
		name string
		kib  float64
	}
	var idles []idle
	if want("relay") && part("idle") {
		pid, _, echoVia := startRelay(t, gw, nettest.Good.String()+":5201", echoAt(), false)
		idles = append(idles, idle{"relay", idleCost(t, pid, func(ctx context.Context) (net.Conn, error) { return vt.Guest.DialContext(ctx, "tcp", echoVia) })})
	}
	for _, c := range []struct {
		link string
		mtu  int
	}{{"offload", 1500}, {"plain", 65520}} {
		name := fmt.Sprintf("%s-%d", c.link, c.mtu)
		if !want(name) || !part("idle") {
			continue
		}
		tp, pid := startNetstack(t, bin, c.link, c.mtu, "")
		echo := echoAt()
		idles = append(idles, idle{name, idleCost(t, pid, func(ctx context.Context) (net.Conn, error) { return tp.Guest.DialContext(ctx, "tcp", echo) })})
	}

	var relay *egressSystem
	for _, s := range systems {
		if s.name == "relay" {
			relay = s
		}
	}
	fmt.Printf("load average at end:   %s\n", load1)
	fmt.Printf("median of %d rounds [min-max]; (ratio to the copy relay's median)\n", *rounds)
	fmt.Printf("%-14s %-24s %-24s %-24s %-24s %-26s\n", "system", "1 stream up Gbit/s", "1 stream down", "4 streams up", "4 streams down", "connections/s")
	for _, s := range systems {
		fmt.Printf("%-14s %-24s %-24s %-24s %-24s %-26s\n", s.name, cell(s.up, relay, func(r *egressSystem) []float64 { return r.up }, "%.2f"),
			cell(s.down, relay, func(r *egressSystem) []float64 { return r.down }, "%.2f"),
			cell(s.up4, relay, func(r *egressSystem) []float64 { return r.up4 }, "%.2f"),
			cell(s.down4, relay, func(r *egressSystem) []float64 { return r.down4 }, "%.2f"),
			cell(s.rate, relay, func(r *egressSystem) []float64 { return r.rate }, "%.0f"))
	}
	fmt.Printf("\n%-14s %-24s %-24s %-24s %-30s\n", "proxy", "CPU-s/GB 1 stream up", "CPU-s/GB 1 stream down", "CPU-µs per connection", "RSS MiB start / peak / 10 s after")
	for _, s := range systems {
		if s.proxy == 0 {
			continue
		}
		fmt.Printf("%-14s %-24s %-24s %-24s %5.1f / %5.1f / %5.1f (%+.1f)\n", s.name,
			cell(s.cpuUp, relay, func(r *egressSystem) []float64 { return r.cpuUp }, "%.2f"),
			cell(s.cpuDown, relay, func(r *egressSystem) []float64 { return r.cpuDown }, "%.2f"),
			cell(s.cpuConn, relay, func(r *egressSystem) []float64 { return r.cpuConn }, "%.0f"),
			mib(s.rssStart), mib(s.rssPeak), mib(s.rssAfter), mib(s.rssAfter-s.rssStart))
	}
	fmt.Printf("\nper idle relayed connection (fresh process, %d connections):", *idleConns)
	for _, i := range idles {
		fmt.Printf(" %s %.1f KiB;", i.name, i.kib)
	}
	fmt.Println()

	if relay == nil {
		return
	}
	fmt.Printf("\ntargets (netstack against the copy relay): throughput >= 0.9, connections/s >= 0.8, CPU-s/GB <= 2x, RSS 10 s after within 8 MiB of start, <= 16 KiB per idle connection\n")
	for _, s := range systems {
		if !s.netstack {
			continue
		}
		var miss []string
		for _, m := range []struct {
			what      string
			got, base []float64
			min       float64
		}{{"1 up", s.up, relay.up, 0.9}, {"1 down", s.down, relay.down, 0.9}, {"4 up", s.up4, relay.up4, 0.9},
			{"4 down", s.down4, relay.down4, 0.9}, {"conn/s", s.rate, relay.rate, 0.8}} {
			if r := median(m.got) / median(m.base); r < m.min {
				miss = append(miss, fmt.Sprintf("%s %.2f", m.what, r))
			}
		}
		for _, m := range []struct {
			what      string
			got, base []float64
		}{{"CPU/GB up", s.cpuUp, relay.cpuUp}, {"CPU/GB down", s.cpuDown, relay.cpuDown}} {
			if r := median(m.got) / median(m.base); r > 2 {
				miss = append(miss, fmt.Sprintf("%s %.1fx", m.what, r))
			}
		}
		if d := s.rssAfter - s.rssStart; d > 8<<20 {
			miss = append(miss, fmt.Sprintf("RSS +%.1f MiB", mib(d)))
		}
		for _, i := range idles {
			if i.name == s.name && i.kib > 16 {
				miss = append(miss, fmt.Sprintf("%.1f KiB/idle conn", i.kib))
			}
		}
		verdict := "all met"
		if len(miss) > 0 {
			verdict = "missed: " + strings.Join(miss, ", ")
		}
		fmt.Printf("  %-14s %s\n", s.name, verdict)
	}
}

// cell formats a median with its range and, against a baseline, the ratio of the medians.
func cell(v []float64, base *egressSystem, of func(*egressSystem) []float64, f string) string {
	if len(v) == 0 {
		return "-"
	}
	lo, hi := slices.Min(v), slices.Max(v)
	s := fmt.Sprintf(f+" ["+f+"-"+f+"]", median(v), lo, hi)
	if base != nil && len(of(base)) > 0 {
		s += fmt.Sprintf(" (%.2f)", median(v)/median(of(base)))
	}
	return s
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// vethNamespace is a namespace routed to this one over a veth pair (plain kernel routing to the
// test hosts); it returns the address of this side, where the copy relay listens.
func vethNamespace(t *testing.T) (*nettest.Topology, string) {
	tp := nettest.New(t)
	here, there := "agbh"+tp.ID, "agbg"+tp.ID
	nettest.Run(t, "ip", "link", "add", here, "type", "veth", "peer", "name", there)
	t.Cleanup(func() { exec.Command("ip", "link", "del", here).Run() })
	nettest.Run(t, "ip", "link", "set", there, "netns", tp.Name)
	net3 := fmt.Sprintf("10.188.%d", os.Getpid()%250)
	nettest.Run(t, "ip", "addr", "add", net3+".1/24", "dev", here)
	nettest.Run(t, "ip", "link", "set", here, "up")
	nettest.Run(t, "ip", "-n", tp.Name, "addr", "add", net3+".2/24", "dev", there)
	nettest.Run(t, "ip", "-n", tp.Name, "link", "set", there, "up")
	nettest.Run(t, "ip", "-n", tp.Name, "route", "add", "default", "via", net3+".1")
	return tp, net3 + ".1"
}

// startRelay starts the copy relay process on ip (splicing, or copying in user space),
// forwarding one port to iperf and one to echo; it returns its pid and the two addresses.
func startRelay(t *testing.T, ip, iperfDst, echoDst string, userCopy bool) (pid int, iperfAt, echoAt string) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	iperfAt = net.JoinHostPort(ip, strconv.Itoa(testutil.ClosedPort(t)))
	echoAt = net.JoinHostPort(ip, strconv.Itoa(testutil.ClosedPort(t)))
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "AGENTD_BENCH_RELAY="+iperfAt+">"+iperfDst+","+echoAt+">"+echoDst)
	if userCopy {
		cmd.Env = append(cmd.Env, "AGENTD_BENCH_RELAY_COPY=1")
	}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("relay did not start: %q", line)
	}
	return cmd.Process.Pid, iperfAt, echoAt
}

// startNetstack starts agentd with its netstack on a tun in a new guest namespace.
func startNetstack(t *testing.T, bin, link string, mtu int, profileName string) (*nettest.Topology, int) {
	tp := nettest.New(t)
	pol := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(pol, []byte(`{"default_egress":"deny","rules":[{"destination":{"cidr":"198.18.0.10/32"},"protocols":["tcp"],"action":"allow"}]}`), 0o644)
	args := []string{"--egress", "netstack", "--egress-guest-netns", "/var/run/netns/" + tp.Name, "--egress-policy", pol,
		"--egress-tun", "agtun" + tp.ID, "--egress-link", link, "--egress-mtu", strconv.Itoa(mtu)}
	if *egressProfile != "" && profileName != "" {
		args = append(args, "--cpu-profile", filepath.Join(*egressProfile, profileName+".pprof"))
	}
	_, cmd := startBinaryCmd(t, bin, 0, args...)
	return tp, cmd.Process.Pid
}

// idleCost opens idleConns connections through a fresh proxy, each echoing one byte and then
// idle, and returns the proxy's added resident memory per connection in KiB.
func idleCost(t *testing.T, pid int, dial func(context.Context) (net.Conn, error)) float64 {
	time.Sleep(time.Second)
	before := testutil.RSS(t, pid)
	conns := make([]net.Conn, 0, *idleConns)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	buf := make([]byte, 1)
	for i := 0; i < *idleConns; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := dial(ctx)
		cancel()
		if err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
		conns = append(conns, c)
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
	}
	time.Sleep(time.Second)
	return float64(testutil.RSS(t, pid)-before) / float64(*idleConns) / 1024
}

// peakRSS is a process's resident high-water mark (VmHWM).
func peakRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			kb, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return kb << 10
		}
	}
	return 0
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

// connRate is the rate of connect, 1-byte echo, close, par at a time (the same client for
// every system).
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
