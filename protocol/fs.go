package protocol

import (
	"fmt"

	"github.com/fxamacker/cbor/v2"
)

// FsRequest is core.fs.request (host -> guest, session start): {"op": {"<Variant>": {...}}},
// plus from generation 8 an optional "bulk" offer for a Read or a Write.
type FsRequest struct {
	Op   FsOp
	Bulk *BulkOffer
}

// FsOp is one filesystem operation. Its name is the reference's Rust variant name, verbatim.
type FsOp interface{ FsOpName() string }

// The FsOp variants, in the reference's declaration order.
type (
	FsRealPath struct {
		Path string `cbor:"path" req:"1"`
	}
	FsStat struct {
		Path          string `cbor:"path" req:"1"`
		FollowSymlink bool   `cbor:"follow_symlink" req:"1"`
	}
	FsSetStat struct {
		Path          string     `cbor:"path" req:"1"`
		FollowSymlink bool       `cbor:"follow_symlink" req:"1"`
		Attrs         FsSetAttrs `cbor:"attrs" req:"1"`
	}
	FsList struct {
		Path string `cbor:"path" req:"1"`
	}
	FsReadLink struct {
		Path string `cbor:"path" req:"1"`
	}
	FsSymlink struct {
		Target   string `cbor:"target" req:"1"`
		LinkPath string `cbor:"link_path" req:"1"`
		// User (user[:group]) owns what the op creates; absent or null means root. The newest
		// hosts always send the key.
		User Null[string] `cbor:"user,omitzero"`
	}
	FsMkdir struct {
		Path string       `cbor:"path" req:"1"`
		Mode *uint32      `cbor:"mode"`
		User Null[string] `cbor:"user,omitzero"`
	}
	FsRemove struct {
		Path string `cbor:"path" req:"1"`
	}
	FsRemoveDir struct {
		Path      string `cbor:"path" req:"1"`
		Recursive bool   `cbor:"recursive" req:"1"`
	}
	FsCopy struct {
		Src string `cbor:"src" req:"1"`
		Dst string `cbor:"dst" req:"1"`
	}
	FsRename struct {
		Src string `cbor:"src" req:"1"`
		Dst string `cbor:"dst" req:"1"`
	}
	FsOpenFile struct {
		Path    string        `cbor:"path" req:"1"`
		Options FsOpenOptions `cbor:"options" req:"1"`
	}
	FsOpenDir struct {
		Path string `cbor:"path" req:"1"`
	}
	FsCloseHandle struct {
		Handle uint64 `cbor:"handle" req:"1"`
	}
	FsRead struct {
		Handle uint64  `cbor:"handle" req:"1"`
		Offset uint64  `cbor:"offset" req:"1"`
		Len    *uint64 `cbor:"len"`
		// Window opts the stream into agentd's flow control (ext.go): the fs.data bytes the
		// host can take before it grants more.
		Window uint32 `cbor:"window,omitempty"`
	}
	FsWrite struct {
		Handle uint64  `cbor:"handle" req:"1"`
		Offset uint64  `cbor:"offset" req:"1"`
		Len    *uint64 `cbor:"len"`
		// Window (any non-zero value) opts the stream into flow control: agentd then grants
		// fs.data credit, starting with one agentd.flow.credit right after the request.
		Window uint32 `cbor:"window,omitempty"`
	}
	FsReadDir struct {
		Handle uint64  `cbor:"handle" req:"1"`
		Limit  *uint32 `cbor:"limit"`
	}
	FsFStat struct {
		Handle uint64 `cbor:"handle" req:"1"`
	}
	FsFSetStat struct {
		Handle uint64     `cbor:"handle" req:"1"`
		Attrs  FsSetAttrs `cbor:"attrs" req:"1"`
	}
)

func (FsRealPath) FsOpName() string    { return "RealPath" }
func (FsStat) FsOpName() string        { return "Stat" }
func (FsSetStat) FsOpName() string     { return "SetStat" }
func (FsList) FsOpName() string        { return "List" }
func (FsReadLink) FsOpName() string    { return "ReadLink" }
func (FsSymlink) FsOpName() string     { return "Symlink" }
func (FsMkdir) FsOpName() string       { return "Mkdir" }
func (FsRemove) FsOpName() string      { return "Remove" }
func (FsRemoveDir) FsOpName() string   { return "RemoveDir" }
func (FsCopy) FsOpName() string        { return "Copy" }
func (FsRename) FsOpName() string      { return "Rename" }
func (FsOpenFile) FsOpName() string    { return "OpenFile" }
func (FsOpenDir) FsOpName() string     { return "OpenDir" }
func (FsCloseHandle) FsOpName() string { return "CloseHandle" }
func (FsRead) FsOpName() string        { return "Read" }
func (FsWrite) FsOpName() string       { return "Write" }
func (FsReadDir) FsOpName() string     { return "ReadDir" }
func (FsFStat) FsOpName() string       { return "FStat" }
func (FsFSetStat) FsOpName() string    { return "FSetStat" }

// fsOpNew makes an empty op of each variant for decoding.
var fsOpNew = map[string]func() FsOp{
	"RealPath": func() FsOp { return &FsRealPath{} }, "Stat": func() FsOp { return &FsStat{} },
	"SetStat": func() FsOp { return &FsSetStat{} }, "List": func() FsOp { return &FsList{} },
	"ReadLink": func() FsOp { return &FsReadLink{} }, "Symlink": func() FsOp { return &FsSymlink{} },
	"Mkdir": func() FsOp { return &FsMkdir{} }, "Remove": func() FsOp { return &FsRemove{} },
	"RemoveDir": func() FsOp { return &FsRemoveDir{} }, "Copy": func() FsOp { return &FsCopy{} },
	"Rename": func() FsOp { return &FsRename{} }, "OpenFile": func() FsOp { return &FsOpenFile{} },
	"OpenDir": func() FsOp { return &FsOpenDir{} }, "CloseHandle": func() FsOp { return &FsCloseHandle{} },
	"Read": func() FsOp { return &FsRead{} }, "Write": func() FsOp { return &FsWrite{} },
	"ReadDir": func() FsOp { return &FsReadDir{} }, "FStat": func() FsOp { return &FsFStat{} },
	"FSetStat": func() FsOp { return &FsFSetStat{} },
}

// FsOpNames lists the variant names.
func FsOpNames() []string {
	names := make([]string, 0, len(fsOpNew))
	for n := range fsOpNew {
		names = append(names, n)
	}
	return names
}

// MarshalCBOR encodes {"op": {"<Variant>": {fields}}[, "bulk": offer]}.
func (r FsRequest) MarshalCBOR() ([]byte, error) {
	if r.Op == nil {
		return nil, fmt.Errorf("fs request without op")
	}
	return encMode.Marshal(struct {
		Op   map[string]FsOp `cbor:"op"`
		Bulk *BulkOffer      `cbor:"bulk,omitempty"`
	}{map[string]FsOp{r.Op.FsOpName(): r.Op}, r.Bulk})
}

// UnmarshalCBOR decodes an externally tagged FsOp and the optional bulk offer.
func (r *FsRequest) UnmarshalCBOR(b []byte) error {
	var w struct {
		Op   map[string]cbor.RawMessage `cbor:"op"`
		Bulk cbor.RawMessage            `cbor:"bulk"`
	}
	if err := keyMode.Unmarshal(b, &w); err != nil { // the variant's name may be a byte string too
		return err
	}
	if w.Op == nil {
		return fmt.Errorf("missing field `op`")
	}
	op, err := decodeVariant(w.Op, fsOpNew, "FsOp")
	if err != nil {
		return err
	}
	r.Op, r.Bulk = op, nil
	if len(w.Bulk) > 0 && w.Bulk[0] != 0xf6 { // null is None
		r.Bulk = new(BulkOffer)
		if err := Unmarshal(w.Bulk, r.Bulk); err != nil {
			return fmt.Errorf("bulk: %w", err)
		}
	}
	return nil
}

func decodeVariant[T any](m map[string]cbor.RawMessage, makers map[string]func() T, enum string) (T, error) {
	var zero T
	if len(m) != 1 {
		return zero, fmt.Errorf("%s: expected a map with one variant, got %d entries", enum, len(m))
	}
	for name, raw := range m {
		mk, ok := makers[name]
		if !ok {
			return zero, fmt.Errorf("%s: unknown variant `%s`", enum, name)
		}
		v := mk()
		if err := Unmarshal(raw, v); err != nil {
			return zero, fmt.Errorf("%s::%s: %w", enum, name, err)
		}
		return v, nil
	}
	return zero, nil
}

// FsSetAttrs are the attributes SetStat/FSetStat change; nil leaves one unchanged.
type FsSetAttrs struct {
	Mode  *uint32 `cbor:"mode"`
	UID   *uint32 `cbor:"uid"`
	GID   *uint32 `cbor:"gid"`
	Size  *uint64 `cbor:"size"`
	Atime *int64  `cbor:"atime"`
	Mtime *int64  `cbor:"mtime"`
}

// FsOpenOptions are OpenFile's flags (all required on decode, as in the reference).
type FsOpenOptions struct {
	Read      bool         `cbor:"read" req:"1"`
	Write     bool         `cbor:"write" req:"1"`
	Append    bool         `cbor:"append" req:"1"`
	Create    bool         `cbor:"create" req:"1"`
	Truncate  bool         `cbor:"truncate" req:"1"`
	CreateNew bool         `cbor:"create_new" req:"1"`
	Mode      *uint32      `cbor:"mode"`
	User      Null[string] `cbor:"user,omitzero"`
}

// FsEntryInfo describes one filesystem entry.
type FsEntryInfo struct {
	Path     string `cbor:"path" req:"1"`
	Kind     string `cbor:"kind" req:"1"` // file, dir, symlink, other
	Size     uint64 `cbor:"size" req:"1"`
	Mode     uint32 `cbor:"mode" req:"1"` // full st_mode, type bits included
	Modified *int64 `cbor:"modified"`
	UID      uint32 `cbor:"uid" req:"1"`
	GID      uint32 `cbor:"gid" req:"1"`
	Atime    *int64 `cbor:"atime"`
	Mtime    *int64 `cbor:"mtime"`
}

// FsResponse is core.fs.response (terminal): always the three keys ok, error, data.
type FsResponse struct {
	OK    bool            `cbor:"ok" req:"1"`
	Error *string         `cbor:"error"`
	Data  *FsResponseData `cbor:"data"`
}

// FsResponseData is the externally tagged result: exactly one of Stat, List, Handle, Path,
// chosen by Kind.
type FsResponseData struct {
	Kind   string // "Stat", "List", "Handle" or "Path"
	Stat   FsEntryInfo
	List   []FsEntryInfo
	Handle uint64
	Path   string
}

// MarshalCBOR encodes {"<Kind>": value}.
func (d FsResponseData) MarshalCBOR() ([]byte, error) {
	var v any
	switch d.Kind {
	case "Stat":
		v = d.Stat
	case "List":
		v = d.List
	case "Handle":
		v = d.Handle
	case "Path":
		v = d.Path
	default:
		return nil, fmt.Errorf("fs response data: unknown kind %q", d.Kind)
	}
	return encMode.Marshal(map[string]any{d.Kind: v})
}

// UnmarshalCBOR decodes {"<Kind>": value}.
func (d *FsResponseData) UnmarshalCBOR(b []byte) error {
	var m map[string]cbor.RawMessage
	if err := decMode.Unmarshal(b, &m); err != nil {
		return err
	}
	if len(m) != 1 {
		return fmt.Errorf("FsResponseData: expected one variant, got %d entries", len(m))
	}
	for k, raw := range m {
		d.Kind = k
		switch k {
		case "Stat":
			return Unmarshal(raw, &d.Stat)
		case "List":
			return Unmarshal(raw, &d.List)
		case "Handle":
			return decMode.Unmarshal(raw, &d.Handle)
		case "Path":
			return decMode.Unmarshal(raw, &d.Path)
		}
		return fmt.Errorf("FsResponseData: unknown variant `%s`", k)
	}
	return nil
}

// FsChunkSize is the largest fs.data chunk the reference sends (3 MiB).
const FsChunkSize = 3 << 20
