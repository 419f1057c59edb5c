package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	// PrefixSize is the length prefix: a u32 counting every byte after it.
	PrefixSize = 4
	// HeaderSize is id (u32) + flags (u8); the minimum legal value of the length prefix.
	HeaderSize = 5
	// MaxFrameSize bounds the length prefix (id + flags + body): 4 MiB.
	MaxFrameSize = 4 << 20
	// MaxWireFrame is the largest frame on the wire, prefix included.
	MaxWireFrame = PrefixSize + MaxFrameSize
)

// Frame-level errors. They mean the byte stream can no longer be trusted (desync).
var (
	ErrFrameTooLarge = errors.New("frame too large")
	ErrFrameTooShort = errors.New("frame too short")
)

// FrameError carries the offending length prefix.
type FrameError struct {
	Err error
	Len uint32
}

func (e *FrameError) Error() string {
	switch e.Err {
	case ErrFrameTooLarge:
		return fmt.Sprintf("frame too large: length prefix %d exceeds %d", e.Len, MaxFrameSize)
	case ErrFrameTooShort:
		return fmt.Sprintf("frame too short: length prefix %d is below %d", e.Len, HeaderSize)
	}
	return e.Err.Error()
}

func (e *FrameError) Unwrap() error { return e.Err }

// Frame is one decoded frame. Body is the CBOR envelope; it may alias a reader's buffer.
type Frame struct {
	ID    uint32
	Flags byte
	Body  []byte
}

// checkLen validates a length prefix in the reference's order: too large first, as soon as
// the prefix is known, then too short.
func checkLen(n uint32) error {
	if n > MaxFrameSize {
		return &FrameError{ErrFrameTooLarge, n}
	}
	if n < HeaderSize {
		return &FrameError{ErrFrameTooShort, n}
	}
	return nil
}

// ParseFrame decodes one frame from the start of b. It returns the frame, the number of bytes
// it used, and io.ErrUnexpectedEOF when b holds only part of a frame. Body aliases b.
func ParseFrame(b []byte) (Frame, int, error) {
	if len(b) < PrefixSize {
		return Frame{}, 0, io.ErrUnexpectedEOF
	}
	n := binary.BigEndian.Uint32(b)
	if n > MaxFrameSize {
		return Frame{}, 0, checkLen(n)
	}
	if len(b) < PrefixSize+int(n) {
		return Frame{}, 0, io.ErrUnexpectedEOF
	}
	if err := checkLen(n); err != nil {
		return Frame{}, 0, err
	}
	f := Frame{
		ID:    binary.BigEndian.Uint32(b[4:]),
		Flags: b[8],
		Body:  b[PrefixSize+HeaderSize : PrefixSize+int(n)],
	}
	return f, PrefixSize + int(n), nil
}

// AppendFrameHeader appends the prefix, id and flags for a body of bodyLen bytes.
func AppendFrameHeader(dst []byte, id uint32, flags byte, bodyLen int) ([]byte, error) {
	if bodyLen > MaxFrameSize-HeaderSize {
		return dst, &FrameError{ErrFrameTooLarge, uint32(min(bodyLen+HeaderSize, 1<<32-1))}
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(HeaderSize+bodyLen))
	dst = binary.BigEndian.AppendUint32(dst, id)
	return append(dst, flags), nil
}

// AppendRawFrame appends a frame with an opaque body.
func AppendRawFrame(dst []byte, id uint32, flags byte, body []byte) ([]byte, error) {
	dst, err := AppendFrameHeader(dst, id, flags, len(body))
	if err != nil {
		return dst, err
	}
	return append(dst, body...), nil
}

// FrameReader reads frames from a stream through its own buffer, so a frame's Body aliases
// that buffer and stays valid only until the next call to Next. The buffer starts small and
// grows only as far as the largest frame seen (at most MaxWireFrame).
type FrameReader struct {
	r          io.Reader
	buf        []byte
	start, end int
}

// DefaultReadBuffer is the reader's initial buffer: a few maximal tcp.data frames, so bulk
// streams are read with few syscalls.
const DefaultReadBuffer = 256 << 10

// NewFrameReader returns a reader with a DefaultReadBuffer-sized buffer.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{r: r, buf: make([]byte, DefaultReadBuffer)}
}

// NewFrameReaderWith returns a reader that yields the bytes of pending before reading r: what
// another reader of the same stream had buffered (Buffered), when a stream changes hands.
func NewFrameReaderWith(r io.Reader, pending []byte) *FrameReader {
	fr := &FrameReader{r: r, buf: make([]byte, max(DefaultReadBuffer, len(pending)))}
	fr.end = copy(fr.buf, pending)
	return fr
}

// Buffered returns the bytes read from the stream but not yet returned as frames (a copy).
func (fr *FrameReader) Buffered() []byte {
	return append([]byte(nil), fr.buf[fr.start:fr.end]...)
}

// Next returns the next frame. A *FrameError means the stream is desynchronized; io.EOF means
// the stream ended cleanly between frames; io.ErrUnexpectedEOF means it ended inside one. A read
// error (a deadline) leaves what arrived of a frame buffered: the next call goes on with it.
func (fr *FrameReader) Next() (Frame, error) {
	f, n, err := fr.peek()
	if err == nil {
		fr.start += n
	}
	return f, err
}

// Peek returns the next frame like Next but leaves it to be returned again by Next.
func (fr *FrameReader) Peek() (Frame, error) {
	f, _, err := fr.peek()
	return f, err
}

func (fr *FrameReader) peek() (Frame, int, error) {
	for {
		f, n, err := ParseFrame(fr.buf[fr.start:fr.end])
		if err == nil {
			return f, n, nil
		}
		if err != io.ErrUnexpectedEOF {
			return Frame{}, 0, err
		}
		need := PrefixSize
		if fr.end-fr.start >= PrefixSize {
			need += int(binary.BigEndian.Uint32(fr.buf[fr.start:]))
		}
		fr.makeRoom(need)
		m, rerr := fr.r.Read(fr.buf[fr.end:])
		fr.end += m
		if rerr != nil {
			if m > 0 {
				continue // parse what arrived; the error comes back on the next read
			}
			if rerr == io.EOF && fr.end > fr.start {
				return Frame{}, 0, io.ErrUnexpectedEOF
			}
			return Frame{}, 0, rerr
		}
	}
}

// makeRoom ensures need bytes from start fit in the buffer, compacting or growing it.
func (fr *FrameReader) makeRoom(need int) {
	if fr.start == fr.end {
		fr.start, fr.end = 0, 0
	}
	if len(fr.buf)-fr.start >= need && fr.end < len(fr.buf) {
		return
	}
	if need > len(fr.buf) {
		nb := make([]byte, max(need, 2*len(fr.buf)))[:min(max(need, 2*len(fr.buf)), MaxWireFrame+DefaultReadBuffer)]
		copy(nb, fr.buf[fr.start:fr.end])
		fr.buf, fr.end, fr.start = nb, fr.end-fr.start, 0
		return
	}
	copy(fr.buf, fr.buf[fr.start:fr.end])
	fr.end -= fr.start
	fr.start = 0
}
