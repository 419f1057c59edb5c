package confine

import (
	"fmt"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/abi/linux"
	"gvisor.dev/gvisor/pkg/bpf"
	"gvisor.dev/gvisor/pkg/seccomp"
)

// Refused is the filter's table: each system call a confined workload may not make, and why.
// Every one of them answers EPERM (the workload sees a clear refusal, never a crash), except
// clone3, which answers ENOSYS: its flags sit in memory the filter cannot read, and ENOSYS makes
// the C library fall back to clone, whose flags it can.
var Refused = []Syscall{
	{"ptrace", unix.SYS_PTRACE, "another process's registers and memory (agentd's above all)"},
	{"process_vm_readv", unix.SYS_PROCESS_VM_READV, "another process's memory"},
	{"process_vm_writev", unix.SYS_PROCESS_VM_WRITEV, "another process's memory"},
	{"pidfd_getfd", unix.SYS_PIDFD_GETFD, "a copy of another process's descriptors (the tun, the channel, the uplink)"},
	{"kcmp", unix.SYS_KCMP, "probing another process's descriptors and memory"},
	{"init_module", unix.SYS_INIT_MODULE, "kernel modules"},
	{"finit_module", unix.SYS_FINIT_MODULE, "kernel modules"},
	{"delete_module", unix.SYS_DELETE_MODULE, "kernel modules"},
	{"kexec_load", unix.SYS_KEXEC_LOAD, "replacing the kernel"},
	{"kexec_file_load", unix.SYS_KEXEC_FILE_LOAD, "replacing the kernel"},
	{"bpf", unix.SYS_BPF, "BPF programs (socket filters, tracing) and the kernel attack surface behind them"},
	{"perf_event_open", unix.SYS_PERF_EVENT_OPEN, "tracing other processes and the kernel"},
	{"userfaultfd", unix.SYS_USERFAULTFD, "a kernel-exploit primitive with no use to a workload here"},
	{"io_uring_setup", unix.SYS_IO_URING_SETUP, "operations that run outside this filter"},
	{"io_uring_enter", unix.SYS_IO_URING_ENTER, "operations that run outside this filter"},
	{"io_uring_register", unix.SYS_IO_URING_REGISTER, "operations that run outside this filter"},
	{"setns", unix.SYS_SETNS, "entering agentd's namespaces (its uplink's above all)"},
	{"unshare", unix.SYS_UNSHARE, "new namespaces (a network namespace of its own, a user namespace with capabilities in it)"},
	{"clone (new namespaces)", unix.SYS_CLONE, "new namespaces, as unshare"},
	{"clone3", unix.SYS_CLONE3, "new namespaces, as unshare (ENOSYS: the C library falls back to clone)"},
	{"open_by_handle_at", unix.SYS_OPEN_BY_HANDLE_AT, "opening files by handle, around mounts and masks"},
	{"name_to_handle_at", unix.SYS_NAME_TO_HANDLE_AT, "file handles, the other half of open_by_handle_at"},
	{"iopl", unix.SYS_IOPL, "I/O ports"},
	{"ioperm", unix.SYS_IOPERM, "I/O ports"},
	{"mount", unix.SYS_MOUNT, "the mount table (agentd's masks)"},
	{"umount2", unix.SYS_UMOUNT2, "the mount table (agentd's masks)"},
	{"pivot_root", unix.SYS_PIVOT_ROOT, "the mount table"},
	{"move_mount", unix.SYS_MOVE_MOUNT, "the mount table"},
	{"open_tree", unix.SYS_OPEN_TREE, "the mount table"},
	{"fsopen", unix.SYS_FSOPEN, "the mount table"},
	{"fsconfig", unix.SYS_FSCONFIG, "the mount table"},
	{"fsmount", unix.SYS_FSMOUNT, "the mount table"},
	{"fspick", unix.SYS_FSPICK, "the mount table"},
	{"mount_setattr", unix.SYS_MOUNT_SETATTR, "the mount table"},
	{"swapon", unix.SYS_SWAPON, "the kernel's memory"},
	{"swapoff", unix.SYS_SWAPOFF, "the kernel's memory"},
	{"acct", unix.SYS_ACCT, "kernel accounting"},
	{"quotactl", unix.SYS_QUOTACTL, "file system quotas"},
	{"add_key", unix.SYS_ADD_KEY, "the kernel keyring, shared with agentd"},
	{"request_key", unix.SYS_REQUEST_KEY, "the kernel keyring, shared with agentd"},
	{"keyctl", unix.SYS_KEYCTL, "the kernel keyring, shared with agentd"},
	{"settimeofday", unix.SYS_SETTIMEOFDAY, "the clock (the host keeps it)"},
	{"clock_settime", unix.SYS_CLOCK_SETTIME, "the clock (the host keeps it)"},
	{"clock_adjtime", unix.SYS_CLOCK_ADJTIME, "the clock (the host keeps it)"},
	{"adjtimex", unix.SYS_ADJTIMEX, "the clock (the host keeps it)"},
	{"vhangup", unix.SYS_VHANGUP, "other sessions' terminals"},
}

// Syscall is one row of the table.
type Syscall struct {
	Name string
	Num  uintptr
	Why  string
}

// nsFlags are the clone flags that make new namespaces.
var nsFlags = []uintptr{unix.CLONE_NEWNS, unix.CLONE_NEWUTS, unix.CLONE_NEWIPC, unix.CLONE_NEWUSER, unix.CLONE_NEWPID,
	unix.CLONE_NEWNET, unix.CLONE_NEWCGROUP, unix.CLONE_NEWTIME}

// x32Bit marks a system call made under the x32 ABI: the same architecture, other numbers.
const x32Bit = 0x40000000

// Filter builds the seccomp program: every call in Refused is refused (clone only with a
// namespace flag) and anything else is allowed. A call made under another ABI cannot match the
// table's numbers, so it is refused too: x32 calls with ENOSYS, 32-bit x86 ones kill the
// process (they could do anything the table forbids).
func Filter() ([]bpf.Instruction, error) {
	eperm := seccomp.NewSyscallRules()
	enosys := seccomp.NewSyscallRules()
	for _, s := range Refused {
		switch s.Num {
		case unix.SYS_CLONE3:
			enosys.Add(s.Num, seccomp.MatchAll{})
		case unix.SYS_CLONE:
			var anyNS seccomp.Or
			for _, f := range nsFlags {
				anyNS = append(anyNS, seccomp.PerArg{seccomp.MaskedEqual(f, f)})
			}
			eperm.Add(s.Num, anyNS)
		default:
			eperm.Add(s.Num, seccomp.MatchAll{})
		}
	}
	p := seccomp.Program{
		RuleSets: []seccomp.RuleSet{
			{Rules: eperm, Action: seccomp.ReturnError.Code(uint16(unix.EPERM))},
			{Rules: enosys, Action: seccomp.ReturnError.Code(uint16(unix.ENOSYS))},
		},
		Options: seccomp.ProgramOptions{DefaultAction: seccomp.Allow, BadArchAction: seccomp.KillProcess},
	}
	prog, _, err := p.Build()
	if err != nil {
		return nil, err
	}
	x32 := []bpf.Instruction{
		bpf.Stmt(bpf.Ld|bpf.Abs|bpf.W, 0), // seccomp_data.nr
		bpf.Jump(bpf.Jmp|bpf.Jge|bpf.K, x32Bit, 0, 1),
		bpf.Stmt(bpf.Ret|bpf.K, uint32(linux.SECCOMP_RET_ERRNO)|uint32(unix.ENOSYS)),
	}
	return append(x32, prog...), nil
}

func installFilter() error {
	prog, err := Filter()
	if err != nil {
		return fmt.Errorf("build: %w", err)
	}
	return seccomp.SetFilter(prog)
}
