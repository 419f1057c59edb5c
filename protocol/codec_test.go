package protocol

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func mustHex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func TestParseFrame(t *testing.T) {
	cases := []struct {
		name    string
		in      []byte
		wantErr error
		wantN   int
	}{
		{"empty", nil, io.ErrUnexpectedEOF, 0},
		{"partial prefix", []byte{0, 0}, io.ErrUnexpectedEOF, 0},
		{"prefix announces more", mustHex("0000000a"), io.ErrUnexpectedEOF, 0},
		{"too large checked at prefix", mustHex("00400001"), ErrFrameTooLarge, 0},
		{"too short once complete", mustHex("00000003 000000"), ErrFrameTooShort, 0},
		{"too short incomplete waits", mustHex("00000003 00"), io.ErrUnexpectedEOF, 0},
		{"minimal header only", mustHex("00000005 12345678 02"), nil, 9},
		{"max size accepted", append(mustHex("00400000"), make([]byte, MaxFrameSize)...), nil, MaxWireFrame},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, n, err := ParseFrame(c.in)
			if !errors.Is(err, c.wantErr) {
				t.Fatalf("err %v want %v", err, c.wantErr)
			}
			if n != c.wantN {
				t.Fatalf("n %d want %d", n, c.wantN)
			}
			if c.name == "minimal header only" && (f.ID != 0x12345678 || f.Flags != 2 || len(f.Body) != 0) {
				t.Fatalf("frame %+v", f)
			}
		})
	}
}

func TestFrameReaderStream(t *testing.T) {
	var stream []byte
	for i := 0; i < 50; i++ {
		data := bytes.Repeat([]byte{byte(i)}, i*5000)
		stream, _ = AppendData(stream, uint32(i), TypeTCPData, data)
	}
	big := bytes.Repeat([]byte{7}, MaxDataChunk)
	stream, _ = AppendData(stream, 99, TypeFsData, big)
	for _, r := range []io.Reader{bytes.NewReader(stream), iotest.OneByteReader(bytes.NewReader(stream)), iotest.HalfReader(bytes.NewReader(stream))} {
		fr := NewFrameReader(r)
		for i := 0; i < 50; i++ {
			f, err := fr.Next()
			if err != nil {
				t.Fatal(i, err)
			}
			m, err := DecodeMessage(f)
			if err != nil || m.ID != uint32(i) || m.Type != TypeTCPData {
				t.Fatalf("frame %d: %+v %v", i, m, err)
			}
			d, err := DecodeData(m.Payload)
			if err != nil || len(d) != i*5000 || (i > 0 && d[0] != byte(i)) {
				t.Fatalf("frame %d data len %d err %v", i, len(d), err)
			}
		}
		f, err := fr.Next()
		if err != nil || f.ID != 99 {
			t.Fatal(err)
		}
		m, _ := DecodeMessage(f)
		if d, _ := DecodeData(m.Payload); !bytes.Equal(d, big) {
			t.Fatal("big frame corrupted")
		}
		if _, err := fr.Next(); err != io.EOF {
			t.Fatalf("want EOF, got %v", err)
		}
	}
	// Truncated inside a frame.
	fr := NewFrameReader(bytes.NewReader(stream[:100]))
	fr.Next()
	if _, err := fr.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("want unexpected EOF, got %v", err)
	}
}

// TestFrameReaderPeekAndHandOver: Peek leaves the frame for Next; a read error in the middle of
// a frame loses nothing; Buffered and NewFrameReaderWith carry what one reader had read past its
// last frame over to another reader of the same stream.
func TestFrameReaderPeekAndHandOver(t *testing.T) {
	var stream []byte
	for i := uint32(1); i <= 3; i++ {
		stream, _ = AppendData(stream, i, TypeTCPData, bytes.Repeat([]byte{byte(i)}, 1000))
	}
	r := &stepReader{data: stream, steps: []int{4, 3, 900, len(stream)}}
	fr := NewFrameReader(r)
	if _, err := fr.Peek(); err != errStep {
		t.Fatalf("peek with a read error after 4 bytes: %v", err)
	}
	if _, err := fr.Peek(); err != errStep { // 7 bytes now
		t.Fatalf("second peek: %v", err)
	}
	f, err := fr.Peek()
	for err == errStep {
		f, err = fr.Peek()
	}
	if err != nil || f.ID != 1 {
		t.Fatalf("peek: %d %v", f.ID, err)
	}
	if f, err = fr.Next(); err != nil || f.ID != 1 {
		t.Fatalf("next after peek: %d %v", f.ID, err)
	}
	rest := fr.Buffered() // frames 2 and 3, already read from r
	if len(rest) != len(stream)*2/3 {
		t.Fatalf("buffered %d bytes, want %d", len(rest), len(stream)*2/3)
	}
	next := NewFrameReaderWith(bytes.NewReader(nil), rest)
	for _, want := range []uint32{2, 3} {
		if f, err := next.Next(); err != nil || f.ID != want {
			t.Fatalf("handed-over reader: %d %v, want %d", f.ID, err, want)
		}
	}
	if _, err := next.Next(); err != io.EOF {
		t.Fatalf("want EOF, got %v", err)
	}
}

var errStep = errors.New("step")

// stepReader returns data in the given steps, with errStep between them.
type stepReader struct {
	data  []byte
	steps []int
	gap   bool
}

func (r *stepReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	if r.gap {
		r.gap = false
		return 0, errStep
	}
	n := min(len(p), len(r.data), r.steps[0])
	if len(r.steps) > 1 {
		r.steps = r.steps[1:]
	}
	copy(p, r.data[:n])
	r.data = r.data[n:]
	r.gap = true
	return n, nil
}

func TestEncoderRefusesOversize(t *testing.T) {
	if _, err := AppendData(nil, 1, TypeFsData, make([]byte, MaxFrameSize)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("got %v", err)
	}
	if _, err := AppendData(nil, 1, TypeFsData, make([]byte, MaxDataChunk)); err != nil {
		t.Fatalf("MaxDataChunk must fit: %v", err)
	}
}

// TestEnvelopeDecoding covers the tolerant slow path and every envelope error kind.
func TestEnvelopeDecoding(t *testing.T) {
	cases := []struct {
		name     string
		body     string
		kind     string // "" = success
		wantType Type
		wantV    uint8
	}{
		{"canonical", "a3 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0", "", TypeInitAck, 5},
		{"reordered keys", "a3 6174 6d636f72652e696e69742e61636b 6170 41a0 6176 05", "", TypeInitAck, 5},
		{"indefinite map", "bf 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0 ff", "", TypeInitAck, 5},
		{"chunked payload", "a3 6176 05 6174 6d636f72652e696e69742e61636b 6170 5f 41a0 ff", "", TypeInitAck, 5},
		{"tagged v", "a3 6176 d9d9f7 05 6174 6d636f72652e696e69742e61636b 6170 41a0", "", TypeInitAck, 5},
		{"extra key ignored", "a4 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0 6178 01", "", TypeInitAck, 5},
		{"trailing bytes ignored", "a3 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0 ffff", "", TypeInitAck, 5},
		{"unknown type", "a3 6176 05 6174 6c636f72652e756e6b6e6f776e 6170 41a0", KindUnsupportedMessageType, 0, 5},
		{"empty body", "", KindMalformedMessage, 0, 0},
		{"not a map", "83 05 05 05", KindMalformedMessage, 0, 0},
		{"missing p", "a2 6176 05 6174 6d636f72652e696e69742e61636b", KindMalformedMessage, 0, 5},
		{"missing v", "a2 6174 6d636f72652e696e69742e61636b 6170 41a0", KindMalformedMessage, 0, 0},
		{"v too big", "a3 6176 190100 6174 6d636f72652e696e69742e61636b 6170 41a0", KindMalformedMessage, 0, 0},
		{"t not text", "a3 6176 05 6174 05 6170 41a0", KindMalformedMessage, 0, 5},
		{"duplicate key", "a4 6176 05 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0", KindMalformedMessage, 0, 0},
		{"truncated", "a3 6176 05 6174 6d636f", KindMalformedMessage, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m, err := DecodeMessage(Frame{ID: 1, Body: mustHex(c.body)})
			if c.kind == "" {
				if err != nil || m.Type != c.wantType || m.V != c.wantV {
					t.Fatalf("got %+v %v", m, err)
				}
				if _, err := DecodePayload(m.Type, m.Payload); err != nil {
					t.Fatalf("payload: %v", err)
				}
				return
			}
			var ee *EnvelopeError
			if !errors.As(err, &ee) || ee.Kind != c.kind {
				t.Fatalf("got %v, want kind %s", err, c.kind)
			}
			if c.kind == KindUnsupportedMessageType && ee.Wire != "core.unknown" {
				t.Fatalf("wire %q", ee.Wire)
			}
		})
	}
}

func TestPayloadDecoding(t *testing.T) {
	cases := []struct {
		name string
		typ  Type
		p    string
		err  string // substring; "" = ok
	}{
		{"tcp connect", TypeTCPConnect, "a2 64686f7374 6161 64706f7274 1850", ""},
		{"tcp connect missing host", TypeTCPConnect, "a1 64706f7274 1850", "missing field `host`"},
		{"tcp connect port overflow", TypeTCPConnect, "a2 64686f7374 6161 64706f7274 1a00010000", "port"},
		{"data as array of ints", TypeTCPData, "a1 6464617461 83 01 02 03", ""},
		{"data missing", TypeTCPData, "a0", "missing field `data`"},
		{"data wrong type", TypeTCPData, "a1 6464617461 63616263", "data"},
		{"exec request defaults", TypeExecRequest, "a1 63636d64 6474727565", ""},
		{"exec rlimit missing hard", TypeExecRequest, "a2 63636d64 6474727565 67726c696d697473 81 a2 687265736f75726365 636e6f66 64736f6674 01", "missing field `hard`"},
		{"fs unknown variant", TypeFsRequest, "a1 626f70 a1 63466f6f a0", "unknown variant"},
		{"fs open missing flag", TypeFsRequest, "a1 626f70 a1 684f70656e46696c65 a2 6470617468 612f 676f7074696f6e73 a1 6472656164 f5", "missing field `write`"},
		{"payload not cbor", TypeExecSignal, "ff", "cbor"},
		{"empty payload", TypeExecSignal, "", "empty payload"},
		{"credit", TypeFlowCredit, "a1 656279746573 1a00010000", ""},
		// null is None for an Option, an error anywhere else (issue 16, item 3)
		{"tcp data null", TypeTCPData, "a1 6464617461 f6", "null"},
		{"tcp data undefined", TypeTCPData, "a1 6464617461 f7", "null"},
		{"exec stdin null", TypeExecStdin, "a1 6464617461 f6", "null"},
		{"fs data null", TypeFsData, "a1 6464617461 f6", "null"},
		{"exec args null", TypeExecRequest, "a2 63636d64 6474727565 6461726773 f6", "args: invalid type: null"},
		{"exec arg null", TypeExecRequest, "a2 63636d64 6474727565 6461726773 82 6161 f6", "args[1]: invalid type: null"},
		{"exec tty null", TypeExecRequest, "a2 63636d64 6474727565 63747479 f6", "tty: invalid type: null"},
		{"exec rows null", TypeExecRequest, "a2 63636d64 6474727565 64726f7773 f6", "rows: invalid type: null"},
		{"exec cmd null", TypeExecRequest, "a1 63636d64 f6", "cmd: invalid type: null"},
		{"exec cwd and user null", TypeExecRequest, "a3 63636d64 6474727565 63637764 f6 6475736572 f6", ""},
		{"exec rlimit soft null", TypeExecRequest, "a2 63636d64 6474727565 67726c696d697473 81 a3 687265736f75726365 636e6f66 64736f6674 f6 6468617264 01", "soft: invalid type: null"},
		{"fs open option null", TypeFsRequest, "a1 626f70 a1 684f70656e46696c65 a2 6470617468 612f 676f7074696f6e73 a6 6472656164 f6 657772697465 f5 66617070656e64 f4 66637265617465 f4 687472756e63617465 f4 6a6372656174655f6e6577 f4", "read: invalid type: null"},
		{"fs open mode null", TypeFsRequest, "a1 626f70 a1 684f70656e46696c65 a2 6470617468 612f 676f7074696f6e73 a7 646d6f6465 f6 6472656164 f6 657772697465 f5 66617070656e64 f4 66637265617465 f4 687472756e63617465 f4 6a6372656174655f6e6577 f4", "read: invalid type: null"},
		{"fs mkdir mode null", TypeFsRequest, "a1 626f70 a1 654d6b646972 a2 6470617468 612f 646d6f6465 f6", ""},
		{"fs read len null", TypeFsRequest, "a1 626f70 a1 6452656164 a3 6668616e646c65 01 666f6666736574 00 636c656e f6", ""},
		{"tcp connect host null", TypeTCPConnect, "a2 64686f7374 f6 64706f7274 1850", "host: invalid type: null"},
		{"signal null", TypeExecSignal, "a1 667369676e616c f6", "null"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v, err := DecodePayload(c.typ, mustHex(c.p))
			if c.err == "" {
				if err != nil {
					t.Fatalf("unexpected %v", err)
				}
				if r, ok := v.(*ExecRequest); ok && (r.Rows != 24 || r.Cols != 80 || r.Cmd != "true") {
					t.Fatalf("defaults not applied: %+v", r)
				}
				if d, ok := v.(*Data); ok && c.name == "data as array of ints" && !bytes.Equal(d.Data, []byte{1, 2, 3}) {
					t.Fatalf("data %v", d.Data)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("got %v, want error containing %q", err, c.err)
			}
		})
	}
}

func TestDataHotPathAllocs(t *testing.T) {
	chunk := make([]byte, 64<<10)
	buf := make([]byte, 0, 70<<10)
	allocs := testing.AllocsPerRun(100, func() {
		out, _ := AppendData(buf[:0], 7, TypeTCPData, chunk)
		f, _, _ := ParseFrame(out)
		m, _ := DecodeMessage(f)
		if d, _ := DecodeData(m.Payload); len(d) != len(chunk) {
			panic("short")
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocs per encode+decode of a data frame, want 0", allocs)
	}
}

// TestDecodeDataNull: the agent's data decoder refuses a null chunk (it is not EOF).
func TestDecodeDataNull(t *testing.T) {
	for _, p := range []string{"a1 6464617461 f6", "a1 6464617461 f7"} {
		if d, err := DecodeData(mustHex(p)); err == nil {
			t.Errorf("%s: decoded %q", p, d)
		}
	}
	if d, err := DecodeData(mustHex("a1 6464617461 40")); err != nil || d == nil || len(d) != 0 {
		t.Errorf("empty data: %v %v", d, err)
	}
}
