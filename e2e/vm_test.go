package e2e

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/internal/testkit/vm"
	"github.com/agentd/agentd/protocol"
)

// TestVM boots a Debian cloud kernel under qemu with agentd as PID 1 (from make initramfs'
// recipe) and checks the mission end to end on a real kernel: the first frame, ready, exec,
// fs, a port forward to a server in the guest, orphan reaping, and a clean power-off. It boots
// Plain: the default CPU and no kernel parameters but the console and MSB_*.
func TestVM(t *testing.T) {
	needVM(t)
	disk := dataDisk(t)
	v, conn := startVM(t, vm.Options{Plain: true, Net: true, Disks: []vm.Disk{{Path: disk, Serial: "data1"}},
		Append: "MSB_HOSTNAME=agentd-vm MSB_TMPFS=/scratch:size=16,noexec MSB_RLIMITS=nofile=4096:8192 " +
			"MSB_NET=iface=eth0,mac=52:54:00:ab:cd:ef,mtu=1400 MSB_NET_IPV4=addr=10.0.2.15/24,gw=10.0.2.2,dns=10.0.2.3 " +
			"MSB_HOST_ALIAS=host.microsandbox.internal MSB_DISK_MOUNTS=data1:/data:fstype=ext4"})
	start := v.Started

	// The first frame must be core.init.resolved.
	var seen bytes.Buffer
	conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	f, err := protocol.NewFrameReader(io.TeeReader(conn, &seen)).Next()
	if err != nil {
		t.Fatalf("first frame: %v", err)
	}
	conn.SetReadDeadline(time.Time{})
	first, _ := protocol.DecodeMessage(f)
	if first.Type != protocol.TypeInitResolved || first.ID != 0 {
		t.Fatalf("first frame %s id %d", first.Name(), first.ID)
	}
	firstAt := time.Since(start)
	c, err := host.Direct(&vm.Replay{Conn: conn, R: io.MultiReader(bytes.NewReader(seen.Bytes()), conn)}, host.Options{Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	readyAt := time.Since(start)
	t.Logf("qemu start -> core.init.resolved %v, -> core.ready %v; agentd init_time_ns %v", firstAt.Round(time.Millisecond),
		readyAt.Round(time.Millisecond), time.Duration(c.Ready.InitTimeNs).Round(time.Microsecond))
	g := vmGuest{t: t, c: c, user: "root"}
	g.checkBootSettings("cloud-amd64", "/dev/root") // the initramfs: / is rootfs, shown as none of the disks
	g.checkNetwork()
	g.checkServices()
	g.checkPowerOff(v, disk)
}

// TestVMBootstrap boots with no MSB_* variable at all, as a current microsandbox host does: the
// host puts a core.bootstrap frame into the console before agentd opens it (qemu holds the
// bytes until the guest opens the port, as a host's console ring does) with a block root, a
// virtio-fs volume, a disk volume, network settings, a user and an environment, and the guest
// comes up configured as the MSB_* boot of TestVM does: the same checks, plus what only the
// bootstrap carries (the default cwd and environment).
func TestVMBootstrap(t *testing.T) {
	if _, err := os.Stat(vm.Virtiofsd); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("virtiofsd is missing: qemu-system-x86 (Debian) ships it; .ci/run installs that")
		}
		t.Skip("no virtiofsd")
	}
	needVM(t)
	root := rootImage(t, map[string]string{
		"etc/block-root-marker": "on the block root\n",
		"etc/passwd":            "root:x:0:0:root:/root:/bin/sh\nimageuser:x:1234:1235::/tmp:/bin/sh\n",
	})
	disk := dataDisk(t)
	work := t.TempDir()
	os.Chmod(work, 0o777)
	os.WriteFile(filepath.Join(work, "from-host"), []byte("host wrote this\n"), 0o644)
	s := func(v string) *string { return &v }
	ext4 := "ext4"
	size, mode := uint32(16), uint32(0o1777)
	dns := protocol.IPv4Addr{10, 0, 2, 3}
	b := &protocol.Bootstrap{
		BlockRoot:   &protocol.BootstrapBlockRoot{Kind: protocol.BlockRootDiskImage, Device: "/dev/vda", FsType: &ext4},
		DirMounts:   []protocol.BootstrapDirMount{{Tag: "work", GuestPath: "/work"}},
		DiskMounts:  []protocol.BootstrapDiskMount{{ID: "data1", GuestPath: "/data", FsType: &ext4}},
		TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/scratch", SizeMiB: &size, Mode: &mode, Flags: protocol.MountFlags{NoExec: true}}},
		Hostname:    s("agentd-vm"),
		HostAlias:   s("host.microsandbox.internal"),
		Network: &protocol.BootstrapNetwork{Interface: "eth0", MAC: [6]byte{0x52, 0x54, 0, 0xab, 0xcd, 0xef}, MTU: 1400,
			IPv4: &protocol.BootstrapIPv4{Address: [4]byte{10, 0, 2, 15}, PrefixLen: 24, Gateway: [4]byte{10, 0, 2, 2}, DNS: &dns}},
		Rlimits:    []protocol.ExecRlimit{{Resource: "nofile", Soft: 4096, Hard: 8192}},
		User:       s("imageuser"),
		DefaultCwd: s("/work"),
		DefaultEnv: []protocol.EnvVar{{Key: "PATH", Value: "/usr/bin:/bin:/usr/sbin:/sbin"}, {Key: "GREETING", Value: "from the bootstrap"},
			{Key: "AGENTD_LOG_LEVEL", Value: "debug"}},
	}
	v, conn := startVM(t, vm.Options{Plain: true, Net: true, Disks: []vm.Disk{{Path: root, Serial: "root"}, {Path: disk, Serial: "data1"}},
		Shares: []vm.Share{{Tag: "work", Dir: work}}})
	c, err := host.Direct(conn, host.Options{Log: quiet, HandshakeTimeout: 60 * time.Second, Bootstrap: b})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("qemu start -> core.ready %v (generation %d); agentd init_time_ns %v", time.Since(v.Started).Round(time.Millisecond),
		c.ReadyV, time.Duration(c.Ready.InitTimeNs).Round(time.Microsecond))
	if got := c.Resolved.DefaultUser; got.UID != 1234 || got.GID != 1235 {
		t.Errorf("core.init.resolved default user %+v, want 1234:1235 from the image's passwd", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The default user, cwd and environment of a request that names none; agentd's own
	// settings (AGENTD_*) are not the workload's.
	out, errOut, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c",
		`id -u; pwd; echo "$GREETING"; echo "$PATH"; env | grep -c AGENTD_; cat /work/from-host; echo guest wrote this > /work/from-guest; cat /etc/block-root-marker`}}, nil)
	want := "1234\n/work\nfrom the bootstrap\n/.msb/scripts:/usr/bin:/bin:/usr/sbin:/sbin\n0\nhost wrote this\non the block root\n"
	if err != nil || string(out) != want {
		t.Fatalf("default user, cwd, env; volume; block root: %q %q %d %v\nwant %q", out, errOut, code, err, want)
	}
	if !strings.Contains(v.Console(), "source=bootstrap") {
		t.Errorf("agentd did not log the bootstrap as its configuration source")
	}
	g := vmGuest{t: t, c: c, user: "root"}
	g.checkBootSettings("cloud-amd64", "/dev/vda")
	g.checkNetwork()
	g.checkServices()
	g.checkPowerOff(v, disk)
	if b, err := os.ReadFile(filepath.Join(work, "from-guest")); err != nil || string(b) != "guest wrote this\n" {
		t.Fatalf("the guest's file on the host: %q %v", b, err)
	}
}

// dataDisk makes an empty ext4 image for a disk volume.
func dataDisk(t *testing.T) string {
	disk := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(disk, 32<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", disk).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return disk
}

// vmGuest holds the checks of a guest booted with TestVM's configuration (from MSB_* or from
// core.bootstrap): hostname agentd-vm, tmpfs /scratch (16 MiB, noexec), nofile 4096:8192, eth0
// with MAC 52:54:00:ab:cd:ef, MTU 1400 and 10.0.2.15/24 via 10.0.2.2 (dns 10.0.2.3), the host
// alias, and the ext4 disk data1 at /data. Commands run as user.
type vmGuest struct {
	t    *testing.T
	c    *host.Client
	user string
}

func (g vmGuest) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	g.t.Cleanup(cancel)
	return ctx
}

func (g vmGuest) run(script string) (string, error) {
	out, _, _, err := g.c.Run(g.ctx(), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", script}, User: &g.user}, nil)
	return string(out), err
}

// checkBootSettings: the kernel, the root device, tmpfs with its size and flags, rlimits on
// PID 1 (inherited), /etc/hostname and /etc/hosts.
func (g vmGuest) checkBootSettings(kernel, rootDev string) {
	t := g.t
	out, err := g.run("uname -a")
	if err != nil || !strings.Contains(out, kernel) || !strings.Contains(out, "agentd-vm") {
		t.Fatalf("uname -a: %q %v", out, err)
	}
	t.Logf("uname -a: %s", strings.TrimSpace(out))
	out, err = g.run(`grep ' /scratch ' /proc/mounts; ulimit -n; ulimit -Hn; cat /etc/hostname; head -1 /etc/hosts; grep ' / ' /proc/mounts | cut -d' ' -f1`)
	mounts, rest, _ := strings.Cut(out, "\n")
	if err != nil || !strings.HasPrefix(mounts, "tmpfs /scratch tmpfs ") || !strings.Contains(mounts, "noexec") ||
		!strings.Contains(mounts, "size=16384k") || !strings.HasPrefix(rest, "4096\n8192\nagentd-vm\n127.0.0.1\tlocalhost agentd-vm\n") {
		t.Fatalf("boot settings: %q %v", out, err)
	}
	if rootDev != "/dev/root" && !strings.HasSuffix(rest, "\n"+rootDev+"\n") {
		t.Fatalf("root device: %q, want %s", rest, rootDev)
	}
}

// checkNetwork: the uplink is configured (MAC, MTU, address, default route, resolv.conf, and
// the host alias in /etc/hosts); a server on this host is reachable through it (qemu user
// networking maps 10.0.2.2 to the host's loopback).
func (g vmGuest) checkNetwork() {
	t := g.t
	out, err := g.run(`ip -o link show eth0; ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf; grep microsandbox /etc/hosts`)
	for _, want := range []string{"mtu 1400", "52:54:00:ab:cd:ef", "inet 10.0.2.15/24", "default via 10.0.2.2 dev eth0",
		"nameserver 10.0.2.3", "10.0.2.2\thost.microsandbox.internal"} {
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("network config: missing %q in\n%s (%v)", want, out, err)
		}
	}
	hostSrv := testutil.Serve(t, testutil.Echo)
	up, err := g.c.DialTCP(g.ctx(), "10.0.2.2", uint16(hostSrv.Addr.Port))
	if err != nil {
		t.Fatalf("guest -> uplink -> host server: %v", err)
	}
	up.Write([]byte("over the uplink"))
	up.CloseWrite()
	if got, _ := io.ReadAll(up); string(got) != "over the uplink" {
		t.Fatalf("echo over the uplink: %q", got)
	}
	up.Close()
}

// checkServices: fs writes (one onto the disk volume, kept for checkPowerOff), a server in the
// guest reached through core.tcp (what agentctl forward does), orphan reaping, a read back.
func (g vmGuest) checkServices() {
	t, c, ctx := g.t, g.c, g.ctx()
	payload := bytes.Repeat([]byte("written through core.fs "), 10000)
	if _, err := c.WriteFile(ctx, "/root/data", 0o600, bytes.NewReader(payload)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteFile(ctx, "/data/hello", 0o644, strings.NewReader("persisted before shutdown\n")); err != nil {
		t.Fatalf("write to the disk volume: %v", err)
	}
	srv, err := c.Exec(ctx, protocol.ExecRequest{Cmd: "sh", User: &g.user, Args: []string{"-c", "mkdir -p /www && echo hello-from-guest > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"}})
	if err != nil {
		t.Fatal(err)
	}
	var body []byte
	for deadline := time.Now().Add(20 * time.Second); ; {
		conn, err := c.DialTCP(ctx, "127.0.0.1", 8080)
		if err == nil {
			conn.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
			conn.CloseWrite()
			body, _ = io.ReadAll(conn)
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest server never listened: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // httpd binds asynchronously in the guest
	}
	if !strings.Contains(string(body), "hello-from-guest") {
		t.Fatalf("forward to the guest server: %q", body)
	}
	srv.Signal(15)
	// Orphans are reaped: a double-forked child exits as PID 1's and must not stay a zombie.
	out, err := g.run(`for i in 1 2 3; do (sleep 0.1 &); done; sleep 1; cat /proc/[0-9]*/stat 2>/dev/null | awk '$3=="Z"' | wc -l`)
	if err != nil || strings.TrimSpace(out) != "0" {
		t.Fatalf("zombies after a double fork: %q %v", out, err)
	}
	var back bytes.Buffer
	if _, err := c.ReadFile(ctx, "/root/data", &back); err != nil || !bytes.Equal(back.Bytes(), payload) {
		t.Fatalf("file read back: %d bytes, %v", back.Len(), err)
	}
}

// checkPowerOff: core.shutdown powers the VM off (qemu exits 0) within 2 s, with a daemon
// that ignores SIGTERM still running (outside every exec session's process group), and what
// was written to the disk volume is on its image.
func (g vmGuest) checkPowerOff(v *vm.VM, disk string) {
	t := g.t
	if out, err := g.run(`setsid sh -c 'trap "" TERM; : > /run/daemon; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
		while [ ! -e /run/daemon ]; do sleep 0.05; done; echo started`); err != nil || out != "started\n" {
		t.Fatalf("daemon: %q %v", out, err)
	}
	stop := time.Now()
	g.c.Shutdown()
	select {
	case err := <-v.Exited:
		if err != nil {
			t.Fatalf("qemu exited with %v", err)
		}
		t.Logf("core.shutdown -> qemu exit %v", time.Since(stop).Round(time.Millisecond))
		if d := time.Since(stop); d > 2*time.Second {
			t.Errorf("core.shutdown -> power-off took %v, want within 2 s", d)
		}
		out, err := exec.Command("debugfs", "-R", "cat /hello", disk).Output()
		if err != nil || string(out) != "persisted before shutdown\n" {
			t.Fatalf("file on the disk image after power-off: %q %v", out, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the VM did not power off within 5 s of core.shutdown")
	}
}

// bootVM boots the initramfs with extra kernel parameters and returns a connected client.
func bootVM(t *testing.T, appendArgs string, disks ...vm.Disk) (*host.Client, *vm.VM) {
	return bootVMWith(t, vm.Options{Append: appendArgs, Disks: disks, Net: true})
}

// bootVMWith boots with o and performs the host handshake.
func bootVMWith(t *testing.T, o vm.Options) (*host.Client, *vm.VM) {
	t.Helper()
	v, conn := startVM(t, o)
	c, err := host.Direct(conn, host.Options{Log: quiet, HandshakeTimeout: 60 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c, v
}

// startVM boots with o (kernel, initrd, dir and accel filled in) and connects to the agent
// channel; qemu is killed and its console shown (on failure) when the test ends.
func startVM(t *testing.T, o vm.Options) (*vm.VM, net.Conn) {
	t.Helper()
	needVM(t)
	o.Kernel, o.Initrd, o.Dir, o.Accel = filepath.Join(binDir, "vmlinuz"), filepath.Join(binDir, "initramfs.cpio.gz"), t.TempDir(), vm.Accel()
	v, err := vm.Boot(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		v.Kill()
		if t.Failed() {
			t.Logf("console:\n%s", tail(v.Console(), 4000))
		}
	})
	conn, err := v.Connect(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return v, conn
}

// TestVMEgress: agentd as PID 1 with the egress netstack on. The guest's uplink (virtio-net on
// qemu user networking) is moved into agentd's own namespace, workloads get only the tun, and
// a policy the host sets at run time (agentd.policy.set, what agentctl policy reload sends)
// allows one server on the uplink and refuses another; rewriting the policy file and SIGHUP
// from inside the guest (a workload's way) change nothing.
func TestVMEgress(t *testing.T) {
	c, v := bootVM(t, "MSB_NET=iface=eth0,mac=52:54:00:12:34:56,mtu=1500 MSB_NET_IPV4=addr=10.0.2.15/24,gw=10.0.2.2,dns=10.0.2.3 "+
		"AGENTD_EGRESS=netstack AGENTD_EGRESS_POLICY=/etc/agentd/egress.json")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	run := func(script string) (string, int32) {
		t.Helper()
		out, errOut, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", script}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return string(out) + string(errOut), code
	}
	if out, _ := run("ls /sys/class/net; cat /etc/resolv.conf; ip route"); !strings.HasPrefix(out, "agentd0\nlo\nnameserver 10.87.0.1\n") ||
		!strings.Contains(out, "default dev agentd0") {
		t.Fatalf("guest network view: %q", out)
	}
	allowed := httpServer(t, "127.0.0.1:0", "allowed")
	denied := httpServer(t, "127.0.0.1:0", "denied")
	port := func(addr string) string { return addr[strings.LastIndex(addr, ":")+1:] }
	url := func(addr string) string { return "http://10.0.2.2:" + port(addr) + "/" }
	// (busybox's wget -T crashes in this busybox-static build, so no -T: a refusal is immediate
	// and ctx bounds the rest.) The boot policy allows everything but the floor: both answer.
	for _, a := range []string{allowed, denied} {
		if out, code := run("wget -q -O - " + url(a)); code != 0 {
			t.Fatalf("before the reload, %s: %d %s", a, code, out)
		}
	}
	pol := `{"default_egress": "deny", "rules": [{"id": "host-web", "destination": {"cidr": "10.0.2.2/32"}, "protocols": ["tcp"], "ports": [{"start": ` + port(allowed) + `}], "action": "allow"}]}`
	// The workload's way first: the file agentd read at boot, and a signal. Nothing changes.
	if out, code := run("echo '" + pol + "' > /etc/agentd/egress.json && kill -HUP 1 && sleep 0.2"); code != 0 {
		t.Fatalf("rewrite and SIGHUP: %s", out)
	}
	if out, code := run("wget -q -O - " + url(denied)); code != 0 || out != "denied" {
		t.Fatalf("a guest-side file rewrite and SIGHUP changed the policy: %d %q", code, out)
	}
	st, err := c.SetPolicy(ctx, []byte(pol))
	if err != nil || st.Generation != 2 {
		t.Fatalf("set policy: %+v %v", st, err)
	}
	// The set is synchronous: the next decision uses it.
	out, code := run("wget -q -O - " + url(denied))
	if code == 0 {
		t.Fatalf("the denied server still answers after the host set the policy: %s", out)
	}
	if !strings.Contains(out, "refused") {
		t.Fatalf("denied server: want connection refused, got %q", out)
	}
	if out, code := run("wget -q -O - " + url(allowed)); code != 0 || out != "allowed" {
		t.Fatalf("allowed server after the reload: %d %q", code, out)
	}
	// core.tcp destinations pass the same policy.
	if _, err := c.DialTCP(ctx, "10.0.2.2", mustPort(t, denied)); err == nil {
		t.Fatal("core.tcp.connect to the denied server succeeded")
	}
	shutdownVM(t, c, v, 5*time.Second)
}

func mustPort(t *testing.T, addr string) uint16 {
	p, err := strconv.Atoi(addr[strings.LastIndex(addr, ":")+1:])
	if err != nil {
		t.Fatal(err)
	}
	return uint16(p)
}

// TestVMBlockRoot: MSB_BLOCK_ROOT=kind=disk-image: agentd mounts an ext4 image from a virtio
// disk, moves it onto / and runs everything from there (exec, fs, power-off with the root
// remounted read-only, so what was written survives). MSB_USER names a user only the image's
// passwd has: as in the reference, it is resolved after the pivot.
func TestVMBlockRoot(t *testing.T) {
	needVM(t)
	img := rootImage(t, map[string]string{
		"etc/block-root-marker": "on the block root\n",
		"etc/passwd":            "root:x:0:0:root:/root:/bin/sh\nimageuser:x:1234:1235::/tmp:/bin/sh\n",
	})
	c, v := bootVM(t, "MSB_BLOCK_ROOT=kind=disk-image,device=/dev/vda,fstype=ext4 MSB_USER=imageuser", vm.Disk{Path: img, Serial: "root"})
	if got := c.Resolved.DefaultUser; got.UID != 1234 || got.GID != 1235 {
		t.Errorf("core.init.resolved default user %+v, want 1234:1235 from the image's passwd", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, _, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "cat /etc/block-root-marker; grep ' / ' /proc/mounts; id -u"}}, nil)
	if err != nil || code != 0 || !strings.HasPrefix(string(out), "on the block root\n/dev/vda / ext4 ") || !strings.HasSuffix(string(out), "\n1234\n") {
		t.Fatalf("exec on the block root (as imageuser): %q %d %v", out, code, err)
	}
	if _, err := c.WriteFile(ctx, "/root/written", 0o644, strings.NewReader("kept\n")); err != nil {
		t.Fatal(err)
	}
	shutdownVM(t, c, v, 5*time.Second)
	if out, err := exec.Command("debugfs", "-R", "cat /root/written", img).Output(); err != nil || string(out) != "kept\n" {
		t.Fatalf("file on the root image after power-off: %q %v", out, err)
	}
}

// TestVMMicrovm: the same initramfs on qemu's microvm machine, where every virtio device sits
// on virtio-mmio (as under libkrun or Firecracker) and there is no PCI bus: agentd loads the
// MMIO transport and not the PCI one, and a disk volume (virtio_blk loaded before the channel
// because MSB_DISK_MOUNTS asks for it) mounts from a virtio-blk-device.
func TestVMMicrovm(t *testing.T) {
	needVM(t)
	img := rootImage(t, map[string]string{"etc/disk-marker": "on the disk\n"})
	c, v := bootVMWith(t, vm.Options{Machine: "microvm", Append: "MSB_DISK_MOUNTS=data:/mnt/data:ro",
		Disks: []vm.Disk{{Path: img, Serial: "data"}}})
	if c.Ready.InitTimeNs == 0 {
		t.Error("core.ready has no init_time_ns")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, _, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' '; cat /mnt/data/etc/disk-marker"}}, nil)
	if err != nil || code != 0 {
		t.Fatalf("exec: %q %d %v", out, code, err)
	}
	mods, marker, _ := strings.Cut(string(out), "on the disk")
	if !strings.Contains(mods, "virtio_mmio ") || strings.Contains(mods, "virtio_pci") || !strings.Contains(mods, "virtio_blk ") {
		t.Errorf("modules on microvm: %s (want virtio_mmio and virtio_blk, no virtio_pci)", mods)
	}
	if marker != "\n" {
		t.Errorf("disk volume: %q", out)
	}
	shutdownVM(t, c, v, 5*time.Second)
}

// rootImage makes an ext4 image of the initramfs's own tree (busybox, passwd; run
// mkinitramfs first) plus extra files (path -> content; executable under sbin/).
func rootImage(t *testing.T, extra map[string]string) string {
	t.Helper()
	tree := filepath.Join(t.TempDir(), "tree")
	if out, err := exec.Command("cp", "-a", filepath.Join(binDir, "vm", "rootfs"), tree).CombinedOutput(); err != nil {
		t.Fatalf("copy the tree: %v %s", err, out)
	}
	for p, content := range extra {
		mode := os.FileMode(0o644)
		if strings.HasPrefix(p, "sbin/") {
			mode = 0o755
		}
		if err := os.WriteFile(filepath.Join(tree, p), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(t.TempDir(), "root.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 -d: %v\n%s", err, out)
	}
	return img
}

// TestVMHandoff: MSB_HANDOFF_INIT on a block root. agentd does the init duties and the
// handshake as PID 1, then hands PID 1 to the image's own init and goes on as its child:
// exec works, PID 1 is the new init, and core.shutdown asks that init to power off
// (SIGRTMIN+4, systemd's way), which it does.
func TestVMHandoff(t *testing.T) {
	needVM(t)
	img := rootImage(t, map[string]string{"sbin/testinit": `#!/bin/sh
echo "pid $$ env ${HANDOFF_MARK}" > /run/handoff-init
trap 'sync; poweroff -f' 38 15
while :; do sleep 0.1; done
`})
	c, v := bootVM(t, "MSB_BLOCK_ROOT=kind=disk-image,device=/dev/vda,fstype=ext4 MSB_HANDOFF_INIT=/sbin/testinit MSB_HANDOFF_INIT_ENV=HANDOFF_MARK=set",
		vm.Disk{Path: img, Serial: "root"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out []byte
	for deadline := time.Now().Add(20 * time.Second); ; {
		var err error
		out, _, _, err = c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "cat /run/handoff-init && tr '\\0' ' ' < /proc/1/cmdline"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(string(out), "pid 1 env set\n") || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // the new init writes its file once it runs
	}
	if !strings.HasPrefix(string(out), "pid 1 env set\n") || !strings.Contains(string(out), "/sbin/testinit") {
		t.Fatalf("after the handoff: %q", out)
	}
	shutdownVM(t, c, v, 10*time.Second)
}

// TestVMVolumes: MSB_DIR_MOUNTS and MSB_FILE_MOUNTS over virtio-fs (qemu's virtiofsd): a host
// directory mounted in the guest both ways, a read-only one refusing writes, and a single file
// bound onto a guest path.
func TestVMVolumes(t *testing.T) {
	if _, err := os.Stat(vm.Virtiofsd); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("virtiofsd is missing: qemu-system-x86 (Debian) ships it; .ci/run installs that")
		}
		t.Skip("no virtiofsd")
	}
	needVM(t)
	work, ro, files := t.TempDir(), t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(work, "from-host"), []byte("host wrote this\n"), 0o644)
	os.WriteFile(filepath.Join(ro, "readme"), []byte("read only\n"), 0o644)
	os.WriteFile(filepath.Join(files, "app.conf"), []byte("key=value\n"), 0o644)
	c, v := bootVMWith(t, vm.Options{
		Append: "MSB_DIR_MOUNTS=work:/work;ro:/ro:ro MSB_FILE_MOUNTS=cfg:app.conf:/etc/app/app.conf:ro",
		Shares: []vm.Share{{Tag: "work", Dir: work}, {Tag: "ro", Dir: ro}, {Tag: "cfg", Dir: files}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, errOut, code, err := c.Run(ctx, protocol.ExecRequest{Cmd: "sh", Args: []string{"-c",
		`cat /work/from-host && echo guest wrote this > /work/from-guest && cat /ro/readme && ` +
			`(echo x > /ro/new 2>/dev/null && echo WRITABLE || echo refused) && cat /etc/app/app.conf && ` +
			`grep -c virtiofs /proc/mounts`}}, nil)
	want := "host wrote this\nread only\nrefused\nkey=value\n"
	if err != nil || code != 0 || !strings.HasPrefix(string(out), want) {
		t.Fatalf("volumes in the guest: %q %q %d %v", out, errOut, code, err)
	}
	c.Shutdown()
	<-v.Exited
	if b, err := os.ReadFile(filepath.Join(work, "from-guest")); err != nil || string(b) != "guest wrote this\n" {
		t.Fatalf("the guest's file on the host: %q %v", b, err)
	}
}

var initramfs = sync.OnceValues(func() ([]byte, error) {
	return exec.Command("../scripts/mkinitramfs.sh", binDir).CombinedOutput()
})

// needVM skips the test without qemu (fails it in CI, where .ci/run installs it) and builds
// the initramfs and kernel into binDir, once per test process.
func needVM(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-system-x86_64 is missing: .ci/run should have installed it")
		}
		t.Skip("qemu-system-x86_64 is not installed (.ci/run installs it)")
	}
	if out, err := initramfs(); err != nil {
		t.Fatalf("mkinitramfs: %v\n%s", err, out)
	}
}

// shutdownVM sends core.shutdown and requires qemu to exit cleanly (0) within limit.
func shutdownVM(t *testing.T, c *host.Client, v *vm.VM, limit time.Duration) {
	t.Helper()
	c.Shutdown()
	select {
	case err := <-v.Exited:
		if err != nil {
			t.Fatalf("qemu exited with %v", err)
		}
	case <-time.After(limit):
		t.Fatalf("the VM did not power off within %v of core.shutdown", limit)
	}
}
