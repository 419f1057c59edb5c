package initfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Profile block markers: the block puts /.msb/scripts on login shells' PATH (spec 4.3 step 15).
const (
	profileStart = "# >>> microsandbox scripts path >>>"
	profileEnd   = "# <<< microsandbox scripts path <<<"
)

// EnsureProfileBlock appends the scripts-path block to profile unless both markers are already
// there (creating the file if missing, adding a newline first if it lacks a trailing one).
func EnsureProfileBlock(profile string) error {
	old, err := os.ReadFile(profile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	if bytes.Contains(old, []byte(profileStart)) && bytes.Contains(old, []byte(profileEnd)) {
		return nil
	}
	var b bytes.Buffer
	if len(old) > 0 && old[len(old)-1] != '\n' {
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "%s\ncase \":$PATH:\" in\n  *:/.msb/scripts:*) ;;\n  *) export PATH=\"/.msb/scripts:$PATH\" ;;\nesac\n%s\n", profileStart, profileEnd)
	if err := os.MkdirAll(filepath.Dir(profile), 0o755); err != nil {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	f, err := os.OpenFile(profile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	defer f.Close()
	if _, err := f.Write(b.Bytes()); err != nil {
		return fmt.Errorf("profile %s: %w", profile, err)
	}
	return nil
}

// MountDisks mounts MSB_DISK_MOUNTS: each virtio-blk device found by its serial (the host sets
// it to the mount's id), with the requested flags (the restricted profile adds nosuid,nodev).
func MountDisks(list []DiskMount, restricted bool) error {
	var autodetect []string
	for _, d := range list {
		if err := os.MkdirAll(d.Path, 0o755); err != nil {
			return fmt.Errorf("disk %s: mkdir %s: %w", d.ID, d.Path, err)
		}
		dev, err := findDisk(d.ID)
		if err != nil {
			return err
		}
		flags := uintptr(unix.MS_RELATIME) | mountFlags(d.Opts, restricted)
		types := []string{d.Opts.FsType}
		if d.Opts.FsType == "" {
			if autodetect == nil {
				autodetect = blockFilesystems()
			}
			types = autodetect
		}
		var last error = fmt.Errorf("no supported filesystem found")
		for _, fs := range types {
			data := ""
			if fs == "ext4" && d.Opts.ReadOnly {
				data = "noload" // a read-only ext4 must not replay its journal
			}
			if last = unix.Mount(dev, d.Path, fs, flags, data); last == nil {
				break
			}
		}
		if last != nil {
			return fmt.Errorf("disk %s: mount %s on %s: %w", d.ID, dev, d.Path, last)
		}
	}
	return nil
}

// findDisk resolves a disk id: /dev/disk/by-id/virtio-<id>, else the /sys/block/vd* whose serial
// is id; retried 20 times 10 ms apart while the driver probes (as the reference).
func findDisk(id string) (string, error) {
	for try := 0; ; try++ {
		if p := "/dev/disk/by-id/virtio-" + id; exists(p) {
			return p, nil
		}
		vds, _ := filepath.Glob("/sys/block/vd*")
		for _, vd := range vds {
			if serial, err := os.ReadFile(filepath.Join(vd, "serial")); err == nil && strings.TrimSpace(string(serial)) == id {
				return "/dev/" + filepath.Base(vd), nil
			}
		}
		if try == 19 {
			return "", fmt.Errorf("disk %s: no virtio block device with that serial", id)
		}
		time.Sleep(10 * time.Millisecond) // the kernel signals no event for a disk appearing
	}
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// blockFilesystems lists the kernel's filesystems that need a device (not "nodev"), in order.
func blockFilesystems() []string {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 1 {
			out = append(out, f[0])
		}
	}
	return out
}
