package bench

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/vm"
)

var boots = flag.Int("boots", 0, "boot the microVM this many times and report boot-to-ready (0: skip)")

// TestBootReport boots the microVM (agentd as PID 1 under qemu) several times and prints the
// time from qemu's start to core.ready, agentd's own init_time_ns, and the artifact sizes.
func TestBootReport(t *testing.T) {
	if !*report || *boots == 0 {
		t.Skip("run with -args -report -boots N (make bench-vm)")
	}
	dir := t.TempDir()
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", filepath.Join(dir, "agentd"), "../cmd/agentd")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	if out, err := exec.Command("../scripts/mkinitramfs.sh", dir).CombinedOutput(); err != nil {
		t.Fatalf("mkinitramfs: %v\n%s", err, out)
	}
	var ready, initNs, off []time.Duration
	var steps string
	for i := 0; i < *boots; i++ {
		v, err := vm.Boot(vm.Options{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initramfs.cpio.gz"), Dir: t.TempDir(), Accel: vm.Accel()})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := v.Connect(30 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c, err := host.Direct(conn, host.Options{Log: quiet})
		if err != nil {
			v.Kill()
			t.Fatalf("boot %d: %v\n%s", i, err, v.Console())
		}
		ready = append(ready, time.Since(v.Started))
		initNs = append(initNs, time.Duration(c.Ready.InitTimeNs))
		stop := time.Now()
		c.Shutdown()
		<-v.Exited
		for _, line := range strings.Split(v.Console(), "\n") {
			if i := strings.Index(line, `msg="init steps"`); i >= 0 {
				steps = line[i+len(`msg="init steps"`):] // agentd's own breakdown, last boot
			}
		}
		off = append(off, time.Since(stop))
		c.Close()
		conn.Close()
	}
	med := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2].Round(time.Millisecond)
	}
	size := func(p string) float64 {
		st, _ := os.Stat(p)
		return float64(st.Size()) / (1 << 20)
	}
	fmt.Printf("microVM boot, accel %s, %d boots (median, min-max)\n", vm.Accel(), *boots)
	fmt.Printf("  qemu start -> core.ready      %v (%v-%v)\n", med(ready), ready[0].Round(time.Millisecond), ready[len(ready)-1].Round(time.Millisecond))
	fmt.Printf("  agentd init_time_ns           %v (%v-%v)\n", med(initNs), initNs[0].Round(time.Millisecond), initNs[len(initNs)-1].Round(time.Millisecond))
	fmt.Printf("  core.shutdown -> qemu exit    %v\n", med(off))
	fmt.Printf("  initramfs %.1f MiB, agentd %.1f MiB stripped\n", size(filepath.Join(dir, "initramfs.cpio.gz")), size(filepath.Join(dir, "agentd")))
	fmt.Printf("  init steps (last boot):%s\n", steps)
	fmt.Printf("targets: init_time_ns < 50 ms; agentd < 20 MB stripped\n")
}
