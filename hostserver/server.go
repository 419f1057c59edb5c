// Package hostserver is the host's end of an agent channel when many clients share it: the
// relay microsandbox runs for 128 clients on a unix socket (each with its own id range), and
// the host end of guest-initiated streams (the guest has no network of its own; the host dials
// out for it, under a policy of its own). Clients talk to it with the host package.
package hostserver

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Options configure a server.
type Options struct {
	// Features are requested from the agent in core.init.ack and thereby offered to clients
	// (each client still opts in per session).
	Features []string
	// ClockSyncEvery is how often the server sends core.clock.sync (0: never). microsandbox's
	// host sends one at start and then every 60 s.
	ClockSyncEvery time.Duration
	// ToAgentQueue bounds frames waiting for the channel, ToAgentBytes their bytes (a raw bulk
	// record is up to 3 MiB); ClientQueue bounds frames waiting for one client (a full client
	// queue holds up routing, as in microsandbox's relay; a bulk stream's credit keeps it from
	// filling).
	ToAgentQueue, ClientQueue int
	ToAgentBytes              int64
	HandshakeTimeout          time.Duration
	Log                       *slog.Logger
	// DialOut, when set, serves guest-initiated streams: the server asks for feature
	// "streams" and dials out for the guest (agentctl serve --egress).
	DialOut *DialOutOptions
	// AuditLog, when set, gets every audit record the guest sends (feature "audit", which the
	// server always asks for), one JSON line each; clients can follow them too (AuditKeep).
	AuditLog io.Writer
}

// DefaultOptions mirror microsandbox's relay (256 frames toward the guest, 64 per client).
var DefaultOptions = Options{
	Features:         []string{protocol.FeatureFlow},
	ClockSyncEvery:   60 * time.Second,
	ToAgentQueue:     256,
	ToAgentBytes:     4 << 20,
	ClientQueue:      64,
	HandshakeTimeout: 60 * time.Second,
}

// Server owns an agent channel and serves up to 128 clients on a unix socket, each with its
// own id range, as microsandbox's relay does.
type Server struct {
	conn    io.ReadWriteCloser
	opts    Options
	log     *slog.Logger
	fr      *protocol.FrameReader
	ready   []byte
	toAgent chan agentFrame
	queued  *sessionio.Budget // bytes in toAgent
	ctx     context.Context   // ends with the server
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
	err     error

	mu      sync.Mutex
	clients [protocol.RelayMaxClients]*relayClient
	// nextSlot is where the search for a free slot starts: slots are handed out in turn, so a
	// slot just freed is reused last. The agent may still send frames for the sessions of a
	// client that left (they cross core.relay.client.disconnected on the channel); a new client
	// in the same slot would receive them as answers to its own first ids.
	nextSlot int

	dialOut *dialOut // nil unless the agent enabled guest-initiated streams
	audit   *auditLog
	// DialOutCounters count guest-initiated streams.
	DialOutCounters DialOutCounters
}

type relayClient struct {
	slot       int
	start, end uint32
	conn       net.Conn
	out        chan []byte
	gone       chan struct{}
	execIDs    map[uint32]bool // guarded by Server.mu
	finished   *idSet          // guarded by Server.mu: ids whose terminal frame the client got
}

// New performs the host handshake on the agent channel and starts routing.
func New(conn io.ReadWriteCloser, opts Options) (*Server, error) {
	d := DefaultOptions
	if opts.Features == nil {
		opts.Features = d.Features
	}
	if opts.ToAgentQueue <= 0 {
		opts.ToAgentQueue = d.ToAgentQueue
	}
	if opts.ClientQueue <= 0 {
		opts.ClientQueue = d.ClientQueue
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = d.HandshakeTimeout
	}
	if opts.ToAgentBytes <= 0 {
		opts.ToAgentBytes = d.ToAgentBytes
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	// The host owns the policy (its clients set it through the server) and keeps the audit.
	features := append(append([]string(nil), opts.Features...), protocol.FeaturePolicy, protocol.FeatureAudit)
	if opts.DialOut != nil {
		features = append(features, protocol.FeatureStreams)
	}
	g, fr, err := host.Handshake(conn, host.Options{Features: features, HandshakeTimeout: opts.HandshakeTimeout, Log: opts.Log})
	if err != nil {
		return nil, err
	}
	r := &Server{conn: conn, opts: opts, log: opts.Log, fr: fr, ready: g.ReadyFrame,
		toAgent: make(chan agentFrame, opts.ToAgentQueue), queued: sessionio.NewBudget(opts.ToAgentBytes), done: make(chan struct{}),
		audit: newAuditLog(opts.AuditLog)}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	if opts.DialOut != nil && protocol.HasFeature(g.Ready.Features, protocol.FeatureStreams) {
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-r.done; cancel() }()
		r.dialOut = newDialOut(ctx, *opts.DialOut, r.sendAgentThen, &r.DialOutCounters)
	}
	r.log.Info("agent ready", "agent_version", g.Ready.AgentVersion, "generation", g.ReadyV, "features", g.Ready.Features)
	go r.writeAgent()
	go r.readAgent()
	if opts.ClockSyncEvery > 0 {
		go r.clockSync()
	}
	return r, nil
}

func (r *Server) stop(err error) {
	r.once.Do(func() {
		r.err = err
		close(r.done)
		r.cancel()
		if r.dialOut != nil {
			go r.dialOut.closeAll()
		}
		r.conn.Close()
		r.mu.Lock()
		for _, c := range r.clients {
			if c != nil {
				c.conn.Close()
			}
		}
		r.mu.Unlock()
	})
}

// Close ends the server.
func (r *Server) Close() { r.stop(host.ErrClosed) }

// agentFrame is a frame for the channel and what to do once it is written (or dropped).
type agentFrame struct {
	b     []byte
	after func()
}

func (r *Server) writeAgent() {
	for {
		select {
		case f := <-r.toAgent:
			_, err := r.conn.Write(f.b)
			r.queued.Release(len(f.b))
			if f.after != nil {
				f.after()
			}
			if err != nil {
				r.stop(fmt.Errorf("write agent channel: %w", err))
				return
			}
		case <-r.done:
			return
		}
	}
}

func (r *Server) sendAgent(frame []byte) bool { return r.sendAgentThen(frame, nil) }

// sendAgentThen queues a frame for the channel; after runs once it was written (a stream uses
// it to keep at most one data frame of its own in the queue, so a bulk stream cannot build a
// long line in front of an interactive one).
func (r *Server) sendAgentThen(frame []byte, after func()) bool {
	if r.queued.Acquire(r.ctx, len(frame)) != nil {
		if after != nil {
			after()
		}
		return false
	}
	select {
	case r.toAgent <- agentFrame{frame, after}:
		return true
	case <-r.done:
		r.queued.Release(len(frame))
		if after != nil {
			after()
		}
		return false
	}
}

func (r *Server) clockSync() {
	t := time.NewTicker(r.opts.ClockSyncEvery)
	defer t.Stop()
	for {
		f, _ := protocol.EncodeFrame(0, protocol.TypeClockSync, protocol.ClockSync{UnixTimeNanos: uint64(time.Now().UnixNano())})
		if !r.sendAgent(f) {
			return
		}
		select {
		case <-t.C:
		case <-r.done:
			return
		}
	}
}

// readAgent routes each guest frame to the client whose range holds its id.
func (r *Server) readAgent() {
	for {
		f, err := r.fr.Next()
		if err != nil {
			if err == io.EOF {
				err = host.ErrClosed
			}
			r.stop(err)
			return
		}
		if r.dialOut != nil && isStreamFrame(f) {
			if m, err := protocol.DecodeMessage(f); err == nil && isStreamType(m.Type) {
				r.dialOut.handle(m) // guest-initiated: by type, before any id routing
				continue
			}
		}
		if f.ID == 0 {
			if protocol.FrameType(f) == protocol.TypeAuditRecords {
				if m, err := protocol.DecodeMessage(f); err == nil {
					r.audit.add(m)
				}
			}
			continue // other control frames after ready are not routed
		}
		r.mu.Lock()
		c := r.clients[protocol.RelaySlotOf(f.ID)]
		if c != nil && (f.ID < c.start || f.ID >= c.end) {
			c = nil // a slot boundary id: no client's
		}
		if c != nil && f.Flags&protocol.FlagTerminal != 0 {
			delete(c.execIDs, f.ID)
			c.finished.add(f.ID)
		}
		r.mu.Unlock()
		if c == nil {
			continue // nobody owns this id any more
		}
		raw, _ := protocol.AppendRawFrame(make([]byte, 0, protocol.PrefixSize+protocol.HeaderSize+len(f.Body)), f.ID, f.Flags, f.Body)
		select {
		case c.out <- raw:
		case <-c.gone:
		case <-r.done:
			return
		}
	}
}

// Serve accepts clients on l until the server or the listener ends.
func (r *Server) Serve(l net.Listener) error {
	go func() { <-r.done; l.Close() }()
	for {
		conn, err := l.Accept()
		if err != nil {
			select {
			case <-r.done:
				return r.err
			default:
			}
			return fmt.Errorf("accept: %w", err)
		}
		r.admit(conn)
	}
}

func (r *Server) admit(conn net.Conn) {
	r.mu.Lock()
	slot := -1
	for i := range r.clients {
		if s := (r.nextSlot + i) % len(r.clients); r.clients[s] == nil {
			slot = s
			break
		}
	}
	if slot < 0 {
		r.mu.Unlock()
		r.log.Warn("relay full; client dropped", "max_clients", protocol.RelayMaxClients)
		conn.Close()
		return
	}
	start, end := protocol.RelaySlotRange(slot)
	c := &relayClient{slot: slot, start: start, end: end, conn: conn,
		out: make(chan []byte, r.opts.ClientQueue), gone: make(chan struct{}), execIDs: map[uint32]bool{}, finished: newIDSet(start)}
	r.clients[slot] = c
	r.nextSlot = slot + 1
	r.mu.Unlock()
	hello := binary.BigEndian.AppendUint32(nil, start)
	hello = binary.BigEndian.AppendUint32(hello, end)
	hello = append(hello, r.ready...)
	c.out <- hello
	r.log.Debug("client connected", "slot", slot, "id_start", start, "id_end_exclusive", end)
	go r.writeClient(c)
	go r.readClient(c)
}

func (r *Server) writeClient(c *relayClient) {
	for {
		select {
		case f := <-c.out:
			if _, err := c.conn.Write(f); err != nil {
				c.conn.Close()
				return
			}
		case <-c.gone:
			return
		}
	}
}

// readClient forwards a client's frames to the agent. An id outside the client's range
// disconnects it, except id 0 with the shutdown flag. A frame on an id whose session already
// finished is not forwarded: correlation ids are single-use (current clients never reuse one),
// so the client gets core.error for it instead.
func (r *Server) readClient(c *relayClient) {
	defer r.leave(c)
	fr := protocol.NewFrameReader(c.conn)
	for {
		f, err := fr.Next()
		if err != nil {
			return
		}
		if f.ID == 0 && f.Flags&protocol.FlagShutdown == 0 || f.ID != 0 && (f.ID < c.start || f.ID >= c.end) {
			r.log.Warn("client used an id outside its range; disconnecting it", "slot", c.slot, "id", f.ID)
			return
		}
		r.mu.Lock()
		reused := f.ID != 0 && c.finished.has(f.ID)
		r.mu.Unlock()
		if reused {
			r.log.Debug("client reused a finished correlation id; frame dropped", "slot", c.slot, "id", f.ID)
			ce := protocol.CoreError{Kind: protocol.KindInvalidSession, Message: fmt.Sprintf("correlation id %d was already used: ids are single-use", f.ID)}
			if t := protocol.FrameType(f); t.Valid() {
				ce.OffendingType = t.String()
			}
			e, _ := protocol.EncodeFrame(f.ID, protocol.TypeError, ce)
			select {
			case c.out <- e:
			case <-c.gone:
				return
			}
			continue
		}
		if f.Flags&protocol.FlagSessionStart != 0 {
			m, err := protocol.DecodeMessage(f)
			switch {
			case err == nil && m.Type == protocol.TypeExecRequest:
				r.mu.Lock()
				c.execIDs[f.ID] = true
				r.mu.Unlock()
			case err == nil && m.Type == protocol.TypeAuditFollow:
				r.audit.follow(r, c, f.ID, m) // the server answers it; agentd never sees it
				continue
			}
		}
		raw, _ := protocol.AppendRawFrame(nil, f.ID, f.Flags, f.Body)
		if !r.sendAgent(raw) {
			return
		}
	}
}

// leave frees the client's slot: its exec sessions get SIGKILL, then the agent is told to
// close everything else in the client's id range.
func (r *Server) leave(c *relayClient) {
	c.conn.Close()
	r.mu.Lock()
	r.clients[c.slot] = nil
	ids := c.execIDs
	c.execIDs = nil
	r.mu.Unlock()
	close(c.gone)
	for id := range ids {
		f, _ := protocol.EncodeFrame(id, protocol.TypeExecSignal, protocol.ExecSignal{Signal: 9})
		r.sendAgent(f)
	}
	f, _ := protocol.EncodeFrame(0, protocol.TypeRelayClientDisconnected,
		protocol.RelayClientDisconnected{IDStart: c.start, IDEndExclusive: c.end})
	r.sendAgent(f)
	r.log.Debug("client disconnected", "slot", c.slot)
}

// isStreamFrame reports whether a frame's type is agentd.stream.* without a full decode.
func isStreamFrame(f protocol.Frame) bool { return isStreamType(protocol.FrameType(f)) }

func isStreamType(t protocol.Type) bool { return t.Info().Family == protocol.FamilyStreams }

// toClient sends a message of the server's own to a client, waiting while its queue is full;
// false once the client or the server is gone.
func (r *Server) toClient(c *relayClient, id uint32, t protocol.Type, v any) bool {
	frame, err := protocol.EncodeFrame(id, t, v)
	if err != nil {
		return false
	}
	select {
	case c.out <- frame:
		return true
	case <-c.gone:
	case <-r.done:
	}
	return false
}
