// Package protocol is the agentd wire format: frames, the CBOR envelope, the message type table
// and one Go payload type per message. It knows bytes and types only: no sockets, no sessions.
//
// The format is byte-compatible with microsandbox-agentd 0.5.7 (protocol generation 5):
//
//	[len u32 BE][id u32 BE][flags u8][CBOR {"v": gen, "t": wire string, "p": bstr(CBOR payload)}]
package protocol

// Version is the protocol generation agentd speaks and stamps on every frame it builds.
const Version = 5

// Frame flags. A frame's flags are a pure function of its type.
const (
	FlagTerminal     byte = 0x01 // last frame of a session
	FlagSessionStart byte = 0x02 // first frame of a session; its id becomes the session id
	FlagShutdown     byte = 0x04 // core.shutdown
)

// Type is a message type: an index into the type table. The zero value is not a valid type.
type Type uint8

// The 27 generation-5 core types, in the reference's declaration order (the schema order),
// followed by agentd's own extension types.
const (
	_ Type = iota
	TypeReady
	TypeInitResolved
	TypeInitAck
	TypeShutdown
	TypeRelayClientDisconnected
	TypeClockSync
	TypeError
	TypeExecRequest
	TypeExecStarted
	TypeExecStdin
	TypeExecStdinError
	TypeExecStdout
	TypeExecStderr
	TypeExecExited
	TypeExecFailed
	TypeExecResize
	TypeExecSignal
	TypeFsRequest
	TypeFsResponse
	TypeFsData
	TypeTCPConnect
	TypeTCPConnected
	TypeTCPData
	TypeTCPEOF
	TypeTCPClose
	TypeTCPClosed
	TypeTCPFailed

	// TypeFlowCredit is agentd's extension (namespace "agentd."): a per-session window update.
	// It is only ever sent to a peer that announced the "flow" feature (see ext.go).
	TypeFlowCredit

	// Guest-initiated streams (feature "streams", see streams.go): agentd asks the host to
	// open a connection on the guest's behalf.
	TypeStreamOpen
	TypeStreamOpened
	TypeStreamData
	TypeStreamEOF
	TypeStreamClose
	TypeStreamCredit

	numTypes
)

// TypeInfo describes one message type: its wire string, its exact flags and the protocol
// generation that introduced it. Extension types have Generation 0 and Extension true.
type TypeInfo struct {
	Wire       string
	Flags      byte
	Generation uint8
	Extension  bool
}

// typeTable is the one source of truth for the type table.
var typeTable = [numTypes]TypeInfo{
	TypeReady:                   {"core.ready", 0, 1, false},
	TypeInitResolved:            {"core.init.resolved", 0, 1, false},
	TypeInitAck:                 {"core.init.ack", 0, 1, false},
	TypeShutdown:                {"core.shutdown", FlagShutdown, 1, false},
	TypeRelayClientDisconnected: {"core.relay.client.disconnected", 0, 1, false},
	TypeClockSync:               {"core.clock.sync", 0, 1, false},
	TypeError:                   {"core.error", FlagTerminal, 5, false},
	TypeExecRequest:             {"core.exec.request", FlagSessionStart, 1, false},
	TypeExecStarted:             {"core.exec.started", 0, 1, false},
	TypeExecStdin:               {"core.exec.stdin", 0, 1, false},
	TypeExecStdinError:          {"core.exec.stdin.error", 0, 1, false},
	TypeExecStdout:              {"core.exec.stdout", 0, 1, false},
	TypeExecStderr:              {"core.exec.stderr", 0, 1, false},
	TypeExecExited:              {"core.exec.exited", FlagTerminal, 1, false},
	TypeExecFailed:              {"core.exec.failed", FlagTerminal, 1, false},
	TypeExecResize:              {"core.exec.resize", 0, 1, false},
	TypeExecSignal:              {"core.exec.signal", 0, 1, false},
	TypeFsRequest:               {"core.fs.request", FlagSessionStart, 2, false},
	TypeFsResponse:              {"core.fs.response", FlagTerminal, 2, false},
	TypeFsData:                  {"core.fs.data", 0, 2, false},
	TypeTCPConnect:              {"core.tcp.connect", FlagSessionStart, 4, false},
	TypeTCPConnected:            {"core.tcp.connected", 0, 4, false},
	TypeTCPData:                 {"core.tcp.data", 0, 4, false},
	TypeTCPEOF:                  {"core.tcp.eof", 0, 4, false},
	TypeTCPClose:                {"core.tcp.close", 0, 4, false},
	TypeTCPClosed:               {"core.tcp.closed", FlagTerminal, 4, false},
	TypeTCPFailed:               {"core.tcp.failed", FlagTerminal, 4, false},
	TypeFlowCredit:              {"agentd.flow.credit", 0, 0, true},
	TypeStreamOpen:              {"agentd.stream.open", FlagSessionStart, 0, true},
	TypeStreamOpened:            {"agentd.stream.opened", 0, 0, true},
	TypeStreamData:              {"agentd.stream.data", 0, 0, true},
	TypeStreamEOF:               {"agentd.stream.eof", 0, 0, true},
	TypeStreamClose:             {"agentd.stream.close", FlagTerminal, 0, true},
	TypeStreamCredit:            {"agentd.stream.credit", 0, 0, true},
}

// schemaOrder is the reference's enum declaration order (its schema snapshot order), which
// differs from the table's grouping only in where core.error sits.
var schemaOrder = []Type{
	TypeReady, TypeInitResolved, TypeInitAck, TypeShutdown, TypeRelayClientDisconnected, TypeClockSync, TypeError,
	TypeExecRequest, TypeExecStarted, TypeExecStdin, TypeExecStdinError, TypeExecStdout, TypeExecStderr, TypeExecExited,
	TypeExecFailed, TypeExecResize, TypeExecSignal, TypeFsRequest, TypeFsResponse, TypeFsData,
	TypeTCPConnect, TypeTCPConnected, TypeTCPData, TypeTCPEOF, TypeTCPClose, TypeTCPClosed, TypeTCPFailed,
}

var byWire = func() map[string]Type {
	m := make(map[string]Type, numTypes)
	for t := Type(1); t < numTypes; t++ {
		m[typeTable[t].Wire] = t
	}
	return m
}()

// CoreTypes returns the generation-5 core types in schema order.
func CoreTypes() []Type { return append([]Type(nil), schemaOrder...) }

// AllTypes returns every known type: the core types in schema order, then the extensions.
func AllTypes() []Type {
	all := CoreTypes()
	for t := Type(1); t < numTypes; t++ {
		if typeTable[t].Extension {
			all = append(all, t)
		}
	}
	return all
}

// LookupType maps a wire string to its type.
func LookupType(wire string) (Type, bool) {
	t, ok := byWire[wire]
	return t, ok
}

// Valid reports whether t is a known type.
func (t Type) Valid() bool { return t > 0 && t < numTypes }

// Info returns the type's table entry (zero for an invalid type).
func (t Type) Info() TypeInfo {
	if !t.Valid() {
		return TypeInfo{}
	}
	return typeTable[t]
}

// String returns the wire string.
func (t Type) String() string {
	if !t.Valid() {
		return "invalid"
	}
	return typeTable[t].Wire
}

// Flags returns the exact flags a frame of this type carries.
func (t Type) Flags() byte { return t.Info().Flags }

// AvailableAt reports whether a peer speaking generation gen understands t.
// Extension types are never "available" by generation; they need a negotiated feature.
func (t Type) AvailableAt(gen uint8) bool {
	info := t.Info()
	return t.Valid() && !info.Extension && info.Generation <= gen
}
