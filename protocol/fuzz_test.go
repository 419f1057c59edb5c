package protocol

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// FuzzFrameEnvelope feeds arbitrary bytes to the frame reader and the envelope decoder. It
// checks that nothing panics, that the allocation-free fast path agrees with the general
// decoder on every input it accepts, and that an accepted frame re-encodes to itself.
func FuzzFrameEnvelope(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewFrameReader(bytes.NewReader(data))
		for {
			fr1, err := fr.Next()
			if err != nil {
				var fe *FrameError
				if errors.As(err, &fe) || err.Error() == "EOF" || err.Error() == "unexpected EOF" {
					return
				}
				t.Fatalf("unexpected reader error %v", err)
			}
			var fast Message
			if fastEnvelope(fr1.Body, &fast) {
				var slow Message
				if err := slowEnvelope(fr1.Body, &slow); err != nil {
					t.Fatalf("fast path accepted what the decoder rejects: %v", err)
				}
				if fast.V != slow.V || fast.Type != slow.Type || !bytes.Equal(fast.Payload, slow.Payload) {
					t.Fatalf("fast %+v != slow %+v", fast, slow)
				}
			}
			m, err := DecodeMessage(fr1)
			if err != nil {
				var ee *EnvelopeError
				if !errors.As(err, &ee) || ee.Kind == "" {
					t.Fatalf("envelope error without a kind: %v", err)
				}
				continue
			}
			if m.Type.Valid() && m.Flags == m.Type.Flags() && m.V == Version {
				re, err := AppendMessage(nil, m.ID, m.Type, m.Payload)
				if err != nil {
					t.Fatal(err)
				}
				if _, _, err := ParseFrame(re); err != nil {
					t.Fatalf("re-encoded frame does not parse: %v", err)
				}
			}
			_, _ = DecodePayload(m.Type, m.Payload)
		}
	})
}

// fuzzPayloads decodes data as each type of a family. Whatever decodes must re-encode, and
// the re-encoding must decode to the same value (encode/decode is stable).
func fuzzPayloads(t *testing.T, types []Type, sel uint8, data []byte) {
	typ := types[int(sel)%len(types)]
	v, err := DecodePayload(typ, data)
	if err != nil || v == nil {
		return
	}
	enc, err := Marshal(reflect.ValueOf(v).Elem().Interface())
	if err != nil {
		return // e.g. an FsResponseData kind we decoded but do not re-encode; no panic is the property
	}
	v2, err := DecodePayload(typ, enc)
	if err != nil {
		t.Fatalf("%s: re-encoded payload %x does not decode: %v", typ, enc, err)
	}
	enc2, err := Marshal(reflect.ValueOf(v2).Elem().Interface())
	if err != nil || !bytes.Equal(enc, enc2) {
		t.Fatalf("%s: unstable encoding %x vs %x (%v)", typ, enc, enc2, err)
	}
}

var (
	coreFamily = []Type{TypeReady, TypeInitResolved, TypeInitAck, TypeRelayClientDisconnected, TypeClockSync, TypeError, TypeFlowCredit}
	execFamily = []Type{TypeExecRequest, TypeExecStarted, TypeExecStdin, TypeExecStdinError, TypeExecStdout, TypeExecStderr, TypeExecExited, TypeExecFailed, TypeExecResize, TypeExecSignal}
	fsFamily   = []Type{TypeFsRequest, TypeFsResponse, TypeFsData}
	tcpFamily  = []Type{TypeTCPConnect, TypeTCPConnected, TypeTCPData, TypeTCPEOF, TypeTCPClose, TypeTCPClosed, TypeTCPFailed,
		TypeStreamOpen, TypeStreamOpened, TypeStreamData, TypeStreamEOF, TypeStreamClose, TypeStreamCredit}
)

func FuzzCorePayload(f *testing.F) {
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) { fuzzPayloads(t, coreFamily, sel, data) })
}

func FuzzExecPayload(f *testing.F) {
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) { fuzzPayloads(t, execFamily, sel, data) })
}

func FuzzFsPayload(f *testing.F) {
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) { fuzzPayloads(t, fsFamily, sel, data) })
}

func FuzzTCPPayload(f *testing.F) {
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) { fuzzPayloads(t, tcpFamily, sel, data) })
}

// TestWriteFuzzCorpus regenerates the checked-in seed corpora from the golden frames and from
// sample payloads of every type (go test ./protocol -run TestWriteFuzzCorpus -update).
func TestWriteFuzzCorpus(t *testing.T) {
	if !*update {
		t.Skip("corpus is checked in; run with -update to regenerate")
	}
	write := func(target, name string, args ...any) {
		dir := filepath.Join("testdata", "fuzz", target)
		os.MkdirAll(dir, 0o755)
		var b bytes.Buffer
		b.WriteString("go test fuzz v1\n")
		for _, a := range args {
			switch v := a.(type) {
			case []byte:
				fmt.Fprintf(&b, "[]byte(%q)\n", v)
			case uint8:
				fmt.Fprintf(&b, "byte('\\x%02x')\n", v)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, name), b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var stream []byte
	for i, file := range []string{"testdata/golden-frames-v0.5.7.txt", "testdata/golden-appendix-a.txt"} {
		for j, g := range readGolden(t, file) {
			write("FuzzFrameEnvelope", fmt.Sprintf("golden-%d-%02d", i, j), g.wire)
			stream = append(stream, g.wire...)
			f, _, _ := ParseFrame(g.wire)
			m, _ := DecodeMessage(f)
			for fam, types := range map[string][]Type{"FuzzCorePayload": coreFamily, "FuzzExecPayload": execFamily, "FuzzFsPayload": fsFamily, "FuzzTCPPayload": tcpFamily} {
				for k, ty := range types {
					if ty == m.Type {
						write(fam, fmt.Sprintf("golden-%d-%02d", i, j), uint8(k), []byte(m.Payload))
					}
				}
			}
		}
	}
	write("FuzzFrameEnvelope", "stream", stream)
	write("FuzzFrameEnvelope", "too-large", mustHex("00400001000000000000"))
	write("FuzzFrameEnvelope", "too-short", mustHex("00000003000000"))
	write("FuzzFrameEnvelope", "unknown-type", append(mustHex("0000001c 00000001 00"), mustHex("a3 6176 05 6174 6c636f72652e756e6b6e6f776e 6170 41a0")...))
	samples := map[string]struct {
		fam  string
		sel  uint8
		data any
	}{
		"fs-open":      {"FuzzFsPayload", 0, FsRequest{FsOpenFile{"/tmp/x", FsOpenOptions{Read: true, Write: true}}}},
		"fs-setstat":   {"FuzzFsPayload", 0, FsRequest{FsSetStat{Path: "/a", Attrs: FsSetAttrs{}}}},
		"fs-list":      {"FuzzFsPayload", 1, FsResponse{OK: true, Data: &FsResponseData{Kind: "List", List: []FsEntryInfo{{Path: "/a", Kind: "file"}}}}},
		"fs-read":      {"FuzzFsPayload", 0, FsRequest{FsRead{Handle: 1}}},
		"exec-rlimit":  {"FuzzExecPayload", 0, ExecRequest{Cmd: "sh", Rlimits: []ExecRlimit{{"nofile", 1, 2}}}},
		"exec-resize":  {"FuzzExecPayload", 8, ExecResize{10, 20}},
		"exec-signal":  {"FuzzExecPayload", 9, ExecSignal{15}},
		"tcp-window":   {"FuzzTCPPayload", 0, TCPConnect{"h", 1, 65536}},
		"core-rcd":     {"FuzzCorePayload", 3, RelayClientDisconnected{1, 2}},
		"core-clock":   {"FuzzCorePayload", 4, ClockSync{1}},
		"core-credit":  {"FuzzCorePayload", 6, FlowCredit{100}},
		"core-initack": {"FuzzCorePayload", 2, InitAck{Features: []string{FeatureFlow}}},
	}
	for name, s := range samples {
		b, err := Marshal(s.data)
		if err != nil {
			t.Fatal(err)
		}
		write(s.fam, name, s.sel, b)
	}
}
