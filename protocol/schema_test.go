package protocol

import (
	"encoding/json"
	"flag"
	"os"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata snapshots")

type schemaType struct {
	Type       string `json:"type"`
	Flags      byte   `json:"flags"`
	Generation uint8  `json:"generation"`
	Class      string `json:"class,omitempty"`
	Family     string `json:"family,omitempty"`
	Dir        string `json:"direction,omitempty"`
}

type schemaBulk struct {
	DefaultFilesystemRecordPayload int `json:"default_filesystem_record_payload"`
	DefaultRecordPayload           int `json:"default_record_payload"`
	DefaultWindow                  int `json:"default_window"`
	FormatRawV1                    int `json:"format_raw_v1"`
	HeaderSize                     int `json:"header_size"`
	MaxRecordPayload               int `json:"max_record_payload"`
	MaxWindow                      int `json:"max_window"`
	MinRecordPayload               int `json:"min_record_payload"`
}

type schema struct {
	Version          int          `json:"version"`
	LatestGeneration int          `json:"latest_generation,omitempty"`
	HeaderSize       int          `json:"header_size"`
	MaxFrameSize     int          `json:"max_frame_size"`
	FlagTerminal     byte         `json:"flag_terminal"`
	FlagSessionStart byte         `json:"flag_session_start"`
	FlagShutdown     byte         `json:"flag_shutdown"`
	FlagBulk         byte         `json:"flag_bulk,omitempty"`
	Bulk             *schemaBulk  `json:"bulk,omitempty"`
	MessageTypes     []schemaType `json:"message_types"`
	Extensions       []schemaType `json:"extensions"`
}

var classNames = map[Class]string{ClassControl: "control", ClassData: "data", ClassMaintenance: "maintenance"}

func currentSchema() schema {
	s := schema{Version: Version, LatestGeneration: LatestGeneration, HeaderSize: HeaderSize, MaxFrameSize: MaxFrameSize,
		FlagTerminal: FlagTerminal, FlagSessionStart: FlagSessionStart, FlagShutdown: FlagShutdown, FlagBulk: FlagBulk,
		Bulk: &schemaBulk{BulkDefaultFSRecordPayload, BulkDefaultRecordPayload, BulkDefaultWindow, BulkFormatRawV1,
			BulkHeaderSize, BulkMaxRecordPayload, BulkMaxWindow, BulkMinRecordPayload}}
	for _, t := range AllTypes() {
		i := t.Info()
		st := schemaType{i.Wire, i.Flags, i.Generation, classNames[i.Class], i.Family.String(), i.Dir.String()}
		if i.Extension {
			s.Extensions = append(s.Extensions, st)
		} else {
			s.MessageTypes = append(s.MessageTypes, st)
		}
	}
	return s
}

// TestSchemaSnapshot pins the whole type table: wire strings, flags, generations, schema
// order, and how each type is treated. A change here is a wire change.
func TestSchemaSnapshot(t *testing.T) {
	got, _ := json.MarshalIndent(currentSchema(), "", "  ")
	got = append(got, '\n')
	const path = "testdata/schema.json"
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatalf("type table differs from %s:\n%s", path, got)
	}
}

// TestSchemaKeepsGeneration5 checks that the generation-5 part of the table is still exactly
// the 0.5.7 snapshot: same types, flags, generations and relative order.
func TestSchemaKeepsGeneration5(t *testing.T) {
	raw, err := os.ReadFile("testdata/schema-gen5.json")
	if err != nil {
		t.Fatal(err)
	}
	var old schema
	if err := json.Unmarshal(raw, &old); err != nil {
		t.Fatal(err)
	}
	var now []schemaType
	for _, ty := range CoreTypes() {
		if i := ty.Info(); i.Generation <= 5 {
			now = append(now, schemaType{Type: i.Wire, Flags: i.Flags, Generation: i.Generation})
		}
	}
	if !reflect.DeepEqual(now, old.MessageTypes) {
		t.Fatalf("generation-5 types changed:\n%+v\nwant\n%+v", now, old.MessageTypes)
	}
}

func TestTypeTable(t *testing.T) {
	if n := len(CoreTypes()); n != 44 {
		t.Fatalf("%d core types, want 44 (gen-9.json)", n)
	}
	seen := map[string]bool{}
	for _, ty := range AllTypes() {
		w, info := ty.String(), ty.Info()
		if seen[w] {
			t.Fatalf("duplicate wire string %s", w)
		}
		seen[w] = true
		back, ok := LookupType(w)
		if !ok || back != ty {
			t.Fatalf("%s does not round-trip", w)
		}
		if info.Extension != (info.Family.Feature() != "") {
			t.Errorf("%s: an extension type is exactly one in an extension family", w)
		}
		if info.Extension && !strings.HasPrefix(w, "agentd.") ||
			!info.Extension && !strings.HasPrefix(w, "core.") {
			t.Errorf("%s: extension types live under agentd., core types under core.", w)
		}
		if !info.Extension && (info.Generation < 1 || info.Generation > LatestGeneration) || info.Extension && info.Generation != 0 {
			t.Errorf("%s: generation %d", w, info.Generation)
		}
		if classNames[info.Class] == "" || info.Family.String() == "invalid" || info.Dir.String() == "invalid" {
			t.Errorf("%s: class %d family %d dir %d", w, info.Class, info.Family, info.Dir)
		}
		_, isData := NewPayload(ty).(*Data)
		if ty.IsData() != isData {
			t.Errorf("%s: class data is exactly the {data} payload", w)
		}
		if NewPayload(ty) == nil && ty != TypeShutdown {
			t.Errorf("%s has no payload type", w)
		}
		if info.Flags&FlagSessionStart != 0 && !info.Dir.From(true) && !info.Extension {
			t.Errorf("%s: a core session starts from the host", w)
		}
	}
	if _, ok := LookupType("core.unknown"); ok {
		t.Fatal("core.unknown is known")
	}
	flags := map[Type]byte{TypeError: 1, TypeExecExited: 1, TypeExecFailed: 1, TypeFsResponse: 1,
		TypeTCPClosed: 1, TypeTCPFailed: 1, TypeExecRequest: 2, TypeFsRequest: 2, TypeTCPConnect: 2, TypeShutdown: 4,
		TypePong: 1, TypeTouched: 1, TypeWorkloadFrozen: 1, TypeWorkloadThawed: 1, TypeRootDiskState: 1,
		TypeStreamOpen: 2, TypeStreamClose: 1, TypePolicySet: 2, TypePolicyGet: 2, TypePolicyState: 1,
		TypeAuditFollow: 2, TypeAuditEnd: 1}
	for _, ty := range AllTypes() {
		if ty.Flags() != flags[ty] {
			t.Errorf("%s flags %d want %d", ty, ty.Flags(), flags[ty])
		}
	}
	avail := []struct {
		t   Type
		gen uint8
		ok  bool
	}{{TypeExecRequest, 1, true}, {TypeFsRequest, 1, false}, {TypeFsRequest, 2, true},
		{TypeTCPConnect, 3, false}, {TypeTCPConnect, 4, true}, {TypeError, 4, false}, {TypeError, 5, true},
		{TypePing, 5, false}, {TypePing, 6, true}, {TypeBootstrap, 6, false}, {TypeBootstrap, 7, true},
		{TypeBulkAccepted, 7, false}, {TypeBulkAccepted, 8, true}, {TypeRootDiskGrow, 8, false}, {TypeRootDiskGrow, 9, true},
		{TypeFlowCredit, 9, false}}
	for _, a := range avail {
		if a.t.AvailableAt(a.gen) != a.ok {
			t.Errorf("%s at gen %d: want %v", a.t, a.gen, a.ok)
		}
	}
	for _, ty := range AllTypes() {
		if want := ty.Info().Extension || ty.AvailableAt(Version); ty.Implemented() != want {
			t.Errorf("%s: Implemented %v", ty, ty.Implemented())
		}
	}
	// Activity (heartbeat counters): maintenance traffic is not counted, a touch is.
	for ty, want := range map[Type]bool{TypeReady: false, TypeClockSync: false, TypePing: false, TypePong: false,
		TypeTouch: true, TypeTouched: false, TypeWorkloadTransportCredit: false, TypeExecStdout: true, TypeError: true,
		TypeBulkCredit: true, Type(0): false} {
		if ty.CountsAsActivity() != want {
			t.Errorf("%s counts as activity: %v", ty, !want)
		}
	}
	if !HostToGuest.From(true) || HostToGuest.From(false) || !BothWays.From(false) || GuestToHost.From(true) {
		t.Fatal("Dir.From")
	}
}

// TestStampsOwnGeneration: every frame agentd builds carries Version, whatever the peer's;
// Negotiated is the lower of the two.
func TestStampsOwnGeneration(t *testing.T) {
	for _, b := range [][]byte{
		must(AppendMessage(nil, 1, TypeTCPEOF, []byte{0xa0})),
		must(AppendData(nil, 1, TypeTCPData, []byte("x"))),
		must(EncodeFrame(0, TypeReady, Ready{})),
	} {
		f, _, _ := ParseFrame(b)
		if m, err := DecodeMessage(f); err != nil || m.V != Version {
			t.Fatalf("v %d %v", m.V, err)
		}
	}
	if Negotiated(9, 5) != 5 || Negotiated(5, 9) != 5 || Negotiated(9, 8) != 8 {
		t.Fatal("Negotiated")
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func TestRelaySlots(t *testing.T) {
	cases := []struct {
		slot       int
		start, end uint32
	}{{0, 1, 33554431}, {1, 33554432, 67108862}, {127, 4261412738, 4294967168}}
	for _, c := range cases {
		s, e := RelaySlotRange(c.slot)
		if s != c.start || e != c.end {
			t.Errorf("slot %d: [%d,%d) want [%d,%d)", c.slot, s, e, c.start, c.end)
		}
		if RelaySlotOf(s) != c.slot && c.slot != 0 {
			t.Errorf("slot of %d = %d", s, RelaySlotOf(s))
		}
	}
	if SameRelayClient(0, 0) || !SameRelayClient(1, 33554431) || SameRelayClient(33554431, 33554432) {
		t.Fatal("SameRelayClient")
	}
	if RelaySlotOf(WorkloadControlID) != RelayMaxClients-1 || WorkloadControlID < cases[2].end {
		t.Fatal("the workload control id lies outside every slot")
	}
}
