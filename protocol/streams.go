package protocol

// Feature "streams": guest-initiated streams. With it, agentd can ask the host to open a
// connection on the guest's behalf (a sandbox with no network device of its own: the netstack
// relays each allowed flow to the host over the agent channel, and the host dials out).
//
//   - The host lists "streams" in core.init.ack; agentd confirms it in core.ready. Without both,
//     agentd never sends an agentd.stream.* frame.
//   - Ids: the frames of a guest-initiated stream carry agentd.stream.* types only, and their
//     ids are a separate space, allocated by agentd (1, 2, ... wrapping, skipping ids in use).
//     A host (or relay) dispatches agentd.stream.* frames by type before it looks at the id, so
//     they can never be mistaken for a host-allocated session, whatever ids the host uses.
//   - agentd.stream.open {proto, addr, port, window} (G->H, session start): proto is "tcp",
//     "udp" or "dns" (datagrams for the host's resolver; addr and port are then ignored);
//     window is how many data bytes the host may send before agentd grants more.
//   - agentd.stream.opened {window} (H->G): connected; window is the host's grant for
//     guest -> host data.
//   - agentd.stream.data {data} (either way): for tcp a piece of the byte stream, for udp and
//     dns exactly one datagram. Never more than the peer's outstanding grant.
//   - agentd.stream.credit {bytes} (either way): the receiver consumed bytes; the sender may
//     send that many more.
//   - agentd.stream.eof {} (either way, tcp): no more data from this side (half-close).
//   - agentd.stream.close {error?} (either way, terminal): the stream is over. From the host in
//     answer to open, it is a refusal (error says why: "connection refused", "denied by
//     policy", ...). After close, frames for that id are dropped.
//
// Each side buffers at most its own window per stream, so memory is bounded on both ends and
// a slow stream holds back only itself.

// FeatureStreams is the name of the guest-initiated streams feature.
const FeatureStreams = "streams"

// StreamOpen is agentd.stream.open.
type StreamOpen struct {
	Proto  string `cbor:"proto" req:"1"`
	Addr   string `cbor:"addr"`
	Port   uint16 `cbor:"port"`
	Window uint32 `cbor:"window" req:"1"`
}

// StreamOpened is agentd.stream.opened.
type StreamOpened struct {
	Window uint32 `cbor:"window" req:"1"`
}

// StreamClose is agentd.stream.close.
type StreamClose struct {
	Error string `cbor:"error,omitempty"`
}

// StreamCredit is agentd.stream.credit.
type StreamCredit struct {
	Bytes uint32 `cbor:"bytes" req:"1"`
}
