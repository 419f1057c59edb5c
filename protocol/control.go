package protocol

// Feature "policy": the host owns the egress policy. The policy agentd enforces changes only
// by these messages from the host (never by a file or a signal inside the guest); agentd
// offers the feature only when it runs an egress policy.
//
//   - agentd.policy.set {document} (H->G, session start): document is a policy in
//     microsandbox's format (JSON or YAML). agentd parses it, puts its floor in front and swaps
//     it in atomically; open flows the new policy no longer allows are reset.
//   - agentd.policy.get {} (H->G, session start): asks for the live policy.
//   - agentd.policy.state {generation, rules, document?, error?} (G->H, terminal): the answer
//     to either. generation counts the policies agentd has enforced (the boot policy is 1);
//     rules is how many rules the live policy has, its floor included; document is the live
//     policy as normalized JSON (get only). A refused set carries error (what is wrong and
//     where, e.g. `rules[0]: destination: cidr: "1.2.3" is not an address or prefix`) and the
//     generation and rules still in force.
//
// Feature "audit": every egress decision record also reaches the host.
//
//   - agentd.audit.records {records, dropped} (G->H, id 0): records are JSON lines (one
//     egress.Record each, as in the guest's audit file); dropped is how many records agentd has
//     dropped so far because the host did not read them fast enough (the data path never waits
//     for the audit).
//   - A host with several clients (agentctl serve) keeps the latest records and serves them:
//     agentd.audit.follow {follow} (client -> server, session start) is answered on the
//     client's id with agentd.audit.records frames (what the server holds, then, with follow,
//     every new one), and agentd.audit.end {dropped} (terminal) when there is no more to send.
//     The server answers these itself; they never reach agentd.

// FeaturePolicy is the name of the host-owned policy feature.
const FeaturePolicy = "policy"

// FeatureAudit is the name of the audit-to-host feature.
const FeatureAudit = "audit"

// PolicySet is agentd.policy.set.
type PolicySet struct {
	Document []byte `cbor:"document" req:"1"`
}

// PolicyGet is agentd.policy.get.
type PolicyGet struct{}

// PolicyState is agentd.policy.state.
type PolicyState struct {
	Generation uint64 `cbor:"generation" req:"1"`
	Rules      uint32 `cbor:"rules" req:"1"`
	Document   []byte `cbor:"document,omitempty"`
	Error      string `cbor:"error,omitempty"`
}

// AuditRecords is agentd.audit.records.
type AuditRecords struct {
	Records [][]byte `cbor:"records" req:"1"`
	Dropped uint64   `cbor:"dropped"`
}

// AuditFollow is agentd.audit.follow.
type AuditFollow struct {
	Follow bool `cbor:"follow"`
}

// AuditEnd is agentd.audit.end.
type AuditEnd struct {
	Dropped uint64 `cbor:"dropped"`
}
