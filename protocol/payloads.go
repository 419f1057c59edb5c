package protocol

import "fmt"

// NewPayload returns a pointer to a fresh payload value of type t, with the reference's decode
// defaults applied, or nil for core.shutdown (whose payload is never decoded).
func NewPayload(t Type) any {
	switch t {
	case TypeReady:
		return &Ready{}
	case TypeInitResolved:
		return &InitResolved{}
	case TypeInitAck:
		return &InitAck{}
	case TypeRelayClientDisconnected:
		return &RelayClientDisconnected{}
	case TypeClockSync:
		return &ClockSync{}
	case TypeError:
		return &CoreError{}
	case TypeExecRequest:
		return &ExecRequest{Rows: DefaultRows, Cols: DefaultCols}
	case TypeExecStarted:
		return &ExecStarted{}
	case TypeExecStdin, TypeExecStdout, TypeExecStderr, TypeFsData, TypeTCPData, TypeStreamData:
		return &Data{} // every ClassData type (TestTypeTable checks)
	case TypeExecStdinError:
		return &ExecStdinError{}
	case TypeExecExited:
		return &ExecExited{}
	case TypeExecFailed:
		return &ExecFailed{}
	case TypeExecResize:
		return &ExecResize{}
	case TypeExecSignal:
		return &ExecSignal{}
	case TypeFsRequest:
		return &FsRequest{}
	case TypeFsResponse:
		return &FsResponse{}
	case TypeTCPConnect:
		return &TCPConnect{}
	case TypeTCPConnected:
		return &TCPConnected{}
	case TypeTCPEOF, TypeTCPClose, TypeTCPClosed, TypePing, TypePong, TypeTouch:
		return &Empty{}
	case TypeTouched:
		return &Touched{}
	case TypeBootstrap:
		return &Bootstrap{}
	case TypeBulkAccepted:
		return &BulkAccepted{}
	case TypeBulkCredit:
		return &BulkCredit{}
	case TypeBulkFinish:
		return &BulkFinish{}
	case TypeBulkCancel:
		return &BulkCancel{}
	case TypeWorkloadFreeze:
		return &WorkloadFreeze{}
	case TypeWorkloadFrozen:
		return &WorkloadFrozen{}
	case TypeWorkloadThaw:
		return &WorkloadThaw{}
	case TypeWorkloadThawed:
		return &WorkloadThawed{}
	case TypeWorkloadTransportCredit:
		return &WorkloadTransport{}
	case TypeRootDiskPrepare, TypeRootDiskGrow:
		return &RootDiskSize{}
	case TypeRootDiskState:
		return &RootDiskState{}
	case TypeTCPFailed:
		return &TCPFailed{}
	case TypeFlowCredit:
		return &FlowCredit{}
	case TypeStreamOpen:
		return &StreamOpen{}
	case TypeStreamOpened:
		return &StreamOpened{}
	case TypeStreamEOF:
		return &Empty{}
	case TypeStreamClose:
		return &StreamClose{}
	case TypeStreamCredit:
		return &StreamCredit{}
	case TypePolicySet:
		return &PolicySet{}
	case TypePolicyGet:
		return &PolicyGet{}
	case TypePolicyState:
		return &PolicyState{}
	case TypeAuditRecords:
		return &AuditRecords{}
	case TypeAuditFollow:
		return &AuditFollow{}
	case TypeAuditEnd:
		return &AuditEnd{}
	}
	return nil
}

// DecodePayload decodes p as the payload of type t. Data payloads alias p.
func DecodePayload(t Type, p []byte) (any, error) {
	v := NewPayload(t)
	if v == nil {
		if t.Valid() {
			return nil, nil
		}
		return nil, fmt.Errorf("no payload type for %v", t)
	}
	if d, ok := v.(*Data); ok {
		b, err := DecodeData(p)
		d.Data = b
		return d, err
	}
	return v, Unmarshal(p, v)
}
