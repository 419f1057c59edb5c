// Package vm boots the project's microVM under qemu for tests and benchmarks: Debian's cloud
// kernel, the initramfs from scripts/mkinitramfs.sh, and the agent channel on a unix socket.
package vm

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
)

// Options describe one boot.
type Options struct {
	Kernel, Initrd string
	// Append is added to the kernel command line (MSB_* settings go here).
	Append string
	// Dir holds the channel socket.
	Dir string
	// Accel is qemu's accelerator: "tcg" unless set (here /dev/kvm exists but a guest under it
	// never boots, so KVM is opt-in, e.g. from AGENTD_QEMU_ACCEL).
	Accel string
	// Plain boots with only what the initramfs promises to need: qemu's default CPU and no
	// kernel parameters but the console, panic=-1, what the machine needs to boot (microvm:
	// the TSC frequency) and Append; none of the speed-ups.
	Plain bool
	// Machine is qemu's machine type: "pc" (PCI transport) unless set; "microvm" has no PCI bus
	// and puts every virtio device on virtio-mmio, as microsandbox's libkrun does.
	Machine string
	// Net adds a virtio-net device on qemu user networking.
	Net bool
	// Disks are raw images attached as virtio-blk devices with the given serials.
	Disks []Disk
	// Shares are host directories exported over virtio-fs (qemu's virtiofsd) by tag.
	Shares []Share
}

// Share is a host directory and the virtio-fs tag the guest mounts (MSB_DIR_MOUNTS tags).
type Share struct{ Tag, Dir string }

// Virtiofsd is the virtio-fs daemon qemu's Debian package ships.
const Virtiofsd = "/usr/lib/qemu/virtiofsd"

// Disk is a raw disk image and the serial the guest sees (MSB_DISK_MOUNTS ids).
type Disk struct{ Path, Serial string }

// VM is a running qemu.
type VM struct {
	Cmd     *exec.Cmd
	Sock    string
	Started time.Time
	Exited  chan error // receives qemu's exit once
	console testutil.Buffer
	daemons []*exec.Cmd // virtiofsd per share
}

// Boot starts qemu.
func Boot(o Options) (*VM, error) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	accel := o.Accel
	if accel == "" {
		accel = "tcg"
	}
	v := &VM{Sock: filepath.Join(o.Dir, "agent.sock"), Exited: make(chan error, 1)}
	// panic=-1 with -no-reboot: a kernel panic ends qemu instead of hanging.
	machine, bus, params := "pc", "pci", []string{"console=ttyS0", "panic=-1"}
	switch o.Machine {
	case "", "pc":
		if !o.Plain {
			// virtio-pci uses MSI-X, and routing each device's legacy interrupt through ACPI
			// (interpreted AML) is most of virtio_pci's load time under TCG (188 -> 80 ms).
			params = append(params, "acpi=noirq")
		}
	case "microvm":
		// No PIT/HPET to calibrate the TSC against: without a given frequency the kernel can hang.
		machine, bus = "microvm", "device"
		params = append(params, "tsc_early_khz=2000000", "tsc=reliable")
	default:
		return nil, fmt.Errorf("machine %q: want pc or microvm", o.Machine)
	}
	args := []string{"-M", machine, "-accel", accel, "-m", "512", "-nographic", "-no-reboot"}
	if !o.Plain {
		params = append(params, "quiet")
		// Under TCG the default CPU has no RDRAND, so the kernel's random pool is seeded only by
		// jitter ~1 s into boot, and the first getrandom (gVisor's package init, before
		// agentd's main) blocks until then. A VM under KVM has the host's RDRAND.
		cpu := "qemu64,+rdrand"
		if accel != "tcg" {
			cpu = "host"
		}
		args = append(args, "-cpu", cpu)
	}
	dev := func(kind string) string { return kind + "-" + bus } // virtio-blk-pci or virtio-blk-device
	args = append(args, "-kernel", o.Kernel, "-initrd", o.Initrd, "-append", strings.Join(append(params, o.Append), " "),
		"-device", dev("virtio-serial"), "-chardev", "socket,id=agent,path="+v.Sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=agent")
	for i, d := range o.Disks {
		args = append(args, "-drive", fmt.Sprintf("file=%s,if=none,id=d%d,format=raw", d.Path, i),
			"-device", fmt.Sprintf("%s,drive=d%d,serial=%s", dev("virtio-blk"), i, d.Serial))
	}
	if len(o.Shares) > 0 {
		// vhost-user needs the guest's memory shared with the daemon.
		args = append(args, "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem")
	}
	for i, sh := range o.Shares {
		sock := filepath.Join(o.Dir, fmt.Sprintf("fs%d.sock", i))
		d := exec.Command(Virtiofsd, "--socket-path="+sock, "-o", "source="+sh.Dir, "-o", "cache=none", "-f")
		d.Stdout, d.Stderr = &v.console, &v.console
		if err := d.Start(); err != nil {
			v.stopDaemons()
			return nil, fmt.Errorf("start virtiofsd for %s: %w", sh.Dir, err)
		}
		v.daemons = append(v.daemons, d)
		if err := waitSocket(sock, 5*time.Second); err != nil {
			v.stopDaemons()
			return nil, err
		}
		args = append(args, "-chardev", fmt.Sprintf("socket,id=fs%d,path=%s", i, sock),
			"-device", fmt.Sprintf("%s,chardev=fs%d,tag=%s", dev("vhost-user-fs"), i, sh.Tag))
	}
	if o.Net {
		args = append(args, "-netdev", "user,id=n0", "-device", dev("virtio-net")+",netdev=n0")
	} else {
		args = append(args, "-net", "none")
	}
	v.Cmd = exec.Command(qemu, args...)
	v.Cmd.Stdout, v.Cmd.Stderr = &v.console, &v.console
	v.Started = time.Now()
	if err := v.Cmd.Start(); err != nil {
		v.stopDaemons()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	go func() {
		err := v.Cmd.Wait()
		v.stopDaemons()
		v.Exited <- err
	}()
	return v, nil
}

func (v *VM) stopDaemons() {
	for _, d := range v.daemons {
		d.Process.Kill()
		d.Wait()
	}
	v.daemons = nil
}

// waitSocket waits for a daemon's socket to appear (it gives no other readiness signal).
func waitSocket(path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s never appeared", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Connect dials the channel socket once qemu has created it.
func (v *VM) Connect(timeout time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.Dial("unix", v.Sock)
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("qemu never opened %s: %w", v.Sock, err)
		}
		time.Sleep(10 * time.Millisecond) // qemu creates the socket asynchronously
	}
}

// Console returns what the guest printed so far.
func (v *VM) Console() string { return v.console.String() }

// Kill stops qemu if it is still running.
func (v *VM) Kill() { v.Cmd.Process.Kill() }

// Replay is a connection whose first bytes were already read (and are handed back first).
type Replay struct {
	net.Conn
	R io.Reader
}

func (c *Replay) Read(p []byte) (int, error) { return c.R.Read(p) }

// Accel returns the accelerator chosen by AGENTD_QEMU_ACCEL ("tcg" by default).
func Accel() string {
	if a := os.Getenv("AGENTD_QEMU_ACCEL"); a != "" {
		return a
	}
	return "tcg"
}
