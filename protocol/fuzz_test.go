package protocol

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
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

// The payload fuzzers' type lists, from the table (a selector byte picks one).
var (
	coreFamily = typesOf(FamilyCore, FamilyLiveness, FamilyBulk, FamilyWorkload, FamilyRootDisk, FamilyFlow)
	execFamily = typesOf(FamilyExec)
	fsFamily   = typesOf(FamilyFs)
	tcpFamily  = typesOf(FamilyTCP, FamilyStreams)
)

// typesOf lists the types of some families that have a payload, in AllTypes order.
func typesOf(families ...Family) []Type {
	var out []Type
	for _, t := range AllTypes() {
		for _, f := range families {
			if t.Info().Family == f && NewPayload(t) != nil {
				out = append(out, t)
			}
		}
	}
	return out
}

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

// FuzzBootstrap decodes arbitrary bytes as a core.bootstrap payload and as a frame: nothing
// panics, and whatever decodes re-encodes stably.
func FuzzBootstrap(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzPayloads(t, []Type{TypeBootstrap}, 0, data)
		if frame, _, err := ParseFrame(data); err == nil {
			_, _ = DecodeBootstrapFrame(frame)
		}
	})
}

// FuzzBulkRecord feeds arbitrary bytes to the binary record decoders of generations 8 and 9:
// raw bulk records and MSBL records in a frame stream, agent-bulk lane packets and the binding
// handshake. Whatever one accepts re-encodes to exactly the bytes it consumed.
func FuzzBulkRecord(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		if b, err := ParseBulkBinding(data); err == nil && !bytes.Equal(AppendBulkBinding(nil, b), data[:BulkBindingSize]) {
			t.Fatalf("binding %x re-encodes differently", data[:BulkBindingSize])
		}
		for rest := data; ; {
			inc, r, n, err := ParseLanePacket(rest)
			if err != nil {
				break
			}
			if re, err := AppendLanePacket(nil, inc, r); err != nil || !bytes.Equal(re, rest[:n]) {
				t.Fatalf("lane packet %x re-encodes as %x (%v)", rest[:n], re, err)
			}
			rest = rest[n:]
		}
		for rest := data; ; {
			fr, n, err := ParseFrame(rest)
			if err != nil {
				return
			}
			raw := rest[:n]
			rest = rest[n:]
			if r, err := ParseBulkRecord(fr); err == nil {
				if re, err := AppendBulkRecord(nil, r); err != nil || !bytes.Equal(re, raw) {
					t.Fatalf("record %x re-encodes as %x (%v)", raw, re, err)
				}
				if len(r.Payload) == 0 || FrameType(fr) != 0 {
					t.Fatal("a record has a payload and no message type")
				}
			}
			if l, err := ParseRangeLease(fr); err == nil && !bytes.Equal(AppendRangeLease(nil, l), raw) {
				t.Fatalf("lease %x re-encodes differently", raw)
			}
		}
	})
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
	var records []byte
	for i, file := range []string{"testdata/golden-frames-v0.5.7.txt", "testdata/golden-appendix-a.txt", "testdata/golden-gen6-9.txt"} {
		for j, g := range readGolden(t, file) {
			if !strings.HasPrefix(g.name, "core.") { // a binary record
				write("FuzzBulkRecord", fmt.Sprintf("golden-%d-%02d", i, j), g.wire)
				records = append(records, g.wire...)
				continue
			}
			write("FuzzFrameEnvelope", fmt.Sprintf("golden-%d-%02d", i, j), g.wire)
			stream = append(stream, g.wire...)
			f, _, _ := ParseFrame(g.wire)
			m, _ := DecodeMessage(f)
			if m.Type == TypeBootstrap {
				write("FuzzBootstrap", fmt.Sprintf("golden-%d-%02d", i, j), []byte(m.Payload))
				write("FuzzBootstrap", fmt.Sprintf("frame-%d-%02d", i, j), g.wire)
			}
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
	write("FuzzBulkRecord", "stream", records)
	write("FuzzBulkRecord", "max-record", must(AppendBulkRecord(nil, BulkRecord{1, BulkFS, BulkGuestToHost, 1 << 40, make([]byte, 64)})))
	write("FuzzBulkRecord", "truncated", mustHex("00000012 00000009 08 0101000000000000"))
	write("FuzzBootstrap", "bad-root-kind", mustHex("a1 6a626c6f636b5f726f6f74 a1 646b696e64 636e6673"))
	write("FuzzBootstrap", "v4-as-string", mustHex("a1 676e6574776f726b a4 69696e74657266616365 6465746830 636d6163 86 00 00 00 00 00 00 636d7475 1905dc 6469707634 a3 6761646472657373 68 31302e302e302e32 6a7072656669785f6c656e 18 18 6767617465776179 84 0a 00 00 01"))
	write("FuzzFrameEnvelope", "too-large", mustHex("00400001000000000000"))
	write("FuzzFrameEnvelope", "too-short", mustHex("00000003000000"))
	write("FuzzFrameEnvelope", "unknown-type", append(mustHex("0000001c 00000001 00"), mustHex("a3 6176 05 6174 6c636f72652e756e6b6e6f776e 6170 41a0")...))
	families := map[string][]Type{"FuzzCorePayload": coreFamily, "FuzzExecPayload": execFamily, "FuzzFsPayload": fsFamily, "FuzzTCPPayload": tcpFamily}
	samples := map[string]struct {
		fam  string
		typ  Type
		data any
	}{
		"fs-open":        {"FuzzFsPayload", TypeFsRequest, FsRequest{Op: FsOpenFile{"/tmp/x", FsOpenOptions{Read: true, Write: true, User: NullOf("1000:1000")}}}},
		"fs-setstat":     {"FuzzFsPayload", TypeFsRequest, FsRequest{Op: FsSetStat{Path: "/a", Attrs: FsSetAttrs{}}}},
		"fs-list":        {"FuzzFsPayload", TypeFsResponse, FsResponse{OK: true, Data: &FsResponseData{Kind: "List", List: []FsEntryInfo{{Path: "/a", Kind: "file"}}}}},
		"fs-read":        {"FuzzFsPayload", TypeFsRequest, FsRequest{Op: FsRead{Handle: 1}}},
		"fs-write-bulk":  {"FuzzFsPayload", TypeFsRequest, FsRequest{Op: FsWrite{Handle: 1}, Bulk: &BulkOfferFSWrite}},
		"exec-rlimit":    {"FuzzExecPayload", TypeExecRequest, ExecRequest{Cmd: "sh", Rlimits: []ExecRlimit{{"nofile", 1, 2}}}},
		"exec-resize":    {"FuzzExecPayload", TypeExecResize, ExecResize{10, 20}},
		"exec-signal":    {"FuzzExecPayload", TypeExecSignal, ExecSignal{15}},
		"tcp-window":     {"FuzzTCPPayload", TypeTCPConnect, TCPConnect{Host: "h", Port: 1, Window: 65536}},
		"core-rcd":       {"FuzzCorePayload", TypeRelayClientDisconnected, RelayClientDisconnected{IDStart: 1, IDEndExclusive: 2}},
		"core-clock":     {"FuzzCorePayload", TypeClockSync, ClockSync{1}},
		"core-credit":    {"FuzzCorePayload", TypeFlowCredit, FlowCredit{100}},
		"core-initack":   {"FuzzCorePayload", TypeInitAck, InitAck{Features: []string{FeatureFlow}}},
		"core-touched":   {"FuzzCorePayload", TypeTouched, Touched{1 << 40}},
		"core-bulk-cred": {"FuzzCorePayload", TypeBulkCredit, BulkCredit{BulkFS, BulkHostToGuest, 1, 2}},
	}
	for name, s := range samples {
		b, err := Marshal(s.data)
		if err != nil {
			t.Fatal(err)
		}
		sel := slices.Index(families[s.fam], s.typ)
		if sel < 0 {
			t.Fatalf("%s is not in %s", s.typ, s.fam)
		}
		write(s.fam, name, uint8(sel), b)
	}
}
