package bench

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/vm"
)

var (
	boots    = flag.Int("boots", 0, "boot the microVM this many times per machine and report boot-to-ready (0: skip)")
	machines = flag.String("machines", "pc,microvm", "comma-separated qemu machine types for -boots: pc (virtio on PCI), microvm (virtio-mmio)")
	vmAppend = flag.String("vm-append", "", "kernel command line words added for -boots (MSB_* settings)")
)

// bootStats are one machine type's boots.
type bootStats struct {
	ready, initNs, off []time.Duration
	steps              string // agentd's own breakdown of init, last boot
}

// TestBootReport boots the microVM (agentd as PID 1 under qemu) several times on each machine
// type, alternating between them so that both see the same load on this shared machine, and
// prints the time from qemu's start to core.ready, agentd's own init_time_ns with its steps,
// and the artifact sizes.
func TestBootReport(t *testing.T) {
	if !*report || *boots == 0 {
		t.Skip("run with -args -report -boots N (make bench-vm)")
	}
	dir := t.TempDir()
	buildAgentd(t, dir, true)
	if out, err := exec.Command("../scripts/mkinitramfs.sh", dir).CombinedOutput(); err != nil {
		t.Fatalf("mkinitramfs: %v\n%s", err, out)
	}
	types := strings.Split(*machines, ",")
	stats := make(map[string]*bootStats)
	for _, m := range types {
		stats[m] = &bootStats{}
	}
	for i := 0; i < *boots; i++ {
		for _, m := range types {
			bootOnce(t, dir, m, i, stats[m])
		}
	}
	med := func(d []time.Duration) string {
		s := slices.Clone(d)
		slices.Sort(s)
		return fmt.Sprintf("%v (%v-%v)", s[len(s)/2].Round(time.Millisecond), s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
	}
	size := func(p string) float64 {
		st, _ := os.Stat(p)
		return float64(st.Size()) / (1 << 20)
	}
	fmt.Printf("microVM boot, accel %s, %d boots per machine, alternating (median, min-max)\n", vm.Accel(), *boots)
	for _, m := range types {
		s := stats[m]
		fmt.Printf("machine %s\n", m)
		fmt.Printf("  qemu start -> core.ready      %s\n", med(s.ready))
		fmt.Printf("  agentd init_time_ns           %s\n", med(s.initNs))
		fmt.Printf("  core.shutdown -> qemu exit    %s\n", med(s.off))
		fmt.Printf("  init steps (last boot):%s\n", s.steps)
	}
	fmt.Printf("initramfs %.1f MiB, agentd %.1f MiB stripped\n", size(filepath.Join(dir, "initramfs.cpio.gz")), size(filepath.Join(dir, "agentd")))
	fmt.Printf("targets: init_time_ns < 50 ms; agentd < 20 MB stripped\n")
}

// bootOnce boots machine m, records its times in s, and shuts it down.
func bootOnce(t *testing.T, dir, m string, i int, s *bootStats) {
	v, err := vm.Boot(vm.Options{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initramfs.cpio.gz"),
		Dir: t.TempDir(), Accel: vm.Accel(), Machine: m, Append: *vmAppend})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	conn, err := v.Connect(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, err := host.Direct(conn, host.Options{Log: quiet})
	if err != nil {
		t.Fatalf("%s boot %d: %v\n%s", m, i, err, v.Console())
	}
	defer c.Close()
	s.ready = append(s.ready, time.Since(v.Started))
	s.initNs = append(s.initNs, time.Duration(c.Ready.InitTimeNs))
	stop := time.Now()
	c.Shutdown()
	if err := <-v.Exited; err != nil {
		t.Fatalf("%s boot %d: qemu exited with %v\n%s", m, i, err, v.Console())
	}
	s.off = append(s.off, time.Since(stop))
	for _, line := range strings.Split(v.Console(), "\n") {
		if i := strings.Index(line, `msg="init steps"`); i >= 0 {
			s.steps = line[i+len(`msg="init steps"`):]
		}
	}
}
