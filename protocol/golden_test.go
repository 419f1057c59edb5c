package protocol

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

type goldenFrame struct {
	name string
	id   uint32
	wire []byte
}

func readGolden(t *testing.T, path string) []goldenFrame {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []goldenFrame
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		parts := strings.Fields(line)
		if len(parts) != 3 {
			t.Fatalf("%s: bad line %q", path, line)
		}
		id, err := strconv.ParseUint(parts[1], 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		wire, err := hex.DecodeString(parts[2])
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, goldenFrame{parts[0], uint32(id), wire})
	}
	return out
}

// restamp returns a frame with the envelope's v replaced: the one byte that differs between
// what two generations stamp on the same payload (both below 24, so one byte at offset 12).
func restamp(wire []byte, v uint8) []byte {
	if v >= 24 || wire[9] != 0xa3 || wire[10] != 0x61 || wire[11] != 'v' || wire[12] >= 24 {
		panic("not a canonical envelope")
	}
	out := append([]byte(nil), wire...)
	out[12] = v
	return out
}

// TestGoldenFrames decodes every golden frame, decodes its payload into our Go type and
// re-encodes both the payload (with fxamacker) and the frame (with the hand-built envelope):
// the bytes must be identical, with the sender's v (the golden frames are generation 5's) and
// with our own (every payload keeps its bytes; only v is ours).
func TestGoldenFrames(t *testing.T) {
	for _, file := range []string{"testdata/golden-frames-v0.5.7.txt", "testdata/golden-appendix-a.txt"} {
		for _, g := range readGolden(t, file) {
			t.Run(file+"/"+g.name, func(t *testing.T) {
				f, n, err := ParseFrame(g.wire)
				if err != nil || n != len(g.wire) {
					t.Fatalf("parse: n=%d err=%v", n, err)
				}
				m, err := DecodeMessage(f)
				if err != nil {
					t.Fatalf("decode envelope: %v", err)
				}
				if m.Name() != g.name || m.ID != g.id || m.V != 5 {
					t.Fatalf("got %s id %d v %d", m.Name(), m.ID, m.V)
				}
				if m.Flags != m.Type.Flags() {
					t.Fatalf("flags %d, table says %d", m.Flags, m.Type.Flags())
				}
				var payload []byte
				if m.Type == TypeShutdown {
					payload, _ = Marshal(nil)
				} else {
					v, err := DecodePayload(m.Type, m.Payload)
					if err != nil {
						t.Fatalf("decode payload: %v", err)
					}
					payload, err = Marshal(reflect.ValueOf(v).Elem().Interface())
					if err != nil {
						t.Fatal(err)
					}
					if d, ok := v.(*Data); ok { // the hot path must agree too
						fast, err := AppendData(nil, g.id, m.Type, d.Data)
						if err != nil || !bytes.Equal(fast, restamp(g.wire, Version)) {
							t.Fatalf("AppendData:\n got %x\nwant %x", fast, g.wire)
						}
					}
				}
				if !bytes.Equal(payload, m.Payload) {
					t.Fatalf("payload:\n got %x\nwant %x", payload, m.Payload)
				}
				wire, err := AppendMessageV(nil, m.V, g.id, m.Type, payload)
				if err != nil || !bytes.Equal(wire, g.wire) {
					t.Fatalf("frame:\n got %x\nwant %x", wire, g.wire)
				}
				own, err := AppendMessage(nil, g.id, m.Type, payload)
				if err != nil || !bytes.Equal(own, restamp(g.wire, Version)) {
					t.Fatalf("frame stamped %d:\n got %x\nwant %x", Version, own, restamp(g.wire, Version))
				}
			})
		}
	}
}

// TestEncodeFromValues builds golden frames from Go values, not from decoded bytes.
func TestEncodeFromValues(t *testing.T) {
	str := func(s string) *string { return &s }
	i32 := func(i int32) *int32 { return &i }
	cases := []struct {
		id      uint32
		typ     Type
		payload any
		hex     string
	}{
		{0, TypeReady, Ready{BootTimeNs: 1, InitTimeNs: 2, ReadyTimeNs: 3, AgentVersion: "0.5.7"}, "0000005a0000000000a361760561746a636f72652e726561647961705840a46c626f6f745f74696d655f6e73016c696e69745f74696d655f6e73026d72656164795f74696d655f6e73036d6167656e745f76657273696f6e65302e352e37"},
		{7, TypeTCPConnect, TCPConnect{Host: "127.0.0.1", Port: 8080}, "000000380000000702a3617605617470636f72652e7463702e636f6e6e65637461705818a264686f7374693132372e302e302e3164706f7274191f90"},
		{7, TypeTCPConnected, TCPConnected{}, "000000220000000700a3617605617472636f72652e7463702e636f6e6e6563746564617041a0"},
		{7, TypeTCPEOF, Empty{}, "0000001c0000000700a361760561746c636f72652e7463702e656f66617041a0"},
		{7, TypeTCPClose, Empty{}, "0000001e0000000700a361760561746e636f72652e7463702e636c6f7365617041a0"},
		{7, TypeTCPClosed, Empty{}, "0000001f0000000701a361760561746f636f72652e7463702e636c6f736564617041a0"},
		{7, TypeTCPFailed, TCPFailed{"connection refused"}, "000000390000000701a361760561746f636f72652e7463702e6661696c65646170581aa1656572726f7272636f6e6e656374696f6e2072656675736564"},
		{9, TypeExecRequest, ExecRequest{Cmd: "/bin/echo", Args: []string{"hi"}, Rows: 24, Cols: 80}, "000000650000000902a3617605617471636f72652e657865632e7265717565737461705844a963636d64692f62696e2f6563686f64617267738162686963656e768063637764f66475736572f663747479f464726f7773181864636f6c73185067726c696d69747380"},
		{9, TypeExecExited, ExecExited{Code: 0}, "000000260000000901a3617605617470636f72652e657865632e657869746564617047a164636f646500"},
		{3, TypeError, CoreError{Kind: "invalid_payload", Message: "bad", OffendingType: "core.tcp.data"}, "000000590000000301a361760561746a636f72652e6572726f726170583fa3646b696e646f696e76616c69645f7061796c6f6164676d657373616765636261646e6f6666656e64696e675f747970656d636f72652e7463702e64617461"},
		{0, TypeShutdown, nil, "0000001d0000000004a361760561746d636f72652e73687574646f776e617041f6"},
		{0, TypeRelayClientDisconnected, RelayClientDisconnected{IDStart: 1, IDEndExclusive: 33554432}, "000000500000000000a36176056174781e636f72652e72656c61792e636c69656e742e646973636f6e6e656374656461705821a26869645f7374617274017069645f656e645f6578636c75736976651a02000000"},
		{0, TypeClockSync, ClockSync{1700000000000000000}, "000000390000000000a361760561746f636f72652e636c6f636b2e73796e636170581aa16f756e69785f74696d655f6e616e6f731b17979cfe362a0000"},
		{1, TypeExecFailed, ExecFailed{"not_found", i32(2), str("ENOENT"), "m", str("Command::spawn")}, "000000680000000101a3617605617470636f72652e657865632e6661696c656461705848a5646b696e64696e6f745f666f756e64656572726e6f026a6572726e6f5f6e616d6566454e4f454e54676d657373616765616d6573746167656e436f6d6d616e643a3a737061776e"},
		{2, TypeFsRequest, FsRequest{Op: FsStat{"/etc", true}}, "000000440000000202a361760561746f636f72652e66732e7265717565737461705825a1626f70a16453746174a26470617468642f6574636e666f6c6c6f775f73796d6c696e6bf5"},
		{3, TypeFsResponse, FsResponse{OK: true, Data: &FsResponseData{Kind: "Handle", Handle: 1}}, "0000003a0000000301a3617605617470636f72652e66732e726573706f6e73656170581aa3626f6bf5656572726f72f66464617461a16648616e646c6501"},
		{0, TypeInitResolved, InitResolved{UserIDs{1000, 1000}}, "0000003f0000000000a3617605617472636f72652e696e69742e7265736f6c7665646170581da16c64656661756c745f75736572a2637569641903e8636769641903e8"},
		{0, TypeInitAck, InitAck{}, "0000001d0000000000a361760561746d636f72652e696e69742e61636b617041a0"},
	}
	for _, c := range cases {
		got, err := EncodeFrame(c.id, c.typ, c.payload)
		if err != nil {
			t.Fatalf("%s: %v", c.typ, err)
		}
		if want := restamp(mustHex(c.hex), Version); !bytes.Equal(got, want) {
			t.Errorf("%s:\n got %x\nwant %x", c.typ, got, want)
		}
	}
}
