package initfs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// VirtiofsOrder lists the modules virtiofs needs (fuse, virtiofs); they are loaded only when
// the machine has a virtio-fs device, so a host without shares pays nothing for them.
const VirtiofsOrder = "agentd.load.virtiofs"

// virtioFsDeviceID is the virtio device id of a virtio-fs device.
const virtioFsDeviceID = "0x001a"

// HasVirtiofsDevice reports whether any virtio device is a virtio-fs one.
func HasVirtiofsDevice() bool {
	devs, _ := filepath.Glob("/sys/bus/virtio/devices/*/device")
	for _, d := range devs {
		if b, err := os.ReadFile(d); err == nil && strings.TrimSpace(string(b)) == virtioFsDeviceID {
			return true
		}
	}
	return false
}

// LoadVirtiofs loads the virtiofs modules if there is a virtio-fs device (after the PCI
// transport, which enumerates it).
func LoadVirtiofs(log *slog.Logger) error {
	if !HasVirtiofsDevice() {
		return nil
	}
	_, err := LoadModules(ModulesDir, VirtiofsOrder, log)
	return err
}

// MountDirs mounts the MSB_DIR_MOUNTS virtiofs shares: each tag at its guest path (created),
// with MS_RELATIME and the requested flags (nosuid and nodev forced by the restricted profile).
func MountDirs(list []DirMount, restricted bool) error {
	for _, d := range list {
		if err := os.MkdirAll(d.Path, 0o755); err != nil {
			return fmt.Errorf("dir volume %s: mkdir %s: %w", d.Tag, d.Path, err)
		}
		flags := uintptr(unix.MS_RELATIME) | mountFlags(d.Opts, restricted)
		if err := unix.Mount(d.Tag, d.Path, "virtiofs", flags, ""); err != nil {
			return fmt.Errorf("dir volume %s: mount on %s: %w", d.Tag, d.Path, err)
		}
	}
	return nil
}

// fileStaging is where file volumes' shares are mounted before their file is bound in place.
const fileStaging = RuntimeDir + "/file-mounts"

// MountFiles mounts the MSB_FILE_MOUNTS single-file volumes as the reference does: the share
// is mounted in a staging directory, the one file is bind-mounted onto the guest path
// (created empty if missing, never truncated), the bind is remounted with the requested
// flags, and the staging mount is detached and removed.
func MountFiles(list []FileMount, restricted bool) error {
	if len(list) == 0 {
		return nil
	}
	if err := os.MkdirAll(fileStaging, 0o755); err != nil {
		return fmt.Errorf("file volumes: mkdir %s: %w", fileStaging, err)
	}
	defer os.Remove(fileStaging) // best effort, as the reference
	for _, f := range list {
		if err := mountFile(f, restricted); err != nil {
			return err
		}
	}
	return nil
}

func mountFile(f FileMount, restricted bool) (err error) {
	stage := filepath.Join(fileStaging, f.Tag)
	if err := os.MkdirAll(stage, 0o755); err != nil {
		return fmt.Errorf("file volume %s: mkdir %s: %w", f.Tag, stage, err)
	}
	flags := uintptr(unix.MS_RELATIME) | mountFlags(f.Opts, restricted)
	if err := unix.Mount(f.Tag, stage, "virtiofs", flags, ""); err != nil {
		return fmt.Errorf("file volume %s: mount on %s: %w", f.Tag, stage, err)
	}
	defer func() { // always detach and remove the staging mount; errors combine
		derr := unix.Unmount(stage, unix.MNT_DETACH)
		if rerr := os.Remove(stage); derr == nil {
			derr = rerr
		}
		if derr != nil {
			err = errors.Join(err, fmt.Errorf("file volume %s: clean up %s: %w", f.Tag, stage, derr))
		}
	}()
	if err := os.MkdirAll(filepath.Dir(f.Path), 0o755); err != nil {
		return fmt.Errorf("file volume %s: mkdir %s: %w", f.Tag, filepath.Dir(f.Path), err)
	}
	target, err := os.OpenFile(f.Path, os.O_WRONLY|os.O_CREATE, 0o644) // no truncation
	if err != nil {
		return fmt.Errorf("file volume %s: create %s: %w", f.Tag, f.Path, err)
	}
	target.Close()
	src := filepath.Join(stage, f.Filename)
	if err := unix.Mount(src, f.Path, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("file volume %s: bind %s on %s: %w", f.Tag, src, f.Path, err)
	}
	if err := unix.Mount("", f.Path, "", unix.MS_BIND|unix.MS_REMOUNT|flags, ""); err != nil {
		return fmt.Errorf("file volume %s: remount %s: %w", f.Tag, f.Path, err)
	}
	return nil
}
