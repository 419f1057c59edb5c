// Command agentd is the guest agent of a microVM sandbox: its PID 1 init and the agent the
// host talks to over the virtio-serial port named "agent". With --standalone it runs the agent
// loop as an ordinary process (no mounts, no power-off), for development and tests.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/confine"
	"github.com/agentd/agentd/exec"
	"github.com/agentd/agentd/gateway"
	"github.com/agentd/agentd/heartbeat"
	"github.com/agentd/agentd/initfs"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/relay"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type options struct {
	standalone   bool
	port         string
	logLevel     string
	clockSync    bool
	noFlow       bool
	initAck      time.Duration
	chunk        int
	highWater    int
	lowWater     int
	inboundLimit int
	connectTO    time.Duration
	cpuProfile   string
	maxSessions  int
	heartbeat    string
	budget       int64
	tcpDialer    string
	bootConfig   string
	generation   uint
	egress       egressOptions
}

// parseFlags reads the command line, then AGENTD_* from the environment for flags not given.
func parseFlags(args []string) (options, error) { return parseFlagsEnv(args, os.Getenv) }

// parseFlagsEnv is parseFlags with the AGENTD_* settings read through getenv.
func parseFlagsEnv(args []string, getenv func(string) string) (options, error) {
	var o options
	fs := flag.NewFlagSet("agentd", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: agentd [--standalone] [--port SPEC] [options]\n\n"+
			"agentd speaks microsandbox's agent protocol (generations 5 to %d) on a channel.\n"+
			"SPEC is a path opened read-write (virtio port, pty, FIFO), unix:PATH to connect to a\n"+
			"unix socket, or unix-listen:PATH to accept one connection. By default agentd finds the\n"+
			"virtio-serial port named \"agent\".\n\noptions:\n", protocol.Version)
		fs.PrintDefaults()
	}
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.BoolVar(&o.standalone, "standalone", false, "run as an ordinary process: no init duties, no power-off")
	fs.StringVar(&o.port, "port", "", "channel `SPEC` (default: the virtio port named \"agent\")")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&o.clockSync, "clock-sync", false, "let core.clock.sync step the system clock (always on as PID 1)")
	fs.BoolVar(&o.noFlow, "no-flow-control", false, "do not offer the per-stream flow-control extension to hosts")
	fs.DurationVar(&o.initAck, "init-ack-timeout", agent.DefaultInitAckTimeout, "how long to wait for core.init.ack")
	fs.IntVar(&o.chunk, "tcp-chunk", relay.DefaultOptions.ChunkSize, "largest core.tcp.data chunk sent to the host, in `bytes` (max 65536)")
	fs.IntVar(&o.highWater, "tcp-high-water", relay.DefaultOptions.HighWater, "`bytes` queued toward the host before a stream stops reading its destination")
	fs.IntVar(&o.lowWater, "tcp-low-water", relay.DefaultOptions.LowWater, "`bytes` at which a paused stream resumes reading")
	fs.IntVar(&o.inboundLimit, "tcp-inbound-limit", relay.DefaultOptions.InboundLimit, "host-to-destination `bytes` buffered per stream (the flow-control window)")
	fs.DurationVar(&o.connectTO, "tcp-connect-timeout", relay.DefaultOptions.ConnectTimeout, "timeout of one destination dial")
	fs.IntVar(&o.maxSessions, "tcp-max-sessions", agent.DefaultMaxTCPSessions, "most concurrent core.tcp sessions")
	fs.Int64Var(&o.budget, "tcp-buffer-budget", agent.DefaultTCPBufferBudget, "`bytes` all TCP sessions together may buffer, per direction")
	fs.StringVar(&o.heartbeat, "heartbeat", "", "write the heartbeat file to `PATH` every second (default "+heartbeat.DefaultPath+" as PID 1, none standalone)")
	fs.StringVar(&o.bootConfig, "boot-config", "", "where the boot configuration comes from: auto (core.bootstrap when the host sends one first, else MSB_*; the default as PID 1), env (MSB_* only, never wait for a frame; the default with --standalone) or bootstrap (core.bootstrap required)")
	fs.UintVar(&o.generation, "protocol-generation", protocol.Version, "protocol `GENERATION` to announce in core.ready (5 to the newest): agentd then behaves as an agent of that generation")
	fs.StringVar(&o.tcpDialer, "tcp-dialer", "kernel", "how core.tcp.connect reaches its destination: kernel (sockets in agentd's namespace, the guest's) or netstack (through the egress netstack and the tun, from the gateway address; needs --egress)")
	o.egress.register(fs)
	fs.StringVar(&o.cpuProfile, "cpu-profile", "", "write a CPU profile to `FILE` (for benchmarks)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	fromEnv, err := flagsFromEnv(fs, getenv)
	if err != nil {
		return o, err
	}
	ref := func(name string, value any) string { return flagRef(name, value, fromEnv) }
	if *showVersion {
		fmt.Printf("agentd %s (protocol generation %d, compatible with microsandbox-agentd %s)\n", version, protocol.Version, protocol.AgentVersion)
		os.Exit(0)
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case o.chunk <= 0 || o.chunk > 64<<10:
		return o, fmt.Errorf("%s: must be between 1 and 65536", ref("tcp-chunk", o.chunk))
	case o.lowWater <= 0 || o.highWater < o.lowWater:
		return o, fmt.Errorf("%s / %s: need 0 < low <= high", ref("tcp-low-water", o.lowWater), ref("tcp-high-water", o.highWater))
	case o.inboundLimit < 64<<10:
		return o, fmt.Errorf("%s: must be at least 65536", ref("tcp-inbound-limit", o.inboundLimit))
	case o.maxSessions <= 0:
		return o, fmt.Errorf("%s: must be positive", ref("tcp-max-sessions", o.maxSessions))
	case o.budget < int64(o.inboundLimit):
		return o, fmt.Errorf("%s: must be at least %s", ref("tcp-buffer-budget", o.budget), ref("tcp-inbound-limit", o.inboundLimit))
	case o.initAck <= 0:
		return o, fmt.Errorf("%s: must be positive", ref("init-ack-timeout", o.initAck))
	case o.generation < 5 || o.generation > protocol.Version:
		return o, fmt.Errorf("%s: want 5 to %d", ref("protocol-generation", o.generation), protocol.Version)
	}
	switch initfs.ConfigSource(o.bootConfig) {
	case "", initfs.SourceAuto, initfs.SourceEnv, initfs.SourceBootstrap:
	default:
		return o, fmt.Errorf("--boot-config %q: want auto, env or bootstrap", o.bootConfig)
	}
	if o.bootConfig == "" {
		o.bootConfig = string(initfs.SourceAuto)
		if o.standalone {
			o.bootConfig = string(initfs.SourceEnv)
		}
	}
	if o.heartbeat == "" && !o.standalone {
		o.heartbeat = heartbeat.DefaultPath
	}
	switch {
	case o.tcpDialer != "kernel" && o.tcpDialer != "netstack":
		return o, fmt.Errorf("%s: want kernel or netstack", ref("tcp-dialer", strconv.Quote(o.tcpDialer)))
	case o.tcpDialer == "netstack" && o.egress.mode == "off":
		return o, fmt.Errorf("%s needs --egress netstack or channel (AGENTD_EGRESS)", ref("tcp-dialer", o.tcpDialer))
	}
	if _, err := newLogger(o.logLevel); err != nil {
		return o, fmt.Errorf("%s: want debug, info, warn or error", ref("log-level", strconv.Quote(o.logLevel)))
	}
	o.egress.ref = ref
	return o, o.egress.check()
}

// flagsFromEnv sets each flag not given on the command line from AGENTD_<NAME> (upper case,
// '-' as '_'), so a kernel command line or a microVM host that only passes environment
// variables to init can configure agentd: AGENTD_EGRESS=netstack is --egress netstack. It
// returns the flags it set and their variables, so that errors name what the user wrote.
func flagsFromEnv(fs *flag.FlagSet, getenv func(string) string) (map[string]string, error) {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	from := map[string]string{}
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := envName(f.Name)
		if v := getenv(env); v != "" && !given[f.Name] && err == nil {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s=%q: %w", env, v, serr)
			}
			from[f.Name] = env
		}
	})
	return from, err
}

// envName is the environment variable of a flag.
func envName(flag string) string {
	return "AGENTD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// flagRef names a flag and its value as the user gave them: "--tcp-chunk 0" on the command
// line, "AGENTD_TCP_CHUNK=0" from the environment.
func flagRef(name string, value any, fromEnv map[string]string) string {
	if env, ok := fromEnv[name]; ok {
		return fmt.Sprintf("%s=%v", env, value)
	}
	return fmt.Sprintf("--%s %v", name, value)
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})).With("component", "agentd"), nil
}

func main() {
	boot := agent.BootTimeNs()
	if exec.IsHelper() {
		exec.HelperMain() // agentd started as its own pre-exec helper; does not return
	}
	// Out of the workloads' reach: a process that is not dumpable cannot be ptraced, nor its
	// memory (/proc/PID/mem, process_vm_*), descriptors (pidfd_getfd, /proc/PID/fd), root or
	// namespaces opened, by anyone without CAP_SYS_PTRACE, which no confined workload has.
	unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	// Nothing agentd inherited reaches a workload (the handoff agent's channel is used here).
	confine.CloseOnExec(3)
	if isHandoffAgent() {
		os.Exit(handoffAgentMain(boot)) // the agent half of PID 1 after a handoff
	}
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "agentd: %v\n", err)
		os.Exit(2)
	}
	log, err := newLogger(o.logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agentd: %v\n", err)
		os.Exit(2)
	}
	if !o.standalone && os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "agentd: not PID 1; use --standalone to run the agent loop as an ordinary process")
		os.Exit(2)
	}
	if o.egress.initial, err = o.egress.loadPolicy(); err != nil { // a bad policy file stops agentd before any side effect
		fmt.Fprintf(os.Stderr, "agentd: %v\n", err)
		if !o.standalone {
			initfs.PowerOff(log, 0) // as PID 1, exiting would panic the kernel
		}
		os.Exit(2)
	}
	if !o.standalone {
		runInit(o, log, boot) // does not return: it powers the machine off
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "agentd: --cpu-profile: %v\n", err)
			os.Exit(2)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	if err := run(o, log, boot); err != nil {
		log.Error("agentd failed", "error", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

// execOptions derives the exec settings from the boot configuration: the default user (also
// reported in core.init.resolved), the workloads' confinement (egress on, or the restricted
// security profile) and, from core.bootstrap, the default cwd and the workloads' environment
// and PATH.
func execOptions(bc initfs.BootConfig, e egressOptions) (exec.Options, protocol.UserIDs, error) {
	c := bc.Config
	opts := exec.Options{AgentPath: os.Getenv("PATH"), DefaultUser: c.User, Confine: workloadProfile(c, e), DefaultCwd: c.DefaultCwd}
	if p := bc.WorkloadPath(); p != "" {
		opts.AgentPath = p
		for _, kv := range c.WorkloadEnv() {
			if kv[0] != "PATH" {
				opts.BaseEnv = append(opts.BaseEnv, kv[0]+"="+kv[1])
			}
		}
	}
	var ids protocol.UserIDs
	if c.User != "" {
		id, err := exec.ResolveUser(c.User)
		if err != nil {
			field := "MSB_USER"
			if bc.Source == initfs.SourceBootstrap {
				field = "user"
			}
			return opts, ids, fmt.Errorf("%s=%q: %w", field, c.User, err)
		}
		ids = protocol.UserIDs{UID: id.UID, GID: id.GID}
	}
	return opts, ids, nil
}

// workloadProfile is the confinement of every workload process (nil: none, the reference's
// behaviour when agentd enforces nothing).
func workloadProfile(c initfs.Config, e egressOptions) *confine.Profile {
	if !e.confined(c.Restricted) {
		return nil
	}
	p := confine.Confined(append(e.privatePaths(), privateDir, initfs.HandoffLog)...)
	return &p
}

// readConfig reads the boot configuration from the channel or the environment (initfs.ReadConfig).
func readConfig(o options, port io.ReadWriteCloser, fr *protocol.FrameReader, log *slog.Logger) (initfs.BootConfig, error) {
	con := initfs.Console{
		Frames:   fr,
		Readable: func(d time.Duration) (bool, error) { return channel.WaitReadable(port, d) },
		Deadline: func(t time.Time) error {
			if dl, ok := port.(interface{ SetReadDeadline(time.Time) error }); ok {
				return dl.SetReadDeadline(t)
			}
			return nil
		},
	}
	bc, err := initfs.ReadConfig(con, initfs.ConfigSource(o.bootConfig), os.Getenv)
	if err == nil {
		log.Info("boot configuration", "source", bc.Source)
		if bc.Conflict {
			log.Warn("the host sent core.bootstrap and set MSB_* variables: the bootstrap is used")
		}
	}
	return bc, err
}

// withBootSettings applies agentd's own settings that came with core.bootstrap: AGENTD_<FLAG>
// entries of its default_env set flags as the environment does (the command line, then the
// environment, win over them). The policy is read afresh, once its file can be mounted.
func withBootSettings(o options, bc initfs.BootConfig) (options, error) {
	if bc.Source != initfs.SourceBootstrap {
		return o, nil
	}
	n, err := parseFlagsEnv(os.Args[1:], func(k string) string {
		if v := os.Getenv(k); v != "" {
			return v
		}
		return bc.AgentSetting(k)
	})
	if err != nil {
		return o, fmt.Errorf("agentd settings in core.bootstrap's default_env: %w", err)
	}
	return n, nil
}

// reportBootError is the fail-closed path of a boot whose configuration is unusable (a bad or
// missing core.bootstrap): the error goes to the console, and the agent comes up only far
// enough to tell the host (agent.Config.BootError).
func reportBootError(o options, log *slog.Logger, boot, initStart uint64, port io.ReadWriteCloser, fr *protocol.FrameReader, err error) error {
	fmt.Fprintf(os.Stderr, "agentd: %v\n", err)
	log.Error("boot configuration refused; serving only to report it", "error", err)
	return serve(o, log, boot, initStart, port, exec.Options{}, protocol.UserIDs{}, nil, serveHooks{frames: fr, bootError: err.Error()})
}

func run(o options, log *slog.Logger, boot uint64) error {
	initStart := agent.BootTimeNs()
	var bc initfs.BootConfig
	var err error
	if o.bootConfig == string(initfs.SourceEnv) { // checked before the channel is opened
		if bc, err = initfs.ReadConfig(initfs.Console{}, initfs.SourceEnv, os.Getenv); err != nil {
			return err
		}
	}
	port, err := channel.Open(o.port)
	if err != nil {
		return err
	}
	defer port.Close()
	fr := protocol.NewFrameReader(port)
	if o.bootConfig != string(initfs.SourceEnv) {
		bc, err = readConfig(o, port, fr, log)
		if err != nil && bc.Source == initfs.SourceBootstrap {
			return reportBootError(o, log, boot, initStart, port, fr, err)
		}
		if err != nil {
			return err
		}
	}
	if bc.Source == initfs.SourceBootstrap {
		log.Info("standalone: only the exec settings of core.bootstrap apply (no mounts, network or handoff)")
	}
	if o, err = withBootSettings(o, bc); err != nil {
		return err
	}
	execOpts, defaultUser, err := execOptions(bc, o.egress)
	if err != nil {
		return err
	}
	gw, err := startEgress(o.egress, "", "", log)
	if err != nil {
		return err
	}
	if gw != nil {
		defer gw.Stop()
	}
	return serve(o, log, boot, initStart, port, execOpts, defaultUser, gw, serveHooks{frames: fr})
}

// runInit is agentd as PID 1: the boot sequence (initfs.StartBoot, then the configuration from
// core.bootstrap or MSB_*, then Configure), egress, the agent loop, then power-off. Whatever
// happens, it ends by powering off (returning would panic the kernel).
func runInit(o options, log *slog.Logger, boot uint64) {
	initStart := agent.BootTimeNs()
	err := func() error {
		t := time.Now()
		b, err := initfs.StartBoot(initfs.BootOptions{Log: log})
		defer b.Close() // an init that fails before the handshake still closes the module files
		if err != nil {
			return err
		}
		port, err := openPort(o.port, 10*time.Second)
		if err != nil {
			return err
		}
		defer port.Close()
		b.Steps.Mark("port", t)
		t = time.Now()
		fr := protocol.NewFrameReader(port)
		bc, err := readConfig(o, port, fr, log) // all of it, before any of its side effects
		if err != nil && bc.Source == initfs.SourceBootstrap {
			return reportBootError(o, log, boot, initStart, port, fr, err)
		}
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		if o, err = withBootSettings(o, bc); err != nil {
			return reportBootError(o, log, boot, initStart, port, fr, err)
		}
		b.Steps.Mark("config", t)
		conf := bc.Config
		b.Opts.NetworkEarly = o.egress.mode != "off"
		if err := b.Configure(conf); err != nil {
			return err
		}
		execOpts, defaultUser, err := execOptions(bc, o.egress) // after the pivot: the image's passwd
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		execOpts.Waiter = b.Reaper
		execOpts.BaseEnv = append(execOpts.BaseEnv, b.TLSEnv...) // for workloads, not agentd itself
		var gw *gateway.Gateway
		if o.egress.mode != "off" && conf.Handoff == nil { // with a handoff, the agent child runs it
			b.WaitModules() // the tun driver
			t = time.Now()
			if gw, err = startGuestEgress(o.egress, conf, log); err != nil {
				return err
			}
			defer gw.Stop()
			b.Steps.Mark("egress", t)
		}
		t = time.Now()
		return serve(o, log, boot, initStart, port, execOpts, defaultUser, gw, serveHooks{
			frames: fr,
			afterInit: func() {
				b.Steps.Mark("handshake", t)
				log.Info("init steps", b.Steps...)
				b.LoadBackground()
				if conf.Handoff != nil {
					b.WaitModules() // exec'ing the new init must not cut a module load short
				}
			},
			handoff: &bc,
		})
	}()
	if err != nil {
		log.Error("agentd stopping", "error", err)
	}
	initfs.PowerOff(log, initfs.DefaultGrace)
	os.Exit(1) // only if the power-off itself failed
}

// startGuestEgress starts egress for the whole guest (agentd as its init): the MSB_NET
// interface, configured already, becomes the private uplink, and the guest resolves through
// the netstack's resolver.
func startGuestEgress(e egressOptions, conf initfs.Config, log *slog.Logger) (*gateway.Gateway, error) {
	uplink := ""
	if conf.Net != nil {
		uplink = conf.Net.Iface // moved with its addresses and routes
	}
	gw, err := startEgress(e, uplink, privateDir+"/uplink.net", log)
	if err != nil {
		return nil, fmt.Errorf("init: egress: %w", err)
	}
	if err := gw.WriteResolvConf("/etc/resolv.conf"); err != nil {
		gw.Stop()
		return nil, fmt.Errorf("init: %w", err)
	}
	return gw, nil
}

// openPort opens the channel, waiting for the virtio port to appear (its driver binds, and
// devtmpfs creates the node, shortly after the module loads).
func openPort(spec string, wait time.Duration) (io.ReadWriteCloser, error) {
	deadline := time.Now().Add(wait)
	for {
		port, err := channel.Open(spec)
		if err == nil || time.Now().After(deadline) {
			return port, err
		}
		time.Sleep(10 * time.Millisecond) // the kernel gives no event for a port appearing
	}
}

// serveHooks change serve: frames is the channel's reader when the boot read from it;
// bootError is the fail-closed boot (see reportBootError); for PID 1, afterInit runs once the
// host acknowledged init and init_time_ns is taken, and with a handoff in the configuration
// PID 1 hands the channel to an agent child and becomes another init; adopted is the child's
// side (the handshake was made by PID 1).
type serveHooks struct {
	frames    *protocol.FrameReader
	bootError string
	afterInit func()
	handoff   *initfs.BootConfig
	adopted   *handoffState
}

// ignoredSignals are the catchable signals agentd does not act on (see serve).
var ignoredSignals = []os.Signal{syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE,
	syscall.SIGALRM, syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGVTALRM, syscall.SIGIO, syscall.SIGPWR,
	syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGTRAP, syscall.SIGABRT, syscall.SIGBUS, syscall.SIGFPE, syscall.SIGSEGV,
	syscall.SIGILL, syscall.SIGSYS, syscall.SIGSTKFLT}

// serve runs the handshake and the agent loop on port.
func serve(o options, log *slog.Logger, boot, initStart uint64, port io.ReadWriteCloser, execOpts exec.Options, defaultUser protocol.UserIDs, gw *gateway.Gateway, hooks serveHooks) error {
	cfg := agent.Config{
		Port:            port,
		Frames:          hooks.frames,
		Generation:      uint8(o.generation),
		BootError:       hooks.bootError,
		Log:             log,
		InitAckTimeout:  o.initAck,
		ClockSync:       o.clockSync || !o.standalone,
		BootTimeNs:      boot,
		DefaultUser:     defaultUser,
		HeartbeatPath:   o.heartbeat,
		Exec:            execOpts,
		MaxTCPSessions:  o.maxSessions,
		TCPBufferBudget: o.budget,
		Relay: relay.Options{
			ChunkSize: o.chunk, HighWater: o.highWater, LowWater: o.lowWater,
			InboundLimit: o.inboundLimit, ConnectTimeout: o.connectTO,
		},
	}
	if o.noFlow {
		cfg.Features = []string{}
	}
	if o.egress.advisory && o.egress.mode != "off" {
		cfg.Announce = []string{"egress-advisory"}
	}
	if hooks.handoff != nil && hooks.handoff.Handoff != nil && o.egress.mode != "off" {
		// The agent child after the handoff runs egress and implements these; the handshake
		// made here must offer them for it.
		if cfg.Features == nil {
			cfg.Features = []string{protocol.FeatureFlow}
		}
		cfg.Features = append(slices.Clone(cfg.Features), protocol.FeaturePolicy, protocol.FeatureAudit)
		if o.egress.mode == "channel" {
			cfg.Features = append(cfg.Features, protocol.FeatureStreams)
		}
	}
	if gw != nil {
		// core.tcp destinations pass the same policy point as the guest's flows, once.
		local := (&net.Dialer{}).DialContext
		if o.tcpDialer == "netstack" && gw.Stack != nil {
			local = gw.Stack.DialContext
		}
		cfg.Relay.Dialer = gw.TCPDialer(local)
		if gw.Resolver != nil { // names get the guest's rules, rebinding refusal and pins
			cfg.Relay.Resolver = gw.Resolver
		}
		cfg.Streams = gw.Streams
		cfg.Policy = gw // the host owns the policy from here on
		cfg.Audit = gw.Audit
	}
	a := agent.New(cfg)
	if hooks.adopted != nil {
		a.Adopt(hooks.adopted.HostGen, hooks.adopted.Features)
		a.SetInitTime(hooks.adopted.InitNs)
	} else {
		if err := a.Handshake(); err != nil {
			return fmt.Errorf("init: %w", err)
		}
		cfg.InitTimeNs = agent.BootTimeNs() - initStart
		a.SetInitTime(cfg.InitTimeNs)
		hostGen, features := a.Negotiated()
		log.Info("host acknowledged init", "host_generation", hostGen, "features", features,
			"init_time", time.Duration(cfg.InitTimeNs).Round(time.Microsecond).String())
		if hooks.afterInit != nil {
			hooks.afterInit()
		}
	}
	if hooks.handoff != nil && hooks.handoff.Handoff != nil {
		return handOff(log, *hooks.handoff, a, port, cfg.InitTimeNs, execOpts.Confine) // returns only on failure
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// No signal from inside the guest changes the policy (it changes only by the host's
	// agentd.policy.set) or stops agentd, but SIGTERM and SIGINT, which shut it down (and the
	// guest with it, as the reference does: that fails closed). Every other signal whose default
	// would end or stop the process, or make the Go runtime dump and exit, is ignored when
	// another process sends it (a real fault still panics). As PID 1 the kernel already drops
	// them; as a standalone agent or the agent child after a handoff this is what keeps them out.
	signal.Ignore(ignoredSignals...)
	err := a.Serve(ctx)
	switch {
	case errors.Is(err, agent.ErrShutdown) && hooks.adopted != nil:
		log.Info("shut down: asking the init to power off")
		initfs.PowerOffViaInit()
		return nil
	case errors.Is(err, agent.ErrShutdown):
		log.Info("shut down")
		return nil
	case err == nil && hooks.bootError != "":
		return errors.New(hooks.bootError)
	case errors.Is(err, context.Canceled):
		log.Info("stopped by signal")
		return nil
	}
	return err
}
