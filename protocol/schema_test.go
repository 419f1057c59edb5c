package protocol

import (
	"encoding/json"
	"flag"
	"os"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata snapshots")

type schemaType struct {
	Type       string `json:"type"`
	Flags      byte   `json:"flags"`
	Generation uint8  `json:"generation"`
}

type schema struct {
	Version          int          `json:"version"`
	HeaderSize       int          `json:"header_size"`
	MaxFrameSize     int          `json:"max_frame_size"`
	FlagTerminal     byte         `json:"flag_terminal"`
	FlagSessionStart byte         `json:"flag_session_start"`
	FlagShutdown     byte         `json:"flag_shutdown"`
	MessageTypes     []schemaType `json:"message_types"`
	Extensions       []schemaType `json:"extensions"`
}

func currentSchema() schema {
	s := schema{Version, HeaderSize, MaxFrameSize, FlagTerminal, FlagSessionStart, FlagShutdown, nil, nil}
	for _, t := range AllTypes() {
		i := t.Info()
		st := schemaType{i.Wire, i.Flags, i.Generation}
		if i.Extension {
			s.Extensions = append(s.Extensions, st)
		} else {
			s.MessageTypes = append(s.MessageTypes, st)
		}
	}
	return s
}

// TestSchemaSnapshot pins the type table: wire strings, flags, generations and order. A change
// here is a wire change: the snapshot must only ever grow (append-only).
func TestSchemaSnapshot(t *testing.T) {
	got, _ := json.MarshalIndent(currentSchema(), "", "  ")
	got = append(got, '\n')
	const path = "testdata/schema-gen5.json"
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

func TestTypeTable(t *testing.T) {
	if n := len(CoreTypes()); n != 27 {
		t.Fatalf("%d core types, want 27", n)
	}
	seen := map[string]bool{}
	for _, ty := range AllTypes() {
		w := ty.String()
		if seen[w] {
			t.Fatalf("duplicate wire string %s", w)
		}
		seen[w] = true
		back, ok := LookupType(w)
		if !ok || back != ty {
			t.Fatalf("%s does not round-trip", w)
		}
		if ty.Info().Extension == (w[:5] == "core.") {
			t.Fatalf("%s: extension types must live outside core.*", w)
		}
		if !ty.Info().Extension && ty.Info().Generation > Version {
			t.Fatalf("%s not sendable to a current peer", w)
		}
	}
	if _, ok := LookupType("core.unknown"); ok {
		t.Fatal("core.unknown is known")
	}
	flags := map[Type]byte{TypeError: 1, TypeExecExited: 1, TypeExecFailed: 1, TypeFsResponse: 1,
		TypeTCPClosed: 1, TypeTCPFailed: 1, TypeExecRequest: 2, TypeFsRequest: 2, TypeTCPConnect: 2, TypeShutdown: 4,
		TypeStreamOpen: 2, TypeStreamClose: 1}
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
		{TypeFlowCredit, 5, false}}
	for _, a := range avail {
		if a.t.AvailableAt(a.gen) != a.ok {
			t.Errorf("%s at gen %d: want %v", a.t, a.gen, a.ok)
		}
	}
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
}
