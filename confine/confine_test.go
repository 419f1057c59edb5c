package confine

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const childEnv = "CONFINE_TEST_CHILD"

// TestMain lets the test binary run as the confined child of TestApply.
func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(child(spec))
	}
	os.Exit(m.Run())
}

// child confines itself, then makes every attempt and prints what each got.
func child(spec string) int {
	runtime.LockOSThread()
	var masks []string
	json.Unmarshal([]byte(spec), &masks)
	if err := Apply(Confined(masks...)); err != nil {
		fmt.Println(`{"apply": "` + err.Error() + `"}`)
		return 1
	}
	res := map[string]string{}
	errno := func(err error) string {
		if err == nil {
			return "ok"
		}
		return unix.ErrnoName(err.(unix.Errno))
	}
	ppid := os.Getppid()
	res["ptrace attach"] = errno(unix.PtraceAttach(ppid))
	_, _, e := unix.Syscall6(unix.SYS_PROCESS_VM_READV, uintptr(ppid), 0, 0, 0, 0, 0)
	res["process_vm_readv"] = errno(errOrNil(e))
	res["unshare net"] = errno(unix.Unshare(unix.CLONE_NEWNET))
	res["unshare user"] = errno(unix.Unshare(unix.CLONE_NEWUSER))
	// Another root process's namespaces: not even openable with fewer capabilities than it has.
	_, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", ppid), unix.O_RDONLY, 0)
	res["open parent ns"] = errno(err)
	if fd, err := unix.Open("/proc/self/ns/net", unix.O_RDONLY, 0); err == nil {
		res["setns"] = errno(unix.Setns(fd, unix.CLONE_NEWNET))
	}
	res["finit_module"] = errno(unix.FinitModule(-1, "", 0))
	_, _, e = unix.Syscall(unix.SYS_BPF, 0, 0, 0)
	res["bpf"] = errno(errOrNil(e))
	_, _, e = unix.Syscall(unix.SYS_IO_URING_SETUP, 1, 0, 0)
	res["io_uring_setup"] = errno(errOrNil(e))
	res["iopl"] = errno(unix.Iopl(3))
	_, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	res["packet socket"] = errno(err)
	_, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	res["raw socket"] = errno(err)
	res["mount"] = errno(unix.Mount("none", "/mnt", "tmpfs", 0, ""))
	res["tun"] = errno(tun())
	res["getpid"] = strconv.Itoa(unix.Getpid())
	status, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(status), "\n") {
		if f := strings.Fields(l); len(f) == 2 && (f[0] == "CapBnd:" || f[0] == "CapEff:" || f[0] == "NoNewPrivs:" || f[0] == "Seccomp:") {
			res[strings.TrimSuffix(f[0], ":")] = f[1]
		}
	}
	for _, p := range masks {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			ents, _ := os.ReadDir(p)
			res["mask "+p] = fmt.Sprintf("dir %d entries", len(ents))
			res["write "+p] = errno(unwrap(os.WriteFile(filepath.Join(p, "x"), nil, 0o600)))
		} else {
			os.WriteFile(p, []byte("allow everything"), 0o600) // goes nowhere: the file is /dev/null here
			b, _ := os.ReadFile(p)
			res["mask "+p] = fmt.Sprintf("file %q", b)
		}
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func errOrNil(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func unwrap(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// tun tries to create a tun device (or attach to one by name).
func tun() error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, _ := unix.NewIfreq("agtunprobe0")
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	return unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
}

// TestApply: a root process confined with the profile loses everything the threat model needs
// gone (each attempt gets EPERM, or ENOSYS where the table says so), keeps exactly the
// capabilities in Kept, has no_new_privs and a seccomp filter, and sees agentd's files masked.
func TestApply(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the attempts are a root workload's")
	}
	dir := t.TempDir()
	secretDir := filepath.Join(dir, "agentd")
	os.Mkdir(secretDir, 0o700)
	os.WriteFile(filepath.Join(secretDir, "audit.jsonl"), []byte("secret records"), 0o600)
	policyFile := filepath.Join(dir, "egress.json")
	os.WriteFile(policyFile, []byte(`{"default_egress": "deny"}`), 0o600)
	spec, _ := json.Marshal([]string{secretDir, policyFile, filepath.Join(dir, "missing")})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var res map[string]string
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("child said %s", out)
	}
	var kept uint64
	for _, c := range Kept {
		kept |= 1 << c.Num
	}
	want := map[string]string{
		"ptrace attach": "EPERM", "process_vm_readv": "EPERM", "unshare net": "EPERM", "unshare user": "EPERM",
		"setns": "EPERM", "finit_module": "EPERM", "bpf": "EPERM", "io_uring_setup": "EPERM", "iopl": "EPERM",
		"packet socket": "EPERM", "raw socket": "EPERM", "mount": "EPERM", "tun": "EPERM",
		"CapBnd": fmt.Sprintf("%016x", kept), "CapEff": fmt.Sprintf("%016x", kept), "NoNewPrivs": "1", "Seccomp": "2",
		"mask " + secretDir: "dir 0 entries", "write " + secretDir: "EROFS",
		"mask " + policyFile: `file ""`, "open parent ns": "EACCES",
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s: %q, want %q", k, res[k], v)
		}
	}
	if res["getpid"] == "" {
		t.Error("an ordinary call failed")
	}
	if b, _ := os.ReadFile(policyFile); string(b) != `{"default_egress": "deny"}` {
		t.Errorf("the masked policy file changed outside: %q", b)
	}
}
