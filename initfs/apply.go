package initfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/protocol"
)

// ApplyRlimits sets MSB_RLIMITS on PID 1, so every process inherits them.
func ApplyRlimits(rl []Rlimit) error {
	for _, r := range rl {
		n := protocol.RlimitResources[r.Resource]
		if err := unix.Setrlimit(n, &unix.Rlimit{Cur: r.Soft, Max: r.Hard}); err != nil {
			return fmt.Errorf("setrlimit %s=%d:%d: %w", r.Resource, r.Soft, r.Hard, err)
		}
	}
	return nil
}

// MountTmpfs mounts MSB_TMPFS entries (the restricted profile forces nosuid,nodev).
func MountTmpfs(list []TmpfsMount, restricted bool) error {
	for _, m := range list {
		if err := os.MkdirAll(m.Path, 0o755); err != nil {
			return fmt.Errorf("tmpfs %s: mkdir: %w", m.Path, err)
		}
		flags := uintptr(unix.MS_RELATIME) | mountFlags(m.Opts, restricted)
		mode := uint32(0o755)
		if m.Path == "/tmp" || m.Path == "/var/tmp" {
			mode = 0o1777
		}
		if m.Opts.Mode != nil {
			mode = *m.Opts.Mode
		}
		data := "mode=" + strconv.FormatUint(uint64(mode), 8)
		if m.Opts.SizeMiB != nil {
			data = fmt.Sprintf("size=%d,%s", uint64(*m.Opts.SizeMiB)<<20, data)
		}
		if err := unix.Mount("tmpfs", m.Path, "tmpfs", flags, data); err != nil {
			return fmt.Errorf("tmpfs %s (%s): %w", m.Path, data, err)
		}
	}
	return nil
}

func mountFlags(o MountOpts, restricted bool) uintptr {
	var f uintptr
	if o.ReadOnly {
		f |= unix.MS_RDONLY
	}
	if o.NoExec {
		f |= unix.MS_NOEXEC
	}
	if o.NoSuid || restricted {
		f |= unix.MS_NOSUID
	}
	if o.NoDev || restricted {
		f |= unix.MS_NODEV
	}
	return f
}

// HostsFile renders /etc/hosts as the reference writes it.
func HostsFile(hostname, alias string, gw4, gw6 string) string {
	var b strings.Builder
	suffix := ""
	if hostname != "" {
		suffix = " " + hostname
	}
	fmt.Fprintf(&b, "127.0.0.1\tlocalhost%s\n", suffix)
	fmt.Fprintf(&b, "::1\tlocalhost ip6-localhost ip6-loopback%s\n", suffix)
	if alias != "" {
		if gw4 != "" {
			fmt.Fprintf(&b, "%s\t%s\n", gw4, alias)
		}
		if gw6 != "" {
			fmt.Fprintf(&b, "%s\t%s\n", gw6, alias)
		}
	}
	b.WriteString("fe00::\tip6-localnet\nff00::\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
	return b.String()
}

// ApplyHostname writes /etc/hosts (always, as the reference) and, with a hostname, sets it and
// writes /etc/hostname. root is "/" as PID 1 (a directory in tests).
func ApplyHostname(root string, c Config, set bool) error {
	var gw4, gw6 string
	if c.IPv4 != nil {
		gw4 = c.IPv4.GW.String()
	}
	if c.IPv6 != nil {
		gw6 = c.IPv6.GW.String()
	}
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("hosts: mkdir %s: %w", etc, err)
	}
	if err := os.WriteFile(filepath.Join(etc, "hosts"), []byte(HostsFile(c.Hostname, c.HostAlias, gw4, gw6)), 0o644); err != nil {
		return fmt.Errorf("hosts: %w", err)
	}
	if c.Hostname == "" {
		return nil
	}
	if set {
		if err := unix.Sethostname([]byte(c.Hostname)); err != nil {
			return fmt.Errorf("sethostname %q: %w", c.Hostname, err)
		}
	}
	if err := os.WriteFile(filepath.Join(etc, "hostname"), []byte(c.Hostname+"\n"), 0o644); err != nil {
		return fmt.Errorf("hostname: %w", err)
	}
	return nil
}
