package protocol

import (
	"fmt"

	"github.com/fxamacker/cbor/v2"
)

// Bootstrap is core.bootstrap (generation 7; host -> guest, id 0, flags 0): the boot
// configuration a current host puts into the console before the VM starts, instead of the
// MSB_* variables. Fields are in wire order; every one may be absent on decode, unknown keys
// are ignored, and all but SecurityProfile are left out when empty.
type Bootstrap struct {
	BlockRoot       *BootstrapBlockRoot  `cbor:"block_root,omitempty"`
	DirMounts       []BootstrapDirMount  `cbor:"dir_mounts,omitempty"`
	FileMounts      []BootstrapFileMount `cbor:"file_mounts,omitempty"`
	DiskMounts      []BootstrapDiskMount `cbor:"disk_mounts,omitempty"`
	TmpfsMounts     []BootstrapTmpfs     `cbor:"tmpfs_mounts,omitempty"`
	Hostname        *string              `cbor:"hostname,omitempty"`
	HostAlias       *string              `cbor:"host_alias,omitempty"`
	Network         *BootstrapNetwork    `cbor:"network,omitempty"`
	Rlimits         []ExecRlimit         `cbor:"rlimits,omitempty"`
	User            *string              `cbor:"user,omitempty"`
	DefaultCwd      *string              `cbor:"default_cwd,omitempty"`
	DefaultEnv      []EnvVar             `cbor:"default_env,omitempty"`
	SecurityProfile SecurityProfile      `cbor:"security_profile"`
	HandoffInit     *BootstrapHandoff    `cbor:"handoff_init,omitempty"`
}

// Block root kinds (BootstrapBlockRoot.Kind) and writable upper kinds (BootstrapUpper.Kind).
const (
	BlockRootDiskImage        = "disk-image"
	BlockRootOCIErofs         = "oci-erofs"
	BlockRootReadOnlyVirtiofs = "read-only-virtiofs" // the lower layer is the msb-readonly-root share
	UpperDevice               = "device"
	UpperTmpfs                = "tmpfs"
)

// BootstrapBlockRoot is the root filesystem assembly, a map tagged by its first key "kind".
type BootstrapBlockRoot struct {
	Kind   string
	Device string          // disk-image
	FsType *string         // disk-image; nil: probe /proc/filesystems
	Lower  string          // oci-erofs: the erofs device
	Upper  *BootstrapUpper // oci-erofs
}

// BootstrapUpper is an oci-erofs root's writable upper layer: a device or a tmpfs.
type BootstrapUpper struct {
	Kind    string
	Device  string  // device
	FsType  string  // device
	SizeMiB *uint32 // tmpfs; nil: the guest's default
}

// MountFlags are a mount's four flags; each defaults to false and all four are always sent.
type MountFlags struct {
	ReadOnly bool `cbor:"readonly"`
	NoExec   bool `cbor:"noexec"`
	NoSuid   bool `cbor:"nosuid"`
	NoDev    bool `cbor:"nodev"`
}

type (
	// BootstrapDirMount is a virtiofs directory volume.
	BootstrapDirMount struct {
		Tag       string     `cbor:"tag" req:"1"`
		GuestPath string     `cbor:"guest_path" req:"1"`
		Flags     MountFlags `cbor:"flags"`
	}
	// BootstrapFileMount is one file of a virtiofs share.
	BootstrapFileMount struct {
		Tag       string     `cbor:"tag" req:"1"`
		Filename  string     `cbor:"filename" req:"1"`
		GuestPath string     `cbor:"guest_path" req:"1"`
		Flags     MountFlags `cbor:"flags"`
	}
	// BootstrapDiskMount is a virtio-blk volume, found by its serial (ID).
	BootstrapDiskMount struct {
		ID        string     `cbor:"id" req:"1"`
		GuestPath string     `cbor:"guest_path" req:"1"`
		FsType    *string    `cbor:"fstype,omitempty"` // nil: probe
		Flags     MountFlags `cbor:"flags"`
	}
	// BootstrapTmpfs is a tmpfs mount; Mode is a number (1023 = 0o1777).
	BootstrapTmpfs struct {
		Path    string     `cbor:"path" req:"1"`
		SizeMiB *uint32    `cbor:"size_mib,omitempty"`
		Mode    *uint32    `cbor:"mode,omitempty"`
		Flags   MountFlags `cbor:"flags"`
	}
)

// BootstrapNetwork is the guest NIC. Addresses travel as arrays of integers.
type BootstrapNetwork struct {
	Interface string         `cbor:"interface" req:"1"`
	MAC       MAC            `cbor:"mac" req:"1"`
	MTU       uint16         `cbor:"mtu" req:"1"`
	IPv4      *BootstrapIPv4 `cbor:"ipv4,omitempty"`
	IPv6      *BootstrapIPv6 `cbor:"ipv6,omitempty"`
}

type (
	BootstrapIPv4 struct {
		Address   IPv4Addr  `cbor:"address" req:"1"`
		PrefixLen uint8     `cbor:"prefix_len" req:"1"`
		Gateway   IPv4Addr  `cbor:"gateway" req:"1"`
		DNS       *IPv4Addr `cbor:"dns,omitempty"`
	}
	BootstrapIPv6 struct {
		Address   IPv6Addr  `cbor:"address" req:"1"`
		PrefixLen uint8     `cbor:"prefix_len" req:"1"`
		Gateway   IPv6Addr  `cbor:"gateway" req:"1"`
		DNS       *IPv6Addr `cbor:"dns,omitempty"`
	}
)

// EnvVar is one environment entry.
type EnvVar struct {
	Key   string `cbor:"key" req:"1"`
	Value string `cbor:"value" req:"1"`
}

// BootstrapHandoff hands PID 1 to another init after agentd's init.
type BootstrapHandoff struct {
	Cmd  string   `cbor:"cmd" req:"1"` // absolute, or "auto"
	Args []string `cbor:"args,omitempty"`
	Cwd  *string  `cbor:"cwd,omitempty"`
	Env  []EnvVar `cbor:"env,omitempty"`
}

// SecurityProfile is "default" or "restricted"; the zero value encodes as "default".
type SecurityProfile string

const (
	SecurityDefault    SecurityProfile = "default"
	SecurityRestricted SecurityProfile = "restricted"
)

func (p SecurityProfile) MarshalCBOR() ([]byte, error) {
	if p == "" {
		p = SecurityDefault
	}
	return encMode.Marshal(string(p))
}

func (p *SecurityProfile) UnmarshalCBOR(b []byte) error {
	var s string
	if err := decMode.Unmarshal(b, &s); err != nil {
		return err
	}
	if s != string(SecurityDefault) && s != string(SecurityRestricted) {
		return fmt.Errorf("unknown variant `%s`, expected `default` or `restricted`", s)
	}
	*p = SecurityProfile(s)
	return nil
}

// MarshalCBOR encodes the variant's map: "kind" first, then its fields.
func (r BootstrapBlockRoot) MarshalCBOR() ([]byte, error) {
	switch r.Kind {
	case BlockRootDiskImage:
		return encMode.Marshal(struct {
			Kind   string  `cbor:"kind"`
			Device string  `cbor:"device"`
			FsType *string `cbor:"fstype,omitempty"`
		}{r.Kind, r.Device, r.FsType})
	case BlockRootOCIErofs:
		if r.Upper == nil {
			return nil, fmt.Errorf("block_root oci-erofs without upper")
		}
		return encMode.Marshal(struct {
			Kind  string         `cbor:"kind"`
			Lower string         `cbor:"lower"`
			Upper BootstrapUpper `cbor:"upper"`
		}{r.Kind, r.Lower, *r.Upper})
	case BlockRootReadOnlyVirtiofs:
		return encMode.Marshal(struct {
			Kind string `cbor:"kind"`
		}{r.Kind})
	}
	return nil, fmt.Errorf("block_root: unknown kind %q", r.Kind)
}

// UnmarshalCBOR decodes a tagged variant; a kind it does not know is an error (an older agent
// must fail closed rather than boot a root it does not understand).
func (r *BootstrapBlockRoot) UnmarshalCBOR(b []byte) error {
	var w struct {
		Kind   *string         `cbor:"kind"`
		Device *string         `cbor:"device"`
		FsType *string         `cbor:"fstype"`
		Lower  *string         `cbor:"lower"`
		Upper  cbor.RawMessage `cbor:"upper"`
	}
	if err := decMode.Unmarshal(b, &w); err != nil {
		return err
	}
	if w.Kind == nil {
		return fmt.Errorf("missing field `kind`")
	}
	*r = BootstrapBlockRoot{Kind: *w.Kind}
	switch r.Kind {
	case BlockRootDiskImage:
		if w.Device == nil {
			return fmt.Errorf("disk-image: missing field `device`")
		}
		r.Device, r.FsType = *w.Device, w.FsType
	case BlockRootOCIErofs:
		if w.Lower == nil {
			return fmt.Errorf("oci-erofs: missing field `lower`")
		}
		if len(w.Upper) == 0 {
			return fmt.Errorf("oci-erofs: missing field `upper`")
		}
		r.Lower, r.Upper = *w.Lower, new(BootstrapUpper)
		if err := decMode.Unmarshal(w.Upper, r.Upper); err != nil {
			return fmt.Errorf("oci-erofs: upper: %w", err)
		}
	case BlockRootReadOnlyVirtiofs:
	default:
		return fmt.Errorf("unknown variant `%s`, expected one of `%s`, `%s`, `%s`", r.Kind,
			BlockRootDiskImage, BlockRootOCIErofs, BlockRootReadOnlyVirtiofs)
	}
	return nil
}

// MarshalCBOR encodes the variant's map: "kind" first, then its fields.
func (u BootstrapUpper) MarshalCBOR() ([]byte, error) {
	switch u.Kind {
	case UpperDevice:
		return encMode.Marshal(struct {
			Kind   string `cbor:"kind"`
			Device string `cbor:"device"`
			FsType string `cbor:"fstype"`
		}{u.Kind, u.Device, u.FsType})
	case UpperTmpfs:
		return encMode.Marshal(struct {
			Kind    string  `cbor:"kind"`
			SizeMiB *uint32 `cbor:"size_mib,omitempty"`
		}{u.Kind, u.SizeMiB})
	}
	return nil, fmt.Errorf("upper: unknown kind %q", u.Kind)
}

func (u *BootstrapUpper) UnmarshalCBOR(b []byte) error {
	var w struct {
		Kind    *string `cbor:"kind"`
		Device  *string `cbor:"device"`
		FsType  *string `cbor:"fstype"`
		SizeMiB *uint32 `cbor:"size_mib"`
	}
	if err := decMode.Unmarshal(b, &w); err != nil {
		return err
	}
	if w.Kind == nil {
		return fmt.Errorf("missing field `kind`")
	}
	*u = BootstrapUpper{Kind: *w.Kind}
	switch u.Kind {
	case UpperDevice:
		if w.Device == nil {
			return fmt.Errorf("device: missing field `device`")
		}
		if w.FsType == nil {
			return fmt.Errorf("device: missing field `fstype`")
		}
		u.Device, u.FsType = *w.Device, *w.FsType
	case UpperTmpfs:
		u.SizeMiB = w.SizeMiB
	default:
		return fmt.Errorf("unknown variant `%s`, expected `%s` or `%s`", u.Kind, UpperDevice, UpperTmpfs)
	}
	return nil
}

// BootstrapGeneration is the generation that introduced core.bootstrap; a bootstrap frame
// stamped with a lower v is refused (a higher one is accepted).
var BootstrapGeneration = TypeBootstrap.Info().Generation

// DecodeBootstrapFrame checks that f is a core.bootstrap frame as a host sends it (id 0, flags
// 0, v >= 7) and decodes its payload, in the reference's order and with its wording.
func DecodeBootstrapFrame(f Frame) (*Bootstrap, error) {
	if f.ID != 0 || f.Flags != 0 {
		return nil, fmt.Errorf("guest bootstrap requires id=0 and flags=0, got id=%d flags=%d", f.ID, f.Flags)
	}
	m, err := DecodeMessage(f)
	if err != nil {
		return nil, fmt.Errorf("expected core.bootstrap as first console frame: %w", err)
	}
	if m.Type != TypeBootstrap {
		return nil, fmt.Errorf("expected core.bootstrap as first console frame, got %s", m.Name())
	}
	if m.V < BootstrapGeneration {
		return nil, fmt.Errorf("guest bootstrap requires protocol generation %d or newer, got %d", BootstrapGeneration, m.V)
	}
	var b Bootstrap
	if err := Unmarshal(m.Payload, &b); err != nil {
		return nil, fmt.Errorf("decode guest bootstrap payload: %w", err)
	}
	return &b, nil
}
