package initfs

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ModulesDir holds the kernel modules the initramfs carries. LoadOrder lists, one file name per
// line in dependency order, those needed before the agent channel exists (virtio, the PCI
// transport, the console); BackgroundOrder those that can load while the handshake runs
// (networking: tun, virtio_net).
const (
	ModulesDir      = "/lib/modules"
	LoadOrder       = "agentd.load"
	BackgroundOrder = "agentd.load.background"
)

// LoadModules loads every module listed in dir/list with finit_module, a line each: the file
// name, then optional parameters ("virtio_pci.ko async_probe=1"). A module that is already
// loaded or built in is fine; no list at all means a kernel with the drivers built in.
func LoadModules(dir, list string, log *slog.Logger) (loaded int, err error) {
	f, err := os.Open(filepath.Join(dir, list))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("load modules: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		name, params, _ := strings.Cut(name, " ") // "file.ko [param=value ...]"
		path := filepath.Join(dir, name)
		mf, err := os.Open(path)
		if err != nil {
			return loaded, fmt.Errorf("load module %s: %w", path, err)
		}
		start := time.Now()
		err = unix.FinitModule(int(mf.Fd()), strings.TrimSpace(params), 0)
		mf.Close()
		log.Debug("kernel module", "name", name, "took", time.Since(start).Round(time.Microsecond).String())
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return loaded, fmt.Errorf("load module %s: %w", path, err)
		}
		loaded++
	}
	log.Debug("kernel modules loaded", "count", loaded)
	return loaded, sc.Err()
}

// OpenModules opens the modules listed in dir/list, in order, without loading them: a caller
// that is about to leave this root (MSB_BLOCK_ROOT) keeps the files it will load later.
func OpenModules(dir, list string) ([]*os.File, error) {
	data, err := os.ReadFile(filepath.Join(dir, list))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open modules: %w", err)
	}
	var files []*os.File
	for _, name := range strings.Split(string(data), "\n") {
		name = strings.TrimSpace(name)
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, fmt.Errorf("open module %s: %w", name, err)
		}
		files = append(files, f)
	}
	return files, nil
}

// LoadOpened loads opened module files in order with finit_module and closes them.
func LoadOpened(files []*os.File, log *slog.Logger) error {
	var first error
	for _, f := range files {
		err := unix.FinitModule(int(f.Fd()), "", 0)
		if err != nil && !errors.Is(err, unix.EEXIST) && first == nil {
			first = fmt.Errorf("load module %s: %w", f.Name(), err)
		}
		f.Close()
	}
	log.Debug("kernel modules loaded", "count", len(files))
	return first
}
