package protocol

import (
	"io"
	"strings"
	"testing"
)

// TestAnyGeneration: a frame is accepted whatever its v (hosts stamp 9, the TypeScript client
// 5); only a v that is not a u8 is malformed, as in the reference.
func TestAnyGeneration(t *testing.T) {
	for _, v := range []uint8{0, 1, 5, 7, 9, 23, 24, 200, 255} {
		wire := must(AppendMessageV(nil, v, 3, TypePing, []byte{0xa0}))
		f, _, _ := ParseFrame(wire)
		m, err := DecodeMessage(f)
		if err != nil || m.V != v || m.Type != TypePing {
			t.Fatalf("v %d: %+v %v", v, m, err)
		}
	}
}

func TestFrameType(t *testing.T) {
	cases := []struct {
		name string
		f    Frame
		want Type
	}{
		{"canonical", frameOf(must(AppendMessageV(nil, 9, 1, TypeStreamData, []byte{0xa1, 0x64, 'd', 'a', 't', 'a', 0x40}))), TypeStreamData},
		{"non-canonical envelope", Frame{ID: 1, Body: mustHex("b90003 6176 05 6174 6d636f72652e696e69742e61636b 6170 41a0")}, TypeInitAck},
		{"bulk record", frameOf(must(AppendBulkRecord(nil, BulkRecord{1, BulkTCP, BulkGuestToHost, 0, []byte("x")}))), 0},
		{"msbl", frameOf(AppendRangeLease(nil, RangeLease{Event: LeaseConnected, IDStart: 1, IDEnd: RelayIDRangeStep})), 0},
		{"unknown type", Frame{ID: 1, Body: mustHex("a3 6176 05 6174 6c636f72652e756e6b6e6f776e 6170 41a0")}, 0},
		{"empty", Frame{ID: 1}, 0},
		{"garbage", Frame{ID: 1, Body: []byte{0xbf, 0xff, 0xff}}, 0},
	}
	for _, c := range cases {
		if got := FrameType(c.f); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	f := cases[0].f
	if n := testing.AllocsPerRun(100, func() { FrameType(f) }); n != 0 {
		t.Fatalf("%v allocs", n)
	}
}

func frameOf(b []byte) Frame {
	f, _, err := ParseFrame(b)
	if err != nil {
		panic(err)
	}
	return f
}

func TestBulkRecordErrors(t *testing.T) {
	ok := must(AppendBulkRecord(nil, BulkRecord{7, BulkTCP, BulkGuestToHost, 5, []byte("abc")}))
	mutate := func(i int, b byte) Frame {
		w := append([]byte(nil), ok...)
		w[i] = b
		return frameOf(w)
	}
	cases := []struct {
		name string
		f    Frame
		err  string
	}{
		{"not bulk", Frame{ID: 7, Flags: 0, Body: ok[9:]}, "not a raw bulk record"},
		{"combined flags", Frame{ID: 7, Flags: FlagBulk | FlagTerminal, Body: ok[9:]}, "not a raw bulk record"},
		{"header only", Frame{ID: 7, Flags: FlagBulk, Body: ok[9:21]}, "want a 12-byte header and a payload"},
		{"id 0", Frame{ID: 0, Flags: FlagBulk, Body: ok[9:]}, "id 0"},
		{"kind", mutate(9, 3), "unknown kind 3"},
		{"flow", mutate(10, 0), "unknown flow 0"},
		{"reserved", mutate(12, 1), "reserved bytes"},
		{"overflow", Frame{ID: 7, Flags: FlagBulk, Body: append(mustHex("0201 0000 ffffffffffffffff"), 'x')}, "overflows"},
	}
	for _, c := range cases {
		if _, err := ParseBulkRecord(c.f); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v, want %q", c.name, err, c.err)
		}
	}
	if _, err := ParseBulkRecord(frameOf(ok)); err != nil {
		t.Fatal(err)
	}
	for _, r := range []BulkRecord{{0, BulkTCP, BulkHostToGuest, 0, []byte("x")}, {1, BulkTCP, BulkHostToGuest, 0, nil},
		{1, BulkTCP, BulkHostToGuest, 0, make([]byte, BulkMaxRecordPayload+1)}, {1, 9, BulkHostToGuest, 0, []byte("x")}} {
		if _, err := AppendBulkRecord(nil, r); err == nil {
			t.Errorf("encoded an invalid record %d %d %d len %d", r.ID, r.Kind, r.Flow, len(r.Payload))
		}
	}
	// The largest record fits in a frame, and the frame reader takes it.
	big := must(AppendBulkRecord(nil, BulkRecord{1, BulkFS, BulkHostToGuest, 0, make([]byte, BulkMaxRecordPayload)}))
	if _, err := ParseBulkRecord(frameOf(big)); err != nil || len(big) > MaxWireFrame {
		t.Fatal(err)
	}
}

func TestTransportRecordErrors(t *testing.T) {
	s1, e1 := RelaySlotRange(1)
	good := AppendRangeLease(nil, RangeLease{LeaseConnected, s1, e1, seqID(1)})
	set := func(i int, b byte) Frame {
		w := append([]byte(nil), good...)
		w[i] = b
		return frameOf(w)
	}
	for name, c := range map[string]struct {
		f   Frame
		err string
	}{
		"format":    {set(13, 2), "format 2"},
		"event":     {set(14, 3), "unknown event 3"},
		"reserved":  {set(16, 1), "reserved"},
		"range":     {set(24, 0xff), "not a relay slot's range"},
		"zero":      {frameOf(AppendRangeLease(nil, RangeLease{Event: LeaseConnected})), "not a relay slot's range"},
		"short":     {Frame{Body: good[9:40]}, "31 body bytes"},
		"not msbl":  {Frame{ID: 1, Body: good[9:]}, "not an MSBL record"},
		"bad magic": {set(9, 'X'), "not an MSBL record"},
	} {
		if _, err := ParseRangeLease(c.f); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v, want %q", name, err, c.err)
		}
	}
	hello := AppendBulkBinding(nil, BulkBinding{ConnectionID: seqID(0xa0)})
	for name, c := range map[string]struct {
		i   int
		b   byte
		err string
	}{"magic": {3, 'X', "magic"}, "format": {4, 2, "format 2"}, "generation": {5, 7, "generation 7"}, "reserved": {7, 1, "reserved"}} {
		w := append([]byte(nil), hello...)
		w[c.i] = c.b
		if _, err := ParseBulkBinding(w); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("binding %s: %v", name, err)
		}
	}
	if _, err := ParseBulkBinding(hello[:23]); err != io.ErrUnexpectedEOF {
		t.Fatal(err)
	}
	lane := must(AppendLanePacket(nil, seqID(1), BulkRecord{7, BulkTCP, BulkGuestToHost, 0, []byte("hi")}))
	if _, _, _, err := ParseLanePacket(lane[:len(lane)-1]); err != io.ErrUnexpectedEOF {
		t.Fatalf("partial lane packet: %v", err)
	}
	inc := seqID(1)
	cbor := append(inc[:], must(AppendMessage(nil, 7, TypeTCPEOF, []byte{0xa0}))...)
	if _, _, _, err := ParseLanePacket(cbor); err == nil || !strings.Contains(err.Error(), "only raw bulk records") {
		t.Fatalf("CBOR on the lane: %v", err)
	}
}

func TestBulkOfferValidate(t *testing.T) {
	for _, o := range []BulkOffer{BulkOfferTCP, BulkOfferFSRead, BulkOfferFSWrite, {1, BulkMinRecordPayload, BulkMaxWindow}} {
		if err := o.Validate(); err != nil {
			t.Errorf("%+v: %v", o, err)
		}
	}
	for o, want := range map[BulkOffer]string{
		{2, BulkDefaultRecordPayload, 1}:                 "format 2",
		{1, BulkMinRecordPayload - 1, 1}:                 "max_record_payload",
		{1, BulkMaxRecordPayload + 1, 1}:                 "max_record_payload",
		{1, BulkDefaultRecordPayload, BulkMaxWindow + 1}: "maximum window",
	} {
		if err := o.Validate(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%+v: %v, want %q", o, err, want)
		}
	}
}

// TestGen9PayloadDecoding covers shapes other encoders may send and the errors that name the
// offending key.
func TestGen9PayloadDecoding(t *testing.T) {
	cases := []struct {
		name string
		typ  Type
		p    string
		err  string // "" = ok
	}{
		{"ping extra keys", TypePing, "a1 6178 01", ""},
		{"ping not a map", TypePing, "80", "cannot unmarshal"},
		{"touched missing seq", TypeTouched, "a0", "missing field `activity_seq`"},
		{"tcp connect bulk null", TypeTCPConnect, "a3 64686f7374 6161 64706f7274 1850 6462756c6b f6", ""},
		{"tcp connect bulk missing format", TypeTCPConnect, "a3 64686f7374 6161 64706f7274 1850 6462756c6b a0", "bulk: missing field `format`"},
		{"fs bulk null", TypeFsRequest, "a2 626f70 a1 6452656164 a2 6668616e646c65 01 666f6666736574 00 6462756c6b f6", ""},
		{"fs bulk bad", TypeFsRequest, "a2 626f70 a1 6452656164 a2 6668616e646c65 01 666f6666736574 00 6462756c6b a0", "bulk: missing field `format`"},
		{"mkdir user string", TypeFsRequest, "a1 626f70 a1 654d6b646972 a2 6470617468 622f77 6475736572 6472 6f6f74", ""},
		{"mkdir user number", TypeFsRequest, "a1 626f70 a1 654d6b646972 a2 6470617468 622f77 6475736572 01", "cannot unmarshal"},
		{"incarnation as bstr", TypeRelayClientDisconnected, "a3 6869645f7374617274 01 7069645f656e645f6578636c7573697665 1a01ffffff 6b696e6361726e6174696f6e 50 000102030405060708090a0b0c0d0e0f", ""},
		{"incarnation short", TypeRelayClientDisconnected, "a3 6869645f7374617274 01 7069645f656e645f6578636c7573697665 1a01ffffff 6b696e6361726e6174696f6e 83 010203", "3 elements, want 16"},
		{"incarnation element too big", TypeRelayClientDisconnected, "a3 6869645f7374617274 01 7069645f656e645f6578636c7573697665 1a01ffffff 6b696e6361726e6174696f6e 90 190100 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f", "element 0 is 256"},
		{"frozen synced defaults false", TypeWorkloadFrozen, "a3 6a617474656d70745f6964 626131 7767756573745f62756c6b5f62797465735f746172676574 00 6c696e7075745f637265646974 a4 6d636f6e74726f6c5f6279746573 00 6e636f6e74726f6c5f6672616d6573 00 6a62756c6b5f6279746573 00 6b62756c6b5f6672616d6573 00", ""},
		{"freeze missing tags", TypeWorkloadFreeze, "a1 6a617474656d70745f6964 626131", "missing field `external_mount_tags`"},
		{"root disk size", TypeRootDiskGrow, "a1 6a73697a655f6279746573 1b0000000100000000", ""},
		{"bootstrap empty map", TypeBootstrap, "a0", ""},
		{"bootstrap unknown keys", TypeBootstrap, "a1 6a62726f6b65725f6b6579 6178", ""},
		{"bootstrap unknown root kind", TypeBootstrap, "a1 6a626c6f636b5f726f6f74 a1 646b696e64 636e6673", "unknown variant `nfs`"},
		{"bootstrap root without kind", TypeBootstrap, "a1 6a626c6f636b5f726f6f74 a0", "missing field `kind`"},
		{"bootstrap disk-image without device", TypeBootstrap, "a1 6a626c6f636b5f726f6f74 a1 646b696e64 6a6469736b2d696d616765", "missing field `device`"},
		{"bootstrap upper without fstype", TypeBootstrap, "a1 6a626c6f636b5f726f6f74 a3 646b696e64 696f63692d65726f6673 656c6f776572 612f 657570706572 a2 646b696e64 66646576696365 66646576696365 612f", "missing field `fstype`"},
		{"bootstrap unknown profile", TypeBootstrap, "a1 7073656375726974795f70726f66696c65 68706172616e6f6964", "unknown variant `paranoid`"},
		{"bootstrap mount missing path", TypeBootstrap, "a1 6a6469725f6d6f756e7473 81 a1 63746167 6161", "dir_mounts[0]: missing field `guest_path`"},
		{"bootstrap network missing mtu", TypeBootstrap, "a1 676e6574776f726b a2 69696e74657266616365 6465746830 636d6163 86 00 00 00 00 00 00", "network: missing field `mtu`"},
		{"bootstrap mac wrong length", TypeBootstrap, "a1 676e6574776f726b a3 69696e74657266616365 6465746830 636d6163 85 00 00 00 00 00 636d7475 1905dc", "network.mac: MAC address: 5 elements, want 6"},
		{"bootstrap ipv4 as a string", TypeBootstrap, "a1 676e6574776f726b a4 69696e74657266616365 6465746830 636d6163 86 00 00 00 00 00 00 636d7475 1905dc 6469707634 a3 6761646472657373 68 31302e302e302e32 6a7072656669785f6c656e 18 18 6767617465776179 84 0a 00 00 01", "network.ipv4.address: IPv4 address"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := DecodePayload(c.typ, mustHex(c.p))
			if c.err == "" {
				if err != nil {
					t.Fatalf("unexpected %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("got %v, want an error containing %q", err, c.err)
			}
		})
	}
}

func TestDecodeBootstrapFrame(t *testing.T) {
	p := must(Marshal(Bootstrap{Hostname: strp("box")}))
	good := must(AppendMessageV(nil, 9, 0, TypeBootstrap, p))
	b, err := DecodeBootstrapFrame(frameOf(good))
	if err != nil || *b.Hostname != "box" || b.SecurityProfile != SecurityDefault {
		t.Fatalf("%+v %v", b, err)
	}
	withID := append([]byte(nil), good...)
	withID[7] = 1
	withFlags := append([]byte(nil), good...)
	withFlags[8] = FlagTerminal
	for name, c := range map[string]struct {
		wire []byte
		err  string
	}{
		"id":      {withID, "requires id=0 and flags=0, got id=1 flags=0"},
		"flags":   {withFlags, "got id=0 flags=1"},
		"type":    {must(AppendMessageV(nil, 9, 0, TypeInitAck, []byte{0xa0})), "expected core.bootstrap as first console frame, got core.init.ack"},
		"old v":   {must(AppendMessageV(nil, 6, 0, TypeBootstrap, p)), "requires protocol generation 7 or newer, got 6"},
		"payload": {must(AppendMessageV(nil, 9, 0, TypeBootstrap, []byte{0x01})), "decode guest bootstrap payload"},
		"unknown": {append(mustHex("0000001c 00000000 00"), mustHex("a3 6176 09 6174 6c636f72652e756e6b6e6f776e 6170 41a0")...), "unknown message type"},
	} {
		if _, err := DecodeBootstrapFrame(frameOf(c.wire)); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v, want %q", name, err, c.err)
		}
	}
	if _, err := DecodeBootstrapFrame(frameOf(must(AppendMessageV(nil, 200, 0, TypeBootstrap, p)))); err != nil {
		t.Fatalf("a newer generation is accepted: %v", err)
	}
}

func TestNull(t *testing.T) {
	for _, c := range []struct {
		v    FsMkdir
		want string
	}{
		{FsMkdir{Path: "/w"}, "a2 6470617468 622f77 646d6f6465 f6"},
		{FsMkdir{Path: "/w", User: Null[string]{Present: true}}, "a3 6470617468 622f77 646d6f6465 f6 6475736572 f6"},
		{FsMkdir{Path: "/w", User: NullOf("root")}, "a3 6470617468 622f77 646d6f6465 f6 6475736572 64726f6f74"},
	} {
		b := must(Marshal(c.v))
		if want := mustHex(c.want); string(b) != string(want) {
			t.Errorf("%+v: %x want %x", c.v, b, want)
		}
		var back FsMkdir
		if err := Unmarshal(b, &back); err != nil || back.User.Present != c.v.User.Present ||
			(back.User.Value == nil) != (c.v.User.Value == nil) {
			t.Errorf("%x: %+v %v", b, back, err)
		}
	}
}
