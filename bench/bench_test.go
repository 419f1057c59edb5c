// Package bench measures agentd against the limit of its channel, in one run on one machine
// (shared machines are noisy, so every figure comes with its baseline measured alongside):
//
//	go test ./bench -run TestReport -v -args -report [-channel pty|socket] [-bytes N]
//
// Over a pty, a channel as slow as a virtio port, the channel is the limit. Over a unix socket,
// a channel faster than any relay on two cores, agentd is also compared with a plain-copy relay
// of the same bytes over the same kind of channel to the same destination.
package bench

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sort"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

var (
	report      = flag.Bool("report", false, "run the benchmark and print the report")
	size        = flag.Int64("bytes", 1<<30, "bytes moved per throughput measurement")
	pings       = flag.Int("pings", 2000, "round trips for the latency measurement")
	profile     = flag.String("agentd-profile", "", "write agentd's CPU profile to this file")
	flowOn      = flag.Bool("flow", true, "negotiate per-stream flow control")
	chanKind    = flag.String("channel", "socket", "channel between host and agentd: socket or pty")
	window      = flag.Int("window", 0, "host receive window (0: client default)")
	hostProfile = flag.String("host-profile", "", "write the host side's CPU profile to this file")
	rounds      = flag.Int("rounds", 3, "rounds of the throughput measurements (the report gives medians)")
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

const chunk = 64 << 10

// TestMain doubles as the plain-copy relay: with AGENTD_BENCH_COPIER="UNIXSOCK TCPADDR" the
// test binary connects the channel socket to the destination and copies bytes both ways,
// which is what agentd does minus the protocol; with AGENTD_BENCH_RELAY it is the egress
// report's TCP copy relay (relayMain).
func TestMain(m *testing.M) {
	if spec := os.Getenv("AGENTD_BENCH_COPIER"); spec != "" {
		var sock, dst string
		fmt.Sscan(spec, &sock, &dst)
		ch, err := net.Dial("unix", sock)
		if err != nil {
			os.Exit(1)
		}
		d, err := net.Dial("tcp", dst)
		if err != nil {
			os.Exit(1)
		}
		done := make(chan struct{})
		go func() {
			io.CopyBuffer(struct{ io.Writer }{ch}, struct{ io.Reader }{d}, make([]byte, chunk))
			ch.(*net.UnixConn).CloseWrite()
			close(done)
		}()
		io.CopyBuffer(struct{ io.Writer }{d}, struct{ io.Reader }{ch}, make([]byte, chunk))
		d.(*net.TCPConn).CloseWrite()
		<-done
		os.Exit(0)
	}
	if spec := os.Getenv("AGENTD_BENCH_RELAY"); spec != "" {
		relayMain(spec) // the copy relay of the egress report
	}
	flag.Parse()
	os.Exit(m.Run())
}

// copierRelay measures the plain-copy relay over the same kind of channel to the same kind
// of destination, in both directions.
func copierRelay(t *testing.T, n int64) (up, down float64) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	run := func(toDest bool) float64 {
		sock := filepath.Join(t.TempDir(), "copier.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		got := make(chan int64, 1)
		dst := testutil.Serve(t, func(conn *net.TCPConn) {
			defer conn.Close()
			if toDest {
				m, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{conn}, make([]byte, 256<<10))
				got <- m
				return
			}
			buf := make([]byte, 256<<10)
			for sent := int64(0); sent < n; sent += int64(len(buf)) {
				conn.Write(buf)
			}
		})
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "AGENTD_BENCH_COPIER="+sock+" "+dst.Addr.String())
		start := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		ch, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		if toDest {
			buf := make([]byte, 256<<10)
			for sent := int64(0); sent < n; sent += int64(len(buf)) {
				ch.Write(buf)
			}
			ch.(*net.UnixConn).CloseWrite()
			if m := <-got; m != n {
				t.Fatalf("copier delivered %d of %d", m, n)
			}
		} else if m, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{ch}, make([]byte, 256<<10)); m != n {
			t.Fatalf("copier delivered %d of %d", m, n)
		}
		return mbps(n, time.Since(start))
	}
	return run(true), run(false)
}

// buildAgentd builds cmd/agentd as dir/agentd and returns its path; release builds it as the
// initramfs ships it (static, stripped).
func buildAgentd(t *testing.T, dir string, release bool) string {
	t.Helper()
	bin := filepath.Join(dir, "agentd")
	build := exec.Command("go", "build", "-o", bin, "../cmd/agentd")
	if release {
		build = exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "../cmd/agentd")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

func TestReport(t *testing.T) {
	if !*report {
		t.Skip("run with -args -report (make bench)")
	}
	bin := buildAgentd(t, t.TempDir(), false)
	fmt.Printf("agentd relay benchmark: %d MiB per direction, %s channel, GOMAXPROCS %d\n\n", *size>>20, *chanKind, runtime.GOMAXPROCS(0))

	if *chanKind == "pty" {
		ptyReport(t, bin)
		return
	}
	raw := rawChannel(t, *size)
	if *hostProfile != "" {
		f, _ := os.Create(*hostProfile)
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	a := startBinary(t, bin)
	a5 := startBinaryGen(t, bin, 5)
	// The systems alternate within each round (the machine is shared and noisy): the limit,
	// generation 5, then bulk, per direction; each figure is the median of the rounds.
	var m medians
	for i := 0; i < *rounds; i++ {
		cu, cd := copierRelay(t, *size)
		m.add("copy up", cu)
		m.add("gen5 up", toGuest(t, a5, *size))
		m.add("bulk up", toGuest(t, a, *size))
		m.add("copy down", cd)
		m.add("gen5 down", toHost(t, a5, *size))
		m.add("bulk down", toHost(t, a, *size))
	}
	p50, p99 := latency(t, a, *pings)
	hostAllocs, guestAllocs := allocsPerFrame(t)
	copyUp, copyDown := m.get("copy up"), m.get("copy down")

	fmt.Printf("medians of %d rounds\n%-56s %8s %14s %14s\n", *rounds, "measurement", "MB/s", "vs channel", "vs plain relay")
	fmt.Printf("%-56s %8.0f %14s %14s\n", "channel alone: byte copy through the unix socket", raw, "1.00", "")
	fmt.Printf("%-56s %8.0f %14.2f %14s\n", "plain-copy relay, host -> destination (the limit)", copyUp, copyUp/raw, "1.00")
	fmt.Printf("%-56s %8.0f %14.2f %14s\n", "plain-copy relay, destination -> host (the limit)", copyDown, copyDown/raw, "1.00")
	for _, r := range []struct {
		name, key string
		limit     float64
	}{
		{"agentd core.tcp gen 5 (CBOR, flow), host -> destination", "gen5 up", copyUp},
		{"agentd core.tcp gen 5 (CBOR, flow), destination -> host", "gen5 down", copyDown},
		{"agentd core.tcp bulk, host -> destination", "bulk up", copyUp},
		{"agentd core.tcp bulk, destination -> host", "bulk down", copyDown},
	} {
		v := m.get(r.key)
		fmt.Printf("%-56s %8.0f %14.2f %14.2f\n", r.name, v, v/raw, v/r.limit)
	}
	fmt.Printf("\n100-byte round trip through agentd (bulk): p50 %v  p99 %v  (%d pings)\n", p50, p99, *pings)
	fmt.Printf("agentd allocations per relayed 64 KiB frame (gen 5): host->destination %.2f, destination->host %.2f\n", hostAllocs, guestAllocs)
	fmt.Printf("\ntargets: bulk >= 0.90 of the limit each way; <= 2 allocations per frame\n")
	execFsReport(t, a, a5, raw)
}

// medians collects a figure per round under a name and gives their median.
type medians map[string][]float64

func (m *medians) add(k string, v float64) {
	if *m == nil {
		*m = medians{}
	}
	(*m)[k] = append((*m)[k], v)
}

func (m medians) get(k string) float64 {
	v := append([]float64(nil), m[k]...)
	sort.Float64s(v)
	if len(v) == 0 {
		return 0
	}
	return v[len(v)/2]
}

// rawChannel is the channel's limit: one process writes 64 KiB chunks into a unix stream
// socket, another goroutine reads and discards them.
func rawChannel(t *testing.T, n int64) float64 {
	a, b := testutil.SocketPair(t)
	defer a.Close()
	defer b.Close()
	buf := make([]byte, chunk)
	start := time.Now()
	go func() {
		for sent := int64(0); sent < n; sent += chunk {
			a.Write(buf)
		}
		a.Close()
	}()
	got, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{b}, make([]byte, 256<<10))
	if got < n {
		t.Fatalf("raw channel moved %d of %d bytes", got, n)
	}
	return mbps(n, time.Since(start))
}

func mbps(n int64, d time.Duration) float64 { return float64(n) / d.Seconds() / 1e6 }

// ptyReport compares agentd over a pty with the pty itself, direction by direction: a pty (like
// a virtio port) is far slower than a unix socket, so there the channel is the limit.
func ptyReport(t *testing.T, bin string) {
	a := startBinary(t, bin)
	a5 := startBinaryGen(t, bin, 5)
	ctx := context.Background()
	file := filepath.Join(t.TempDir(), "big")
	f, _ := os.Create(file)
	f.Truncate(*size)
	f.Close()
	timed := func(do func() error) float64 {
		start := time.Now()
		if err := do(); err != nil {
			t.Fatal(err)
		}
		return mbps(*size, time.Since(start))
	}
	read := func(c *host.Client) func() error {
		return func() error { _, err := c.ReadFile(ctx, file, io.Discard); return err }
	}
	write := func(c *host.Client) func() error {
		return func() error { _, err := c.WriteFile(ctx, file+".w", 0o600, io.LimitReader(zeros{}, *size)); return err }
	}
	var m medians
	for i := 0; i < *rounds; i++ { // alternating, medians (see TestReport)
		m.add("raw up", rawPTY(t, *size, true))
		m.add("gen5 up", toGuest(t, a5, *size))
		m.add("bulk up", toGuest(t, a, *size))
		m.add("fs5 write", timed(write(a5)))
		m.add("fs write", timed(write(a)))
		m.add("raw down", rawPTY(t, *size, false))
		m.add("gen5 down", toHost(t, a5, *size))
		m.add("bulk down", toHost(t, a, *size))
		m.add("fs5 read", timed(read(a5)))
		m.add("fs read", timed(read(a)))
	}
	p50, p99 := latency(t, a, *pings)
	cat := catThroughput(t, a, file)
	toGuestRaw, toHostRaw := m.get("raw up"), m.get("raw down")
	fmt.Printf("medians of %d rounds\n%-56s %8s %10s\n", *rounds, "measurement", "MB/s", "vs pty")
	fmt.Printf("%-56s %8.0f %10s\n", "pty alone, host -> guest (master -> slave)", toGuestRaw, "1.00")
	fmt.Printf("%-56s %8.0f %10s\n", "pty alone, guest -> host (slave -> master)", toHostRaw, "1.00")
	for _, r := range []struct {
		name string
		v    float64
		base float64
	}{
		{"agentd core.tcp gen 5 (CBOR, flow), host -> destination", m.get("gen5 up"), toGuestRaw},
		{"agentd core.tcp gen 5 (CBOR, flow), destination -> host", m.get("gen5 down"), toHostRaw},
		{"agentd core.tcp bulk, host -> destination", m.get("bulk up"), toGuestRaw},
		{"agentd core.tcp bulk, destination -> host", m.get("bulk down"), toHostRaw},
		{"agentd exec cat, stdout to the host", cat, toHostRaw},
		{"agentd fs read, gen 5 (core.fs.data)", m.get("fs5 read"), toHostRaw},
		{"agentd fs read, bulk", m.get("fs read"), toHostRaw},
		{"agentd fs write, gen 5 (core.fs.data)", m.get("fs5 write"), toGuestRaw},
		{"agentd fs write, bulk", m.get("fs write"), toGuestRaw},
	} {
		fmt.Printf("%-56s %8.0f %10.2f\n", r.name, r.v, r.v/r.base)
	}
	fmt.Printf("\n100-byte round trip through agentd over the pty: p50 %v  p99 %v\n", p50, p99)
	fmt.Printf("\ntargets: bulk >= 0.90 of the pty each way\n")
}

// rawPTY is a pty's limit in one direction: 64 KiB writes into one end of a raw-mode pty,
// read from the other.
func rawPTY(t *testing.T, n int64, toSlave bool) float64 {
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	m, err := channel.Pollable(master)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	defer slave.Close()
	sl, err := channel.Open(slave.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer sl.Close()
	w, r := io.Writer(m), io.Reader(sl)
	if !toSlave {
		channel.MakeRaw(int(slave.Fd())) // the master side reads too: no output processing
		w, r = sl, m
	}
	buf := make([]byte, chunk)
	start := time.Now()
	go func() {
		for sent := int64(0); sent < n; sent += chunk {
			w.Write(buf)
		}
	}()
	got, rbuf := int64(0), make([]byte, 256<<10)
	for got < n {
		k, err := r.Read(rbuf)
		if err != nil {
			t.Fatal(err)
		}
		got += int64(k)
	}
	return mbps(n, time.Since(start))
}

// startBinary runs agentd --standalone on the chosen channel and connects a client to it.
func startBinary(t *testing.T, bin string, extra ...string) *host.Client {
	c, _ := startBinaryCmd(t, bin, 0, extra...)
	return c
}

// startBinaryGen is startBinary with a host client of generation gen (5: CBOR data frames).
func startBinaryGen(t *testing.T, bin string, gen uint8) *host.Client {
	c, _ := startBinaryCmd(t, bin, gen)
	return c
}

// startBinaryCmd starts agentd with extra flags and returns the client (of generation gen, 0
// for the newest) and the process.
func startBinaryCmd(t *testing.T, bin string, gen uint8, extra ...string) (*host.Client, *exec.Cmd) {
	sock := filepath.Join(t.TempDir(), "chan.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := "unix:" + sock
	var hostEnd io.ReadWriteCloser
	if *chanKind == "pty" {
		master, slave, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { slave.Close() })
		if hostEnd, err = channel.Pollable(master); err != nil {
			t.Fatal(err)
		}
		port = slave.Name()
	}
	args := append([]string{"--standalone", "--port", port, "--log-level", "warn"}, extra...)
	if *profile != "" {
		args = append(args, "--cpu-profile", *profile)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	conn := hostEnd
	if conn == nil {
		if conn, err = l.Accept(); err != nil {
			t.Fatal(err)
		}
	}
	opts := host.Options{Log: quiet, Window: *window, Generation: gen}
	if !*flowOn {
		opts.Features = []string{}
	}
	c, err := host.Direct(conn, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, cmd
}

// toGuest pushes n bytes through one stream to a sink and times it until the sink sees EOF.
func toGuest(t *testing.T, c *host.Client, n int64) float64 {
	got := make(chan int64, 1)
	sink := testutil.Serve(t, func(conn *net.TCPConn) {
		m, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{conn}, make([]byte, 256<<10))
		got <- m
		conn.Close()
	})
	conn, err := c.DialTCP(context.Background(), "127.0.0.1", uint16(sink.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 256<<10)
	start := time.Now()
	for sent := int64(0); sent < n; sent += int64(len(buf)) {
		if _, err := conn.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	conn.CloseWrite()
	if m := <-got; m != n {
		t.Fatalf("sink got %d of %d bytes", m, n)
	}
	return mbps(n, time.Since(start))
}

// toHost has a source send n bytes and times the host reading them to EOF.
func toHost(t *testing.T, c *host.Client, n int64) float64 {
	src := testutil.Serve(t, func(conn *net.TCPConn) {
		buf := make([]byte, 256<<10)
		for sent := int64(0); sent < n; sent += int64(len(buf)) {
			if _, err := conn.Write(buf); err != nil {
				break
			}
		}
		conn.Close()
	})
	start := time.Now()
	conn, err := c.DialTCP(context.Background(), "127.0.0.1", uint16(src.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	m, err := io.CopyBuffer(io.Discard, conn, make([]byte, 256<<10))
	if err != nil || m != n {
		t.Fatalf("host got %d of %d bytes: %v", m, n, err)
	}
	return mbps(n, time.Since(start))
}

func latency(t *testing.T, c *host.Client, n int) (time.Duration, time.Duration) {
	echo := testutil.Serve(t, testutil.Echo)
	conn, err := c.DialTCP(context.Background(), "127.0.0.1", uint16(echo.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msg, buf := make([]byte, 100), make([]byte, 100)
	rtts := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		start := time.Now()
		conn.Write(msg)
		if _, err := io.ReadFull(conn, buf); err != nil {
			t.Fatal(err)
		}
		rtts = append(rtts, time.Since(start))
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	return testutil.Percentile(rtts, 50), testutil.Percentile(rtts, 99)
}

// allocsPerFrame runs agentd in this process and drives it with pre-encoded frames and a
// zero-allocation frame reader, so the process's allocation count is agentd's own.
func allocsPerFrame(t *testing.T) (float64, float64) {
	agentEnd, hostEnd := testutil.SocketPair(t)
	a := agent.New(agent.Config{Port: agentEnd, Log: quiet, Features: []string{}})
	go func() {
		if a.Handshake() == nil {
			a.Serve(context.Background())
		}
	}()
	fr := protocol.NewFrameReader(hostEnd)
	fr.Next() // init.resolved
	ack, _ := protocol.EncodeFrame(0, protocol.TypeInitAck, protocol.InitAck{})
	hostEnd.Write(ack)
	fr.Next() // ready
	defer hostEnd.Close()

	const frames = 4096
	// host -> destination
	done := make(chan struct{})
	sink := testutil.Serve(t, func(conn *net.TCPConn) {
		io.CopyBuffer(io.Discard, struct{ io.Reader }{conn}, make([]byte, 256<<10))
		close(done)
	})
	connect, _ := protocol.EncodeFrame(1, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(sink.Addr.Port)})
	hostEnd.Write(connect)
	fr.Next() // connected
	data, _ := protocol.AppendData(nil, 1, protocol.TypeTCPData, make([]byte, chunk))
	var batch []byte
	for i := 0; i < 16; i++ {
		batch = append(batch, data...)
	}
	eof, _ := protocol.EncodeFrame(1, protocol.TypeTCPEOF, protocol.Empty{})
	hostEnd.Write(batch) // warm the pools
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := 0; i < frames/16; i++ {
		hostEnd.Write(batch)
	}
	hostEnd.Write(eof)
	<-done
	runtime.ReadMemStats(&m1)
	up := float64(m1.Mallocs-m0.Mallocs) / frames

	// destination -> host
	src := testutil.Serve(t, func(conn *net.TCPConn) {
		buf := make([]byte, chunk)
		for i := 0; i < frames+16; i++ {
			conn.Write(buf)
		}
		conn.Close()
	})
	connect, _ = protocol.EncodeFrame(2, protocol.TypeTCPConnect, protocol.TCPConnect{Host: "127.0.0.1", Port: uint16(src.Addr.Port)})
	hostEnd.Write(connect)
	var bytes int64
	var count int
	for bytes < (frames+16)*chunk {
		f, err := fr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if f.ID != 2 {
			continue
		}
		m, _ := protocol.DecodeMessage(f)
		if m.Type == protocol.TypeTCPData {
			d, _ := protocol.DecodeData(m.Payload)
			bytes += int64(len(d))
			count++
			if count == 16 {
				runtime.ReadMemStats(&m0)
			}
		}
	}
	runtime.ReadMemStats(&m1)
	down := float64(m1.Mallocs-m0.Mallocs) / float64(count-16)
	return up, down
}
