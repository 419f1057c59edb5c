package initfs

import (
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"

	"github.com/agentd/agentd/protocol"
)

// Config is the boot configuration a microsandbox host passes, from one of two sources: the
// MSB_* variables of hosts before 0.6.10 (the kernel command line's unknown KEY=VALUE words
// become PID 1's environment; names and formats are the reference's, spec 4.2), read by
// LoadConfig, or the core.bootstrap frame of current hosts, mapped by FromBootstrap. Either
// way the boot sequence applies the same Config; ChooseSource decides which source a boot uses.
type Config struct {
	BlockRoot  *BlockRoot
	DirMounts  []DirMount
	FileMounts []FileMount
	DiskMounts []DiskMount
	Tmpfs      []TmpfsMount
	Restricted bool // MSB_SECURITY_PROFILE=restricted
	Hostname   string
	HostAlias  string
	Net        *NetConfig
	IPv4, IPv6 *IPConfig
	Rlimits    []Rlimit
	User       string
	Handoff    *Handoff
	// DefaultCwd (bootstrap only) is the cwd of exec requests that name none ("" = agentd's).
	DefaultCwd string
	// DefaultEnv (bootstrap only) is the baseline environment: agentd's own, and every child's
	// under its exec and handoff entries. nil from the MSB_* source, whose children start from
	// agentd's clean set as before. Entries named AGENTD_* are agentd's own settings (see
	// AgentSetting), not passed to workloads.
	DefaultEnv [][2]string
}

// MountOpts are the flags of a mount-option block.
type MountOpts struct {
	ReadOnly, NoExec, NoSuid, NoDev bool
	FsType                          string // disk mounts only; "" = autodetect
	SizeMiB                         *uint32
	Mode                            *uint32 // tmpfs only
}

type (
	DirMount struct {
		Tag, Path string
		Opts      MountOpts
	}
	FileMount struct {
		Tag, Filename, Path string
		Opts                MountOpts
	}
	DiskMount struct {
		ID, Path string
		Opts     MountOpts
	}
	TmpfsMount struct {
		Path string
		Opts MountOpts
	}
	BlockRoot struct {
		Kind                      string // BlockRootDiskImage, BlockRootOCIErofs or BlockRootReadOnlyVirtiofs
		Device, FsType            string // disk-image
		Lower, Upper, UpperFsType string // oci-erofs with a device upper
		// UpperTmpfs: an oci-erofs root whose writable upper is a tmpfs (Upper and UpperFsType
		// empty) of UpperSizeMiB (nil: the guest's default).
		UpperTmpfs   bool
		UpperSizeMiB *uint32
	}
	NetConfig struct {
		Iface string
		MAC   [6]byte
		MTU   uint16
	}
	IPConfig struct {
		Addr netip.Prefix
		GW   netip.Addr
		DNS  *netip.Addr
	}
	Rlimit struct {
		Resource   string
		Soft, Hard uint64
	}
	Handoff struct {
		Path string // absolute, or "auto"
		Args []string
		Env  [][2]string
		Cwd  string // absolute, or "" for agentd's
	}
)

// Block root kinds (BlockRoot.Kind).
const (
	BlockRootDiskImage = "disk-image"
	BlockRootOCIErofs  = "oci-erofs"
	// BlockRootReadOnlyVirtiofs (bootstrap only): the lower layer is the virtiofs share tagged
	// msb-readonly-root, mounted read-only under a tmpfs overlay, and the root is sealed
	// read-only after init.
	BlockRootReadOnlyVirtiofs = "read-only-virtiofs"
)

// mount kinds, for the keyed options each allows
type mountKind int

const (
	kindDir mountKind = iota
	kindFile
	kindDisk
	kindTmpfs
)

// ParseMountOptions parses a comma-separated option block with the reference's rules.
func parseMountOptions(block string, kind mountKind) (MountOpts, error) {
	var o MountOpts
	seen := map[string]bool{}
	once := func(k string) error {
		if seen[k] {
			return fmt.Errorf("mount option %q specified more than once", k)
		}
		seen[k] = true
		return nil
	}
	for _, item := range strings.Split(block, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if k, v, ok := strings.Cut(item, "="); ok {
			if err := once(k); err != nil {
				return o, err
			}
			if v == "" {
				return o, fmt.Errorf("mount option %q has an empty value", k)
			}
			switch {
			case k == "fstype" && kind == kindDisk:
				if strings.ContainsAny(v, ",;:=") {
					return o, fmt.Errorf("invalid fstype %q", v)
				}
				o.FsType = v
			case k == "size" && kind == kindTmpfs:
				n, err := strconv.ParseUint(v, 10, 32)
				if err != nil {
					return o, fmt.Errorf("invalid tmpfs size %q", v)
				}
				s := uint32(n)
				o.SizeMiB = &s
			case k == "mode" && kind == kindTmpfs:
				n, err := strconv.ParseUint(v, 8, 32)
				if err != nil {
					return o, fmt.Errorf("invalid octal tmpfs mode %q", v)
				}
				m := uint32(n)
				o.Mode = &m
			case k == "fstype" || k == "size" || k == "mode":
				return o, fmt.Errorf("mount option %q is not valid for this mount kind", k)
			default:
				return o, fmt.Errorf("unknown mount option %q", item)
			}
			continue
		}
		switch item {
		case "ro", "rw":
			if seen["ro"] || seen["rw"] {
				return o, fmt.Errorf("mount option %q specified more than once", item)
			}
			seen[item] = true
			o.ReadOnly = item == "ro"
		case "noexec", "nosuid", "nodev":
			if err := once(item); err != nil {
				return o, err
			}
			switch item {
			case "noexec":
				o.NoExec = true
			case "nosuid":
				o.NoSuid = true
			default:
				o.NoDev = true
			}
		case "suid", "exec", "dev":
			return o, fmt.Errorf("unsupported mount option %q", item)
		default:
			return o, fmt.Errorf("unknown mount option %q", item)
		}
	}
	return o, nil
}

func entries(v string) []string {
	var out []string
	for _, e := range strings.Split(v, ";") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

func absPath(p string) error {
	if !path.IsAbs(p) {
		return fmt.Errorf("guest path %q must be absolute", p)
	}
	return nil
}

// ParseDirMounts parses MSB_DIR_MOUNTS: tag:guest_path[:opts] entries separated by ';'.
func ParseDirMounts(v string) ([]DirMount, error) {
	var out []DirMount
	for _, e := range entries(v) {
		parts := strings.SplitN(e, ":", 3)
		if len(parts) < 2 || parts[0] == "" {
			return nil, fmt.Errorf("entry %q: want tag:guest_path[:options] with a non-empty tag", e)
		}
		if err := absPath(parts[1]); err != nil {
			return nil, fmt.Errorf("entry %q: %w", e, err)
		}
		m := DirMount{Tag: parts[0], Path: parts[1]}
		if len(parts) == 3 {
			o, err := parseMountOptions(parts[2], kindDir)
			if err != nil {
				return nil, fmt.Errorf("entry %q: %w", e, err)
			}
			m.Opts = o
		}
		out = append(out, m)
	}
	return out, nil
}

// ParseFileMounts parses MSB_FILE_MOUNTS: tag:filename:guest_path[:opts] entries.
func ParseFileMounts(v string) ([]FileMount, error) {
	var out []FileMount
	for _, e := range entries(v) {
		parts := strings.SplitN(e, ":", 4)
		if len(parts) < 3 {
			return nil, fmt.Errorf("entry %q: want tag:filename:guest_path[:options]", e)
		}
		if parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("entry %q: tag and filename must not be empty", e)
		}
		if err := absPath(parts[2]); err != nil {
			return nil, fmt.Errorf("entry %q: %w", e, err)
		}
		m := FileMount{Tag: parts[0], Filename: parts[1], Path: parts[2]}
		if len(parts) == 4 {
			o, err := parseMountOptions(parts[3], kindFile)
			if err != nil {
				return nil, fmt.Errorf("entry %q: %w", e, err)
			}
			m.Opts = o
		}
		out = append(out, m)
	}
	return out, nil
}

// ParseDiskMounts parses MSB_DISK_MOUNTS: id:guest_path[:opts] (opts may hold fstype=NAME).
func ParseDiskMounts(v string) ([]DiskMount, error) {
	var out []DiskMount
	for _, e := range entries(v) {
		parts := strings.SplitN(e, ":", 3)
		if len(parts) < 2 || parts[0] == "" {
			return nil, fmt.Errorf("entry %q: want id:guest_path[:options] with a non-empty id", e)
		}
		if err := absPath(parts[1]); err != nil {
			return nil, fmt.Errorf("entry %q: %w", e, err)
		}
		m := DiskMount{ID: parts[0], Path: parts[1]}
		if len(parts) == 3 {
			o, err := parseMountOptions(parts[2], kindDisk)
			if err != nil {
				return nil, fmt.Errorf("entry %q: %w", e, err)
			}
			m.Opts = o
		}
		out = append(out, m)
	}
	return out, nil
}

// ParseTmpfs parses MSB_TMPFS: path[:opts] entries, split at the first ':'.
func ParseTmpfs(v string) ([]TmpfsMount, error) {
	var out []TmpfsMount
	for _, e := range entries(v) {
		p, opts, hasOpts := strings.Cut(e, ":")
		if !hasOpts && strings.Contains(e, ",") {
			return nil, fmt.Errorf("entry %q: MSB_TMPFS options must use path:opts syntax", e)
		}
		if p == "" {
			return nil, fmt.Errorf("entry %q: empty path", e)
		}
		m := TmpfsMount{Path: p}
		if hasOpts {
			o, err := parseMountOptions(opts, kindTmpfs)
			if err != nil {
				return nil, fmt.Errorf("entry %q: %w", e, err)
			}
			m.Opts = o
		}
		out = append(out, m)
	}
	return out, nil
}

// ParseBlockRoot parses MSB_BLOCK_ROOT: comma-separated key=value (kind=disk-image|oci-erofs).
// An oci-erofs upper of "tmpfs" (with an optional upper_size_mib=N and no upper_fstype) is a
// RAM-backed upper, as later 0.6 hosts wrote it.
func ParseBlockRoot(v string) (*BlockRoot, error) {
	kv := map[string]string{}
	for _, part := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue // parts without '=' are ignored, as by the reference
		}
		if _, dup := kv[k]; dup {
			return nil, fmt.Errorf("duplicate key '%s'", k)
		}
		kv[k] = val
	}
	kind, ok := kv["kind"]
	if !ok {
		return nil, fmt.Errorf("missing 'kind' key")
	}
	switch kind {
	case "disk-image":
		if kv["device"] == "" {
			return nil, fmt.Errorf("kind=disk-image: missing 'device'")
		}
		return &BlockRoot{Kind: kind, Device: kv["device"], FsType: kv["fstype"]}, nil
	case "oci-erofs":
		if kv["upper"] == "tmpfs" {
			return tmpfsUpper(kv)
		}
		for _, k := range []string{"lower", "upper", "upper_fstype"} {
			if kv[k] == "" {
				return nil, fmt.Errorf("kind=oci-erofs: missing '%s'", k)
			}
		}
		return &BlockRoot{Kind: kind, Lower: kv["lower"], Upper: kv["upper"], UpperFsType: kv["upper_fstype"]}, nil
	}
	return nil, fmt.Errorf("unknown kind %q (want disk-image or oci-erofs)", kind)
}

func tmpfsUpper(kv map[string]string) (*BlockRoot, error) {
	if kv["lower"] == "" {
		return nil, fmt.Errorf("kind=oci-erofs: missing 'lower'")
	}
	if _, ok := kv["upper_fstype"]; ok {
		return nil, fmt.Errorf("kind=oci-erofs: upper=tmpfs takes no 'upper_fstype'")
	}
	b := &BlockRoot{Kind: BlockRootOCIErofs, Lower: kv["lower"], UpperTmpfs: true}
	if v, ok := kv["upper_size_mib"]; ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("kind=oci-erofs: invalid upper_size_mib %q", v)
		}
		size := uint32(n)
		b.UpperSizeMiB = &size
	}
	return b, nil
}

// ParseMAC parses six ':'-separated hex octets of one or two digits.
func ParseMAC(s string) ([6]byte, error) {
	var mac [6]byte
	parts := strings.Split(s, ":")
	if len(parts) != 6 {
		return mac, fmt.Errorf("invalid MAC %q: want 6 octets", s)
	}
	for i, p := range parts {
		if len(p) < 1 || len(p) > 2 {
			return mac, fmt.Errorf("invalid MAC %q: octet %q", s, p)
		}
		n, err := strconv.ParseUint(p, 16, 8)
		if err != nil {
			return mac, fmt.Errorf("invalid MAC %q: octet %q is not hex", s, p)
		}
		mac[i] = byte(n)
	}
	return mac, nil
}

// ParseNet parses MSB_NET: iface=NAME,mac=MAC[,mtu=N].
func ParseNet(v string) (*NetConfig, error) {
	n := &NetConfig{MTU: 1500}
	var haveIface, haveMAC bool
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		switch {
		case strings.HasPrefix(part, "iface="):
			n.Iface, haveIface = strings.TrimPrefix(part, "iface="), true
			if n.Iface == "" || len(n.Iface) >= 16 {
				return nil, fmt.Errorf("iface %q: want 1 to 15 bytes", n.Iface)
			}
		case strings.HasPrefix(part, "mac="):
			mac, err := ParseMAC(strings.TrimPrefix(part, "mac="))
			if err != nil {
				return nil, err
			}
			n.MAC, haveMAC = mac, true
		case strings.HasPrefix(part, "mtu="):
			m, err := strconv.ParseUint(strings.TrimPrefix(part, "mtu="), 10, 16)
			if err != nil {
				return nil, fmt.Errorf("invalid mtu %q", strings.TrimPrefix(part, "mtu="))
			}
			n.MTU = uint16(m)
		default:
			return nil, fmt.Errorf("unknown option %q (want iface=, mac=, mtu=)", part)
		}
	}
	if !haveIface {
		return nil, fmt.Errorf("missing iface=")
	}
	if !haveMAC {
		return nil, fmt.Errorf("missing mac=")
	}
	return n, nil
}

// ParseIP parses MSB_NET_IPV4 / MSB_NET_IPV6: addr=ADDR/N,gw=ADDR[,dns=ADDR].
func ParseIP(v string, v6 bool) (*IPConfig, error) {
	c := &IPConfig{}
	var haveAddr, haveGW bool
	for _, part := range strings.Split(v, ",") {
		k, val, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch k {
		case "addr":
			p, err := netip.ParsePrefix(val)
			if err != nil || p.Addr().Is6() != v6 || p.Addr().Is4In6() {
				return nil, fmt.Errorf("invalid addr %q: want %s/prefix", val, family(v6))
			}
			c.Addr, haveAddr = p, true
		case "gw":
			a, err := netip.ParseAddr(val)
			if err != nil || a.Is6() != v6 {
				return nil, fmt.Errorf("invalid gw %q: want an %s address", val, family(v6))
			}
			c.GW, haveGW = a, true
		case "dns":
			a, err := netip.ParseAddr(val)
			if err != nil || a.Is6() != v6 {
				return nil, fmt.Errorf("invalid dns %q: want an %s address", val, family(v6))
			}
			c.DNS = &a
		default:
			return nil, fmt.Errorf("unknown option %q (want addr=, gw=, dns=)", part)
		}
	}
	if !haveAddr || !haveGW {
		return nil, fmt.Errorf("addr= and gw= are required")
	}
	return c, nil
}

func family(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// ParseRlimits parses MSB_RLIMITS: resource=soft[:hard] entries separated by ';'.
func ParseRlimits(v string) ([]Rlimit, error) {
	var out []Rlimit
	seen := map[string]bool{}
	for _, e := range entries(v) {
		name, vals, ok := strings.Cut(e, "=")
		if !ok {
			return nil, fmt.Errorf("entry %q: want resource=soft[:hard]", e)
		}
		name = strings.ToLower(strings.TrimSpace(name))
		if _, ok := protocol.RlimitResources[name]; !ok {
			return nil, fmt.Errorf("unknown resource: %s", name)
		}
		if seen[name] {
			return nil, fmt.Errorf("duplicate resource: %s", name)
		}
		seen[name] = true
		parts := strings.Split(vals, ":")
		if len(parts) > 2 {
			return nil, fmt.Errorf("entry %q: more than one ':'", e)
		}
		soft, err := strconv.ParseUint(strings.TrimSpace(parts[0]), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("entry %q: soft limit %q is not a number", e, parts[0])
		}
		hard := soft
		if len(parts) == 2 {
			if hard, err = strconv.ParseUint(strings.TrimSpace(parts[1]), 10, 64); err != nil {
				return nil, fmt.Errorf("entry %q: hard limit %q is not a number", e, parts[1])
			}
		}
		if soft > hard {
			return nil, fmt.Errorf("entry %q: soft limit cannot exceed hard limit", e)
		}
		out = append(out, Rlimit{name, soft, hard})
	}
	return out, nil
}

// handoffSep separates MSB_HANDOFF_INIT_ARGS and _ENV entries (ASCII unit separator).
const handoffSep = "\x1f"

// ParseHandoff parses MSB_HANDOFF_INIT (+ _ARGS, _ENV, and _CWD of later 0.6 hosts), read
// untrimmed; unset or whitespace-only means no handoff.
func ParseHandoff(initPath, args, env, cwd string) (*Handoff, error) {
	if strings.TrimSpace(initPath) == "" {
		return nil, nil
	}
	if initPath != "auto" && !path.IsAbs(initPath) {
		return nil, fmt.Errorf("MSB_HANDOFF_INIT %q: must be an absolute path or auto", initPath)
	}
	h := &Handoff{Path: initPath, Cwd: cwd}
	if cwd != "" && !path.IsAbs(cwd) {
		return nil, fmt.Errorf("MSB_HANDOFF_INIT_CWD %q: must be an absolute path", cwd)
	}
	if args != "" {
		h.Args = strings.Split(args, handoffSep)
	}
	if env != "" {
		for _, e := range strings.Split(env, handoffSep) {
			k, v, ok := strings.Cut(e, "=")
			if !ok {
				return nil, fmt.Errorf("MSB_HANDOFF_INIT_ENV entry %q: missing '='", e)
			}
			if k == "" {
				return nil, fmt.Errorf("MSB_HANDOFF_INIT_ENV entry %q: empty key", e)
			}
			h.Env = append(h.Env, [2]string{k, v})
		}
	}
	return h, nil
}

// LoadConfig reads every MSB_* variable through getenv. Values are trimmed and empty means
// unset (the handoff variables are read untrimmed). An error names the variable.
func LoadConfig(getenv func(string) string) (Config, error) {
	var c Config
	get := func(k string) string { return strings.TrimSpace(getenv(k)) }
	wrap := func(k string, err error) error { return fmt.Errorf("%s=%q: %w", k, get(k), err) }
	var err error
	if v := get("MSB_BLOCK_ROOT"); v != "" {
		if c.BlockRoot, err = ParseBlockRoot(v); err != nil {
			return c, wrap("MSB_BLOCK_ROOT", err)
		}
	}
	if c.DirMounts, err = ParseDirMounts(get("MSB_DIR_MOUNTS")); err != nil {
		return c, wrap("MSB_DIR_MOUNTS", err)
	}
	if c.FileMounts, err = ParseFileMounts(get("MSB_FILE_MOUNTS")); err != nil {
		return c, wrap("MSB_FILE_MOUNTS", err)
	}
	if c.DiskMounts, err = ParseDiskMounts(get("MSB_DISK_MOUNTS")); err != nil {
		return c, wrap("MSB_DISK_MOUNTS", err)
	}
	if c.Tmpfs, err = ParseTmpfs(get("MSB_TMPFS")); err != nil {
		return c, wrap("MSB_TMPFS", err)
	}
	switch p := get("MSB_SECURITY_PROFILE"); p {
	case "", "default":
	case "restricted":
		c.Restricted = true
	default:
		return c, wrap("MSB_SECURITY_PROFILE", fmt.Errorf("want default or restricted"))
	}
	c.Hostname, c.HostAlias, c.User = get("MSB_HOSTNAME"), get("MSB_HOST_ALIAS"), get("MSB_USER")
	if v := get("MSB_NET"); v != "" {
		if c.Net, err = ParseNet(v); err != nil {
			return c, wrap("MSB_NET", err)
		}
	}
	if v := get("MSB_NET_IPV4"); v != "" {
		if c.IPv4, err = ParseIP(v, false); err != nil {
			return c, wrap("MSB_NET_IPV4", err)
		}
	}
	if v := get("MSB_NET_IPV6"); v != "" {
		if c.IPv6, err = ParseIP(v, true); err != nil {
			return c, wrap("MSB_NET_IPV6", err)
		}
	}
	if c.Rlimits, err = ParseRlimits(get("MSB_RLIMITS")); err != nil {
		return c, wrap("MSB_RLIMITS", err)
	}
	if c.Handoff, err = ParseHandoff(getenv("MSB_HANDOFF_INIT"), getenv("MSB_HANDOFF_INIT_ARGS"), getenv("MSB_HANDOFF_INIT_ENV"), getenv("MSB_HANDOFF_INIT_CWD")); err != nil {
		return c, err
	}
	// The boot mounts every volume in one plan (contract 4.6), checked before any side effect.
	if _, err := c.MountPlan(); err != nil {
		return c, fmt.Errorf("volumes (MSB_DIR_MOUNTS, MSB_FILE_MOUNTS, MSB_DISK_MOUNTS, MSB_TMPFS): %w", err)
	}
	return c, nil
}
