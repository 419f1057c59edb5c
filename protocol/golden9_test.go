package protocol

import (
	"bytes"
	"reflect"
	"testing"
)

// gen9Value is what one line of testdata/golden-gen6-9.txt (Appendix A of the current
// contract) holds, as a Go value: a payload with its envelope's v, or a binary record.
type gen9Value struct {
	v       uint8
	payload any
}

func strp(s string) *string { return &s }
func u32p(v uint32) *uint32 { return &v }

func seqID(from byte) ID16 {
	var id ID16
	for i := range id {
		id[i] = from + byte(i)
	}
	return id
}

// gen9Values follows the file line by line.
var gen9Values = func() []gen9Value {
	inc, conn := seqID(0x10), seqID(0xa0)
	slot1, end1 := RelaySlotRange(1)
	v4 := &BootstrapIPv4{Address: IPv4Addr{172, 16, 0, 2}, PrefixLen: 30, Gateway: IPv4Addr{172, 16, 0, 1}, DNS: &IPv4Addr{172, 16, 0, 1}}
	v6 := &BootstrapIPv6{Address: IPv6Addr{0xfd, 0x42, 0x6d, 0x73, 0, 0x62, 15: 2}, PrefixLen: 64,
		Gateway: IPv6Addr{0xfd, 0x42, 0x6d, 0x73, 0, 0x62, 15: 1}, DNS: &IPv6Addr{0xfd, 0x42, 0x6d, 0x73, 0, 0x62, 15: 1}}
	network := &BootstrapNetwork{Interface: "eth0", MAC: MAC{2, 0, 0, 0, 0, 2}, MTU: 1500, IPv4: v4, IPv6: v6}
	alias := strp("host.microsandbox.internal")
	credit := WorkloadTransport{8 << 20, 256, 32 << 20, 256}
	return []gen9Value{
		{9, Empty{}},
		{9, Empty{}},
		{9, Empty{}},
		{9, Touched{42}},
		{7, Empty{}},
		{9, Bootstrap{SecurityProfile: SecurityDefault}},
		{9, Bootstrap{HostAlias: alias, Network: network,
			DefaultEnv: []EnvVar{{"PATH", "/usr/local/bin:/usr/bin:/bin"}}, SecurityProfile: SecurityDefault}},
		{9, Bootstrap{BlockRoot: &BootstrapBlockRoot{Kind: BlockRootDiskImage, Device: "/dev/vda"},
			User: strp("1000:1000"), DefaultCwd: strp("/app"), SecurityProfile: SecurityDefault}},
		{9, Bootstrap{BlockRoot: &BootstrapBlockRoot{Kind: BlockRootReadOnlyVirtiofs}, SecurityProfile: SecurityDefault}},
		{9, everyFieldBootstrap(network, alias)},
		{7, Ready{BootTimeNs: 1, InitTimeNs: 2, ReadyTimeNs: 3, AgentVersion: "0.5.7"}},
		{9, Ready{BootTimeNs: 1, InitTimeNs: 2, ReadyTimeNs: 3, AgentVersion: "0.7.8", RelayLease: &RelayLease{1},
			WorkloadTransportBarrierVersion: WorkloadBarrierVersion}},
		{9, Ready{BootTimeNs: 1, InitTimeNs: 2, ReadyTimeNs: 3, AgentVersion: "0.7.8",
			BulkTransport: &BulkTransport{DualPortProfile, BulkPortName, conn}, RelayLease: &RelayLease{1},
			WorkloadTransportBarrierVersion: WorkloadBarrierVersion}},
		{9, RelayClientDisconnected{slot1, end1, &inc}},
		{9, RelayClientDisconnected{1, RelayIDRangeStep, nil}},
		{9, CoreError{Kind: KindCapabilityUnavailable, Message: "x", OffendingType: "core.root_disk.grow"}},
		{9, CoreError{Kind: KindInvalidSession, Message: "x", OffendingType: "core.workload.freeze",
			WorkloadFailure: &WorkloadFailure{"a1", WorkloadRecoveryRequired}}},
		{9, TCPConnect{Host: "127.0.0.1", Port: 8080, Bulk: &BulkOfferTCP}},
		{8, BulkAccepted{BulkTCP, 3, 1, BulkDefaultRecordPayload, BulkDefaultWindow, BulkDefaultWindow}},
		{9, FsRequest{Op: &FsRead{Handle: 1}, Bulk: &BulkOfferFSRead}},
		{8, BulkAccepted{BulkFS, BulkGuestToHost.Bit(), 1, BulkDefaultFSRecordPayload, 0, BulkDefaultWindow}},
		{8, BulkCredit{BulkTCP, BulkHostToGuest, 4 << 20, 12 << 20}},
		{8, BulkFinish{BulkTCP, BulkGuestToHost, 2}},
		{9, BulkCancel{BulkTCP, BulkCancelCaller, "x"}},
		{0, BulkRecord{7, BulkTCP, BulkGuestToHost, 0, []byte("hi")}},
		{0, BulkRecord{9, BulkFS, BulkHostToGuest, 3 << 20, []byte{0}}},
		{9, WorkloadFreeze{ExternalMountTags: []string{}, AttemptID: "a1", HostInput: WorkloadTransport{1000, 10, 0, 0}}},
		{9, WorkloadFrozen{"a1", 0, credit, true}},
		{9, WorkloadThaw{"a1", ThawContinue}},
		{9, WorkloadThawed{"a1"}},
		{9, credit},
		{9, RootDiskSize{4 << 30}},
		{9, RootDiskSize{4 << 30}},
		{9, RootDiskState{4 << 30, 4 << 30}},
		{9, FsRequest{Op: &FsMkdir{Path: "/w", User: Null[string]{Present: true}}}},
		{0, RangeLease{LeaseConnected, slot1, end1, inc}},
		{0, RangeLease{LeaseDisconnectedAck, slot1, end1, inc}},
		{0, BulkBinding{false, conn}},
		{0, BulkBinding{true, conn}},
		{0, lanePacket{inc, BulkRecord{7, BulkTCP, BulkGuestToHost, 0, []byte("hi")}}},
	}
}()

type lanePacket struct {
	inc ID16
	r   BulkRecord
}

// everyFieldBootstrap is the value of the reference's test
// guest_bootstrap_round_trips_transport_sensitive_values.
func everyFieldBootstrap(network *BootstrapNetwork, alias *string) Bootstrap {
	return Bootstrap{
		BlockRoot:       &BootstrapBlockRoot{Kind: BlockRootOCIErofs, Lower: "/dev/vda", Upper: &BootstrapUpper{Kind: UpperTmpfs, SizeMiB: u32p(512)}},
		DirMounts:       []BootstrapDirMount{{"workspace", "/workspace:with separators", MountFlags{NoExec: true}}},
		FileMounts:      []BootstrapFileMount{{"config", "app.json", "/etc/app.json", MountFlags{ReadOnly: true}}},
		DiskMounts:      []BootstrapDiskMount{{"data", "/data", strp("ext4"), MountFlags{}}},
		TmpfsMounts:     []BootstrapTmpfs{{"/tmp", u32p(64), u32p(0o1777), MountFlags{}}},
		Hostname:        strp("quoted-env-test"),
		HostAlias:       alias,
		Network:         network,
		Rlimits:         []ExecRlimit{{"nofile", 1024, 4096}},
		User:            strp("1000:1000"),
		DefaultCwd:      strp("/workspace with spaces"),
		DefaultEnv:      []EnvVar{{"APP_CONFIG", `{"message":"hello"}`}, {"UNICODE", "snowman: \u2603\nnext\tcolumn"}, {"EMPTY", ""}},
		SecurityProfile: SecurityRestricted,
		HandoffInit: &BootstrapHandoff{Cmd: "/sbin/init", Args: []string{"--unit=multi user.target"},
			Cwd: strp("/workspace with spaces"), Env: []EnvVar{{"HANDOFF_JSON", `{"enabled":true}`}}},
	}
}

// TestGoldenGen9 checks every frame of Appendix A both ways: the Go value encodes to exactly
// the frame, and the frame decodes to exactly the value (and re-encodes to itself).
func TestGoldenGen9(t *testing.T) {
	golden := readGolden(t, "testdata/golden-gen6-9.txt")
	if len(golden) != len(gen9Values) {
		t.Fatalf("%d golden frames, %d values", len(golden), len(gen9Values))
	}
	for i, g := range golden {
		want := gen9Values[i]
		t.Run(g.name, func(t *testing.T) {
			switch v := want.payload.(type) {
			case BulkRecord:
				enc, err := AppendBulkRecord(nil, v)
				eq(t, "encode", enc, g.wire, err)
				f, n, err := ParseFrame(g.wire)
				if err != nil || n != len(g.wire) {
					t.Fatal(n, err)
				}
				got, err := ParseBulkRecord(f)
				same(t, got, v, err)
				if FrameType(f) != 0 {
					t.Fatal("a raw record has no message type")
				}
			case RangeLease:
				eq(t, "encode", AppendRangeLease(nil, v), g.wire, nil)
				f, _, err := ParseFrame(g.wire)
				if err != nil || !IsRangeLease(f) || FrameType(f) != 0 {
					t.Fatalf("%v %v %v", err, IsRangeLease(f), FrameType(f))
				}
				got, err := ParseRangeLease(f)
				same(t, got, v, err)
			case BulkBinding:
				eq(t, "encode", AppendBulkBinding(nil, v), g.wire, nil)
				got, err := ParseBulkBinding(g.wire)
				same(t, got, v, err)
			case lanePacket:
				enc, err := AppendLanePacket(nil, v.inc, v.r)
				eq(t, "encode", enc, g.wire, err)
				inc, r, n, err := ParseLanePacket(g.wire)
				same(t, lanePacket{inc, r}, v, err)
				if n != len(g.wire) {
					t.Fatalf("used %d of %d", n, len(g.wire))
				}
			default:
				typ, ok := LookupType(g.name)
				if !ok {
					t.Fatalf("unknown type %s", g.name)
				}
				p, err := Marshal(v)
				if err != nil {
					t.Fatal(err)
				}
				enc, err := AppendMessageV(nil, want.v, g.id, typ, p)
				eq(t, "encode", enc, g.wire, err)
				f, _, err := ParseFrame(g.wire)
				if err != nil {
					t.Fatal(err)
				}
				if FrameType(f) != typ {
					t.Fatalf("FrameType %v", FrameType(f))
				}
				m, err := DecodeMessage(f)
				if err != nil || m.Type != typ || m.V != want.v || m.ID != g.id || m.Flags != typ.Flags() {
					t.Fatalf("envelope %+v %v", m, err)
				}
				got, err := DecodePayload(typ, m.Payload)
				if err != nil {
					t.Fatal(err)
				}
				same(t, reflect.ValueOf(got).Elem().Interface(), v, nil)
				re, err := Marshal(reflect.ValueOf(got).Elem().Interface())
				eq(t, "re-encode", re, m.Payload, err)
			}
		})
	}
}

func eq(t *testing.T, what string, got, want []byte, err error) {
	t.Helper()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s (%v):\n got %x\nwant %x", what, err, got, want)
	}
}

func same(t *testing.T, got, want any, err error) {
	t.Helper()
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("decode (%v):\n got %+v\nwant %+v", err, got, want)
	}
}
