package protocol

import "fmt"

// Fixed-size byte arrays travel as CBOR arrays of small unsigned ints, not byte strings: that
// is how the reference's serde encodes Ipv4Addr and Ipv6Addr (ciborium is not human-readable),
// [u8; 6] MACs and [u8; 16] ids. Decoding also takes a byte string of the right length.
type (
	IPv4Addr [4]byte
	IPv6Addr [16]byte
	MAC      [6]byte
	// ID16 is a 16-byte id: a relay client incarnation, an agent-bulk connection id.
	ID16 [16]byte
)

func (a IPv4Addr) MarshalCBOR() ([]byte, error)  { return appendOctets(nil, a[:]), nil }
func (a *IPv4Addr) UnmarshalCBOR(b []byte) error { return readOctets(b, a[:], "IPv4 address") }
func (a IPv6Addr) MarshalCBOR() ([]byte, error)  { return appendOctets(nil, a[:]), nil }
func (a *IPv6Addr) UnmarshalCBOR(b []byte) error { return readOctets(b, a[:], "IPv6 address") }
func (m MAC) MarshalCBOR() ([]byte, error)       { return appendOctets(nil, m[:]), nil }
func (m *MAC) UnmarshalCBOR(b []byte) error      { return readOctets(b, m[:], "MAC address") }
func (id ID16) MarshalCBOR() ([]byte, error)     { return appendOctets(nil, id[:]), nil }
func (id *ID16) UnmarshalCBOR(b []byte) error    { return readOctets(b, id[:], "16-byte id") }
func appendOctets(dst []byte, b []byte) []byte {
	dst = appendHead(dst, majorArray, uint64(len(b)))
	for _, c := range b {
		dst = appendHead(dst, majorUint, uint64(c))
	}
	return dst
}

func readOctets(b []byte, dst []byte, what string) error {
	if s, _, ok := readDefinite(b, majorBytes); ok {
		if len(s) != len(dst) {
			return fmt.Errorf("%s: %d bytes, want %d", what, len(s), len(dst))
		}
		copy(dst, s)
		return nil
	}
	var arr []uint64
	if err := decMode.Unmarshal(b, &arr); err != nil {
		return fmt.Errorf("%s: want an array of %d integers: %w", what, len(dst), err)
	}
	if len(arr) != len(dst) {
		return fmt.Errorf("%s: %d elements, want %d", what, len(arr), len(dst))
	}
	for i, v := range arr {
		if v > 0xff {
			return fmt.Errorf("%s: element %d is %d, want 0 to 255", what, i, v)
		}
		dst[i] = byte(v)
	}
	return nil
}

// Null is a key that a sender may leave out, write as null, or give a value: the newest Rust
// host always writes fs `user` keys, usually as null, where older hosts leave them out. It
// decodes all three and re-encodes the one it saw (tag the field `omitzero`).
type Null[T any] struct {
	Present bool // the key was there, as null or a value
	Value   *T   // nil: null or absent
}

// NullOf returns a present, non-null value.
func NullOf[T any](v T) Null[T] { return Null[T]{Present: true, Value: &v} }

// IsZero reports an absent key (for omitzero).
func (n Null[T]) IsZero() bool { return !n.Present }

func (n Null[T]) MarshalCBOR() ([]byte, error) {
	if n.Value == nil {
		return []byte{0xf6}, nil
	}
	return encMode.Marshal(*n.Value)
}

func (n *Null[T]) UnmarshalCBOR(b []byte) error {
	n.Present, n.Value = true, nil
	var v *T
	if err := decMode.Unmarshal(b, &v); err != nil {
		return err
	}
	n.Value = v
	return nil
}
