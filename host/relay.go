package host

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/agentd/agentd/protocol"
)

// RelayOptions configure a relay.
type RelayOptions struct {
	// Features are requested from the agent in core.init.ack and thereby offered to clients
	// (each client still opts in per session).
	Features []string
	// ClockSyncEvery is how often the relay sends core.clock.sync (0: never). microsandbox's
	// host sends one at start and then every 60 s.
	ClockSyncEvery time.Duration
	// ToAgentQueue bounds frames waiting for the channel; ClientQueue bounds frames waiting
	// for one client (a full client queue holds up routing, as in microsandbox's relay).
	ToAgentQueue, ClientQueue int
	HandshakeTimeout          time.Duration
	Log                       *slog.Logger
	// Streams, when set, serves guest-initiated streams: the relay asks for feature
	// "streams" and dials out for the guest (agentctl serve --egress).
	Streams *StreamOptions
}

// DefaultRelayOptions mirror microsandbox's relay (256 frames toward the guest, 64 per client).
var DefaultRelayOptions = RelayOptions{
	Features:         []string{protocol.FeatureFlow},
	ClockSyncEvery:   60 * time.Second,
	ToAgentQueue:     256,
	ClientQueue:      64,
	HandshakeTimeout: 60 * time.Second,
}

// Relay owns an agent channel and serves up to 128 clients on a unix socket, each with its
// own id range, as microsandbox's relay does.
type Relay struct {
	conn    io.ReadWriteCloser
	opts    RelayOptions
	log     *slog.Logger
	fr      *protocol.FrameReader
	ready   []byte
	toAgent chan agentFrame
	done    chan struct{}
	once    sync.Once
	err     error

	mu      sync.Mutex
	clients [protocol.RelayMaxClients]*relayClient

	streams *streamServer // nil unless the agent enabled guest-initiated streams
	// StreamCounters count guest-initiated streams.
	StreamCounters StreamCounters
}

type relayClient struct {
	slot       int
	start, end uint32
	conn       net.Conn
	out        chan []byte
	gone       chan struct{}
	execIDs    map[uint32]bool // guarded by Relay.mu
}

// NewRelay performs the host handshake on the agent channel and starts routing.
func NewRelay(conn io.ReadWriteCloser, opts RelayOptions) (*Relay, error) {
	d := DefaultRelayOptions
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
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	features := opts.Features
	if opts.Streams != nil {
		features = append(append([]string(nil), features...), protocol.FeatureStreams)
	}
	c, err := Direct(conn, Options{Features: features, HandshakeTimeout: opts.HandshakeTimeout, Log: opts.Log, handshakeOnly: true})
	if err != nil {
		return nil, err
	}
	r := &Relay{conn: conn, opts: opts, log: opts.Log, fr: c.fr, ready: c.ReadyFrame,
		toAgent: make(chan agentFrame, opts.ToAgentQueue), done: make(chan struct{})}
	if opts.Streams != nil && c.HasFeature(protocol.FeatureStreams) {
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-r.done; cancel() }()
		r.streams = newStreamServer(ctx, *opts.Streams, r.sendAgentThen, &r.StreamCounters)
	}
	r.log.Info("agent ready", "agent_version", c.Ready.AgentVersion, "generation", c.ReadyV, "features", c.Ready.Features)
	go r.writeAgent()
	go r.readAgent()
	if opts.ClockSyncEvery > 0 {
		go r.clockSync()
	}
	return r, nil
}

// Done is closed when the agent channel is gone.
func (r *Relay) Done() <-chan struct{} { return r.done }

// Err says why the channel ended.
func (r *Relay) Err() error {
	<-r.done
	return r.err
}

func (r *Relay) stop(err error) {
	r.once.Do(func() {
		r.err = err
		close(r.done)
		if r.streams != nil {
			go r.streams.closeAll()
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

// Close ends the relay.
func (r *Relay) Close() { r.stop(ErrClosed) }

// agentFrame is a frame for the channel and what to do once it is written (or dropped).
type agentFrame struct {
	b     []byte
	after func()
}

func (r *Relay) writeAgent() {
	for {
		select {
		case f := <-r.toAgent:
			_, err := r.conn.Write(f.b)
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

func (r *Relay) sendAgent(frame []byte) bool { return r.sendAgentThen(frame, nil) }

// sendAgentThen queues a frame for the channel; after runs once it was written (a stream uses
// it to keep at most one data frame of its own in the queue, so a bulk stream cannot build a
// long line in front of an interactive one).
func (r *Relay) sendAgentThen(frame []byte, after func()) bool {
	select {
	case r.toAgent <- agentFrame{frame, after}:
		return true
	case <-r.done:
		if after != nil {
			after()
		}
		return false
	}
}

func (r *Relay) clockSync() {
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
func (r *Relay) readAgent() {
	for {
		f, err := r.fr.Next()
		if err != nil {
			if err == io.EOF {
				err = ErrClosed
			}
			r.stop(err)
			return
		}
		if r.streams != nil && isStreamFrame(f) {
			if m, err := protocol.DecodeMessage(f); err == nil && isStreamType(m.Type) {
				r.streams.handle(m) // guest-initiated: by type, before any id routing
				continue
			}
		}
		if f.ID == 0 {
			continue // control frames after ready are not routed
		}
		r.mu.Lock()
		c := r.clients[protocol.RelaySlotOf(f.ID)]
		if c != nil && f.Flags&protocol.FlagTerminal != 0 {
			delete(c.execIDs, f.ID)
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

// Serve accepts clients on l until the relay or the listener ends.
func (r *Relay) Serve(l net.Listener) error {
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

func (r *Relay) admit(conn net.Conn) {
	r.mu.Lock()
	slot := -1
	for i, c := range r.clients {
		if c == nil {
			slot = i
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
		out: make(chan []byte, r.opts.ClientQueue), gone: make(chan struct{}), execIDs: map[uint32]bool{}}
	r.clients[slot] = c
	r.mu.Unlock()
	hello := binary.BigEndian.AppendUint32(nil, start)
	hello = binary.BigEndian.AppendUint32(hello, end)
	hello = append(hello, r.ready...)
	c.out <- hello
	r.log.Debug("client connected", "slot", slot, "id_start", start, "id_end_exclusive", end)
	go r.writeClient(c)
	go r.readClient(c)
}

func (r *Relay) writeClient(c *relayClient) {
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
// disconnects it, except id 0 with the shutdown flag.
func (r *Relay) readClient(c *relayClient) {
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
		if f.Flags&protocol.FlagSessionStart != 0 {
			if m, err := protocol.DecodeMessage(f); err == nil && m.Type == protocol.TypeExecRequest {
				r.mu.Lock()
				c.execIDs[f.ID] = true
				r.mu.Unlock()
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
func (r *Relay) leave(c *relayClient) {
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

// Clients returns the number of connected clients.
func (r *Relay) Clients() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range r.clients {
		if c != nil {
			n++
		}
	}
	return n
}

// isStreamFrame reports whether a frame's type is agentd.stream.* without a full decode.
func isStreamFrame(f protocol.Frame) bool { return isStreamType(protocol.FrameType(f)) }

func isStreamType(t protocol.Type) bool { return t.Info().Family == protocol.FamilyStreams }
