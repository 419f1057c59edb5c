package protocol

// Payloads of the core control messages. Field order is wire order. A field tagged `req:"1"`
// must be present on decode (serde's rule for non-Option fields without a default).

// AgentVersion is what agentd reports in core.ready; hosts compare it with the reference's.
const AgentVersion = "0.5.7"

// Ready is core.ready (guest -> host, id 0).
type Ready struct {
	BootTimeNs   uint64 `cbor:"boot_time_ns" req:"1"`
	InitTimeNs   uint64 `cbor:"init_time_ns" req:"1"`
	ReadyTimeNs  uint64 `cbor:"ready_time_ns" req:"1"`
	AgentVersion string `cbor:"agent_version,omitempty"`
	// The generation-8/9 capabilities. Each switches the host into a transport mode that the
	// agent must then honour (contract section 0.6), so agentd sends one only with the machinery
	// behind it. LocalTransport is what a host relay adds for its own clients; no agent sends it.
	BulkTransport                   *BulkTransport  `cbor:"bulk_transport,omitempty"`
	RelayLease                      *RelayLease     `cbor:"relay_lease,omitempty"`
	LocalTransport                  *LocalTransport `cbor:"local_transport,omitempty"`
	WorkloadTransportBarrierVersion uint8           `cbor:"workload_transport_barrier_version,omitempty"`
	// Features lists the agentd extensions enabled for this host (see ext.go). It is sent only
	// when the host asked for extensions in core.init.ack, so stock hosts see the reference's
	// exact bytes.
	Features []string `cbor:"features,omitempty"`
}

// UserIDs is a numeric identity.
type UserIDs struct {
	UID uint32 `cbor:"uid" req:"1"`
	GID uint32 `cbor:"gid" req:"1"`
}

// InitResolved is core.init.resolved (guest -> host, id 0): the default exec user.
type InitResolved struct {
	DefaultUser UserIDs `cbor:"default_user" req:"1"`
}

// InitAck is core.init.ack (host -> guest, id 0). The reference's is the empty map; a host
// that speaks agentd's extensions lists the ones it wants in Features (the reference agent
// ignores unknown keys).
type InitAck struct {
	Features []string `cbor:"features,omitempty"`
}

// RelayClientDisconnected is core.relay.client.disconnected (host -> guest, id 0). A host with
// an active range lease (Ready.RelayLease) adds the client's incarnation and waits for the
// agent's MSBL DisconnectedAck (transport.go) before it reuses the range.
type RelayClientDisconnected struct {
	IDStart        uint32 `cbor:"id_start" req:"1"`
	IDEndExclusive uint32 `cbor:"id_end_exclusive" req:"1"`
	Incarnation    *ID16  `cbor:"incarnation,omitempty"`
}

// ClockSync is core.clock.sync (host -> guest, id 0): the host's wall clock.
type ClockSync struct {
	UnixTimeNanos uint64 `cbor:"unix_time_nanos" req:"1"`
}

// CoreError is core.error (terminal): a frame the receiver could not accept.
type CoreError struct {
	Kind          string `cbor:"kind" req:"1"`
	Message       string `cbor:"message" req:"1"`
	OffendingType string `cbor:"offending_type,omitempty"`
	// WorkloadFailure qualifies an error answering a workload freeze or thaw (generation 9).
	WorkloadFailure *WorkloadFailure `cbor:"workload_failure,omitempty"`
}

func (e *CoreError) Error() string {
	if e.OffendingType != "" {
		return "core.error " + e.Kind + " (" + e.OffendingType + "): " + e.Message
	}
	return "core.error " + e.Kind + ": " + e.Message
}

// Touched is core.touched (terminal, generation 6): the activity sequence number after the
// touch was counted, the number the next heartbeat shows. core.ping, core.pong and core.touch
// carry Empty.
type Touched struct {
	ActivitySeq uint64 `cbor:"activity_seq" req:"1"`
}

// Data is the payload of every pure data message: core.tcp.data, core.exec.stdin/stdout/
// stderr and core.fs.data. Hot paths use AppendData/DecodeData instead of this struct.
type Data struct {
	Data []byte `cbor:"data" req:"1"`
}

// Empty is the payload of the empty-map messages (core.tcp.eof, close, closed, core.ping,
// core.pong, core.touch).
type Empty struct{}

// Relay client id ranges (the host relay gives each of its 128 client slots one range).
const (
	RelayMaxClients  = 128
	RelayIDRangeStep = (1<<32 - 1) / RelayMaxClients // 33,554,431
)

// RelaySlotRange returns the id range [start, end) of relay client slot s.
func RelaySlotRange(s int) (start, end uint32) {
	return uint32(s)*RelayIDRangeStep + 1, uint32(s+1) * RelayIDRangeStep
}

// RelaySlotOf returns the relay slot that owns a guest -> host frame id (as the relay routes).
func RelaySlotOf(id uint32) int { return min(int(id/RelayIDRangeStep), RelayMaxClients-1) }

// SameRelayClient reports whether two ids belong to the same relay client, agentd's rule for
// fs handle ownership: slot(id) = (id-1)/step, and id 0 belongs to no client.
func SameRelayClient(a, b uint32) bool {
	return a != 0 && b != 0 && (a-1)/RelayIDRangeStep == (b-1)/RelayIDRangeStep
}
