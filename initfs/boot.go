package initfs

import (
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// BootOptions are what PID 1's boot needs besides the MSB_* configuration.
type BootOptions struct {
	// NetworkEarly loads the background modules (tun, network drivers) as soon as they are
	// opened, for an init that needs them before the handshake (egress). MSB_NET implies it.
	NetworkEarly bool
	Log          *slog.Logger
}

// Boot is PID 1's boot sequence up to the agent channel, and what it leaves running: the
// reaper, the background module loads, the workloads' TLS environment, and the time each step
// took. It runs in two parts: StartBoot does what the channel needs (EarlyPlan), so that the
// configuration can be read from it (a current host's core.bootstrap); Configure then runs
// the plan for that configuration (Plan).
//
// The steps run in the reference's order, except that those it runs after its early handshake
// (volumes, hosts, /etc/profile, loopback, network, TLS) come before the handshake here, so
// that egress can take over the configured uplink before the agent starts. (Running them
// alongside the handshake instead gained nothing measurable on one emulated CPU.)
type Boot struct {
	Conf   Config
	Opts   BootOptions
	Reaper *Reaper
	// TLSEnv is the environment workloads get for the installed CA bundle.
	TLSEnv []string
	Steps  Steps

	bgModules []Opened
	bg        sync.WaitGroup
	bgOnce    sync.Once
}

// Step is one named part of the boot sequence.
type Step struct {
	Name string
	Run  func(b *Boot) error
}

// EarlyPlan is what the boot does before it knows its configuration: what the agent channel
// needs (devtmpfs for the port's node, sysfs to find it, the virtio console), and the reaper.
func EarlyPlan() []Step {
	return []Step{
		{"base mounts", func(*Boot) error { return MountEarly() }},
		{"reaper", func(b *Boot) error { b.Reaper = StartReaper(); return nil }},
		{"console modules", func(b *Boot) error {
			_, err := LoadModules(ModulesDir, LoadOrder, b.Opts.Log)
			return err
		}},
	}
}

// Plan is the boot sequence for c, after EarlyPlan: the steps that apply, in order. It does
// nothing itself.
func Plan(c Config, o BootOptions) []Step {
	steps := []Step{
		{"rlimits", func(b *Boot) error { return ApplyRlimits(b.Conf.Rlimits) }},
		{"modules", (*Boot).loadModules},
		{"runtime share", func(b *Boot) error { MountRuntime(b.Opts.Log); return nil }},
	}
	if c.BlockRoot != nil {
		steps = append(steps, Step{"block root", func(b *Boot) error { return MountBlockRoot(b.Conf.BlockRoot) }})
	}
	if c.Net != nil || o.NetworkEarly {
		steps = append(steps, Step{"network modules", func(b *Boot) error { b.LoadBackground(); return nil }})
	}
	steps = append(steps,
		Step{"volumes", (*Boot).mountVolumes},
		Step{"hosts+profile", func(b *Boot) error {
			if err := ApplyHostname("/", b.Conf, true); err != nil {
				return err
			}
			return EnsureProfileBlock("/etc/profile")
		}},
		Step{"lo", func(b *Boot) error {
			if err := LoopbackUp(); err != nil {
				b.Opts.Log.Warn("loopback not up", "error", err)
			}
			return nil
		}},
	)
	if c.Net != nil {
		steps = append(steps, Step{"network", func(b *Boot) error {
			b.WaitModules()
			return ConfigureNetwork("/", b.Conf)
		}})
	}
	return append(steps, Step{"tls", func(b *Boot) (err error) {
		b.TLSEnv, err = InstallTLS("/", b.Opts.Log)
		return err
	}})
}

// StartBoot runs EarlyPlan. On error the boot is left as far as it got; Close still releases
// what it holds.
func StartBoot(o BootOptions) (*Boot, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	b := &Boot{Opts: o}
	b.bg.Add(1)
	return b, b.run(EarlyPlan())
}

// Configure runs the plan for c (read, all of it, before any of its side effects).
func (b *Boot) Configure(c Config) error {
	b.Conf = c
	return b.run(Plan(c, b.Opts))
}

func (b *Boot) run(steps []Step) error {
	for _, s := range steps {
		t := time.Now()
		if err := s.Run(b); err != nil {
			return fmt.Errorf("init: %s: %w", s.Name, err)
		}
		if s.Name != "reaper" && s.Name != "network modules" { // instant: not worth a column
			b.Steps.Mark(s.Name, t)
		}
	}
	return nil
}

// loadModules loads what init mounts from (virtio-fs and the block driver, when it does) and
// opens the rest, which load in the background from files opened now (a block root is about
// to replace the initramfs as /).
func (b *Boot) loadModules() error {
	log := b.Opts.Log
	if err := LoadVirtiofs(log); err != nil { // only with a virtio-fs device
		return err
	}
	disks := b.Conf.BlockRoot != nil || len(b.Conf.DiskMounts) > 0
	if disks {
		if _, err := LoadModules(ModulesDir, BlockOrder, log); err != nil {
			return err
		}
	}
	bg, err := OpenModules(ModulesDir, BackgroundOrder)
	if err != nil {
		return err
	}
	if !disks { // a workload may still attach a disk
		block, err := OpenModules(ModulesDir, BlockOrder)
		if err != nil {
			return err
		}
		bg = append(block, bg...)
	}
	b.bgModules = bg
	return nil
}

// mountVolumes mounts the rest of the base file systems, then every volume in the order of
// the mount plan: parents before children, whatever their kind (contract 4.6).
func (b *Boot) mountVolumes() error {
	c := b.Conf
	if err := MountRest(); err != nil {
		return err
	}
	plan, err := c.MountPlan()
	if err != nil {
		return err
	}
	for _, m := range plan {
		i := m.Index
		switch m.Kind {
		case MountKindDir:
			err = MountDirs(c.DirMounts[i:i+1], c.Restricted)
		case MountKindFile:
			err = MountFiles(c.FileMounts[i:i+1], c.Restricted)
		case MountKindDisk:
			err = MountDisks(c.DiskMounts[i:i+1], c.Restricted)
		case MountKindTmpfs:
			err = MountTmpfs(c.Tmpfs[i:i+1], c.Restricted)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// LoadBackground starts loading the background modules, once: right away when init needs
// them (MSB_NET, egress), otherwise once the host acknowledged init, so that they do not
// compete with the init steps for the CPU (under emulation that is most of the cost).
func (b *Boot) LoadBackground() {
	b.bgOnce.Do(func() {
		mods := b.bgModules
		b.bgModules = nil
		go func() {
			defer b.bg.Done()
			if err := LoadOpened(mods, b.Opts.Log); err != nil {
				b.Opts.Log.Error("kernel modules", "error", err)
			}
		}()
	})
}

// WaitModules waits for the background modules (the tun driver, before egress starts; all of
// them before a handoff execs another init, which must not cut a load short).
func (b *Boot) WaitModules() {
	b.LoadBackground()
	b.bg.Wait()
}

// Close releases what the boot holds: the background module files are loaded (or closed) so
// no descriptor of agentd's lingers.
func (b *Boot) Close() { b.LoadBackground() }

// Steps records how long each init step took, for one log line once init_time_ns is taken (a
// line on the serial console costs milliseconds under emulation).
type Steps []any // step, duration, ...

// Mark records step as taking the time since since.
func (s *Steps) Mark(step string, since time.Time) {
	*s = append(*s, step, time.Since(since).Round(time.Microsecond).String())
}
