package initfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// NewRoot is where MSB_BLOCK_ROOT's filesystem is assembled before agentd moves into it.
const NewRoot = "/newroot"

// MountBlockRoot assembles the root filesystem of MSB_BLOCK_ROOT on /newroot and makes it the
// root, as the reference does: a disk-image device (fstype given, or every block filesystem
// the kernel has, in order), or an oci-erofs lower image with a writable upper filesystem
// under an overlay. Then /.msb is bind-mounted into it, the new root is moved onto / and
// chrooted into, and devtmpfs, proc and sysfs are mounted again inside it (MountRest follows).
// Errors name the step.
func MountBlockRoot(b *BlockRoot) error {
	if err := os.MkdirAll(NewRoot, 0o755); err != nil {
		return fmt.Errorf("block root: mkdir %s: %w", NewRoot, err)
	}
	switch b.Kind {
	case "disk-image":
		if err := waitDevice(b.Device, 2*time.Second); err != nil {
			return fmt.Errorf("block root: %w", err)
		}
		types := []string{b.FsType}
		if b.FsType == "" {
			types = blockFilesystems()
		}
		var last error = errors.New("no supported filesystem found")
		for _, fs := range types {
			if last = unix.Mount(b.Device, NewRoot, fs, 0, ""); last == nil {
				break
			}
		}
		if last != nil {
			return fmt.Errorf("block root: mount %s on %s: %w", b.Device, NewRoot, last)
		}
	case "oci-erofs":
		lower, upperfs := RuntimeDir+"/rootfs/lower", RuntimeDir+"/rootfs/upperfs"
		for _, d := range []string{lower, upperfs} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return fmt.Errorf("block root: mkdir %s: %w", d, err)
			}
		}
		for _, dev := range []string{b.Lower, b.Upper} {
			if err := waitDevice(dev, 2*time.Second); err != nil {
				return fmt.Errorf("block root: %w", err)
			}
		}
		if err := unix.Mount(b.Lower, lower, "erofs", unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("block root: mount erofs %s on %s: %w", b.Lower, lower, err)
		}
		if err := unix.Mount(b.Upper, upperfs, b.UpperFsType, 0, ""); err != nil {
			return fmt.Errorf("block root: mount %s (%s) on %s: %w", b.Upper, b.UpperFsType, upperfs, err)
		}
		for _, d := range []string{upperfs + "/upper", upperfs + "/work"} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return fmt.Errorf("block root: mkdir %s: %w", d, err)
			}
		}
		data := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lower, upperfs, upperfs)
		if err := unix.Mount("overlay", NewRoot, "overlay", 0, data); err != nil {
			return fmt.Errorf("block root: mount overlay on %s: %w", NewRoot, err)
		}
	default:
		return fmt.Errorf("block root: unknown kind %q", b.Kind)
	}
	return pivot()
}

// pivot moves /newroot onto / and chroots into it (an initramfs cannot be pivot_root'ed away),
// then mounts devtmpfs, proc and sysfs there.
func pivot() error {
	if _, err := os.Stat(RuntimeDir); err == nil {
		target := filepath.Join(NewRoot, RuntimeDir)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("block root: mkdir %s: %w", target, err)
		}
		if err := unix.Mount(RuntimeDir, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("block root: bind %s: %w", RuntimeDir, err)
		}
	}
	if err := unix.Chdir(NewRoot); err != nil {
		return fmt.Errorf("block root: chdir %s: %w", NewRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("block root: move %s to /: %w", NewRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("block root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("block root: chdir /: %w", err)
	}
	// The rest of the base mounts (MountRest) are init's next steps, in this root.
	if err := MountEarly(); err != nil {
		return fmt.Errorf("block root: base mounts in the new root: %w", err)
	}
	return nil
}

// waitDevice waits for a device node to appear (devtmpfs creates it once the driver probed).
func waitDevice(path string, limit time.Duration) error {
	if path == "" {
		return errors.New("no device given")
	}
	deadline := time.Now().Add(limit)
	for !exists(path) {
		if time.Now().After(deadline) {
			return fmt.Errorf("device %s did not appear within %v", path, limit)
		}
		time.Sleep(10 * time.Millisecond) // the kernel signals no event for a node appearing
	}
	return nil
}
