// Package confine is what a workload may do once agentd enforces egress. The workload is root
// inside the guest and hostile (docs/security.md); it shares the kernel with agentd. Confined, it
// keeps a small capability set (none that reaches the network's configuration, raw sockets,
// modules, devices, other processes' memory or the mount table), runs with no_new_privs, sees
// agentd's own files masked, and has a seccomp filter refuse, with EPERM, the system calls that
// would reach agentd or the kernel's network, module and namespace machinery. Apply runs in the
// pre-exec helper (exec sessions) and in PID 1 before it hands off to the image's init; what it
// sets is inherited by everything the workload starts and cannot be undone.
package confine

import (
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// Profile is one confinement.
type Profile struct {
	// Caps are the capabilities a workload may keep: the bounding set is cut to them, for
	// good, and the other sets with it.
	Caps []Cap
	// Seccomp installs the filter (Filter) that refuses what the threat model needs refused.
	Seccomp bool
	// Mask are paths of agentd's own (its policy, audit and log files): in the workload's own
	// mount namespace a directory is covered by an empty read-only tmpfs (writes fail with
	// EROFS) and a file by /dev/null (it reads empty; what is written goes nowhere), so a
	// workload can neither read them nor change them. Paths that do not exist are skipped.
	Mask []string
}

// Cap is a capability.
type Cap struct {
	Name string
	Num  uintptr
}

// Kept is the capability allowlist of a confined workload: Docker's default set without
// NET_RAW (raw and packet sockets, which could speak past the policy on any interface they
// reach) and MKNOD (device nodes), with SYS_BOOT. docs/security.md has the table, capability
// by capability.
var Kept = []Cap{
	{"CAP_CHOWN", unix.CAP_CHOWN},
	{"CAP_DAC_OVERRIDE", unix.CAP_DAC_OVERRIDE},
	{"CAP_FOWNER", unix.CAP_FOWNER},
	{"CAP_FSETID", unix.CAP_FSETID},
	{"CAP_KILL", unix.CAP_KILL},
	{"CAP_SETGID", unix.CAP_SETGID},
	{"CAP_SETUID", unix.CAP_SETUID},
	{"CAP_SETPCAP", unix.CAP_SETPCAP},
	{"CAP_NET_BIND_SERVICE", unix.CAP_NET_BIND_SERVICE},
	{"CAP_SYS_CHROOT", unix.CAP_SYS_CHROOT},
	{"CAP_AUDIT_WRITE", unix.CAP_AUDIT_WRITE},
	{"CAP_SETFCAP", unix.CAP_SETFCAP},
	// Powering the VM off ends the workload with everything else (it fails closed), and the
	// image's init after a handoff must be able to.
	{"CAP_SYS_BOOT", unix.CAP_SYS_BOOT},
}

// Confined is the profile of every workload while egress is on, and of MSB_SECURITY_PROFILE=
// restricted: Kept, the seccomp filter, and the masks the caller adds.
func Confined(mask ...string) Profile { return Profile{Caps: Kept, Seccomp: true, Mask: mask} }

// Apply confines the calling thread and the program it execs next: Begin and End with nothing
// in between. Call it on a locked thread.
func Apply(p Profile) error {
	if err := Begin(p); err != nil {
		return err
	}
	return End(p)
}

// Begin is the part of the confinement that needs privileges: the masks (CAP_SYS_ADMIN and a
// mount namespace of the workload's own), no_new_privs, and the bounding set cut to p.Caps (for
// good: no exec gets anything else back). The thread keeps its other capabilities until End,
// so a user switch or a per-request rlimit between the two still works as without confinement.
func Begin(p Profile) error {
	if len(p.Mask) > 0 {
		if err := mask(p.Mask); err != nil {
			return err
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return limitBounding(p.Caps)
}

// End finishes the confinement: the thread's own capability sets cut to p.Caps, then the
// seccomp filter, last, so that nothing before it is refused.
func End(p Profile) error {
	if err := limitSets(p.Caps); err != nil {
		return err
	}
	if p.Seccomp {
		if err := installFilter(); err != nil {
			return fmt.Errorf("seccomp filter: %w", err)
		}
	}
	return nil
}

// lastCap is the highest capability number the kernel knows.
func lastCap() uintptr {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err == nil {
		var n uintptr
		if _, err := fmt.Sscan(string(b), &n); err == nil {
			return n
		}
	}
	return 63
}

func kept(keep []Cap, c uintptr) bool {
	return slices.ContainsFunc(keep, func(k Cap) bool { return k.Num == c })
}

// limitBounding clears the ambient set and cuts the bounding set to keep.
func limitBounding(keep []Cap) error {
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && err != unix.EINVAL {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	for c := uintptr(0); c <= lastCap(); c++ {
		if kept(keep, c) {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	return nil
}

// limitSets removes everything but keep from the effective, permitted and inheritable sets.
func limitSets(keep []Cap) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	for c := uintptr(0); c < 64; c++ {
		if kept(keep, c) {
			continue
		}
		w, bit := c/32, uint32(1)<<(c%32)
		data[w].Effective &^= bit
		data[w].Permitted &^= bit
		data[w].Inheritable &^= bit
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return nil
}

// mask gives the thread a mount namespace of its own (receiving later mounts from agentd's, so
// volumes the host attaches still appear) and covers each path there.
func mask(paths []string) error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("mount namespace: make / a slave: %w", err)
	}
	for _, p := range paths {
		st, err := os.Lstat(p)
		if err != nil {
			continue // nothing there to hide
		}
		if st.IsDir() {
			err = unix.Mount("agentd-private", p, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4k,mode=0555")
		} else {
			err = unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
			if err == nil {
				err = unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, "")
			}
		}
		if err != nil {
			return fmt.Errorf("mask %s: %w", p, err)
		}
	}
	return nil
}

// CloseOnExec marks every descriptor from first up close-on-exec, so that nothing the process
// holds (what it inherited, what a library opened without O_CLOEXEC: gVisor's tun and eventfd)
// reaches a program it execs: a workload starts with what its exec request gave it and nothing
// of agentd's.
func CloseOnExec(first int) error {
	if err := unix.CloseRange(uint(first), ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return nil
	}
	ents, err := os.ReadDir("/proc/self/fd") // kernels before 5.11
	if err != nil {
		return fmt.Errorf("close-on-exec: %w", err)
	}
	for _, e := range ents {
		var fd int
		if _, err := fmt.Sscan(e.Name(), &fd); err == nil && fd >= first {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}
