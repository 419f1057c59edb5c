package protocol

// TCPConnect is core.tcp.connect (host -> guest, session start).
type TCPConnect struct {
	Host string `cbor:"host" req:"1"`
	Port uint16 `cbor:"port" req:"1"`
	// Window opts this session into agentd's flow control (see ext.go): the bytes of
	// core.tcp.data the host is ready to receive. Absent (0) for stock hosts.
	Window uint32 `cbor:"window,omitempty"`
	// Bulk (generation 8) offers raw bulk transfer for the session's bytes.
	Bulk *BulkOffer `cbor:"bulk,omitempty"`
}

// TCPConnected is core.tcp.connected. Window is agentd's grant to the host, set only when the
// connect carried a window.
type TCPConnected struct {
	Window uint32 `cbor:"window,omitempty"`
}

// TCPFailed is core.tcp.failed (terminal).
type TCPFailed struct {
	Error string `cbor:"error" req:"1"`
}
