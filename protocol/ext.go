package protocol

// agentd's protocol extensions. None of them is ever sent to a peer that did not ask for it:
//
//  1. The host lists the features it speaks in core.init.ack {"features": [...]}. The
//     reference agent ignores unknown keys, so this ack is safe for any agent.
//  2. agentd answers in core.ready {"features": [...]} with the subset it enables. A stock
//     host ignores the key; agentd omits it when the host asked for nothing, so a stock host
//     gets the reference's bytes.
//  3. Each feature then has its own opt-in per session, so a stock client behind a relay that
//     negotiated a feature never receives an unknown message type.
//
// Feature "flow" (per-session credit flow control):
//   - core.tcp.connect {.., "window": W} opts the session in; W is how many bytes of
//     core.tcp.data the host may receive before it grants more.
//   - core.tcp.connected {"window": W'} is agentd's grant for host -> guest data.
//   - core.exec.request {.., "window": W} opts an exec session in for stdout/stderr, and
//     core.exec.started {pid, "window": W'} is agentd's stdin grant.
//   - core.exec.exited {code: -1, "signal": N} names the signal that killed the program of
//     such a session (the reference reports only -1).
//   - agentd.flow.credit {"bytes": n} (flags 0, on the session id, either direction) grants n
//     more bytes. A sender never has more data bytes in flight than its grants.
//   Memory is then bounded on both ends and a slow stream stalls only itself, never the
//   channel. See docs/protocol.md.

// FeatureFlow is the name of the credit flow-control feature.
const FeatureFlow = "flow"

// FlowCredit is agentd.flow.credit: n more bytes may be sent on this session.
type FlowCredit struct {
	Bytes uint32 `cbor:"bytes" req:"1"`
}

// HasFeature reports whether name is in list.
func HasFeature(list []string, name string) bool {
	for _, f := range list {
		if f == name {
			return true
		}
	}
	return false
}
