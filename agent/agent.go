// Package agent is agentd's loop: the init handshake on the channel, then one reader that
// decodes host frames and dispatches them by type and id to sessions, and the fair writer (sessionio) that
// sends their output fairly. Bad input is answered with core.error and the loop goes on; only
// a frame-level desync (a length prefix over the cap) ends it.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/exec"
	"github.com/agentd/agentd/fs"
	"github.com/agentd/agentd/heartbeat"
	"github.com/agentd/agentd/hostdial"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/relay"
	"github.com/agentd/agentd/sessionio"
)

// ErrShutdown is returned by Serve when the host sent core.shutdown.
var ErrShutdown = errors.New("shutdown requested by host")

// Config configures the agent. Zero fields take sensible defaults.
type Config struct {
	Port io.ReadWriteCloser
	// Frames reads Port, when the boot already read from it (its first frame, core.bootstrap):
	// whatever it holds past what was read is the agent's (default: a new reader on Port).
	Frames *protocol.FrameReader
	Log    *slog.Logger

	// Generation is the protocol generation announced in core.ready and stamped on every
	// frame: protocol.Version by default; lower (down to 5) to behave as an agent of that
	// generation does, which knows no later type and ignores a bulk offer.
	Generation uint8
	// BootError, when set, is why the boot configuration could not be used (a bad or missing
	// core.bootstrap). The agent then comes up only far enough to say so: the handshake and
	// core.ready, a core.error on id 0, and every session start is answered with its terminal
	// failure carrying this text; nothing runs.
	BootError string

	// DefaultUser is reported in core.init.resolved.
	DefaultUser protocol.UserIDs
	// InitAckTimeout bounds the wait for core.init.ack (the reference's 60 s).
	InitAckTimeout time.Duration
	// ClockSync lets core.clock.sync step CLOCK_REALTIME when it drifts by more than
	// ClockTolerance. Off for a standalone agent on a developer's machine.
	ClockSync bool
	// BootTimeNs is CLOCK_BOOTTIME when the process started; InitTimeNs the time spent in
	// init (both reported in core.ready).
	BootTimeNs, InitTimeNs uint64
	// Features are the extensions this agent offers; a host gets those it asks for.
	Features []string
	// Announce are names core.ready's features carry whatever the host asked for: warnings a
	// host should see even if it knows no extension (egress-advisory).
	Announce []string
	// HeartbeatPath is where the heartbeat file is written ("" = none), every
	// HeartbeatInterval (default 1 s).
	HeartbeatPath     string
	HeartbeatInterval time.Duration

	// MaxTCPSessions caps concurrent core.tcp sessions; a connect beyond it gets tcp.failed.
	MaxTCPSessions int
	// TCPBufferBudget caps the bytes buffered by all TCP sessions together, per direction, on
	// top of the per-session limits in Relay: many sessions cannot add up to unbounded memory.
	TCPBufferBudget int64
	// ExecStdinBudget caps host stdin bytes queued for all exec children together;
	// FsWriteBudget caps host bytes queued for the disk by all fs writes together. Each is its
	// own budget: a busy direction of one kind never starves another kind.
	ExecStdinBudget, FsWriteBudget int64

	// Streams, when set, is offered to the host as feature "streams" (guest-initiated
	// streams) and attached to the channel if the host enables it.
	Streams *hostdial.Endpoint
	// Policy, when set, is offered as feature "policy": the host owns the egress policy and
	// sets it with agentd.policy.set (the only way it changes once agentd runs).
	Policy PolicyControl
	// Audit, when set, is offered as feature "audit": every egress decision record also goes
	// to the host, as agentd.audit.records frames.
	Audit AuditSource

	Relay relay.Options
	Exec  exec.Options
	Fs    fs.Options
	Mux   sessionio.WriterOptions
}

// PolicyControl is the egress policy the host owns (gateway.Gateway).
type PolicyControl interface {
	SetPolicy(doc []byte) protocol.PolicyState
	PolicyState(doc bool) protocol.PolicyState
}

// AuditSource gives the audit records meant for the host (egress.Audit): JSON lines on a
// bounded channel, closed when the audit ends, and how many records the host has lost.
type AuditSource interface {
	Host() <-chan []byte
	Lost() int64
}

// Defaults for the session cap and the shared buffer budgets.
const (
	DefaultMaxTCPSessions  = 4096
	DefaultTCPBufferBudget = 64 << 20
	DefaultExecStdinBudget = 64 << 20
	DefaultFsWriteBudget   = 64 << 20
)

// DefaultInitAckTimeout is the reference's INIT_ACK_TIMEOUT_SECS.
const DefaultInitAckTimeout = 60 * time.Second

// ClockTolerance is the drift core.clock.sync tolerates (strictly greater steps the clock).
const ClockTolerance = 100 * time.Millisecond

// Agent is one agent loop on one channel.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	fr      *protocol.FrameReader
	out     *sessionio.Writer
	fs      *fs.Service
	gen     uint8 // announced
	hostGen uint8
	enabled []string // features negotiated with the host

	act heartbeat.Counters

	mu    sync.Mutex
	tcp   map[uint32]*relay.Session
	execs map[uint32]*exec.Session
	all   sync.WaitGroup
}

// New prepares an agent on cfg.Port.
func New(cfg Config) *Agent {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.InitAckTimeout <= 0 {
		cfg.InitAckTimeout = DefaultInitAckTimeout
	}
	if cfg.Features == nil {
		cfg.Features = []string{protocol.FeatureFlow}
	}
	offer := func(on bool, feature string) {
		if on && !protocol.HasFeature(cfg.Features, feature) {
			cfg.Features = append(cfg.Features, feature)
		}
	}
	offer(cfg.Streams != nil, protocol.FeatureStreams)
	offer(cfg.Policy != nil, protocol.FeaturePolicy)
	offer(cfg.Audit != nil, protocol.FeatureAudit)
	if cfg.MaxTCPSessions <= 0 {
		cfg.MaxTCPSessions = DefaultMaxTCPSessions
	}
	budget := func(b **sessionio.Budget, limit *int64, def int64) {
		if *b != nil { // the caller made its own
			return
		}
		if *limit <= 0 {
			*limit = def
		}
		*b = sessionio.NewBudget(*limit)
	}
	budget(&cfg.Relay.Inbound, &cfg.TCPBufferBudget, DefaultTCPBufferBudget)
	budget(&cfg.Relay.Outbound, &cfg.TCPBufferBudget, DefaultTCPBufferBudget)
	budget(&cfg.Exec.StdinBudget, &cfg.ExecStdinBudget, DefaultExecStdinBudget)
	budget(&cfg.Fs.WriteBudget, &cfg.FsWriteBudget, DefaultFsWriteBudget)
	if cfg.Generation == 0 || cfg.Generation > protocol.Version {
		cfg.Generation = protocol.Version
	}
	cfg.Generation = max(cfg.Generation, protocol.TypeError.Info().Generation)
	cfg.Mux.Generation = cfg.Generation
	fr := cfg.Frames
	if fr == nil {
		fr = protocol.NewFrameReader(cfg.Port)
	}
	return &Agent{cfg: cfg, log: cfg.Log, fr: fr, gen: cfg.Generation,
		tcp: map[uint32]*relay.Session{}, execs: map[uint32]*exec.Session{}}
}

// frame builds a frame of the announced generation (before the writer runs).
func (a *Agent) frame(id uint32, t protocol.Type, v any) ([]byte, error) {
	p, err := protocol.Marshal(v)
	if err != nil {
		return nil, err
	}
	return protocol.AppendMessageV(nil, a.gen, id, t, p)
}

// Handshake sends core.init.resolved and waits for core.init.ack, as the reference does
// during init. Any other first frame, a timeout or EOF is an error.
func (a *Agent) Handshake() error {
	if a.cfg.BootError != "" { // in the channel's log; a relay drops it before ready
		f, err := a.frame(0, protocol.TypeError, protocol.CoreError{Kind: protocol.KindInvalidPayload,
			Message: a.cfg.BootError, OffendingType: protocol.TypeBootstrap.String()})
		if err != nil {
			return err
		}
		if _, err := a.cfg.Port.Write(f); err != nil {
			return fmt.Errorf("send core.error: %w", err)
		}
	}
	frame, err := a.frame(0, protocol.TypeInitResolved, protocol.InitResolved{DefaultUser: a.cfg.DefaultUser})
	if err != nil {
		return err
	}
	if _, err := a.cfg.Port.Write(frame); err != nil {
		return fmt.Errorf("send core.init.resolved: %w", err)
	}
	start := time.Now()
	stop := a.deadline(a.cfg.InitAckTimeout)
	f, err := a.fr.Next()
	stop()
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) >= a.cfg.InitAckTimeout {
			return fmt.Errorf("wait for core.init.ack: no reply within %s", a.cfg.InitAckTimeout)
		}
		return fmt.Errorf("wait for core.init.ack: %w", err)
	}
	m, err := protocol.DecodeMessage(f)
	if err != nil {
		return fmt.Errorf("wait for core.init.ack: %w", err)
	}
	if m.Type != protocol.TypeInitAck {
		return fmt.Errorf("wait for core.init.ack: got %s", m.Name())
	}
	var ack protocol.InitAck
	if err := protocol.Unmarshal(m.Payload, &ack); err != nil {
		return fmt.Errorf("decode core.init.ack: %w", err)
	}
	a.hostGen = m.V
	for _, f := range ack.Features {
		if protocol.HasFeature(a.cfg.Features, f) {
			a.enabled = append(a.enabled, f)
		}
	}
	return nil
}

// Negotiated returns what the handshake settled: the host's generation and the features
// enabled (for handing the channel to another process, see Adopt).
func (a *Agent) Negotiated() (hostGen uint8, features []string) { return a.hostGen, a.enabled }

// Adopt takes the outcome of a handshake another agentd process made on this channel (PID 1
// before it handed off to another init), instead of running Handshake.
func (a *Agent) Adopt(hostGen uint8, features []string) {
	a.hostGen = hostGen
	for _, f := range features {
		if protocol.HasFeature(a.cfg.Features, f) {
			a.enabled = append(a.enabled, f)
		}
	}
}

// deadline arranges for a blocked read to end after d and returns a func that cancels it.
// Ports with deadlines (sockets, ttys, pipes) use them; anything else is closed, which ends
// the read for good.
func (a *Agent) deadline(d time.Duration) func() {
	type deadliner interface{ SetReadDeadline(time.Time) error }
	if dl, ok := a.cfg.Port.(deadliner); ok && dl.SetReadDeadline(time.Now().Add(d)) == nil {
		return func() { dl.SetReadDeadline(time.Time{}) }
	}
	t := time.AfterFunc(d, func() { a.cfg.Port.Close() })
	return func() { t.Stop() }
}

// Serve sends core.ready and runs the loop until the host closes the channel (nil), sends
// core.shutdown (ErrShutdown) or the channel fails. Every session is ended before it returns.
func (a *Agent) Serve(ctx context.Context) error {
	a.cfg.Mux.Observe = a.observe
	a.out = sessionio.NewWriter(a.cfg.Port, a.cfg.Mux)
	a.fs = fs.New(a.out, a.cfg.Fs, a.log)
	if a.cfg.Streams != nil && protocol.HasFeature(a.enabled, protocol.FeatureStreams) {
		a.cfg.Streams.Attach(a.out)
		defer a.cfg.Streams.Detach()
	}
	defer func() {
		a.abortAll(syscall.SIGKILL) // the host is gone: nobody will read their output
		a.all.Wait()
		a.out.Close()
		a.fs.Wait()
	}()
	ready := protocol.Ready{
		BootTimeNs:   a.cfg.BootTimeNs,
		InitTimeNs:   a.cfg.InitTimeNs,
		ReadyTimeNs:  BootTimeNs(),
		AgentVersion: protocol.AgentVersion,
		Features:     append(slices.Clip(a.enabled), a.cfg.Announce...),
	}
	if err := a.out.ControlMsg(ctx, 0, protocol.TypeReady, ready); err != nil {
		return err
	}
	if a.cfg.HeartbeatPath != "" {
		hctx, stop := context.WithCancel(ctx)
		interval := a.cfg.HeartbeatInterval
		if interval <= 0 {
			interval = time.Second
		}
		beat := make(chan struct{})
		go func() {
			defer close(beat)
			heartbeat.Run(hctx, a.cfg.HeartbeatPath, interval, &a.act, func() (int, int, int) {
				st := a.Stats()
				return st.ExecSessions, st.FsStreams, st.TCPSessions
			})
		}()
		defer func() { stop(); <-beat }() // joined: no write after Serve returns
	}
	if a.cfg.Audit != nil && protocol.HasFeature(a.enabled, protocol.FeatureAudit) {
		actx, stop := context.WithCancel(ctx)
		pumped := make(chan struct{})
		go func() { defer close(pumped); a.pumpAudit(actx) }()
		defer func() { stop(); <-pumped }()
	}
	readErr := make(chan error, 1)
	go func() { readErr <- a.readLoop(ctx) }()
	select {
	case err := <-readErr:
		if errors.Is(err, ErrShutdown) {
			a.abortAll(syscall.SIGTERM)
			fctx, cancel := context.WithTimeout(context.Background(), time.Second)
			a.out.Flush(fctx)
			cancel()
		}
		return err
	case <-a.out.Done():
		a.cfg.Port.Close() // unblock the reader
		<-readErr
		if err := a.out.Err(); !hungUp(err) {
			return fmt.Errorf("write channel: %w", err)
		}
		a.log.Info("host closed the channel", "error", a.out.Err())
		return nil
	case <-ctx.Done():
		a.cfg.Port.Close()
		<-readErr
		return ctx.Err()
	}
}

// Buffered returns what the agent's frame reader read past the last frame it returned (for
// handing the channel to another process, see Adopt).
func (a *Agent) Buffered() []byte { return a.fr.Buffered() }

func (a *Agent) readLoop(ctx context.Context) error {
	for {
		f, err := a.fr.Next()
		if err != nil {
			if hungUp(err) {
				a.log.Info("host closed the channel", "error", err)
				return nil
			}
			var fe *protocol.FrameError
			if errors.As(err, &fe) {
				a.log.Error("channel desynchronized; closing it", "error", err)
				return fmt.Errorf("read channel: %w", err)
			}
			return fmt.Errorf("read channel: %w", err)
		}
		if err := a.handle(ctx, f); err != nil {
			return err
		}
	}
}

// observe counts every frame the writer sends, but maintenance traffic (core.ready, as in the
// reference), and the data bytes per family.
func (a *Agent) observe(t protocol.Type, n int) {
	if !t.CountsAsActivity() {
		return
	}
	switch {
	case t.IsData() && t.Info().Family == protocol.FamilyExec:
		a.act.ExecOutputBytes.Add(uint64(n))
	case t.IsData() && t.Info().Family == protocol.FamilyFs:
		a.act.FsBytes.Add(uint64(n))
	case t.IsData() && t.Info().Family == protocol.FamilyTCP:
		a.act.TCPBytes.Add(uint64(n))
	}
	a.act.GuestMessage()
}

// hungUp reports whether a channel error means the host went away: EOF on a socket or
// virtio port, EIO on a pty whose master closed, or a reset/broken pipe on a socket.
func hungUp(err error) bool {
	return err == io.EOF || errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// handle processes one frame. It returns an error only to end the loop (shutdown, or the
// writer is gone); everything the host got wrong is answered on the frame's id.
func (a *Agent) handle(ctx context.Context, f protocol.Frame) error {
	if f.Flags == protocol.FlagBulk && a.gen >= protocol.TypeBulkAccepted.Info().Generation {
		return a.record(ctx, f)
	}
	m, err := protocol.DecodeMessage(f)
	if err != nil {
		var ee *protocol.EnvelopeError
		errors.As(err, &ee)
		v := ee.V
		if v == 0 {
			v = a.hostGen
		}
		return a.reject(ctx, f.ID, v, ee.Kind, err.Error(), ee.Wire)
	}
	if want := m.Type.Flags(); m.Flags != want {
		return a.reject(ctx, m.ID, m.V, protocol.KindInvalidFlags,
			fmt.Sprintf("invalid flags for %s: got %d, expected %d", m.Type, m.Flags, want), m.Type.String())
	}
	// A type of a later generation than the one announced, or a later generation's guest ->
	// host type, is answered as an unknown type is. (Generation-5 guest -> host types are
	// ignored below, as by the reference.)
	if info := m.Type.Info(); info.Generation > a.gen || !info.Extension && !info.Dir.From(true) && info.Generation > 5 {
		return a.reject(ctx, m.ID, m.V, protocol.KindUnsupportedMessageType,
			fmt.Sprintf("unsupported message type %s from the host", m.Type), m.Type.String())
	}
	var seq uint64
	if m.Type.CountsAsActivity() {
		seq = a.act.HostMessage()
	}
	if a.cfg.BootError != "" && m.Flags&protocol.FlagSessionStart != 0 {
		return a.refuseSession(ctx, m)
	}
	switch m.Type {
	case protocol.TypePing:
		var p protocol.Empty
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		return a.out.ControlMsg(ctx, m.ID, protocol.TypePong, protocol.Empty{})
	case protocol.TypeTouch:
		var p protocol.Empty
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		return a.out.ControlMsg(ctx, m.ID, protocol.TypeTouched, protocol.Touched{ActivitySeq: seq})
	case protocol.TypeRootDiskPrepare, protocol.TypeRootDiskGrow:
		var p protocol.RootDiskSize
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		return a.reject(ctx, m.ID, m.V, protocol.KindCapabilityUnavailable,
			"this guest cannot resize its root disk online", m.Type.String())
	case protocol.TypeWorkloadFreeze, protocol.TypeWorkloadThaw:
		var p struct {
			AttemptID string `cbor:"attempt_id" req:"1"`
		}
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		return a.out.ControlMsg(ctx, m.ID, protocol.TypeError, protocol.CoreError{Kind: protocol.KindCapabilityUnavailable,
			Message: "this guest has no workload freezer", OffendingType: m.Type.String(),
			WorkloadFailure: &protocol.WorkloadFailure{AttemptID: p.AttemptID, Disposition: protocol.WorkloadUnavailable}})
	case protocol.TypeBootstrap:
		return a.reject(ctx, m.ID, m.V, protocol.KindUnsupportedMessageType,
			"core.bootstrap is only taken as the first console frame, before init", m.Type.String())
	case protocol.TypeBulkCredit, protocol.TypeBulkFinish, protocol.TypeBulkCancel:
		return a.bulkControl(ctx, &m)
	case protocol.TypeShutdown:
		a.log.Info("shutdown requested by host")
		return ErrShutdown
	case protocol.TypeRelayClientDisconnected:
		var p protocol.RelayClientDisconnected
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		a.closeRange(p.IDStart, p.IDEndExclusive)
	case protocol.TypeClockSync:
		var p protocol.ClockSync
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if a.cfg.ClockSync {
			syncClock(a.log, p.UnixTimeNanos)
		}
	case protocol.TypeTCPConnect:
		var p protocol.TCPConnect
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if !protocol.HasFeature(a.enabled, protocol.FeatureFlow) {
			p.Window = 0 // flow control only for a host that negotiated it
		}
		if a.gen < protocol.TypeBulkAccepted.Info().Generation {
			p.Bulk = nil // an agent of an older generation knows no such key
		}
		return a.startTCP(ctx, m.ID, m.V, p)
	case protocol.TypeTCPData:
		data, err := protocol.DecodeData(m.Payload)
		if err != nil {
			return a.badPayload(ctx, &m, err)
		}
		s := a.lookupTCP(m.ID)
		if s == nil {
			return a.out.ControlMsg(ctx, m.ID, protocol.TypeTCPFailed,
				protocol.TCPFailed{Error: fmt.Sprintf("unknown TCP session: %d", m.ID)})
		}
		a.act.TCPBytes.Add(uint64(len(data)))
		if err := s.Write(data); err != nil {
			s.Abort()
			return a.out.ControlMsg(ctx, m.ID, protocol.TypeTCPFailed, protocol.TCPFailed{Error: err.Error()})
		}
	case protocol.TypeTCPEOF, protocol.TypeTCPClose:
		var p protocol.Empty
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if s := a.lookupTCP(m.ID); s != nil {
			if m.Type == protocol.TypeTCPClose {
				s.Close()
			} else if err := s.CloseWrite(); err != nil {
				s.Abort()
				return a.out.ControlMsg(ctx, m.ID, protocol.TypeTCPFailed, protocol.TCPFailed{Error: err.Error()})
			}
		}
	case protocol.TypeFlowCredit:
		var p protocol.FlowCredit
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if s := a.lookupTCP(m.ID); s != nil {
			s.Credit(p.Bytes)
		} else if s := a.lookupExec(m.ID); s != nil {
			s.Credit(p.Bytes)
		} else {
			a.fs.Credit(m.ID, p.Bytes)
		}
	case protocol.TypeExecRequest:
		req, err := protocol.DecodeExecRequest(m.Payload)
		if err != nil {
			return a.badPayload(ctx, &m, err)
		}
		if !protocol.HasFeature(a.enabled, protocol.FeatureFlow) {
			req.Window = 0
		}
		return a.startExec(ctx, m.ID, m.V, req)
	case protocol.TypeExecStdin:
		data, err := protocol.DecodeData(m.Payload)
		if err != nil {
			return a.badPayload(ctx, &m, err)
		}
		if s := a.lookupExec(m.ID); s != nil {
			s.Stdin(data) // may wait for room: only a host without flow control outruns a child
		}
	case protocol.TypeExecResize:
		var p protocol.ExecResize
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if s := a.lookupExec(m.ID); s != nil {
			s.Resize(p.Rows, p.Cols)
		}
	case protocol.TypeExecSignal:
		var p protocol.ExecSignal
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if s := a.lookupExec(m.ID); s != nil {
			s.Signal(p.Signal)
		}
	case protocol.TypeFsRequest:
		var p protocol.FsRequest
		if err := a.decode(ctx, &m, &p); err != nil {
			return ignoreBad(err)
		}
		if p.Bulk != nil && a.gen >= protocol.TypeBulkAccepted.Info().Generation {
			a.fs.RequestBulk(ctx, m.ID, p.Op, *p.Bulk, m.V)
		} else { // an agent of an older generation knows no bulk key
			a.fs.Request(ctx, m.ID, p.Op, protocol.HasFeature(a.enabled, protocol.FeatureFlow))
		}
	case protocol.TypeFsData:
		data, err := protocol.DecodeData(m.Payload)
		if err != nil {
			return a.badPayload(ctx, &m, err)
		}
		a.act.FsBytes.Add(uint64(len(data)))
		if !a.fs.Data(m.ID, data) {
			msg := fmt.Sprintf("unknown write session: %d", m.ID)
			return a.out.ControlMsg(ctx, m.ID, protocol.TypeFsResponse, protocol.FsResponse{Error: &msg})
		}
	case protocol.TypePolicySet, protocol.TypePolicyGet:
		if a.cfg.Policy == nil || !protocol.HasFeature(a.enabled, protocol.FeaturePolicy) {
			return a.reject(ctx, m.ID, m.V, protocol.KindUnsupportedMessageType,
				fmt.Sprintf("%s: the host did not negotiate feature %q", m.Type, protocol.FeaturePolicy), m.Type.String())
		}
		var st protocol.PolicyState
		if m.Type == protocol.TypePolicySet {
			var p protocol.PolicySet
			if err := a.decode(ctx, &m, &p); err != nil {
				return ignoreBad(err)
			}
			st = a.cfg.Policy.SetPolicy(p.Document)
		} else {
			st = a.cfg.Policy.PolicyState(true)
		}
		return a.out.ControlMsg(ctx, m.ID, protocol.TypePolicyState, st)
	case protocol.TypeStreamOpened, protocol.TypeStreamData, protocol.TypeStreamEOF, protocol.TypeStreamClose, protocol.TypeStreamCredit:
		if a.cfg.Streams == nil || !protocol.HasFeature(a.enabled, protocol.FeatureStreams) {
			return nil // never opened any: nothing to route to
		}
		if err := a.cfg.Streams.Handle(m); err != nil {
			return a.badPayload(ctx, &m, err)
		}
	default:
		// Guest -> host types (and init.ack after init) are ignored, as by the reference.
	}
	return nil
}

// errBadInput marks a frame that was answered with core.error; the loop goes on.
var errBadInput = errors.New("bad input answered")

func ignoreBad(err error) error {
	if errors.Is(err, errBadInput) {
		return nil
	}
	return err
}

func (a *Agent) decode(ctx context.Context, m *protocol.Message, v any) error {
	if err := protocol.Unmarshal(m.Payload, v); err != nil {
		if rerr := a.badPayload(ctx, m, err); rerr != nil {
			return rerr
		}
		return errBadInput
	}
	return nil
}

func (a *Agent) badPayload(ctx context.Context, m *protocol.Message, err error) error {
	return a.reject(ctx, m.ID, m.V, protocol.KindInvalidPayload,
		fmt.Sprintf("decode payload for %s: %v", m.Type, err), m.Type.String())
}

// reject answers a bad frame with core.error. A peer older than generation 5 cannot receive
// core.error; unlike the reference (which exits), the frame is then logged and dropped.
func (a *Agent) reject(ctx context.Context, id uint32, v uint8, kind, msg, offending string) error {
	if !protocol.TypeError.AvailableAt(v) {
		a.log.Warn("dropped bad frame from a pre-generation-5 host", "id", id, "kind", kind, "error", msg)
		return nil
	}
	a.log.Debug("rejected frame", "id", id, "kind", kind, "error", msg)
	return a.out.ControlMsg(ctx, id, protocol.TypeError, protocol.CoreError{Kind: kind, Message: msg, OffendingType: offending})
}

// record routes a raw bulk record to its session. A record that is not well formed, or that
// its session's flow does not allow, fails that session; one for no session is answered as
// data for no session is (core.tcp.data, core.fs.data).
func (a *Agent) record(ctx context.Context, f protocol.Frame) error {
	a.act.HostMessage()
	r, err := protocol.ParseBulkRecord(f)
	if s := a.lookupTCP(f.ID); s != nil {
		a.act.TCPBytes.Add(uint64(len(r.Payload)))
		if err != nil {
			s.Fail("invalid TCP bulk record: " + err.Error())
		} else {
			s.Record(r)
		}
		return nil
	}
	if err == nil && r.Kind == protocol.BulkFS {
		a.act.FsBytes.Add(uint64(len(r.Payload)))
		if a.fs.Record(r) {
			return nil
		}
		msg := fmt.Sprintf("unknown write session: %d", f.ID)
		return a.out.ControlMsg(ctx, f.ID, protocol.TypeFsResponse, protocol.FsResponse{Error: &msg})
	}
	return a.out.ControlMsg(ctx, f.ID, protocol.TypeTCPFailed,
		protocol.TCPFailed{Error: fmt.Sprintf("unknown TCP session: %d", f.ID)})
}

// bulkControl routes core.bulk.credit, finish and cancel to their TCP session or fs stream; for
// neither they are ignored, as credit is.
func (a *Agent) bulkControl(ctx context.Context, m *protocol.Message) error {
	s := a.lookupTCP(m.ID)
	switch m.Type {
	case protocol.TypeBulkCredit:
		var p protocol.BulkCredit
		if err := a.decode(ctx, m, &p); err != nil {
			return ignoreBad(err)
		}
		if s != nil {
			s.BulkCredit(p)
		} else {
			a.fs.BulkControl(m.ID, p)
		}
	case protocol.TypeBulkFinish:
		var p protocol.BulkFinish
		if err := a.decode(ctx, m, &p); err != nil {
			return ignoreBad(err)
		}
		if s != nil {
			s.BulkFinish(p)
		} else {
			a.fs.BulkControl(m.ID, p)
		}
	case protocol.TypeBulkCancel:
		var p protocol.BulkCancel
		if err := a.decode(ctx, m, &p); err != nil {
			return ignoreBad(err)
		}
		if s != nil {
			s.BulkCancel(p)
		} else {
			a.fs.BulkControl(m.ID, p)
		}
	}
	return nil
}

// refuseSession answers a session start after a failed boot with its terminal failure.
func (a *Agent) refuseSession(ctx context.Context, m protocol.Message) error {
	msg := "agent not configured: " + a.cfg.BootError
	switch m.Type {
	case protocol.TypeExecRequest:
		return a.out.ControlMsg(ctx, m.ID, protocol.TypeExecFailed, protocol.ExecFailed{Kind: protocol.ExecOther, Message: msg})
	case protocol.TypeFsRequest:
		return a.out.ControlMsg(ctx, m.ID, protocol.TypeFsResponse, protocol.FsResponse{Error: &msg})
	case protocol.TypeTCPConnect:
		return a.out.ControlMsg(ctx, m.ID, protocol.TypeTCPFailed, protocol.TCPFailed{Error: msg})
	}
	return a.reject(ctx, m.ID, m.V, protocol.KindInvalidSession, msg, m.Type.String())
}

func (a *Agent) startTCP(ctx context.Context, id uint32, v uint8, p protocol.TCPConnect) error {
	a.mu.Lock()
	old, n := a.tcp[id], len(a.tcp)
	a.mu.Unlock()
	if old != nil { // a duplicate id replaces the old session, as in the reference
		old.Abort()
	} else if n >= a.cfg.MaxTCPSessions {
		return a.out.ControlMsg(ctx, id, protocol.TypeTCPFailed, protocol.TCPFailed{
			Error: fmt.Sprintf("connect %s:%d: too many TCP sessions (limit %d)", p.Host, p.Port, a.cfg.MaxTCPSessions)})
	}
	a.all.Add(1)
	s := relay.New(id, p, min(v, a.gen), a.out, a.cfg.Relay, a.log, func(s *relay.Session) {
		a.mu.Lock()
		if a.tcp[s.ID()] == s {
			delete(a.tcp, s.ID())
		}
		a.mu.Unlock()
	})
	a.mu.Lock()
	a.tcp[id] = s
	a.mu.Unlock()
	s.Go()
	go func() { <-s.Finished(); a.all.Done() }()
	return nil
}

func (a *Agent) startExec(ctx context.Context, id uint32, v uint8, req protocol.ExecRequest) error {
	a.all.Add(1)
	opts := a.cfg.Exec
	opts.Groups = min(v, a.gen) > protocol.ReferenceGeneration
	s, failed := exec.Start(id, req, a.out, opts, a.log, func(s *exec.Session) {
		a.mu.Lock()
		if a.execs[s.ID()] == s {
			delete(a.execs, s.ID())
		}
		a.mu.Unlock()
	})
	if failed != nil {
		a.all.Done()
		a.log.Debug("exec failed", "id", id, "cmd", req.Cmd, "kind", failed.Kind, "error", failed.Message)
		return a.out.ControlMsg(ctx, id, protocol.TypeExecFailed, failed)
	}
	a.mu.Lock()
	a.execs[id] = s // a duplicate id replaces the entry; the old child runs on, as in the reference
	a.mu.Unlock()
	s.Go()
	go func() { <-s.Finished(); a.all.Done() }()
	return nil
}

func (a *Agent) lookupExec(id uint32) *exec.Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.execs[id]
}

func (a *Agent) lookupTCP(id uint32) *relay.Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.tcp[id]
}

// closeRange ends every session owned by a disconnected relay client, without frames.
func (a *Agent) closeRange(start, end uint32) {
	a.mu.Lock()
	var victims []*relay.Session
	for id, s := range a.tcp {
		if id >= start && id < end {
			victims = append(victims, s)
		}
	}
	var execs []*exec.Session
	for id, s := range a.execs {
		if id >= start && id < end && s.Groups() { // a 0.5.7 host's relay sends exec.signal 9 itself
			execs = append(execs, s)
		}
	}
	a.mu.Unlock()
	for _, s := range victims {
		s.Abort()
	}
	for _, s := range execs { // their process groups (the relay may also send exec.signal 9)
		s.Kill(syscall.SIGKILL)
	}
	nfs := a.fs.CloseRange(start, end)
	a.log.Debug("relay client disconnected", "id_start", start, "id_end_exclusive", end, "closed_tcp", len(victims),
		"killed_exec", len(execs), "closed_fs", nfs)
}

// abortAll ends every session: TCP sessions at once, exec children with sig.
func (a *Agent) abortAll(sig syscall.Signal) {
	a.mu.Lock()
	var tcps []*relay.Session
	for _, s := range a.tcp {
		tcps = append(tcps, s)
	}
	var execs []*exec.Session
	for _, s := range a.execs {
		execs = append(execs, s)
	}
	a.mu.Unlock()
	for _, s := range tcps {
		s.Abort()
	}
	for _, s := range execs {
		s.Kill(sig)
	}
	if a.fs != nil {
		a.fs.Close()
	}
}

// Stats are the agent's live sessions.
type Stats struct {
	ExecSessions, TCPSessions int
	FsHandles, FsStreams      int // open handles; read and write streams
}

// Stats counts the live sessions (the heartbeat's gauges; leak checks in tests).
func (a *Agent) Stats() Stats {
	a.mu.Lock()
	st := Stats{ExecSessions: len(a.execs), TCPSessions: len(a.tcp)}
	a.mu.Unlock()
	if a.fs != nil {
		st.FsHandles, st.FsStreams = a.fs.Counts()
	}
	return st
}

// BootTimeNs reads CLOCK_BOOTTIME in nanoseconds.
func BootTimeNs() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return uint64(ts.Nano())
}

// syncClock steps CLOCK_REALTIME to the host's time when the drift exceeds ClockTolerance.
func syncClock(log *slog.Logger, hostNs uint64) {
	now := time.Now().UnixNano()
	if !ClockDriftExceeds(now, int64(hostNs)) {
		return
	}
	ts := unix.NsecToTimespec(int64(hostNs))
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		log.Warn("clock sync failed", "error", err)
		return
	}
	log.Info("clock stepped to host time", "drift_ns", int64(hostNs)-now)
}

// ClockDriftExceeds reports whether |guest - host| is strictly greater than ClockTolerance.
func ClockDriftExceeds(guestNs, hostNs int64) bool {
	d := guestNs - hostNs
	if d < 0 {
		d = -d
	}
	return d > int64(ClockTolerance)
}

// SetInitTime records the init duration reported in core.ready (known only after Handshake).
func (a *Agent) SetInitTime(ns uint64) { a.cfg.InitTimeNs = ns }

// Audit batches: at most this many records, or bytes of them, per agentd.audit.records frame.
const (
	auditBatchRecords = 256
	auditBatchBytes   = 48 << 10
)

// pumpAudit sends the audit's host records to the host in batches, on a queue of its own
// (a fair share of the channel, behind no session's data and ahead of none). When the host
// reads slowly this waits, and the audit drops and counts what it cannot hand over: the data
// path never waits for it.
func (a *Agent) pumpAudit(ctx context.Context) {
	lines := a.cfg.Audit.Host()
	q := a.out.NewQueue(auditBatchBytes*2, auditBatchBytes)
	defer q.Close()
	for {
		var batch protocol.AuditRecords
		size := 0
		select {
		case l, ok := <-lines:
			if !ok {
				return
			}
			batch.Records, size = append(batch.Records, l), len(l)
		case <-ctx.Done():
			return
		}
	more:
		for len(batch.Records) < auditBatchRecords && size < auditBatchBytes {
			select {
			case l, ok := <-lines:
				if !ok {
					break more
				}
				batch.Records, size = append(batch.Records, l), size+len(l)
			default:
				break more
			}
		}
		batch.Dropped = uint64(a.cfg.Audit.Lost())
		if q.PushMsg(ctx, 0, protocol.TypeAuditRecords, batch) != nil {
			return
		}
	}
}
