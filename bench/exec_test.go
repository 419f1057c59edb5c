package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	osexec "os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// execFsReport measures exec latency against a direct spawn, and bulk exec output and fs
// transfers against the same bytes moved by a plain copy over the same kind of channel; fs at
// generation 5 (c5: CBOR core.fs.data) and with bulk (c).
func execFsReport(t *testing.T, c, c5 *host.Client, raw float64) {
	ctx := context.Background()
	const runs = 200
	direct := make([]time.Duration, 0, runs)
	for i := 0; i < runs; i++ {
		start := time.Now()
		if err := osexec.Command("true").Run(); err != nil {
			t.Fatal(err)
		}
		direct = append(direct, time.Since(start))
	}
	via := make([]time.Duration, 0, runs)
	for i := 0; i < runs; i++ {
		start := time.Now()
		if _, _, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "true"}, nil); err != nil || code != 0 {
			t.Fatalf("true: %v %d", err, code)
		}
		via = append(via, time.Since(start))
	}
	sortD(direct)
	sortD(via)

	file := filepath.Join(t.TempDir(), "big")
	f, _ := os.Create(file)
	chunk := make([]byte, 1<<20)
	for i := int64(0); i < *size; i += int64(len(chunk)) {
		f.Write(chunk)
	}
	f.Close()

	plainCat := plainPipe(t, func(w io.Writer) { cmd := osexec.Command("cat", file); cmd.Stdout = w; cmd.Run() })
	cat := catThroughput(t, c, file)

	fsRead := func(c *host.Client) float64 {
		start := time.Now()
		if m, err := c.ReadFile(ctx, file, io.Discard); err != nil || m != *size {
			t.Fatalf("fs read %d: %v", m, err)
		}
		return mbps(*size, time.Since(start))
	}
	out := filepath.Join(t.TempDir(), "written")
	fsWrite := func(c *host.Client) float64 {
		start := time.Now()
		if m, err := c.WriteFile(ctx, out, 0o600, io.LimitReader(zeros{}, *size)); err != nil || m != *size {
			t.Fatalf("fs write %d: %v", m, err)
		}
		return mbps(*size, time.Since(start))
	}
	var m medians
	for i := 0; i < *rounds; i++ { // alternating, medians (see TestReport)
		m.add("plain read", plainPipe(t, func(w io.Writer) {
			f, _ := os.Open(file)
			io.CopyBuffer(w, struct{ io.Reader }{f}, make([]byte, chunk2))
			f.Close()
		}))
		m.add("read5", fsRead(c5))
		m.add("read", fsRead(c))
		m.add("plain write", plainPipeTo(t, out))
		m.add("write5", fsWrite(c5))
		m.add("write", fsWrite(c))
	}
	plainRead, read5, read := m.get("plain read"), m.get("read5"), m.get("read")
	plainWrite, write5, write := m.get("plain write"), m.get("write5"), m.get("write")

	fmt.Printf("\nexec and fs (%d MiB transfers; fs: medians of %d rounds)\n", *size>>20, *rounds)
	fmt.Printf("%-52s %10s %10s\n", "exec of `true`", "p50", "p99")
	fmt.Printf("%-52s %10v %10v\n", "spawned directly from Go (the limit)", testutil.Percentile(direct, 50).Round(time.Microsecond), testutil.Percentile(direct, 99).Round(time.Microsecond))
	fmt.Printf("%-52s %10v %10v\n", "through agentd (request -> exited)", testutil.Percentile(via, 50).Round(time.Microsecond), testutil.Percentile(via, 99).Round(time.Microsecond))
	fmt.Printf("%-52s %10v\n", "overhead at p50", (testutil.Percentile(via, 50) - testutil.Percentile(direct, 50)).Round(time.Microsecond))
	fmt.Printf("\n%-52s %8s %14s %14s\n", "transfer", "MB/s", "vs channel", "vs plain copy")
	row := func(name string, v, plain float64) {
		fmt.Printf("%-52s %8.0f %14.2f %14.2f\n", name, v, v/raw, v/plain)
	}
	fmt.Printf("%-52s %8.0f %14.2f %14s\n", "plain: cat | channel (the limit for exec output)", plainCat, plainCat/raw, "1.00")
	row("agentd: exec cat, stdout to the host", cat, plainCat)
	fmt.Printf("%-52s %8.0f %14.2f %14s\n", "plain: file -> channel (the limit for fs read)", plainRead, plainRead/raw, "1.00")
	row("agentd: fs read, gen 5 (core.fs.data)", read5, plainRead)
	row("agentd: fs read, bulk", read, plainRead)
	fmt.Printf("%-52s %8.0f %14.2f %14s\n", "plain: channel -> file (the limit for fs write)", plainWrite, plainWrite/raw, "1.00")
	row("agentd: fs write, gen 5 (core.fs.data)", write5, plainWrite)
	row("agentd: fs write, bulk", write, plainWrite)
	fmt.Printf("\nfs bulk vs gen 5: read %.2fx, write %.2fx\n", read/read5, write/write5)
	fmt.Printf("\ntargets: exec overhead < 2 ms at p50; transfers >= 0.70 of the limit; fs bulk >= 1.5x gen 5\n")
}

// catThroughput times `cat file` in the guest, counting stdout as it streams to the host.
func catThroughput(t *testing.T, c *host.Client, file string) float64 {
	ctx := context.Background()
	start := time.Now()
	var n int64
	e, err := c.Exec(ctx, protocol.ExecRequest{Cmd: "cat", Args: []string{file}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.CloseStdin()
	for {
		ev, err := e.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		n += int64(len(ev.Stdout))
		if ev.Exited {
			return mbps(n, time.Since(start))
		}
	}
}

const chunk2 = 64 << 10

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func sortD(d []time.Duration) { sort.Slice(d, func(i, j int) bool { return d[i] < d[j] }) }

// plainPipe times produce writing into one end of a unix socket pair while the other end is
// read and discarded: the same bytes over the same kind of channel, with a plain copy.
func plainPipe(t *testing.T, produce func(io.Writer)) float64 {
	a, b := testutil.SocketPair(t)
	defer b.Close()
	start := time.Now()
	go func() { produce(struct{ io.Writer }{a}); a.Close() }()
	n, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{b}, make([]byte, 256<<10))
	return mbps(n, time.Since(start))
}

// plainPipeTo times writing *size bytes through a unix socket pair into a file.
func plainPipeTo(t *testing.T, path string) float64 {
	a, b := testutil.SocketPair(t)
	defer b.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	go func() {
		io.CopyBuffer(struct{ io.Writer }{a}, io.LimitReader(zeros{}, *size), make([]byte, chunk2))
		a.Close()
	}()
	n, _ := io.CopyBuffer(struct{ io.Writer }{f}, struct{ io.Reader }{b}, make([]byte, chunk2))
	f.Close()
	os.Remove(path)
	return mbps(n, time.Since(start))
}
