// Command attack is the hostile workload of the security tests: started through agentd's exec
// as root, it makes every attempt the threat model names against agentd and the kernel's
// network, module and device machinery, and prints what each attempt got, as JSON: "ok" for an
// attempt that worked (a hole), an errno name for one that was refused. Never run it outside a
// test's sandbox: against an unconfined process its ptrace attempts succeed (and stop it).
//
//	attack -pid AGENTD_PID [-rewrite FILE,...] [-signals] [-modules DIR]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	pid := flag.Int("pid", 1, "agentd's process id")
	name := flag.String("name", "", "find agentd by its argv[0] instead (the agent child after a handoff)")
	rewrite := flag.String("rewrite", "", "comma-separated files of agentd's to overwrite with an allow-everything policy")
	signals := flag.Bool("signals", false, "send agentd every catchable signal but SIGTERM and SIGINT")
	modules := flag.String("modules", "/lib/modules", "where to look for a kernel module to load")
	flag.Parse()
	if *name != "" {
		*pid = find(*name)
	}
	r := results{"pid": strconv.Itoa(*pid)}

	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", *pid))
	if len(tasks) == 0 { // not even listable: try the process itself
		tasks = []string{fmt.Sprintf("/proc/%d/task/%d", *pid, *pid)}
	}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(filepath.Base(task))
		r.set("ptrace attach", unix.PtraceAttach(tid))
		r.set("ptrace seize", ptraceSeize(tid))
		for _, ns := range []string{"net", "mnt", "pid", "uts", "ipc", "user", "cgroup"} {
			fd, err := unix.Open(filepath.Join(task, "ns", ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err == nil {
				err = unix.Setns(fd, 0)
				unix.Close(fd)
			}
			r.set("setns "+ns, err)
		}
	}
	_, err := os.OpenFile(fmt.Sprintf("/proc/%d/mem", *pid), os.O_RDONLY, 0)
	r.set("/proc/PID/mem read", unwrap(err))
	_, err = os.OpenFile(fmt.Sprintf("/proc/%d/mem", *pid), os.O_RDWR, 0)
	r.set("/proc/PID/mem write", unwrap(err))
	var b [8]byte
	local := []unix.Iovec{{Base: &b[0], Len: 8}}
	remote := []unix.RemoteIovec{{Base: 0x400000, Len: 8}}
	_, err = unix.ProcessVMReadv(*pid, local, remote, 0)
	r.set("process_vm_readv", err)
	_, err = unix.ProcessVMWritev(*pid, local, remote, 0)
	r.set("process_vm_writev", err)
	// The numbers are listable by root (the directory's mode allows it); the descriptors behind
	// them are what must stay out of reach.
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", *pid))
	r.set("open agentd's descriptors", unix.EBADF)
	for _, e := range ents {
		f, err := os.Open(fmt.Sprintf("/proc/%d/fd/%s", *pid, e.Name()))
		if err == nil {
			f.Close()
		}
		r.set("open agentd's descriptors", unwrap(err))
	}
	_, err = os.Readlink(fmt.Sprintf("/proc/%d/root", *pid))
	r.set("agentd's root", unwrap(err))
	if pfd, err := unix.PidfdOpen(*pid, 0); err != nil {
		r.set("pidfd_open", err)
	} else {
		defer unix.Close(pfd)
		var got error = unix.EBADF
		for fd := 0; fd < 256; fd++ { // every descriptor agentd may hold
			nfd, err := unix.PidfdGetfd(pfd, fd, 0)
			if err == nil {
				unix.Close(nfd)
				got = nil
				break
			}
			if err != unix.EBADF {
				got = err
			}
		}
		r.set("pidfd_getfd", got)
	}

	if mod := findModule(*modules); mod != "" {
		f, err := os.Open(mod)
		if err == nil {
			err = unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
		r.set("finit_module", err)
	}
	r.set("init_module", unix.InitModule([]byte("\x7fELF"), ""))
	r.set("delete_module", unix.DeleteModule("virtio_console", 0))
	r.set("iopl", unix.Iopl(3))
	_, _, e := unix.Syscall(unix.SYS_IOPERM, 0x80, 1, 1)
	r.set("ioperm", errno(e))
	_, err = os.OpenFile("/dev/mem", os.O_RDWR, 0)
	r.set("/dev/mem", unwrap(err))
	_, err = os.OpenFile("/dev/port", os.O_RDWR, 0)
	r.set("/dev/port", unwrap(err))
	os.Remove("/tmp/attack-mem")
	r.set("mknod /dev/mem", unix.Mknod("/tmp/attack-mem", unix.S_IFCHR|0o600, int(unix.Mkdev(1, 1))))
	r.set("create a tun", tun("agattack0"))
	r.set("attach agentd's tun", tun("agentd0"))
	_, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	r.set("packet socket", err)
	_, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
	r.set("raw socket", err)
	r.set("unshare net", unix.Unshare(unix.CLONE_NEWNET))
	r.set("unshare user", unix.Unshare(unix.CLONE_NEWUSER))
	r.set("mount", unix.Mount("none", "/mnt", "tmpfs", 0, ""))
	_, _, e = unix.Syscall(unix.SYS_BPF, 0, 0, 0)
	r.set("bpf", errno(e))

	for _, f := range strings.Split(*rewrite, ",") {
		if f == "" {
			continue
		}
		allowAll := []byte(`{"default_egress": "allow", "rules": []}`)
		if err := os.WriteFile(f, allowAll, 0o644); err != nil {
			r.set("rewrite "+f, unwrap(err))
			continue
		}
		// A write into a mask (/dev/null) succeeds and goes nowhere: what counts is whether
		// the file now says what was written.
		if b, _ := os.ReadFile(f); string(b) == string(allowAll) {
			r["rewrite "+f] = "ok"
		} else {
			r["rewrite "+f] = "masked"
		}
	}
	if *signals {
		for s := syscall.Signal(1); s < 32; s++ {
			switch s {
			case syscall.SIGKILL, syscall.SIGSTOP, syscall.SIGTERM, syscall.SIGINT:
				continue
			}
			unix.Kill(*pid, s) // delivered or not: what matters is what agentd does after
		}
		r["signals sent"] = "ok"
	}

	json.NewEncoder(os.Stdout).Encode(r)
}

// results maps each attempt to "ok" (it worked) or the errno that refused it; an attempt made
// several times (per thread) keeps its worst outcome, "ok".
type results map[string]string

func (r results) set(what string, err error) {
	if r[what] == "ok" {
		return
	}
	if err == nil {
		r[what] = "ok"
		return
	}
	if e, ok := err.(unix.Errno); ok {
		r[what] = unix.ErrnoName(e)
		return
	}
	r[what] = err.Error()
}

func errno(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func unwrap(err error) error {
	for {
		switch e := err.(type) {
		case *os.PathError:
			err = e.Err
		case *os.SyscallError:
			err = e.Err
		default:
			return err
		}
	}
}

func ptraceSeize(tid int) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SEIZE, uintptr(tid), 0, 0, 0, 0)
	return errno(e)
}

// tun creates a tun device, or with the name of an existing one, attaches to it.
func tun(name string) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var ifr [40]byte
	copy(ifr[:16], name)
	*(*uint16)(unsafe.Pointer(&ifr[16])) = unix.IFF_TUN | unix.IFF_NO_PI
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0])))
	return errno(e)
}

func findModule(dir string) string {
	var found []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".ko") {
			found = append(found, p)
		}
		return nil
	})
	sort.Strings(found)
	if len(found) > 0 {
		return found[0]
	}
	return ""
}

// find returns the process whose argv[0] is name (0 if none: every attempt then fails).
func find(name string) int {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err == nil && strings.SplitN(string(b), "\x00", 2)[0] == name {
			n, _ := strconv.Atoi(filepath.Base(d))
			return n
		}
	}
	return 0
}
