package initfs

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ModulesDir holds the kernel modules the initramfs carries, and LoadOrder lists them (one
// file name per line) in dependency order.
const (
	ModulesDir = "/lib/modules"
	LoadOrder  = "agentd.load"
)

// LoadModules loads every module listed in dir/agentd.load with finit_module. A module that is
// already loaded or built in is fine; no list at all means a kernel with the drivers built in.
func LoadModules(dir string, log *slog.Logger) (loaded int, err error) {
	f, err := os.Open(filepath.Join(dir, LoadOrder))
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
		path := filepath.Join(dir, name)
		mf, err := os.Open(path)
		if err != nil {
			return loaded, fmt.Errorf("load module %s: %w", path, err)
		}
		err = unix.FinitModule(int(mf.Fd()), "", 0)
		mf.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return loaded, fmt.Errorf("load module %s: %w", path, err)
		}
		loaded++
	}
	log.Debug("kernel modules loaded", "count", loaded)
	return loaded, sc.Err()
}
