// Package tlshello reads the server name (SNI) from the first bytes a client sends on a TCP
// flow, the way a policy that checks SNI must: the ClientHello is reassembled from however
// many TLS records (and TCP segments) the client split it into, up to MaxHello, and anything
// that starts like TLS but is not a whole, well-formed ClientHello is Invalid, never "no SNI".
// The structure is parsed by crypto/tls itself, so the name is the one a Go server would see.
// It does no I/O; the callers (the netstack, the host end of guest streams) hold the flow's
// first bytes until Parse says Complete or Invalid, within a deadline of their own.
package tlshello

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"
)

// MaxHello bounds the bytes held while a ClientHello arrives: TLS records (5-byte headers
// included) up to the end of the ClientHello message. Real hellos are 0.5-2 KiB (post-quantum
// key shares included); a client that needs more is refused.
const MaxHello = 16 << 10

// State is what the bytes so far amount to.
type State int

const (
	// NotTLS: the flow does not start with a TLS handshake record; there is no SNI to check.
	NotTLS State = iota
	// Incomplete: a ClientHello has begun and more bytes are needed.
	Incomplete
	// Complete: a whole, well-formed ClientHello; SNI is its server name ("" when it has none).
	Complete
	// Invalid: a TLS handshake that is not a well-formed ClientHello within MaxHello (another
	// message, a record of another type inside it, a malformed or oversized hello).
	Invalid
)

func (s State) String() string {
	switch s {
	case NotTLS:
		return "not TLS"
	case Incomplete:
		return "incomplete ClientHello"
	case Complete:
		return "ClientHello"
	}
	return "invalid ClientHello"
}

const (
	recordHandshake = 0x16
	typeClientHello = 1
	maxRecord       = 1<<14 + 256 // TLSPlaintext.length is at most 2^14; allow a little slack
)

// Parse examines b, the first bytes of a flow (all of them so far). When the state is
// Complete, n is how many bytes of b the ClientHello's records take (what follows them is
// ordinary data), and sni its server name.
func Parse(b []byte) (st State, sni string, n int) {
	if len(b) == 0 {
		return Incomplete, "", 0
	}
	if b[0] != recordHandshake {
		return NotTLS, "", 0
	}
	// Collect the handshake bytes of consecutive handshake records until the first message
	// (4-byte header + body) is whole.
	var msg []byte
	off := 0
	for {
		if len(b)-off < 5 {
			return incompleteOr(len(b))
		}
		h := b[off : off+5]
		if h[0] != recordHandshake || h[1] != 3 {
			return Invalid, "", 0 // another record type, or not TLS 1.x, before the hello ended
		}
		l := int(h[3])<<8 | int(h[4])
		if l == 0 || l > maxRecord {
			return Invalid, "", 0
		}
		if off+5+l > MaxHello {
			return Invalid, "", 0
		}
		if len(b) < off+5+l {
			return Incomplete, "", 0
		}
		msg = append(msg, b[off+5:off+5+l]...)
		off += 5 + l
		if len(msg) >= 4 {
			if msg[0] != typeClientHello {
				return Invalid, "", 0
			}
			need := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
			if need > MaxHello {
				return Invalid, "", 0
			}
			switch {
			case len(msg) == need:
				name, ok := serverName(b[:off])
				if !ok {
					return Invalid, "", 0
				}
				return Complete, name, off
			case len(msg) > need:
				// Another handshake message shares the hello's last record: no client does
				// that before the server's reply.
				return Invalid, "", 0
			}
		}
	}
}

func incompleteOr(have int) (State, string, int) {
	if have >= MaxHello {
		return Invalid, "", 0
	}
	return Incomplete, "", 0
}

var errStop = errors.New("stop")

// serverName runs crypto/tls's server over the recorded records up to the point where it has
// parsed the ClientHello (GetConfigForClient), and takes the name from there. ok is false
// when crypto/tls refuses the message.
func serverName(records []byte) (name string, ok bool) {
	srv := tls.Server(&replay{r: bytes.NewReader(records)}, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		name, ok = h.ServerName, true
		return nil, errStop
	}})
	srv.Handshake()
	return name, ok
}

// replay feeds recorded bytes to crypto/tls and swallows what it writes back.
type replay struct{ r io.Reader }

func (c *replay) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *replay) Write(b []byte) (int, error)      { return len(b), nil }
func (c *replay) Close() error                     { return nil }
func (c *replay) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *replay) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replay) SetDeadline(time.Time) error      { return nil }
func (c *replay) SetReadDeadline(time.Time) error  { return nil }
func (c *replay) SetWriteDeadline(time.Time) error { return nil }
