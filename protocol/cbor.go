package protocol

import (
	"bytes"
	"fmt"
	"reflect"
	"strings"

	"github.com/fxamacker/cbor/v2"
)

// Payloads are encoded with fxamacker/cbor in the reference's shape (ciborium + serde derive):
// struct fields in declaration order, definite lengths, shortest integer heads, nil slices as
// empty arrays, None as null, byte strings for []byte. Hot data payloads and the envelope
// itself use precomputed prefixes (see envelope.go); tests pin both to the golden frames.
var (
	encMode = func() cbor.EncMode {
		em, err := cbor.EncOptions{
			Sort:          cbor.SortNone,
			NilContainers: cbor.NilContainerAsEmpty,
			IndefLength:   cbor.IndefLengthForbidden,
		}.EncMode()
		if err != nil {
			panic(err)
		}
		return em
	}()

	// decOptions accept what the reference's decoder accepts: definite or indefinite lengths,
	// tags (skipped), unknown keys (ignored), field names as text or byte strings; they reject
	// duplicate keys as serde does.
	decOptions = cbor.DecOptions{
		DupMapKey:           cbor.DupMapKeyEnforcedAPF,
		MaxNestedLevels:     256,
		IndefLength:         cbor.IndefLengthAllowed,
		TagsMd:              cbor.TagsAllowed,
		DefaultMapType:      reflect.TypeOf(map[string]any(nil)),
		UTF8:                cbor.UTF8RejectInvalid,
		FieldNameMatching:   cbor.FieldNameMatchingCaseSensitive,
		FieldNameByteString: cbor.FieldNameByteStringAllowed,
	}
	decMode = mustDecMode(decOptions)
	// keyMode reads a map's keys as field names, text or bytes (checkFields); a byte string is
	// not a string anywhere else.
	keyMode = func() cbor.DecMode {
		o := decOptions
		o.ByteStringToString = cbor.ByteStringToStringAllowed
		return mustDecMode(o)
	}()
)

func mustDecMode(o cbor.DecOptions) cbor.DecMode {
	dm, err := o.DecMode()
	if err != nil {
		panic(err)
	}
	return dm
}

// Marshal encodes a payload value the way the reference does.
func Marshal(v any) ([]byte, error) { return encMode.Marshal(v) }

// Unmarshal decodes one CBOR item from b into v, ignoring trailing bytes (as the reference
// does), then checks what serde checks and the CBOR library does not: every field tagged
// `req:"1"` is present, and null (or undefined) appears only where the reference has an
// Option (a pointer here, or a type that decodes null itself, such as Null). A null bool,
// integer, string, byte string or array is an error, not its zero value: a null data chunk is
// not EOF, a null OpenFile option is not false. An error names the key path of the offending
// field ("network.mac: ...", "dir_mounts[0]: missing field ...").
func Unmarshal(b []byte, v any) error {
	if len(b) == 0 {
		return fmt.Errorf("empty payload")
	}
	if isNull(b) && reflect.TypeOf(v).Elem().Kind() == reflect.Struct {
		return fmt.Errorf("invalid type: null, expected a map")
	}
	if _, err := decMode.UnmarshalFirst(b, v); err != nil {
		if path := errorPath(b, reflect.TypeOf(v).Elem()); path != "" {
			return fmt.Errorf("%s: %w", path, err)
		}
		return err
	}
	// Without a null byte anywhere there is no null to refuse: only required fields to check.
	nulls := bytes.IndexByte(b, 0xf6) >= 0 || bytes.IndexByte(b, 0xf7) >= 0
	return checkFields(b, reflect.TypeOf(v).Elem(), nulls, "")
}

// isNull reports whether the encoded item b is null or undefined.
func isNull(b []byte) bool { return len(b) > 0 && (b[0] == 0xf6 || b[0] == 0xf7) }

var unmarshalerType = reflect.TypeOf((*cbor.Unmarshaler)(nil)).Elem()

// errorPath finds the key path of the first value in b that does not decode into its Go
// field, descending through maps and arrays of plain structs (a type with its own decoder
// names what is wrong inside it itself). It runs only once a decode has failed.
func errorPath(b []byte, t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		return ""
	}
	switch t.Kind() {
	case reflect.Struct:
		var m map[string]cbor.RawMessage
		if _, err := decMode.UnmarshalFirst(b, &m); err != nil {
			return ""
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := fieldName(f)
			raw, ok := m[name]
			if name == "" || !ok {
				continue
			}
			if err := decMode.Unmarshal(raw, reflect.New(f.Type).Interface()); err != nil {
				return joinPath(name, errorPath(raw, f.Type))
			}
		}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return ""
		}
		var items []cbor.RawMessage
		if _, err := decMode.UnmarshalFirst(b, &items); err != nil {
			return ""
		}
		for i, it := range items {
			if err := decMode.Unmarshal(it, reflect.New(t.Elem()).Interface()); err != nil {
				return joinPath(fmt.Sprintf("[%d]", i), errorPath(it, t.Elem()))
			}
		}
	}
	return ""
}

func joinPath(parent, child string) string {
	switch {
	case child == "":
		return parent
	case parent == "":
		return child
	case child[0] == '[':
		return parent + child
	}
	return parent + "." + child
}

// checkFields checks the encoded map b against struct type t: missing required fields (with
// serde's wording, after the key path of the map they are missing from) and, if nulls, null
// values in non-Option fields, recursing into struct, pointer-to-struct and slice fields.
func checkFields(b []byte, t reflect.Type, nulls bool, path string) error {
	if t.Kind() != reflect.Struct || (!nulls && !hasRequired(t)) {
		return nil
	}
	var m map[string]cbor.RawMessage
	if _, err := keyMode.UnmarshalFirst(b, &m); err != nil {
		return nil // not a map with field-name keys: the value decode already ran
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := fieldName(f)
		if name == "" {
			continue
		}
		raw, ok := m[name]
		if !ok {
			if f.Tag.Get("req") == "1" {
				if path != "" {
					return fmt.Errorf("%s: missing field `%s`", path, name)
				}
				return fmt.Errorf("missing field `%s`", name)
			}
			continue
		}
		if err := checkValue(raw, f.Type, nulls, joinPath(path, name)); err != nil {
			return err
		}
	}
	return nil
}

func checkValue(raw []byte, t reflect.Type, nulls bool, path string) error {
	if isNull(raw) {
		if nulls && t.Kind() != reflect.Pointer && t.Kind() != reflect.Interface && !reflect.PointerTo(t).Implements(unmarshalerType) {
			return fmt.Errorf("%s: invalid type: null, expected %s", path, t)
		}
		return nil
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		return checkFields(raw, t, nulls, path)
	case reflect.Slice:
		et := t.Elem()
		if et.Kind() == reflect.Uint8 || !(nulls || et.Kind() == reflect.Struct && hasRequired(et)) {
			return nil
		}
		var items []cbor.RawMessage
		if _, err := decMode.UnmarshalFirst(raw, &items); err != nil {
			return nil
		}
		for i, it := range items {
			if err := checkValue(it, et, nulls, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	}
	return nil
}

func fieldName(f reflect.StructField) string {
	tag := f.Tag.Get("cbor")
	if tag == "-" || !f.IsExported() {
		return ""
	}
	if name, _, _ := strings.Cut(tag, ","); name != "" {
		return name
	}
	return f.Name
}

func hasRequired(t reflect.Type) bool {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if f.Tag.Get("req") == "1" {
			return true
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer || ft.Kind() == reflect.Slice {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft != t && hasRequired(ft) {
			return true
		}
	}
	return false
}

// CBOR major types used by the hand-built prefixes.
const (
	majorUint  = 0
	majorBytes = 2
	majorText  = 3
	majorArray = 4
	majorMap   = 5
)

// appendHead appends a definite-length CBOR head with the shortest argument.
func appendHead(dst []byte, major byte, n uint64) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(dst, m|byte(n))
	case n <= 0xff:
		return append(dst, m|24, byte(n))
	case n <= 0xffff:
		return append(dst, m|25, byte(n>>8), byte(n))
	case n <= 0xffffffff:
		return append(dst, m|26, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	return append(dst, m|27, byte(n>>56), byte(n>>48), byte(n>>40), byte(n>>32),
		byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func headLen(n uint64) int {
	switch {
	case n < 24:
		return 1
	case n <= 0xff:
		return 2
	case n <= 0xffff:
		return 3
	case n <= 0xffffffff:
		return 5
	}
	return 9
}

// readHead parses a definite-length head at the start of b. ok is false for anything else
// (indefinite lengths, simple values, truncation); callers then take the general decoder.
func readHead(b []byte) (major byte, arg uint64, n int, ok bool) {
	if len(b) == 0 {
		return 0, 0, 0, false
	}
	major, ai := b[0]>>5, b[0]&0x1f
	switch {
	case ai < 24:
		return major, uint64(ai), 1, true
	case ai == 24 && len(b) >= 2:
		return major, uint64(b[1]), 2, true
	case ai == 25 && len(b) >= 3:
		return major, uint64(b[1])<<8 | uint64(b[2]), 3, true
	case ai == 26 && len(b) >= 5:
		return major, uint64(b[1])<<24 | uint64(b[2])<<16 | uint64(b[3])<<8 | uint64(b[4]), 5, true
	case ai == 27 && len(b) >= 9:
		var v uint64
		for _, c := range b[1:9] {
			v = v<<8 | uint64(c)
		}
		return major, v, 9, true
	}
	return 0, 0, 0, false
}

// readDefinite reads a definite text or byte string of the given major type at the start of
// b, returning its content (aliasing b) and the bytes used.
func readDefinite(b []byte, major byte) ([]byte, int, bool) {
	m, l, n, ok := readHead(b)
	if !ok || m != major || l > uint64(len(b)-n) {
		return nil, 0, false
	}
	return b[n : n+int(l) : n+int(l)], n + int(l), true
}
