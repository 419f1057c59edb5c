package confine

import (
	"testing"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/abi/linux"
	"gvisor.dev/gvisor/pkg/bpf"
	"gvisor.dev/gvisor/pkg/seccomp"
)

// TestFilter runs the filter in gVisor's BPF interpreter: every refused call answers EPERM,
// clone only with a namespace flag, clone3 ENOSYS, the x32 ABI ENOSYS, 32-bit x86 kills, and
// the calls ordinary programs make (and clone for a thread or a fork) pass.
func TestFilter(t *testing.T) {
	instrs, err := Filter()
	if err != nil {
		t.Fatal(err)
	}
	prog, err := bpf.Compile(instrs, false)
	if err != nil {
		t.Fatal(err)
	}
	run := func(nr uintptr, arch uint32, args ...uint64) uint32 {
		d := linux.SeccompData{Nr: int32(nr), Arch: arch}
		copy(d.Args[:], args)
		buf := make([]byte, d.SizeBytes())
		ret, err := bpf.Exec[bpf.NativeEndian](prog, seccomp.DataAsBPFInput(&d, buf))
		if err != nil {
			t.Fatalf("syscall %d: %v", nr, err)
		}
		return ret
	}
	const amd64 = linux.AUDIT_ARCH_X86_64
	eperm := uint32(linux.SECCOMP_RET_ERRNO) | uint32(unix.EPERM)
	enosys := uint32(linux.SECCOMP_RET_ERRNO) | uint32(unix.ENOSYS)
	allow := uint32(linux.SECCOMP_RET_ALLOW)
	for _, s := range Refused {
		want := eperm
		switch s.Num {
		case unix.SYS_CLONE:
			continue // below
		case unix.SYS_CLONE3:
			want = enosys
		}
		if got := run(s.Num, amd64); got != want {
			t.Errorf("%s: %#x, want %#x", s.Name, got, want)
		}
	}
	for _, f := range nsFlags {
		if got := run(unix.SYS_CLONE, amd64, uint64(f)|uint64(unix.SIGCHLD)); got != eperm {
			t.Errorf("clone with %#x: %#x, want EPERM", f, got)
		}
	}
	for _, c := range []struct {
		name string
		nr   uintptr
		args []uint64
	}{
		{"fork", unix.SYS_CLONE, []uint64{uint64(unix.SIGCHLD)}},
		{"thread", unix.SYS_CLONE, []uint64{unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_THREAD | unix.CLONE_SYSVSEM}},
		{"read", unix.SYS_READ, nil}, {"openat", unix.SYS_OPENAT, nil}, {"execve", unix.SYS_EXECVE, nil},
		{"socket", unix.SYS_SOCKET, []uint64{unix.AF_INET, unix.SOCK_STREAM}}, {"connect", unix.SYS_CONNECT, nil},
		{"setuid", unix.SYS_SETUID, nil}, {"kill", unix.SYS_KILL, nil}, {"chroot", unix.SYS_CHROOT, nil},
	} {
		if got := run(c.nr, amd64, c.args...); got != allow {
			t.Errorf("%s: %#x, want allow", c.name, got)
		}
	}
	if got := run(unix.SYS_PTRACE|x32Bit, amd64); got != enosys {
		t.Errorf("x32 ptrace: %#x, want ENOSYS", got)
	}
	if got := run(unix.SYS_READ|x32Bit, amd64); got != enosys {
		t.Errorf("x32 read: %#x, want ENOSYS", got)
	}
	if got := run(26 /* i386 ptrace */, 0x40000003 /* AUDIT_ARCH_I386 */); got != uint32(linux.SECCOMP_RET_KILL_PROCESS) {
		t.Errorf("i386 call: %#x, want kill", got)
	}
}
