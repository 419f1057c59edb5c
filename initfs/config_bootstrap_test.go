package initfs

import (
	"bufio"
	"encoding/hex"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/protocol"
)

func sp(s string) *string { return &s }

func addrp(s string) *netip.Addr { a := netip.MustParseAddr(s); return &a }

var (
	v4  = protocol.BootstrapIPv4{Address: protocol.IPv4Addr{172, 16, 0, 2}, PrefixLen: 30, Gateway: protocol.IPv4Addr{172, 16, 0, 1}, DNS: &protocol.IPv4Addr{172, 16, 0, 1}}
	v6  = protocol.BootstrapIPv6{Address: protocol.IPv6Addr{0xfd, 0x42, 15: 2}, PrefixLen: 64, Gateway: protocol.IPv6Addr{0xfd, 0x42, 15: 1}}
	mac = protocol.MAC{2, 0, 0, 0, 0, 2}
)

// TestBootstrapTwins is the one table mapping each core.bootstrap field to its MSB_* twin:
// both sources must give the same Config. A case without env has no MSB_* twin.
func TestBootstrapTwins(t *testing.T) {
	cases := []struct {
		field string
		b     protocol.Bootstrap
		env   map[string]string
		want  Config
	}{
		{"nothing", protocol.Bootstrap{}, map[string]string{}, Config{}},
		{"block_root disk-image",
			protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "disk-image", Device: "/dev/vda", FsType: sp("ext4")}},
			map[string]string{"MSB_BLOCK_ROOT": "kind=disk-image,device=/dev/vda,fstype=ext4"},
			Config{BlockRoot: &BlockRoot{Kind: BlockRootDiskImage, Device: "/dev/vda", FsType: "ext4"}}},
		{"block_root disk-image, fstype probed",
			protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "disk-image", Device: "/dev/vda"}},
			map[string]string{"MSB_BLOCK_ROOT": "kind=disk-image,device=/dev/vda"},
			Config{BlockRoot: &BlockRoot{Kind: BlockRootDiskImage, Device: "/dev/vda"}}},
		{"block_root oci-erofs, device upper",
			protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", Upper: &protocol.BootstrapUpper{Kind: "device", Device: "/dev/vdb", FsType: "ext4"}}},
			map[string]string{"MSB_BLOCK_ROOT": "kind=oci-erofs,lower=/dev/vda,upper=/dev/vdb,upper_fstype=ext4"},
			Config{BlockRoot: &BlockRoot{Kind: BlockRootOCIErofs, Lower: "/dev/vda", Upper: "/dev/vdb", UpperFsType: "ext4"}}},
		{"block_root oci-erofs, tmpfs upper",
			protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", Upper: &protocol.BootstrapUpper{Kind: "tmpfs", SizeMiB: u32p(512)}}},
			map[string]string{"MSB_BLOCK_ROOT": "kind=oci-erofs,lower=/dev/vda,upper=tmpfs,upper_size_mib=512"},
			Config{BlockRoot: &BlockRoot{Kind: BlockRootOCIErofs, Lower: "/dev/vda", UpperTmpfs: true, UpperSizeMiB: u32p(512)}}},
		{"block_root read-only-virtiofs (no twin)",
			protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "read-only-virtiofs"}}, nil,
			Config{BlockRoot: &BlockRoot{Kind: BlockRootReadOnlyVirtiofs}}},
		{"dir_mounts",
			protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "work", GuestPath: "/work", Flags: protocol.MountFlags{ReadOnly: true, NoExec: true}},
				{Tag: "cache", GuestPath: "/var/cache/x", Flags: protocol.MountFlags{NoSuid: true, NoDev: true}}}},
			map[string]string{"MSB_DIR_MOUNTS": "work:/work:ro,noexec;cache:/var/cache/x:nosuid,nodev"},
			Config{DirMounts: []DirMount{{"work", "/work", MountOpts{ReadOnly: true, NoExec: true}}, {"cache", "/var/cache/x", MountOpts{NoSuid: true, NoDev: true}}}}},
		{"file_mounts",
			protocol.Bootstrap{FileMounts: []protocol.BootstrapFileMount{{Tag: "cfg", Filename: "app.json", GuestPath: "/etc/app.json", Flags: protocol.MountFlags{ReadOnly: true}}}},
			map[string]string{"MSB_FILE_MOUNTS": "cfg:app.json:/etc/app.json:ro"},
			Config{FileMounts: []FileMount{{"cfg", "app.json", "/etc/app.json", MountOpts{ReadOnly: true}}}}},
		{"disk_mounts",
			protocol.Bootstrap{DiskMounts: []protocol.BootstrapDiskMount{{ID: "data", GuestPath: "/data", FsType: sp("ext4"), Flags: protocol.MountFlags{NoDev: true}},
				{ID: "scratch", GuestPath: "/scratch"}}},
			map[string]string{"MSB_DISK_MOUNTS": "data:/data:fstype=ext4,nodev;scratch:/scratch"},
			Config{DiskMounts: []DiskMount{{"data", "/data", MountOpts{FsType: "ext4", NoDev: true}}, {"scratch", "/scratch", MountOpts{}}}}},
		{"tmpfs_mounts",
			protocol.Bootstrap{TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/tmp", SizeMiB: u32p(64), Mode: u32p(0o1777), Flags: protocol.MountFlags{NoExec: true}}, {Path: "/run/x"}}},
			map[string]string{"MSB_TMPFS": "/tmp:size=64,mode=1777,noexec;/run/x"},
			Config{Tmpfs: []TmpfsMount{{"/tmp", MountOpts{SizeMiB: u32p(64), Mode: u32p(0o1777), NoExec: true}}, {"/run/x", MountOpts{}}}}},
		{"hostname", protocol.Bootstrap{Hostname: sp("box")}, map[string]string{"MSB_HOSTNAME": "box"}, Config{Hostname: "box"}},
		{"host_alias", protocol.Bootstrap{HostAlias: sp("host.microsandbox.internal")},
			map[string]string{"MSB_HOST_ALIAS": "host.microsandbox.internal"}, Config{HostAlias: "host.microsandbox.internal"}},
		{"network",
			protocol.Bootstrap{Network: &protocol.BootstrapNetwork{Interface: "eth0", MAC: mac, MTU: 1400}},
			map[string]string{"MSB_NET": "iface=eth0,mac=02:00:00:00:00:02,mtu=1400"},
			Config{Net: &NetConfig{"eth0", [6]byte(mac), 1400}}},
		{"network.ipv4",
			protocol.Bootstrap{Network: &protocol.BootstrapNetwork{Interface: "eth0", MAC: mac, MTU: 1500, IPv4: &v4}},
			map[string]string{"MSB_NET": "iface=eth0,mac=02:00:00:00:00:02", "MSB_NET_IPV4": "addr=172.16.0.2/30,gw=172.16.0.1,dns=172.16.0.1"},
			Config{Net: &NetConfig{"eth0", [6]byte(mac), 1500},
				IPv4: &IPConfig{netip.MustParsePrefix("172.16.0.2/30"), netip.MustParseAddr("172.16.0.1"), addrp("172.16.0.1")}}},
		{"network.ipv6",
			protocol.Bootstrap{Network: &protocol.BootstrapNetwork{Interface: "eth0", MAC: mac, MTU: 1500, IPv6: &v6}},
			map[string]string{"MSB_NET": "iface=eth0,mac=02:00:00:00:00:02,mtu=1500", "MSB_NET_IPV6": "addr=fd42::2/64,gw=fd42::1"},
			Config{Net: &NetConfig{"eth0", [6]byte(mac), 1500},
				IPv6: &IPConfig{netip.MustParsePrefix("fd42::2/64"), netip.MustParseAddr("fd42::1"), nil}}},
		{"rlimits",
			protocol.Bootstrap{Rlimits: []protocol.ExecRlimit{{Resource: "nofile", Soft: 1024, Hard: 4096}, {Resource: "nproc", Soft: 64, Hard: 64}}},
			map[string]string{"MSB_RLIMITS": "nofile=1024:4096;nproc=64"},
			Config{Rlimits: []Rlimit{{"nofile", 1024, 4096}, {"nproc", 64, 64}}}},
		{"user", protocol.Bootstrap{User: sp("1000:1000")}, map[string]string{"MSB_USER": "1000:1000"}, Config{User: "1000:1000"}},
		{"security_profile restricted", protocol.Bootstrap{SecurityProfile: protocol.SecurityRestricted},
			map[string]string{"MSB_SECURITY_PROFILE": "restricted"}, Config{Restricted: true}},
		{"security_profile default", protocol.Bootstrap{SecurityProfile: protocol.SecurityDefault},
			map[string]string{"MSB_SECURITY_PROFILE": "default"}, Config{}},
		{"handoff_init",
			protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "/sbin/init", Args: []string{"--unit=multi user.target", ""},
				Cwd: sp("/srv"), Env: []protocol.EnvVar{{Key: "J", Value: `{"a":1}`}, {Key: "E", Value: ""}}}},
			map[string]string{"MSB_HANDOFF_INIT": "/sbin/init", "MSB_HANDOFF_INIT_ARGS": "--unit=multi user.target\x1f",
				"MSB_HANDOFF_INIT_ENV": "J={\"a\":1}\x1fE=", "MSB_HANDOFF_INIT_CWD": "/srv"},
			Config{Handoff: &Handoff{Path: "/sbin/init", Args: []string{"--unit=multi user.target", ""}, Env: [][2]string{{"J", `{"a":1}`}, {"E", ""}}, Cwd: "/srv"}}},
		{"handoff_init auto", protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "auto"}},
			map[string]string{"MSB_HANDOFF_INIT": "auto"}, Config{Handoff: &Handoff{Path: "auto"}}},
		{"default_cwd (no twin)", protocol.Bootstrap{DefaultCwd: sp("work dir")}, nil, Config{DefaultCwd: "work dir"}},
		{"default_env (no twin)", protocol.Bootstrap{DefaultEnv: []protocol.EnvVar{{Key: "PATH", Value: "/bin"}, {Key: "AGENTD_EGRESS", Value: "netstack"}}}, nil,
			Config{DefaultEnv: [][2]string{{"PATH", "/bin"}, {"AGENTD_EGRESS", "netstack"}}}},
	}
	for _, c := range cases {
		t.Run(c.field, func(t *testing.T) {
			p, err := protocol.Marshal(c.b)
			if err != nil {
				t.Fatal(err)
			}
			var b protocol.Bootstrap // through the wire: addresses as arrays of integers
			if err := protocol.Unmarshal(p, &b); err != nil {
				t.Fatal(err)
			}
			got, err := FromBootstrap(&b)
			if err != nil || !reflect.DeepEqual(got, c.want) {
				t.Fatalf("from bootstrap: %v\n got %+v\nwant %+v", err, got, c.want)
			}
			if c.env == nil {
				return
			}
			fromEnv, err := LoadConfig(func(k string) string { return c.env[k] })
			if err != nil || !reflect.DeepEqual(fromEnv, c.want) {
				t.Fatalf("from MSB_*: %v\n got %+v\nwant %+v", err, fromEnv, c.want)
			}
			if HasBootEnv(func(k string) string { return c.env[k] }) != (len(c.env) > 0) {
				t.Fatal("HasBootEnv")
			}
		})
	}
}

// TestBootstrapGolden maps the contract's Appendix A bootstrap frames.
func TestBootstrapGolden(t *testing.T) {
	var frames [][]byte
	f, err := os.Open("../protocol/testdata/golden-gen6-9.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for sc := bufio.NewScanner(f); sc.Scan(); {
		if fields := strings.Fields(sc.Text()); len(fields) == 3 && fields[0] == "core.bootstrap" {
			b, _ := hex.DecodeString(fields[2])
			frames = append(frames, b)
		}
	}
	if len(frames) != 5 {
		t.Fatalf("%d bootstrap frames", len(frames))
	}
	for i, wire := range frames {
		fr, _, err := protocol.ParseFrame(wire)
		if err != nil {
			t.Fatal(err)
		}
		b, err := protocol.DecodeBootstrapFrame(fr)
		if err != nil {
			t.Fatal(err)
		}
		c, err := FromBootstrap(b)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		switch i {
		case 1: // virtiofs root with network
			if c.Net == nil || c.IPv4.Addr.String() != "172.16.0.2/30" || c.IPv6.GW.String() != "fd42:6d73:62::1" ||
				c.HostAlias != "host.microsandbox.internal" || c.AgentSetting("AGENTD_X") != "" || len(c.WorkloadEnv()) != 1 {
				t.Fatalf("%+v", c)
			}
		case 4: // every field
			plan, err := c.MountPlan()
			if err != nil || len(plan) != 4 || plan[0].Path != "/data" || plan[1].Path != "/tmp" || !c.Restricted ||
				c.Handoff.Cwd != "/workspace with spaces" || !c.BlockRoot.UpperTmpfs || *c.BlockRoot.UpperSizeMiB != 512 {
				t.Fatalf("%+v %+v %v", c, plan, err)
			}
		}
	}
}

// TestBootstrapErrorsNameTheField: a bad payload is refused with the field it is about.
func TestBootstrapErrorsNameTheField(t *testing.T) {
	net := func(n protocol.BootstrapNetwork) protocol.Bootstrap {
		if n.Interface == "" {
			n.Interface = "eth0"
		}
		return protocol.Bootstrap{Network: &n}
	}
	cases := []struct {
		b    protocol.Bootstrap
		want string
	}{
		{protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "disk-image", Device: "vda"}}, "block_root.device: \"vda\" must be an absolute path"},
		{protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "disk-image", Device: "/dev/vda", FsType: sp("")}}, "block_root.fstype: empty"},
		{protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", Upper: &protocol.BootstrapUpper{Kind: "device", Device: "/dev/vdb"}}}, "block_root.upper.fstype: empty"},
		{protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "oci-erofs", Lower: "/dev/vda"}}, "block_root.upper: missing"},
		{protocol.Bootstrap{BlockRoot: &protocol.BootstrapBlockRoot{Kind: "nfs"}}, "block_root.kind"},
		{protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "a", GuestPath: "/a"}, {Tag: "", GuestPath: "/b"}}}, "dir_mounts[1].tag: empty"},
		{protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "a", GuestPath: "rel"}}}, "dir_mounts[0].guest_path: \"rel\" must be an absolute path"},
		{protocol.Bootstrap{FileMounts: []protocol.BootstrapFileMount{{Tag: "a", Filename: "x\x00", GuestPath: "/f"}}}, "file_mounts[0].filename: \"x\\x00\" contains NUL"},
		{protocol.Bootstrap{DiskMounts: []protocol.BootstrapDiskMount{{ID: "d", GuestPath: "/d", FsType: sp("")}}}, "disk_mounts[0].fstype: empty"},
		{protocol.Bootstrap{TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "tmp"}}}, "tmpfs_mounts[0].path"},
		{protocol.Bootstrap{TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/a/../b"}}}, "tmpfs_mounts[0].path: guest path must not contain \"..\""},
		{protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "r", GuestPath: "/"}}}, "dir_mounts[0].guest_path: cannot mount a volume on /"},
		{protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "a", GuestPath: "/w"}}, TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/w/"}}},
			"tmpfs_mounts[0].path: multiple volumes cannot mount the same guest path (/w, dir_mounts[0].guest_path)"},
		{protocol.Bootstrap{FileMounts: []protocol.BootstrapFileMount{{Tag: "a", Filename: "f", GuestPath: "/etc/f"}}, TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/etc/f/x"}}},
			"file_mounts[0].guest_path: file mount cannot contain another mount (/etc/f, tmpfs_mounts[0].path)"},
		{protocol.Bootstrap{Hostname: sp("")}, "hostname: empty"},
		{protocol.Bootstrap{HostAlias: sp("a\x00")}, "host_alias"},
		{net(protocol.BootstrapNetwork{Interface: "averyveryverylongname"}), "network.interface"},
		{net(protocol.BootstrapNetwork{IPv4: &protocol.BootstrapIPv4{PrefixLen: 33}}), "network.ipv4.prefix_len: 33"},
		{net(protocol.BootstrapNetwork{IPv6: &protocol.BootstrapIPv6{PrefixLen: 129}}), "network.ipv6.prefix_len: 129"},
		{net(protocol.BootstrapNetwork{IPv6: &protocol.BootstrapIPv6{Address: protocol.IPv6Addr{10: 0xff, 11: 0xff, 12: 10}, PrefixLen: 64}}), "network.ipv6.address"},
		{protocol.Bootstrap{Rlimits: []protocol.ExecRlimit{{Resource: "bogus"}}}, "rlimits[0].resource: unknown resource: bogus"},
		{protocol.Bootstrap{Rlimits: []protocol.ExecRlimit{{Resource: "nofile"}, {Resource: "NOFILE"}}}, "rlimits[1].resource: duplicate resource: nofile"},
		{protocol.Bootstrap{Rlimits: []protocol.ExecRlimit{{Resource: "nofile", Soft: 2, Hard: 1}}}, "rlimits[0]: soft limit 2 exceeds hard limit 1"},
		{protocol.Bootstrap{User: sp("")}, "user: empty"},
		{protocol.Bootstrap{DefaultCwd: sp("")}, "default_cwd: empty"},
		{protocol.Bootstrap{DefaultEnv: []protocol.EnvVar{{Key: "A=B", Value: "x"}}}, "default_env[0].key: \"A=B\" must not contain '=' or NUL"},
		{protocol.Bootstrap{DefaultEnv: []protocol.EnvVar{{Key: "", Value: "x"}}}, "default_env[0].key: empty"},
		{protocol.Bootstrap{DefaultEnv: []protocol.EnvVar{{Key: "K", Value: "\x00"}}}, "default_env[0].value"},
		{protocol.Bootstrap{SecurityProfile: "paranoid"}, "security_profile"},
		{protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "sbin/init"}}, "handoff_init.cmd"},
		{protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "/sbin/init", Args: []string{"ok", "\x00"}}}, "handoff_init.args[1]"},
		{protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "/sbin/init", Cwd: sp("srv")}}, "handoff_init.cwd"},
		{protocol.Bootstrap{HandoffInit: &protocol.BootstrapHandoff{Cmd: "/sbin/init", Env: []protocol.EnvVar{{Key: "=", Value: ""}}}}, "handoff_init.env[0].key"},
	}
	for _, c := range cases {
		_, err := FromBootstrap(&c.b)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want an error containing %q", err, c.want)
		}
	}
}

func TestMountPlan(t *testing.T) {
	c := Config{
		DirMounts:  []DirMount{{Tag: "w", Path: "/work/a/b"}, {Tag: "v", Path: "/work"}},
		FileMounts: []FileMount{{Tag: "f", Filename: "x", Path: "/etc/x.conf"}},
		DiskMounts: []DiskMount{{ID: "d", Path: "/work/a/"}},
		Tmpfs:      []TmpfsMount{{Path: "/tmp"}, {Path: "/var//cache"}},
	}
	plan, err := c.MountPlan()
	if err != nil {
		t.Fatal(err)
	}
	want := []PlannedMount{{MountKindTmpfs, 0, "/tmp"}, {MountKindDir, 1, "/work"}, {MountKindFile, 0, "/etc/x.conf"},
		{MountKindTmpfs, 1, "/var/cache"}, {MountKindDisk, 0, "/work/a"}, {MountKindDir, 0, "/work/a/b"}}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("plan\n%+v\nwant\n%+v", plan, want)
	}
	if plan, err := (Config{}).MountPlan(); err != nil || len(plan) != 0 {
		t.Fatal(plan, err)
	}
	for _, bad := range []Config{
		{Tmpfs: []TmpfsMount{{Path: "rel"}}},
		{Tmpfs: []TmpfsMount{{Path: "/a/.."}}},
		{Tmpfs: []TmpfsMount{{Path: "//"}}},
		{DirMounts: []DirMount{{Path: "/x"}}, DiskMounts: []DiskMount{{Path: "/x/."}}},
		{FileMounts: []FileMount{{Path: "/f"}}, DirMounts: []DirMount{{Path: "/f/g/h"}}},
	} {
		if _, err := bad.MountPlan(); err == nil {
			t.Errorf("%+v: accepted", bad)
		}
	}
}

func TestChooseSource(t *testing.T) {
	cases := []struct {
		opt   ConfigSource
		env   bool
		first FirstFrame
		want  Decision
		err   string
	}{
		// auto: section 4.7 of the contract
		{SourceAuto, false, FrameBootstrap, Decision{SourceBootstrap, false}, ""}, // a current host
		{SourceAuto, false, FrameNone, Decision{SourceEnv, false}, ""},            // an old host with nothing to set
		{SourceAuto, false, FrameOther, Decision{SourceEnv, false}, ""},           // an old host's early frame
		{SourceAuto, true, FrameNone, Decision{SourceEnv, false}, ""},             // an old host
		{SourceAuto, true, FrameOther, Decision{SourceEnv, false}, ""},
		{SourceAuto, true, FrameBootstrap, Decision{SourceBootstrap, true}, ""}, // both: bootstrap wins, logged
		{"", false, FrameBootstrap, Decision{SourceBootstrap, false}, ""},
		{SourceEnv, false, FrameBootstrap, Decision{SourceEnv, false}, ""},
		{SourceEnv, true, FrameNone, Decision{SourceEnv, false}, ""},
		{SourceBootstrap, false, FrameBootstrap, Decision{SourceBootstrap, false}, ""},
		{SourceBootstrap, true, FrameBootstrap, Decision{SourceBootstrap, true}, ""},
		{SourceBootstrap, false, FrameNone, Decision{}, "no core.bootstrap frame within 1m0s"},
		{SourceBootstrap, true, FrameOther, Decision{}, "expected core.bootstrap"},
		{"sometimes", false, FrameNone, Decision{}, "want auto, env or bootstrap"},
	}
	for _, c := range cases {
		got, err := ChooseSource(c.opt, c.env, c.first)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%+v: %v", c, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q env=%v first=%d: %+v %v, want %+v", c.opt, c.env, c.first, got, err, c.want)
		}
	}
	waits := []struct {
		opt  ConfigSource
		env  bool
		want time.Duration
	}{{SourceAuto, false, BootstrapGrace}, {SourceAuto, true, 0}, {SourceEnv, false, 0}, {SourceBootstrap, true, BootstrapDeadline}}
	for _, w := range waits {
		if got := BootstrapWait(w.opt, w.env); got != w.want {
			t.Errorf("wait %q env=%v: %v", w.opt, w.env, got)
		}
	}
	if HasBootEnv(func(string) string { return "" }) || HasBootEnv(func(k string) string { return map[string]string{"MSB_HOSTNAME": "  "}[k] }) ||
		!HasBootEnv(func(k string) string { return map[string]string{"MSB_USER": "0"}[k] }) || HasBootEnv(func(k string) string { return map[string]string{"PATH": "/bin"}[k] }) {
		t.Fatal("HasBootEnv")
	}
	boot, _ := protocol.AppendMessageV(nil, 9, 0, protocol.TypeBootstrap, []byte{0xa0})
	ack, _ := protocol.AppendMessageV(nil, 9, 0, protocol.TypeInitAck, []byte{0xa0})
	for wire, want := range map[string]FirstFrame{string(boot): FrameBootstrap, string(ack): FrameOther} {
		f, _, _ := protocol.ParseFrame([]byte(wire))
		if ClassifyFirstFrame(f) != want {
			t.Errorf("classify %x", wire)
		}
	}
}

func TestAgentSettings(t *testing.T) {
	c := Config{DefaultEnv: [][2]string{{"AGENTD_EGRESS", "channel"}, {"PATH", "/bin"}, {"AGENTD_EGRESS", "netstack"}, {"HOME", "/root"}}}
	if c.AgentSetting("AGENTD_EGRESS") != "netstack" || c.AgentSetting("PATH") != "" || c.AgentSetting("AGENTD_NONE") != "" {
		t.Fatal("AgentSetting")
	}
	if got := c.WorkloadEnv(); !reflect.DeepEqual(got, [][2]string{{"PATH", "/bin"}, {"HOME", "/root"}}) {
		t.Fatal(got)
	}
}

// FuzzBootstrapConfig: no payload makes decoding and mapping panic, and a payload that maps
// gives a Config the boot sequence can rely on.
func FuzzBootstrapConfig(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var b protocol.Bootstrap
		if protocol.Unmarshal(data, &b) != nil {
			return
		}
		c, err := FromBootstrap(&b)
		if err != nil {
			if !strings.Contains(err.Error(), ":") {
				t.Fatalf("error without a field: %v", err)
			}
			return
		}
		plan, err := c.MountPlan()
		if err != nil || len(plan) != len(c.DirMounts)+len(c.FileMounts)+len(c.DiskMounts)+len(c.Tmpfs) {
			t.Fatalf("a valid config has no mount plan: %v", err)
		}
		for _, r := range c.Rlimits {
			if _, ok := protocol.RlimitResources[r.Resource]; !ok || r.Soft > r.Hard {
				t.Fatalf("rlimit %+v", r)
			}
		}
		if c.Net != nil && (c.Net.Iface == "" || len(c.Net.Iface) > 15) {
			t.Fatalf("interface %q", c.Net.Iface)
		}
		if c.Handoff != nil && c.Handoff.Path != "auto" && !strings.HasPrefix(c.Handoff.Path, "/") {
			t.Fatalf("handoff %q", c.Handoff.Path)
		}
	})
}

var update = flag.Bool("update", false, "rewrite the checked-in fuzz corpus")

// TestWriteBootstrapCorpus regenerates FuzzBootstrapConfig's seed corpus from the contract's
// bootstrap frames and from payloads built to hit each validation error
// (go test ./initfs -run TestWriteBootstrapCorpus -update).
func TestWriteBootstrapCorpus(t *testing.T) {
	if !*update {
		t.Skip("corpus is checked in; run with -update to regenerate")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzBootstrapConfig")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, p []byte) {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", p)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Open("../protocol/testdata/golden-gen6-9.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for sc := bufio.NewScanner(f); sc.Scan(); {
		if fields := strings.Fields(sc.Text()); len(fields) == 3 && fields[0] == "core.bootstrap" {
			wire, _ := hex.DecodeString(fields[2])
			fr, _, _ := protocol.ParseFrame(wire)
			m, _ := protocol.DecodeMessage(fr)
			write(fmt.Sprintf("golden-%d", n), m.Payload)
			n++
		}
	}
	for i, b := range []protocol.Bootstrap{
		{DirMounts: []protocol.BootstrapDirMount{{Tag: "a", GuestPath: "/w"}}, TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/w/"}}},
		{FileMounts: []protocol.BootstrapFileMount{{Tag: "a", Filename: "f", GuestPath: "/etc/f"}}, TmpfsMounts: []protocol.BootstrapTmpfs{{Path: "/etc/f/x"}}},
		{Rlimits: []protocol.ExecRlimit{{Resource: "nofile", Soft: 2, Hard: 1}}},
		{HandoffInit: &protocol.BootstrapHandoff{Cmd: "auto", Env: []protocol.EnvVar{{Key: "K", Value: "v"}}}},
		{Network: &protocol.BootstrapNetwork{Interface: "eth0", MTU: 1500, IPv6: &protocol.BootstrapIPv6{PrefixLen: 129}}},
	} {
		p, err := protocol.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		write(fmt.Sprintf("case-%d", i), p)
	}
}
