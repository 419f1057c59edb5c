// Package initfs does agentd's PID-1 duties: the base mounts, kernel modules, reaping orphans
// and powering off. Every error names the step and the path.
package initfs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// baseMounts are the reference's, in its order. The first earlyMounts of them are what the
// agent channel needs (devtmpfs for the port's node, proc and sysfs to find the machine's
// devices); the rest can wait until the handshake is under way.
var baseMounts = []mount{
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_RELATIME, ""},
	{"proc", "/proc", "proc", unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOSUID | unix.MS_RELATIME, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOSUID | unix.MS_RELATIME, ""},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOSUID | unix.MS_RELATIME, ""},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOEXEC | unix.MS_NOSUID | unix.MS_RELATIME, ""},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOEXEC | unix.MS_NOSUID | unix.MS_RELATIME, ""},
}

const earlyMounts = 3

// MountEarly mounts devtmpfs, proc and sysfs (EBUSY: already mounted).
func MountEarly() error { return mountAll(baseMounts[:earlyMounts]) }

// MountRest mounts cgroup2, devpts and /dev/shm (EBUSY: already mounted), links /dev/fd, and
// makes /tmp, /var/tmp (1777), /run and /run/microsandbox.
func MountRest() error {
	if err := mountAll(baseMounts[earlyMounts:]); err != nil {
		return err
	}
	if _, err := os.Lstat("/dev/fd"); os.IsNotExist(err) {
		if err := os.Symlink("/proc/self/fd", "/dev/fd"); err != nil {
			return fmt.Errorf("symlink /dev/fd: %w", err)
		}
	}
	for _, d := range []string{"/tmp", "/var/tmp"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", d, err)
		}
		if err := os.Chmod(d, 0o1777|os.ModeSticky); err != nil {
			return fmt.Errorf("chmod %s: %w", d, err)
		}
	}
	for _, d := range []string{"/run", "/run/microsandbox"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", d, err)
		}
	}
	return nil
}

func mountAll(mounts []mount) error {
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("mount %s: mkdir %s: %w", m.fstype, m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	return nil
}

// RuntimeTag and RuntimeDir are the host's virtiofs runtime share and where it is mounted.
const (
	RuntimeTag = "msb_runtime"
	RuntimeDir = "/.msb"
)

// MountRuntime mounts the virtiofs runtime share at /.msb. It is optional: a host without it
// (or a kernel without virtiofs) gets a log line, not a failed boot.
func MountRuntime(log *slog.Logger) {
	if fs, err := os.ReadFile("/proc/filesystems"); err == nil && !strings.Contains(string(fs), "\tvirtiofs\n") {
		// Checking first spares the kernel's module-autoload helper (a process spawn per miss).
		log.Debug("runtime share not mounted (optional): the kernel has no virtiofs", "path", RuntimeDir)
		return
	}
	if err := os.MkdirAll(RuntimeDir, 0o755); err != nil {
		log.Warn("runtime share skipped", "step", "mkdir", "path", RuntimeDir, "error", err)
		return
	}
	if err := unix.Mount(RuntimeTag, RuntimeDir, "virtiofs", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
		log.Info("runtime share not mounted (optional)", "tag", RuntimeTag, "path", RuntimeDir, "error", err)
	}
}

// LoopbackUp brings lo up (the kernel assigns 127.0.0.1 and ::1 to an up loopback).
func LoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: SIOCGIFFLAGS: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: SIOCSIFFLAGS: %w", err)
	}
	return nil
}
