package protocol

// Generation 9: workload freeze/thaw with guest -> host input credit, and root-disk grow.
// Freeze, thaw and their replies, transport credit and the core.error answering them use the
// reserved id WorkloadControlID; root-disk requests use an ordinary client id.

// WorkloadControlID is the host's private lifecycle channel, outside every relay slot.
const WorkloadControlID = 0xffffffff

// WorkloadTransport counts a host's input in two classes: control frames, and data (stdin,
// fs and tcp data, tcp eof, raw bulk records), in full wire bytes. As a position it is what the
// host wrote; as a credit it is the absolute limit the guest grants.
type WorkloadTransport struct {
	ControlBytes  uint64 `cbor:"control_bytes" req:"1"`
	ControlFrames uint64 `cbor:"control_frames" req:"1"`
	BulkBytes     uint64 `cbor:"bulk_bytes" req:"1"`
	BulkFrames    uint64 `cbor:"bulk_frames" req:"1"`
}

// WorkloadFreeze is core.workload.freeze (host -> guest).
type WorkloadFreeze struct {
	ExternalMountTags []string          `cbor:"external_mount_tags" req:"1"` // always sent, may be []
	AttemptID         string            `cbor:"attempt_id" req:"1"`
	HostInput         WorkloadTransport `cbor:"host_input" req:"1"`
}

// WorkloadFrozen is core.workload.frozen (guest -> host, terminal).
type WorkloadFrozen struct {
	AttemptID            string            `cbor:"attempt_id" req:"1"`
	GuestBulkBytesTarget uint64            `cbor:"guest_bulk_bytes_target" req:"1"`
	InputCredit          WorkloadTransport `cbor:"input_credit" req:"1"`
	ExternalMountsSynced bool              `cbor:"external_mounts_synced"`
}

// Thaw modes.
const (
	ThawContinue = "continue"
	ThawRestore  = "restore"
)

// WorkloadThaw is core.workload.thaw (host -> guest).
type WorkloadThaw struct {
	AttemptID string `cbor:"attempt_id" req:"1"`
	Mode      string `cbor:"mode" req:"1"`
}

// WorkloadThawed is core.workload.thawed (guest -> host, terminal).
type WorkloadThawed struct {
	AttemptID string `cbor:"attempt_id" req:"1"`
}

// Workload failure dispositions.
const (
	WorkloadUnavailable      = "unavailable"
	WorkloadRecoveryRequired = "recovery_required"
)

// WorkloadFailure is core.error's workload_failure.
type WorkloadFailure struct {
	AttemptID   string `cbor:"attempt_id" req:"1"`
	Disposition string `cbor:"disposition" req:"1"`
}

// RootDiskSize is the payload of core.root_disk.prepare and core.root_disk.grow.
type RootDiskSize struct {
	SizeBytes uint64 `cbor:"size_bytes" req:"1"`
}

// RootDiskState is core.root_disk.state (terminal).
type RootDiskState struct {
	FilesystemBytes uint64 `cbor:"filesystem_bytes" req:"1"`
	DeviceBytes     uint64 `cbor:"device_bytes" req:"1"`
}
