// Package protocol is the agentd wire format: frames, the CBOR envelope, the message type table
// and one Go payload type per message. It knows bytes and types only: no sockets, no sessions.
//
// The format is byte-compatible with microsandbox-agentd 0.5.7 (protocol generation 5) and
// knows every type of the generations after it, up to microsandbox 0.7.x (generation 9):
//
//	[len u32 BE][id u32 BE][flags u8][CBOR {"v": gen, "t": wire string, "p": bstr(CBOR payload)}]
//
// plus, from generation 8, raw bulk records (flags 0x08, a binary body; see bulk.go).
package protocol

// Version is the highest generation agentd implements. agentd announces it in core.ready and
// stamps it in the "v" of every frame it builds, whatever a peer announced: each side stamps
// its own generation. It is not the generation a session runs at, which is the lower of the
// two sides' (Negotiated), and it does not limit what agentd decodes: any "v" is accepted on
// any frame, and the type table knows every type up to LatestGeneration.
const Version = 9

// LatestGeneration is the newest generation whose types the table knows (microsandbox 0.7.x).
const LatestGeneration = 9

// ReferenceGeneration is the generation of microsandbox-agentd 0.5.7. A session started by a
// frame stamped with it (or older) gets that agent's behaviour exactly; one started by a later
// host gets what current hosts rely on (contract section 10: process groups, core.tcp.closed,
// drain or reset on core.tcp.close). Each side stamps its own generation, so the frame's v is
// the host's, and the session runs at the lower of it and agentd's.
const ReferenceGeneration = 5

// Negotiated is the generation a session with a peer that announced peer runs at: the lower of
// the two (the host side takes min(own, core.ready's v)). Gate what one sends on it, never on
// the v of the frames one stamps.
func Negotiated(own, peer uint8) uint8 { return min(own, peer) }

// Frame flags. A frame's flags are a pure function of its type; a raw bulk record carries
// exactly FlagBulk, never combined.
const (
	FlagTerminal     byte = 0x01 // last frame of a session
	FlagSessionStart byte = 0x02 // first frame of a session; its id becomes the session id
	FlagShutdown     byte = 0x04 // core.shutdown
	FlagBulk         byte = 0x08 // a raw bulk record (generation 8): not CBOR, see bulk.go
)

// Type is a message type: an index into the type table. The zero value is not a valid type.
type Type uint8

// The core types (generations 1 to 9), then agentd's own extension types. The order here is
// not the wire's: schemaOrder holds the reference's declaration order.
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

	// Generation 6: liveness.
	TypePing
	TypePong
	TypeTouch
	TypeTouched
	// Generation 7: the boot configuration.
	TypeBootstrap
	// Generation 8: raw bulk transfer (the records themselves are FlagBulk frames).
	TypeBulkAccepted
	TypeBulkCredit
	TypeBulkFinish
	TypeBulkCancel
	// Generation 9: workload freeze/thaw, input credit, root-disk grow.
	TypeWorkloadFreeze
	TypeWorkloadFrozen
	TypeWorkloadThaw
	TypeWorkloadThawed
	TypeWorkloadTransportCredit
	TypeRootDiskPrepare
	TypeRootDiskGrow
	TypeRootDiskState

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

	// The host-owned egress policy (feature "policy", see control.go).
	TypePolicySet
	TypePolicyGet
	TypePolicyState

	// Audit records to the host (feature "audit", see control.go).
	TypeAuditRecords
	TypeAuditFollow
	TypeAuditEnd

	numTypes
)

// Class is how a message is treated by code that does not look at its payload.
type Class uint8

const (
	// ClassControl is an ordinary message with its own payload type. It counts as activity.
	ClassControl Class = iota + 1
	// ClassData is a piece of a byte stream: the payload is {"data": bstr} (AppendData and
	// DecodeData), and its bytes are counted per family.
	ClassData
	// ClassMaintenance is keepalive and lifecycle traffic that must not count as activity
	// (an idle sandbox stays idle): core.ready, clock.sync, ping/pong, the touched reply and
	// the workload messages.
	ClassMaintenance
)

// Family is the job a type belongs to; an extension family names the feature that a peer
// must negotiate before it is sent any type of the family.
type Family uint8

const (
	FamilyCore     Family = iota + 1 // the connection: ready, init, shutdown, relay, clock, bootstrap, error
	FamilyLiveness                   // ping/pong, touch/touched
	FamilyExec
	FamilyFs
	FamilyTCP
	FamilyBulk
	FamilyWorkload
	FamilyRootDisk
	FamilyFlow    // extension: feature "flow"
	FamilyStreams // extension: feature "streams"
	FamilyPolicy  // extension: feature "policy"
	FamilyAudit   // extension: feature "audit"
)

var familyNames = [...]string{FamilyCore: "core", FamilyLiveness: "liveness", FamilyExec: "exec",
	FamilyFs: "fs", FamilyTCP: "tcp", FamilyBulk: "bulk", FamilyWorkload: "workload",
	FamilyRootDisk: "root_disk", FamilyFlow: "flow", FamilyStreams: "streams", FamilyPolicy: "policy",
	FamilyAudit: "audit"}

func (f Family) String() string {
	if int(f) < len(familyNames) && familyNames[f] != "" {
		return familyNames[f]
	}
	return "invalid"
}

// Feature is the extension feature a family needs negotiated, or "" for a core family.
func (f Family) Feature() string {
	switch f {
	case FamilyFlow:
		return FeatureFlow
	case FamilyStreams:
		return FeatureStreams
	case FamilyPolicy:
		return FeaturePolicy
	case FamilyAudit:
		return FeatureAudit
	}
	return ""
}

// Dir is the direction a type travels in.
type Dir uint8

const (
	HostToGuest Dir = iota + 1
	GuestToHost
	BothWays
)

func (d Dir) String() string {
	switch d {
	case HostToGuest:
		return "host_to_guest"
	case GuestToHost:
		return "guest_to_host"
	case BothWays:
		return "both"
	}
	return "invalid"
}

// From reports whether a frame of this direction may come from the host (host true) or from
// the guest (host false).
func (d Dir) From(host bool) bool {
	if host {
		return d == HostToGuest || d == BothWays
	}
	return d == GuestToHost || d == BothWays
}

// TypeInfo describes one message type. Extension types have Generation 0 and Extension true
// (their Family names the feature they need).
type TypeInfo struct {
	Wire       string
	Flags      byte
	Generation uint8
	Extension  bool
	Class      Class
	Family     Family
	Dir        Dir
}

func core(wire string, flags, gen byte, c Class, f Family, d Dir) TypeInfo {
	return TypeInfo{Wire: wire, Flags: flags, Generation: gen, Class: c, Family: f, Dir: d}
}

func ext(wire string, flags byte, c Class, f Family, d Dir) TypeInfo {
	return TypeInfo{Wire: wire, Flags: flags, Extension: true, Class: c, Family: f, Dir: d}
}

// Short names for the table below only.
const (
	cCtl  = ClassControl
	cData = ClassData
	cMnt  = ClassMaintenance
	dH2G  = HostToGuest
	dG2H  = GuestToHost
	dBoth = BothWays
)

// typeTable is the one source of truth for the type table: everything about a type that does
// not depend on its payload is derived from here.
var typeTable = [numTypes]TypeInfo{
	TypeReady:                   core("core.ready", 0, 1, cMnt, FamilyCore, dG2H),
	TypeInitResolved:            core("core.init.resolved", 0, 1, cCtl, FamilyCore, dG2H),
	TypeInitAck:                 core("core.init.ack", 0, 1, cCtl, FamilyCore, dH2G),
	TypeShutdown:                core("core.shutdown", FlagShutdown, 1, cCtl, FamilyCore, dH2G),
	TypeRelayClientDisconnected: core("core.relay.client.disconnected", 0, 1, cCtl, FamilyCore, dH2G),
	TypeClockSync:               core("core.clock.sync", 0, 1, cMnt, FamilyCore, dH2G),
	TypeError:                   core("core.error", FlagTerminal, 5, cCtl, FamilyCore, dBoth),
	TypeExecRequest:             core("core.exec.request", FlagSessionStart, 1, cCtl, FamilyExec, dH2G),
	TypeExecStarted:             core("core.exec.started", 0, 1, cCtl, FamilyExec, dG2H),
	TypeExecStdin:               core("core.exec.stdin", 0, 1, cData, FamilyExec, dH2G),
	TypeExecStdinError:          core("core.exec.stdin.error", 0, 1, cCtl, FamilyExec, dG2H),
	TypeExecStdout:              core("core.exec.stdout", 0, 1, cData, FamilyExec, dG2H),
	TypeExecStderr:              core("core.exec.stderr", 0, 1, cData, FamilyExec, dG2H),
	TypeExecExited:              core("core.exec.exited", FlagTerminal, 1, cCtl, FamilyExec, dG2H),
	TypeExecFailed:              core("core.exec.failed", FlagTerminal, 1, cCtl, FamilyExec, dG2H),
	TypeExecResize:              core("core.exec.resize", 0, 1, cCtl, FamilyExec, dH2G),
	TypeExecSignal:              core("core.exec.signal", 0, 1, cCtl, FamilyExec, dH2G),
	TypeFsRequest:               core("core.fs.request", FlagSessionStart, 2, cCtl, FamilyFs, dH2G),
	TypeFsResponse:              core("core.fs.response", FlagTerminal, 2, cCtl, FamilyFs, dG2H),
	TypeFsData:                  core("core.fs.data", 0, 2, cData, FamilyFs, dBoth),
	TypeTCPConnect:              core("core.tcp.connect", FlagSessionStart, 4, cCtl, FamilyTCP, dH2G),
	TypeTCPConnected:            core("core.tcp.connected", 0, 4, cCtl, FamilyTCP, dG2H),
	TypeTCPData:                 core("core.tcp.data", 0, 4, cData, FamilyTCP, dBoth),
	TypeTCPEOF:                  core("core.tcp.eof", 0, 4, cCtl, FamilyTCP, dBoth),
	TypeTCPClose:                core("core.tcp.close", 0, 4, cCtl, FamilyTCP, dH2G),
	TypeTCPClosed:               core("core.tcp.closed", FlagTerminal, 4, cCtl, FamilyTCP, dG2H),
	TypeTCPFailed:               core("core.tcp.failed", FlagTerminal, 4, cCtl, FamilyTCP, dG2H),
	TypePing:                    core("core.ping", 0, 6, cMnt, FamilyLiveness, dH2G),
	TypePong:                    core("core.pong", FlagTerminal, 6, cMnt, FamilyLiveness, dG2H),
	TypeTouch:                   core("core.touch", 0, 6, cCtl, FamilyLiveness, dH2G), // activity, once
	TypeTouched:                 core("core.touched", FlagTerminal, 6, cMnt, FamilyLiveness, dG2H),
	TypeBootstrap:               core("core.bootstrap", 0, 7, cCtl, FamilyCore, dH2G),
	TypeBulkAccepted:            core("core.bulk.accepted", 0, 8, cCtl, FamilyBulk, dG2H),
	TypeBulkCredit:              core("core.bulk.credit", 0, 8, cCtl, FamilyBulk, dBoth),
	TypeBulkFinish:              core("core.bulk.finish", 0, 8, cCtl, FamilyBulk, dBoth),
	TypeBulkCancel:              core("core.bulk.cancel", 0, 8, cCtl, FamilyBulk, dBoth),
	TypeWorkloadFreeze:          core("core.workload.freeze", 0, 9, cMnt, FamilyWorkload, dH2G),
	TypeWorkloadFrozen:          core("core.workload.frozen", FlagTerminal, 9, cMnt, FamilyWorkload, dG2H),
	TypeWorkloadThaw:            core("core.workload.thaw", 0, 9, cMnt, FamilyWorkload, dH2G),
	TypeWorkloadThawed:          core("core.workload.thawed", FlagTerminal, 9, cMnt, FamilyWorkload, dG2H),
	TypeWorkloadTransportCredit: core("core.workload.transport.credit", 0, 9, cMnt, FamilyWorkload, dG2H),
	TypeRootDiskPrepare:         core("core.root_disk.prepare", 0, 9, cCtl, FamilyRootDisk, dH2G),
	TypeRootDiskGrow:            core("core.root_disk.grow", 0, 9, cCtl, FamilyRootDisk, dH2G),
	TypeRootDiskState:           core("core.root_disk.state", FlagTerminal, 9, cCtl, FamilyRootDisk, dG2H),
	TypeFlowCredit:              ext("agentd.flow.credit", 0, cCtl, FamilyFlow, dBoth),
	TypeStreamOpen:              ext("agentd.stream.open", FlagSessionStart, cCtl, FamilyStreams, dG2H),
	TypeStreamOpened:            ext("agentd.stream.opened", 0, cCtl, FamilyStreams, dH2G),
	TypeStreamData:              ext("agentd.stream.data", 0, cData, FamilyStreams, dBoth),
	TypeStreamEOF:               ext("agentd.stream.eof", 0, cCtl, FamilyStreams, dBoth),
	TypeStreamClose:             ext("agentd.stream.close", FlagTerminal, cCtl, FamilyStreams, dBoth),
	TypeStreamCredit:            ext("agentd.stream.credit", 0, cCtl, FamilyStreams, dBoth),
	TypePolicySet:               ext("agentd.policy.set", FlagSessionStart, cCtl, FamilyPolicy, dH2G),
	TypePolicyGet:               ext("agentd.policy.get", FlagSessionStart, cCtl, FamilyPolicy, dH2G),
	TypePolicyState:             ext("agentd.policy.state", FlagTerminal, cCtl, FamilyPolicy, dG2H),
	TypeAuditRecords:            ext("agentd.audit.records", 0, cMnt, FamilyAudit, dG2H),
	TypeAuditFollow:             ext("agentd.audit.follow", FlagSessionStart, cMnt, FamilyAudit, dH2G),
	TypeAuditEnd:                ext("agentd.audit.end", FlagTerminal, cMnt, FamilyAudit, dG2H),
}

// schemaOrder is the reference's enum declaration order at generation 9 (its schema snapshot
// order, microsandbox-protocol's gen-9.json). The generation-5 types keep their relative order.
var schemaOrder = []Type{
	TypeReady, TypeInitResolved, TypeInitAck, TypeShutdown, TypeRelayClientDisconnected, TypeClockSync,
	TypePing, TypePong, TypeTouch, TypeTouched,
	TypeWorkloadFreeze, TypeWorkloadFrozen, TypeWorkloadThaw, TypeWorkloadThawed, TypeWorkloadTransportCredit,
	TypeRootDiskPrepare, TypeRootDiskGrow, TypeRootDiskState,
	TypeError, TypeBulkAccepted, TypeBulkCredit, TypeBulkFinish, TypeBulkCancel,
	TypeExecRequest, TypeExecStarted, TypeExecStdin, TypeExecStdinError, TypeExecStdout, TypeExecStderr, TypeExecExited,
	TypeExecFailed, TypeExecResize, TypeExecSignal, TypeFsRequest, TypeFsResponse, TypeFsData,
	TypeTCPConnect, TypeTCPConnected, TypeTCPData, TypeTCPEOF, TypeTCPClose, TypeTCPClosed, TypeTCPFailed,
	TypeBootstrap,
}

var byWire = func() map[string]Type {
	m := make(map[string]Type, numTypes)
	for t := Type(1); t < numTypes; t++ {
		m[typeTable[t].Wire] = t
	}
	return m
}()

// CoreTypes returns the core types of every generation, in schema order.
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

// IsData reports whether t's payload is {"data": bstr}.
func (t Type) IsData() bool { return t.Info().Class == ClassData }

// CountsAsActivity reports whether a frame of type t counts in the activity counters (the
// heartbeat's host and guest message counts). Maintenance traffic does not.
func (t Type) CountsAsActivity() bool {
	c := t.Info().Class
	return c == ClassControl || c == ClassData
}

// AvailableAt reports whether a peer speaking generation gen understands t.
// Extension types are never "available" by generation; they need a negotiated feature.
func (t Type) AvailableAt(gen uint8) bool {
	info := t.Info()
	return t.Valid() && !info.Extension && info.Generation <= gen
}

// Implemented reports whether agentd implements t: a core type up to Version, or an extension
// (whose use is gated by its feature). A host frame of a type agentd does not implement is
// answered as an unknown type would be.
func (t Type) Implemented() bool {
	return t.Valid() && (t.Info().Extension || t.Info().Generation <= Version)
}
