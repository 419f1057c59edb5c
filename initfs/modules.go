package initfs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ModulesDir holds the kernel modules the initramfs carries, and the lists of them agentd
// loads, one module per line in dependency order:
//   - LoadOrder: what the agent channel needs (virtio, a transport, the console);
//   - BlockOrder: virtio_blk, loaded before the channel only when init mounts a disk
//     (MSB_BLOCK_ROOT, MSB_DISK_MOUNTS), otherwise after it;
//   - BackgroundOrder: what can load while the handshake runs (networking: tun, virtio_net);
//   - VirtiofsOrder: fuse and virtiofs, only when a virtio-fs device exists.
//
// A line is "file.ko [when=CONDITION] [param=value ...]": the module is skipped unless the
// condition holds (see Conditions), and the parameters go to the kernel.
const (
	ModulesDir      = "/lib/modules"
	LoadOrder       = "agentd.load"
	BlockOrder      = "agentd.load.block"
	BackgroundOrder = "agentd.load.background"
)

// Conditions a module line may carry. A virtio transport module costs several milliseconds
// to load under emulation, so only the transport the machine has is loaded: PCI on a
// standard machine, MMIO on a microVM (qemu's microvm, libkrun, Firecracker).
var Conditions = map[string]func(sys Sys) bool{
	"virtio-pci":  Sys.HasVirtioPCI,
	"virtio-mmio": Sys.HasVirtioMMIO,
}

// Sys is where the kernel describes the machine: Root is "/" in the guest (tests point it at
// a directory shaped like /sys and /proc).
type Sys struct{ Root string }

// virtioVendor is the PCI vendor id of every virtio device.
const virtioVendor = "0x1af4"

// HasVirtioPCI reports whether a PCI device is a virtio one.
func (s Sys) HasVirtioPCI() bool {
	vendors, _ := filepath.Glob(filepath.Join(s.Root, "sys/bus/pci/devices/*/vendor"))
	for _, v := range vendors {
		if b, err := os.ReadFile(v); err == nil && strings.TrimSpace(string(b)) == virtioVendor {
			return true
		}
	}
	return false
}

// HasVirtioMMIO reports whether the firmware or the command line describes a virtio-mmio
// device: an ACPI LNRO0005 device, a device-tree "virtio_mmio" node, or virtio_mmio.device=.
func (s Sys) HasVirtioMMIO() bool {
	for _, pattern := range []string{"sys/bus/platform/devices/LNRO0005:*", "sys/bus/platform/devices/*.virtio_mmio"} {
		if m, _ := filepath.Glob(filepath.Join(s.Root, pattern)); len(m) > 0 {
			return true
		}
	}
	cmdline, _ := os.ReadFile(filepath.Join(s.Root, "proc/cmdline"))
	return strings.Contains(string(cmdline), "virtio_mmio.device=")
}

// Module is one entry of a module list.
type Module struct {
	Name   string // file name in the modules directory
	Params string // parameters for finit_module ("" for none)
	When   string // condition, "" for always
}

// ParseModuleList parses a module list (see ModulesDir). Blank lines and # comments are
// skipped; an unknown condition is an error naming the list and the line.
func ParseModuleList(name, text string) ([]Module, error) {
	var mods []Module
	for i, line := range strings.Split(text, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		m := Module{Name: fields[0]}
		var params []string
		for _, f := range fields[1:] {
			if cond, ok := strings.CutPrefix(f, "when="); ok {
				if _, known := Conditions[cond]; !known {
					return nil, fmt.Errorf("%s line %d: %s: unknown condition %q (want virtio-pci or virtio-mmio)", name, i+1, m.Name, cond)
				}
				m.When = cond
				continue
			}
			params = append(params, f)
		}
		m.Params = strings.Join(params, " ")
		mods = append(mods, m)
	}
	return mods, nil
}

// Wanted returns the modules whose condition holds on this machine (each condition is
// checked once).
func Wanted(mods []Module, sys Sys) []Module {
	var out []Module
	holds := map[string]bool{"": true}
	for _, m := range mods {
		ok, known := holds[m.When]
		if !known {
			ok = Conditions[m.When](sys)
			holds[m.When] = ok
		}
		if ok {
			out = append(out, m)
		}
	}
	return out
}

// readModules reads dir/list and keeps the modules this machine wants. No list at all means
// a kernel with the drivers built in: nothing to load.
func readModules(dir, list string) ([]Module, error) {
	text, err := os.ReadFile(filepath.Join(dir, list))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("module list: %w", err)
	}
	mods, err := ParseModuleList(filepath.Join(dir, list), string(text))
	if err != nil {
		return nil, err
	}
	return Wanted(mods, Sys{Root: "/"}), nil
}

// LoadModules loads the modules dir/list names with finit_module. A module that is already
// loaded or built in is fine.
func LoadModules(dir, list string, log *slog.Logger) (loaded int, err error) {
	opened, err := OpenModules(dir, list)
	if err != nil {
		return 0, err
	}
	return len(opened), LoadOpened(opened, log)
}

// Opened is a module file opened for a later load.
type Opened struct {
	File   *os.File
	Params string
}

// OpenModules opens the modules dir/list names, in order, without loading them: a caller
// that is about to leave this root (MSB_BLOCK_ROOT) keeps the files it will load later.
func OpenModules(dir, list string) ([]Opened, error) {
	mods, err := readModules(dir, list)
	if err != nil {
		return nil, err
	}
	var opened []Opened
	for _, m := range mods {
		f, err := os.Open(filepath.Join(dir, m.Name))
		if err != nil {
			for _, o := range opened {
				o.File.Close()
			}
			return nil, fmt.Errorf("open module %s: %w", m.Name, err)
		}
		opened = append(opened, Opened{File: f, Params: m.Params})
	}
	return opened, nil
}

// LoadOpened loads opened modules in order with finit_module and closes them all. It stops
// at the first failure (a later module may depend on the failed one).
func LoadOpened(mods []Opened, log *slog.Logger) error {
	defer func() {
		for _, m := range mods {
			m.File.Close()
		}
	}()
	for _, m := range mods {
		start := time.Now()
		err := unix.FinitModule(int(m.File.Fd()), m.Params, 0)
		log.Debug("kernel module", "name", filepath.Base(m.File.Name()), "took", time.Since(start).Round(time.Microsecond).String())
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load module %s: %w", m.File.Name(), err)
		}
	}
	return nil
}
