package initfs

import (
	"fmt"
	"net/netip"
	"path"
	"strings"

	"github.com/agentd/agentd/protocol"
)

// FromBootstrap maps a core.bootstrap payload onto the Config the MSB_* variables would give,
// validating it as the reference does (contract 4.5) and as the MSB_* parsers do for the same
// values. An error names the payload field ("dir_mounts[1].guest_path: ...").
func FromBootstrap(b *protocol.Bootstrap) (Config, error) {
	var c Config
	var err error
	if b.BlockRoot != nil {
		if c.BlockRoot, err = bootstrapRoot(b.BlockRoot); err != nil {
			return Config{}, err
		}
	}
	for i, m := range b.DirMounts {
		f := fmt.Sprintf("dir_mounts[%d]", i)
		if err := firstErr(checkName(f+".tag", m.Tag), checkGuestPath(f+".guest_path", m.GuestPath)); err != nil {
			return Config{}, err
		}
		c.DirMounts = append(c.DirMounts, DirMount{Tag: m.Tag, Path: m.GuestPath, Opts: mountOpts(m.Flags)})
	}
	for i, m := range b.FileMounts {
		f := fmt.Sprintf("file_mounts[%d]", i)
		if err := firstErr(checkName(f+".tag", m.Tag), checkName(f+".filename", m.Filename), checkGuestPath(f+".guest_path", m.GuestPath)); err != nil {
			return Config{}, err
		}
		c.FileMounts = append(c.FileMounts, FileMount{Tag: m.Tag, Filename: m.Filename, Path: m.GuestPath, Opts: mountOpts(m.Flags)})
	}
	for i, m := range b.DiskMounts {
		f := fmt.Sprintf("disk_mounts[%d]", i)
		if err := firstErr(checkName(f+".id", m.ID), checkGuestPath(f+".guest_path", m.GuestPath), checkOptName(f+".fstype", m.FsType)); err != nil {
			return Config{}, err
		}
		o := mountOpts(m.Flags)
		if m.FsType != nil {
			o.FsType = *m.FsType
		}
		c.DiskMounts = append(c.DiskMounts, DiskMount{ID: m.ID, Path: m.GuestPath, Opts: o})
	}
	for i, m := range b.TmpfsMounts {
		if err := checkGuestPath(fmt.Sprintf("tmpfs_mounts[%d].path", i), m.Path); err != nil {
			return Config{}, err
		}
		o := mountOpts(m.Flags)
		o.SizeMiB, o.Mode = m.SizeMiB, m.Mode
		c.Tmpfs = append(c.Tmpfs, TmpfsMount{Path: m.Path, Opts: o})
	}
	if c.Hostname, err = optString("hostname", b.Hostname); err != nil {
		return Config{}, err
	}
	if c.HostAlias, err = optString("host_alias", b.HostAlias); err != nil {
		return Config{}, err
	}
	if b.Network != nil {
		if c.Net, c.IPv4, c.IPv6, err = bootstrapNetwork(b.Network); err != nil {
			return Config{}, err
		}
	}
	seen := map[string]bool{}
	for i, r := range b.Rlimits {
		f := fmt.Sprintf("rlimits[%d]", i)
		res := strings.ToLower(r.Resource)
		switch _, known := protocol.RlimitResources[res]; {
		case !known:
			return Config{}, fmt.Errorf("%s.resource: unknown resource: %s", f, r.Resource)
		case seen[res]:
			return Config{}, fmt.Errorf("%s.resource: duplicate resource: %s", f, res)
		case r.Soft > r.Hard:
			return Config{}, fmt.Errorf("%s: soft limit %d exceeds hard limit %d", f, r.Soft, r.Hard)
		}
		seen[res] = true
		c.Rlimits = append(c.Rlimits, Rlimit{res, r.Soft, r.Hard})
	}
	if c.User, err = optString("user", b.User); err != nil {
		return Config{}, err
	}
	if c.DefaultCwd, err = optString("default_cwd", b.DefaultCwd); err != nil {
		return Config{}, err
	}
	if c.DefaultEnv, err = envList("default_env", b.DefaultEnv); err != nil {
		return Config{}, err
	}
	switch b.SecurityProfile {
	case "", protocol.SecurityDefault:
	case protocol.SecurityRestricted:
		c.Restricted = true
	default:
		return Config{}, fmt.Errorf("security_profile: %q: want default or restricted", b.SecurityProfile)
	}
	if b.HandoffInit != nil {
		if c.Handoff, err = bootstrapHandoff(b.HandoffInit); err != nil {
			return Config{}, err
		}
	}
	if err := checkPlan(c); err != nil {
		return Config{}, err
	}
	return c, nil
}

func bootstrapRoot(r *protocol.BootstrapBlockRoot) (*BlockRoot, error) {
	switch r.Kind {
	case protocol.BlockRootDiskImage:
		if err := firstErr(checkGuestPath("block_root.device", r.Device), checkOptName("block_root.fstype", r.FsType)); err != nil {
			return nil, err
		}
		out := &BlockRoot{Kind: BlockRootDiskImage, Device: r.Device}
		if r.FsType != nil {
			out.FsType = *r.FsType
		}
		return out, nil
	case protocol.BlockRootOCIErofs:
		if err := checkGuestPath("block_root.lower", r.Lower); err != nil {
			return nil, err
		}
		out := &BlockRoot{Kind: BlockRootOCIErofs, Lower: r.Lower}
		switch u := r.Upper; {
		case u == nil:
			return nil, fmt.Errorf("block_root.upper: missing")
		case u.Kind == protocol.UpperDevice:
			if err := firstErr(checkGuestPath("block_root.upper.device", u.Device), checkName("block_root.upper.fstype", u.FsType)); err != nil {
				return nil, err
			}
			out.Upper, out.UpperFsType = u.Device, u.FsType
		case u.Kind == protocol.UpperTmpfs:
			out.UpperTmpfs, out.UpperSizeMiB = true, u.SizeMiB
		default:
			return nil, fmt.Errorf("block_root.upper.kind: unknown kind %q", u.Kind)
		}
		return out, nil
	case protocol.BlockRootReadOnlyVirtiofs:
		return &BlockRoot{Kind: BlockRootReadOnlyVirtiofs}, nil
	}
	return nil, fmt.Errorf("block_root.kind: unknown kind %q", r.Kind)
}

func bootstrapNetwork(n *protocol.BootstrapNetwork) (*NetConfig, *IPConfig, *IPConfig, error) {
	if err := checkName("network.interface", n.Interface); err != nil {
		return nil, nil, nil, err
	}
	if len(n.Interface) >= 16 {
		return nil, nil, nil, fmt.Errorf("network.interface: %q: want 1 to 15 bytes", n.Interface)
	}
	nc := &NetConfig{Iface: n.Interface, MAC: n.MAC, MTU: n.MTU}
	var v4, v6 *IPConfig
	if n.IPv4 != nil {
		if n.IPv4.PrefixLen > 32 {
			return nil, nil, nil, fmt.Errorf("network.ipv4.prefix_len: %d out of range 0..32", n.IPv4.PrefixLen)
		}
		v4 = &IPConfig{Addr: netip.PrefixFrom(netip.AddrFrom4(n.IPv4.Address), int(n.IPv4.PrefixLen)),
			GW: netip.AddrFrom4(n.IPv4.Gateway)}
		if n.IPv4.DNS != nil {
			d := netip.AddrFrom4(*n.IPv4.DNS)
			v4.DNS = &d
		}
	}
	if n.IPv6 != nil {
		if n.IPv6.PrefixLen > 128 {
			return nil, nil, nil, fmt.Errorf("network.ipv6.prefix_len: %d out of range 0..128", n.IPv6.PrefixLen)
		}
		addr := netip.AddrFrom16(n.IPv6.Address)
		if addr.Is4In6() { // as MSB_NET_IPV6: an IPv6 address, not a mapped IPv4 one
			return nil, nil, nil, fmt.Errorf("network.ipv6.address: %s is an IPv4-mapped address", addr)
		}
		v6 = &IPConfig{Addr: netip.PrefixFrom(addr, int(n.IPv6.PrefixLen)), GW: netip.AddrFrom16(n.IPv6.Gateway)}
		if n.IPv6.DNS != nil {
			d := netip.AddrFrom16(*n.IPv6.DNS)
			v6.DNS = &d
		}
	}
	return nc, v4, v6, nil
}

func bootstrapHandoff(h *protocol.BootstrapHandoff) (*Handoff, error) {
	if strings.ContainsRune(h.Cmd, 0) || h.Cmd != "auto" && !path.IsAbs(h.Cmd) {
		return nil, fmt.Errorf("handoff_init.cmd: %q: must be an absolute path or auto", h.Cmd)
	}
	out := &Handoff{Path: h.Cmd, Args: h.Args}
	for i, a := range h.Args {
		if strings.ContainsRune(a, 0) {
			return nil, fmt.Errorf("handoff_init.args[%d]: contains NUL", i)
		}
	}
	if h.Cwd != nil {
		if err := checkGuestPath("handoff_init.cwd", *h.Cwd); err != nil {
			return nil, err
		}
		out.Cwd = *h.Cwd
	}
	var err error
	if out.Env, err = envList("handoff_init.env", h.Env); err != nil {
		return nil, err
	}
	return out, nil
}

func envList(field string, env []protocol.EnvVar) ([][2]string, error) {
	var out [][2]string
	for i, e := range env {
		f := fmt.Sprintf("%s[%d]", field, i)
		switch {
		case e.Key == "":
			return nil, fmt.Errorf("%s.key: empty", f)
		case strings.ContainsAny(e.Key, "=\x00"):
			return nil, fmt.Errorf("%s.key: %q must not contain '=' or NUL", f, e.Key)
		case strings.ContainsRune(e.Value, 0):
			return nil, fmt.Errorf("%s.value: %s's value contains NUL", f, e.Key)
		}
		out = append(out, [2]string{e.Key, e.Value})
	}
	return out, nil
}

func mountOpts(f protocol.MountFlags) MountOpts {
	return MountOpts{ReadOnly: f.ReadOnly, NoExec: f.NoExec, NoSuid: f.NoSuid, NoDev: f.NoDev}
}

// checkName checks a string that names something: non-empty, no NUL.
func checkName(field, v string) error {
	if v == "" {
		return fmt.Errorf("%s: empty", field)
	}
	if strings.ContainsRune(v, 0) {
		return fmt.Errorf("%s: %q contains NUL", field, v)
	}
	return nil
}

func checkOptName(field string, v *string) error {
	if v == nil {
		return nil
	}
	return checkName(field, *v)
}

func optString(field string, v *string) (string, error) {
	if v == nil {
		return "", nil
	}
	return *v, checkName(field, *v)
}

// checkGuestPath checks an absolute guest path.
func checkGuestPath(field, v string) error {
	if err := checkName(field, v); err != nil {
		return err
	}
	if !path.IsAbs(v) {
		return fmt.Errorf("%s: %q must be an absolute path", field, v)
	}
	return nil
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// AgentEnvPrefix marks agentd's own settings among the bootstrap's default_env entries: a
// current host passes agentd no kernel command line words, but its sandbox environment
// becomes default_env, so AGENTD_<FLAG>=value entries there set agentd's flags as they do in
// the environment (docs/protocol-gen9-plan.md).
const AgentEnvPrefix = "AGENTD_"

// AgentSetting looks up an AGENTD_* setting in DefaultEnv (the last entry wins, as with
// repeated words on a command line); "" when absent.
func (c Config) AgentSetting(key string) string {
	v := ""
	if strings.HasPrefix(key, AgentEnvPrefix) {
		for _, kv := range c.DefaultEnv {
			if kv[0] == key {
				v = kv[1]
			}
		}
	}
	return v
}

// WorkloadEnv is DefaultEnv without agentd's own settings: what children inherit.
func (c Config) WorkloadEnv() [][2]string {
	var out [][2]string
	for _, kv := range c.DefaultEnv {
		if !strings.HasPrefix(kv[0], AgentEnvPrefix) {
			out = append(out, kv)
		}
	}
	return out
}

// DefaultWorkloadPath is the PATH workloads get when the bootstrap's default_env has none
// (contract 4.2 step 7; the scripts directory is prepended to it at exec).
const DefaultWorkloadPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// WorkloadPath is the PATH of the bootstrap's default_env (the last entry wins), else
// DefaultWorkloadPath; "" for the MSB_* source, whose workloads get agentd's own PATH.
func (c BootConfig) WorkloadPath() string {
	if c.Source != SourceBootstrap {
		return ""
	}
	p := DefaultWorkloadPath
	for _, kv := range c.DefaultEnv {
		if kv[0] == "PATH" {
			p = kv[1]
		}
	}
	return p
}
