package initfs

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func u32p(v uint32) *uint32 { return &v }

func TestParseBlockRoot(t *testing.T) {
	cases := []struct {
		in   string
		want *BlockRoot
		err  string
	}{
		{"kind=disk-image,device=/dev/vda,fstype=ext4", &BlockRoot{Kind: "disk-image", Device: "/dev/vda", FsType: "ext4"}, ""},
		{"kind=disk-image,device=/dev/vda", &BlockRoot{Kind: "disk-image", Device: "/dev/vda"}, ""},
		{"kind=oci-erofs,lower=/dev/vda,upper=/dev/vdb,upper_fstype=ext4", &BlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", Upper: "/dev/vdb", UpperFsType: "ext4"}, ""},
		{"kind=bogus", nil, "unknown kind"},
		{"/dev/vda", nil, "missing 'kind' key"},
		{"kind=disk-image", nil, "missing 'device'"},
		{"kind=oci-erofs,lower=/dev/vda,upper_fstype=ext4", nil, "missing 'upper'"},
		{"kind=disk-image,device=/a,device=/b", nil, "duplicate key 'device'"},
		{"kind=oci-erofs,lower=/dev/vda,upper=tmpfs", &BlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", UpperTmpfs: true}, ""},
		{"kind=oci-erofs,lower=/dev/vda,upper=tmpfs,upper_size_mib=512", &BlockRoot{Kind: "oci-erofs", Lower: "/dev/vda", UpperTmpfs: true, UpperSizeMiB: u32p(512)}, ""},
		{"kind=oci-erofs,lower=/dev/vda,upper=tmpfs,upper_fstype=ext4", nil, "takes no 'upper_fstype'"},
		{"kind=oci-erofs,lower=/dev/vda,upper=tmpfs,upper_size_mib=x", nil, "invalid upper_size_mib"},
		{"kind=oci-erofs,upper=tmpfs", nil, "missing 'lower'"},
	}
	for _, c := range cases {
		got, err := ParseBlockRoot(c.in)
		check(t, c.in, got, c.want, err, c.err)
	}
}

func check(t *testing.T, in string, got, want any, err error, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%q: got %v, want an error containing %q", in, err, wantErr)
		}
		return
	}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("%q: got %+v %v, want %+v", in, got, err, want)
	}
}

func TestParseFileMounts(t *testing.T) {
	cases := []struct {
		in   string
		want []FileMount
		err  string
	}{
		{"fm_config:app.conf:/etc/app.conf", []FileMount{{Tag: "fm_config", Filename: "app.conf", Path: "/etc/app.conf"}}, ""},
		{"fm_config:app.conf:/etc/app.conf:ro,noexec", []FileMount{{Tag: "fm_config", Filename: "app.conf", Path: "/etc/app.conf", Opts: MountOpts{ReadOnly: true, NoExec: true}}}, ""},
		{"tag:/path", nil, "want tag:filename:guest_path"},
		{"tag::/path", nil, "must not be empty"},
		{"tag:f:relative", nil, "must be absolute"},
		{"tag:f:/p:ro:extra", nil, "unknown mount option"},
		{"tag:f:/p:exec", nil, "unsupported mount option"},
		{":f:/p", nil, "must not be empty"},
	}
	for _, c := range cases {
		got, err := ParseFileMounts(c.in)
		check(t, c.in, got, c.want, err, c.err)
	}
}

func TestParseTmpfs(t *testing.T) {
	cases := []struct {
		in   string
		want []TmpfsMount
		err  string
	}{
		{"/tmp", []TmpfsMount{{Path: "/tmp"}}, ""},
		{"/tmp:size=256", []TmpfsMount{{Path: "/tmp", Opts: MountOpts{SizeMiB: u32p(256)}}}, ""},
		{"/tmp:noexec", []TmpfsMount{{Path: "/tmp", Opts: MountOpts{NoExec: true}}}, ""},
		{"/seed:size=64,ro", []TmpfsMount{{Path: "/seed", Opts: MountOpts{ReadOnly: true, SizeMiB: u32p(64)}}}, ""},
		{"/a:mode=1777;/b:mode=755", []TmpfsMount{{Path: "/a", Opts: MountOpts{Mode: u32p(0o1777)}}, {Path: "/b", Opts: MountOpts{Mode: u32p(0o755)}}}, ""},
		{"/t:size=8,mode=700,noexec", []TmpfsMount{{Path: "/t", Opts: MountOpts{SizeMiB: u32p(8), Mode: u32p(0o700), NoExec: true}}}, ""},
		{"/tmp:bogus=42", nil, "unknown mount option"},
		{"/tmp:size=abc", nil, "invalid tmpfs size"},
		{"/tmp:mode=zzz", nil, "invalid octal tmpfs mode"},
		{":size=256", nil, "empty path"},
		{"/tmp,noexec", nil, "must use path:opts syntax"},
		{"/tmp:ro,ro", nil, "specified more than once"},
		{"/tmp:ro,rw", nil, "specified more than once"},
		{"/tmp:fstype=ext4", nil, "not valid for this mount kind"},
	}
	for _, c := range cases {
		got, err := ParseTmpfs(c.in)
		check(t, c.in, got, c.want, err, c.err)
	}
}

func TestParseDiskMounts(t *testing.T) {
	cases := []struct {
		in   string
		want []DiskMount
		err  string
	}{
		{"data_abc:/data:fstype=ext4", []DiskMount{{ID: "data_abc", Path: "/data", Opts: MountOpts{FsType: "ext4"}}}, ""},
		{"d:/data:ro,noexec,fstype=ext4", []DiskMount{{ID: "d", Path: "/data", Opts: MountOpts{ReadOnly: true, NoExec: true, FsType: "ext4"}}}, ""},
		{"d:/data:ro", []DiskMount{{ID: "d", Path: "/data", Opts: MountOpts{ReadOnly: true}}}, ""},
		{"d:/data", []DiskMount{{ID: "d", Path: "/data"}}, ""},
		{"d:/data:exec", nil, "unsupported mount option"},
		{"id:relative", nil, "must be absolute"},
		{":/data", nil, "non-empty id"},
		{"d:/data:fstype=ext4:extra", nil, "invalid fstype"},
		{"a:/a;b:/b:ro;c:/c:fstype=xfs", []DiskMount{{ID: "a", Path: "/a"}, {ID: "b", Path: "/b", Opts: MountOpts{ReadOnly: true}}, {ID: "c", Path: "/c", Opts: MountOpts{FsType: "xfs"}}}, ""},
	}
	for _, c := range cases {
		got, err := ParseDiskMounts(c.in)
		check(t, c.in, got, c.want, err, c.err)
	}
}

func TestParseNet(t *testing.T) {
	got, err := ParseNet("iface=eth0,mac=02:00:00:00:00:01,mtu=1400")
	check(t, "full", got, &NetConfig{Iface: "eth0", MAC: [6]byte{2, 0, 0, 0, 0, 1}, MTU: 1400}, err, "")
	got, err = ParseNet("iface=eth0,mac=2:0:0:0:0:1")
	check(t, "default mtu", got, &NetConfig{Iface: "eth0", MAC: [6]byte{2, 0, 0, 0, 0, 1}, MTU: 1500}, err, "")
	for in, want := range map[string]string{
		"mac=02:00:00:00:00:01": "missing iface=",
		"iface=eth0":            "missing mac=",
		"iface=eth0,mac=02:00:00:00:00:01,bogus=42":  "unknown option",
		"iface=eth0,mac=02:00:00":                    "want 6 octets",
		"iface=eth0,mac=zz:00:00:00:00:01":           "not hex",
		"iface=eth0,mac=02:00:00:00:00:01,":          "unknown option",
		"iface=eth0,mac=02:00:00:00:00:01,mtu=70000": "invalid mtu",
	} {
		_, err := ParseNet(in)
		check(t, in, nil, nil, err, want)
	}
}

func TestParseIP(t *testing.T) {
	dns := netip.MustParseAddr("100.96.1.1")
	got, err := ParseIP("addr=100.96.1.2/30,gw=100.96.1.1,dns=100.96.1.1", false)
	check(t, "v4", got, &IPConfig{Addr: netip.MustParsePrefix("100.96.1.2/30"), GW: netip.MustParseAddr("100.96.1.1"), DNS: &dns}, err, "")
	got, err = ParseIP("addr=100.96.1.2/30,gw=100.96.1.1", false)
	check(t, "v4 no dns", got, &IPConfig{Addr: netip.MustParsePrefix("100.96.1.2/30"), GW: netip.MustParseAddr("100.96.1.1")}, err, "")
	got, err = ParseIP("addr=fd42:6d73:62:2a::2/64,gw=fd42:6d73:62:2a::1", true)
	check(t, "v6", got, &IPConfig{Addr: netip.MustParsePrefix("fd42:6d73:62:2a::2/64"), GW: netip.MustParseAddr("fd42:6d73:62:2a::1")}, err, "")
	for _, c := range []struct {
		in string
		v6 bool
	}{{"gw=1.2.3.4", false}, {"addr=1.2.3.4/33,gw=1.2.3.4", false}, {"addr=::1/64,gw=1.2.3.4", false}, {"addr=1.2.3.4/8,gw=::1", true}} {
		if _, err := ParseIP(c.in, c.v6); err == nil {
			t.Errorf("%q: accepted", c.in)
		}
	}
}

func TestParseRlimits(t *testing.T) {
	got, err := ParseRlimits("nofile=65535;NPROC=4096:8192;")
	check(t, "happy", got, []Rlimit{{"nofile", 65535, 65535}, {"nproc", 4096, 8192}}, err, "")
	for in, want := range map[string]string{
		"bogus=1":           "unknown resource: bogus",
		"nofile=1;nofile=2": "duplicate resource: nofile",
		"nofile":            "want resource=soft[:hard]",
		"nofile=abc":        "not a number",
		"nofile=10:5":       "soft limit cannot exceed hard limit",
		"nofile=1:2:3":      "more than one ':'",
	} {
		_, err := ParseRlimits(in)
		check(t, in, nil, nil, err, want)
	}
}

func TestParseHandoff(t *testing.T) {
	for _, unset := range []string{"", "   "} {
		if h, err := ParseHandoff(unset, "x", "y", "/z"); h != nil || err != nil {
			t.Errorf("%q: %+v %v", unset, h, err)
		}
	}
	h, err := ParseHandoff("/sbin/init", "", "", "")
	check(t, "cmd only", h, &Handoff{Path: "/sbin/init"}, err, "")
	h, err = ParseHandoff("auto", "--log-level=debug\x1fa b;c\x1f", "A=1\x1fB=x=y", "/srv")
	check(t, "args and env", h, &Handoff{Path: "auto", Args: []string{"--log-level=debug", "a b;c", ""}, Env: [][2]string{{"A", "1"}, {"B", "x=y"}}, Cwd: "/srv"}, err, "")
	_, err = ParseHandoff("sbin/init", "", "", "")
	check(t, "relative", nil, nil, err, "absolute path")
	_, err = ParseHandoff("/sbin/init", "", "NOEQUALS", "")
	check(t, "no =", nil, nil, err, "missing '='")
	_, err = ParseHandoff("/sbin/init", "", "=v", "")
	check(t, "empty key", nil, nil, err, "empty key")
	_, err = ParseHandoff("/sbin/init", "", "", "srv")
	check(t, "relative cwd", nil, nil, err, "MSB_HANDOFF_INIT_CWD")
}

// TestLoadConfigNamesTheVariable: every bad value is reported with its variable's name.
func TestLoadConfigNamesTheVariable(t *testing.T) {
	for k, v := range map[string]string{
		"MSB_BLOCK_ROOT": "kind=x", "MSB_DIR_MOUNTS": "t:rel", "MSB_FILE_MOUNTS": "t", "MSB_DISK_MOUNTS": ":/x",
		"MSB_TMPFS": "/t:size=x", "MSB_SECURITY_PROFILE": "paranoid", "MSB_NET": "iface=eth0",
		"MSB_NET_IPV4": "addr=x", "MSB_NET_IPV6": "addr=1.2.3.4/8,gw=1.2.3.4", "MSB_RLIMITS": "x=1",
		"MSB_HANDOFF_INIT": "relative",
	} {
		_, err := LoadConfig(func(name string) string {
			if name == k {
				return v
			}
			return ""
		})
		if err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("%s=%s: %v", k, v, err)
		}
	}
	c, err := LoadConfig(func(name string) string {
		return map[string]string{"MSB_HOSTNAME": " box ", "MSB_TMPFS": "/tmp", "MSB_SECURITY_PROFILE": "restricted"}[name]
	})
	if err != nil || c.Hostname != "box" || len(c.Tmpfs) != 1 || !c.Restricted {
		t.Fatalf("%+v %v", c, err)
	}
}

// FuzzLoadConfig: no value of any variable makes the loader panic.
func FuzzLoadConfig(f *testing.F) {
	for _, s := range []string{"kind=disk-image,device=/dev/vda", "/tmp:size=1,mode=1777", "iface=eth0,mac=02:00:00:00:00:01",
		"addr=10.0.0.2/24,gw=10.0.0.1,dns=10.0.0.1", "nofile=1:2", "t:f:/p:ro", "/sbin/init"} {
		f.Add(s)
	}
	vars := []string{"MSB_BLOCK_ROOT", "MSB_DIR_MOUNTS", "MSB_FILE_MOUNTS", "MSB_DISK_MOUNTS", "MSB_TMPFS",
		"MSB_SECURITY_PROFILE", "MSB_NET", "MSB_NET_IPV4", "MSB_NET_IPV6", "MSB_RLIMITS", "MSB_HANDOFF_INIT",
		"MSB_HANDOFF_INIT_ARGS", "MSB_HANDOFF_INIT_ENV", "MSB_HANDOFF_INIT_CWD"}
	f.Fuzz(func(t *testing.T, v string) {
		for _, k := range vars {
			LoadConfig(func(name string) string {
				if name == k {
					return v
				}
				return ""
			})
		}
	})
}

func TestHostsFile(t *testing.T) {
	tail := "fe00::\tip6-localnet\nff00::\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
	cases := []struct {
		host, alias, gw4, gw6 string
		want                  string
	}{
		{"", "", "", "", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + tail},
		{"box", "", "", "", "127.0.0.1\tlocalhost box\n::1\tlocalhost ip6-localhost ip6-loopback box\n" + tail},
		{"", "host.microsandbox.internal", "100.96.1.1", "fd42::1", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n100.96.1.1\thost.microsandbox.internal\nfd42::1\thost.microsandbox.internal\n" + tail},
		{"", "h", "100.96.1.1", "", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n100.96.1.1\th\n" + tail},
		{"", "", "100.96.1.1", "fd42::1", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + tail},
	}
	for _, c := range cases {
		if got := HostsFile(c.host, c.alias, c.gw4, c.gw6); got != c.want {
			t.Errorf("%+v:\n%q\nwant\n%q", c, got, c.want)
		}
	}
}

func TestResolvConf(t *testing.T) {
	d4, d6 := netip.MustParseAddr("10.0.2.3"), netip.MustParseAddr("fd00::3")
	cases := []struct {
		c    Config
		want string
	}{
		{Config{}, ""},
		{Config{IPv4: &IPConfig{DNS: &d4}}, "nameserver 10.0.2.3\n"},
		{Config{IPv4: &IPConfig{DNS: &d4}, IPv6: &IPConfig{DNS: &d6}}, "nameserver 10.0.2.3\nnameserver fd00::3\n"},
		{Config{IPv4: &IPConfig{}, IPv6: &IPConfig{DNS: &d6}}, "nameserver fd00::3\n"},
	}
	for _, c := range cases {
		if got := ResolvConf(c.c); got != c.want {
			t.Errorf("%q, want %q", got, c.want)
		}
	}
}
