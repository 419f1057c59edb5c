package refmodel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"unicode/utf8"
)

// A small CBOR codec of our own, so that neither side's decoder is the judge of the other.
// Decoded values: nil (null), undefined, bool, uint64, int64 (negative), float64, string,
// []byte, []any, Map (keys in wire order), Tag.

// Map is a CBOR map with its entries in wire order.
type Map []KV

// KV is one map entry.
type KV struct{ K, V any }

// undefined is CBOR's undefined (0xf7).
type undefined struct{}

// Tag is a tagged item.
type Tag struct {
	N uint64
	V any
}

// Indef encodes its value (array, map, byte or text string) with indefinite length.
type Indef struct{ V any }

// Raw is already encoded CBOR.
type Raw []byte

// get returns the value of text key k.
func (m Map) get(k string) (any, bool) {
	for _, kv := range m {
		if s, ok := kv.K.(string); ok && s == k {
			return kv.V, true
		}
	}
	return nil, false
}

// --- encoding ---

func head(b []byte, major byte, n uint64) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n <= math.MaxUint8:
		return append(b, m|24, byte(n))
	case n <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, m|25), uint16(n))
	case n <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, m|26), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, m|27), n)
}

// enc appends the encoding of v: definite lengths and shortest heads unless asked otherwise.
func enc(b []byte, v any) []byte {
	switch x := v.(type) {
	case nil:
		return append(b, 0xf6)
	case undefined:
		return append(b, 0xf7)
	case bool:
		if x {
			return append(b, 0xf5)
		}
		return append(b, 0xf4)
	case int:
		if x < 0 {
			return head(b, 1, uint64(-1-x))
		}
		return head(b, 0, uint64(x))
	case int64:
		if x < 0 {
			return head(b, 1, uint64(-1-x))
		}
		return head(b, 0, uint64(x))
	case uint64:
		return head(b, 0, x)
	case uint32:
		return head(b, 0, uint64(x))
	case uint16:
		return head(b, 0, uint64(x))
	case float64:
		return binary.BigEndian.AppendUint64(append(b, 0xfb), math.Float64bits(x))
	case string:
		return append(head(b, 3, uint64(len(x))), x...)
	case []byte:
		return append(head(b, 2, uint64(len(x))), x...)
	case []any:
		b = head(b, 4, uint64(len(x)))
		for _, e := range x {
			b = enc(b, e)
		}
		return b
	case []string:
		b = head(b, 4, uint64(len(x)))
		for _, e := range x {
			b = enc(b, e)
		}
		return b
	case Map:
		b = head(b, 5, uint64(len(x)))
		for _, kv := range x {
			b = enc(enc(b, kv.K), kv.V)
		}
		return b
	case Tag:
		return enc(head(b, 6, x.N), x.V)
	case Raw:
		return append(b, x...)
	case Indef:
		switch y := x.V.(type) {
		case []any:
			b = append(b, 0x9f)
			for _, e := range y {
				b = enc(b, e)
			}
		case Map:
			b = append(b, 0xbf)
			for _, kv := range y {
				b = enc(enc(b, kv.K), kv.V)
			}
		case string: // two chunks
			h := len(y) / 2
			b = enc(enc(append(b, 0x7f), y[:h]), y[h:])
		case []byte:
			h := len(y) / 2
			b = enc(enc(append(b, 0x5f), y[:h]), y[h:])
		default:
			panic(fmt.Sprintf("indefinite %T", y))
		}
		return append(b, 0xff)
	}
	panic(fmt.Sprintf("cbor: cannot encode %T", v))
}

func encode(v any) []byte { return enc(nil, v) }

// --- decoding ---

var errShort = errors.New("unexpected end of input")

type decoder struct {
	b     []byte
	depth int
}

// decode reads one item from b (trailing bytes are ignored, as by the reference).
func decode(b []byte) (any, error) {
	d := &decoder{b: b}
	return d.item()
}

func (d *decoder) byte() (byte, error) {
	if len(d.b) == 0 {
		return 0, errShort
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c, nil
}

// arg reads the argument of a head with additional info ai; indef reports ai 31.
func (d *decoder) arg(ai byte) (n uint64, indef bool, err error) {
	switch {
	case ai < 24:
		return uint64(ai), false, nil
	case ai == 31:
		return 0, true, nil
	case ai > 27:
		return 0, false, fmt.Errorf("reserved additional info %d", ai)
	}
	size := 1 << (ai - 24)
	if len(d.b) < size {
		return 0, false, errShort
	}
	for _, c := range d.b[:size] {
		n = n<<8 | uint64(c)
	}
	d.b = d.b[size:]
	return n, false, nil
}

func (d *decoder) item() (any, error) {
	if d.depth++; d.depth > 256 {
		return nil, errors.New("recursion limit exceeded")
	}
	defer func() { d.depth-- }()
	c, err := d.byte()
	if err != nil {
		return nil, err
	}
	major, ai := c>>5, c&0x1f
	if major == 7 {
		switch ai {
		case 20:
			return false, nil
		case 21:
			return true, nil
		case 22:
			return nil, nil
		case 23:
			return undefined{}, nil
		case 25, 26, 27:
			n, _, err := d.arg(ai)
			if err != nil {
				return nil, err
			}
			switch ai {
			case 25:
				return float64(half(uint16(n))), nil
			case 26:
				return float64(math.Float32frombits(uint32(n))), nil
			}
			return math.Float64frombits(n), nil
		}
		return nil, fmt.Errorf("unsupported simple value %d", ai)
	}
	n, indef, err := d.arg(ai)
	if err != nil {
		return nil, err
	}
	switch major {
	case 0:
		if indef {
			return nil, errors.New("indefinite integer")
		}
		return n, nil
	case 1:
		if indef {
			return nil, errors.New("indefinite integer")
		}
		if n > math.MaxInt64 {
			return nil, errors.New("negative integer out of range")
		}
		return -1 - int64(n), nil
	case 2, 3:
		var s []byte
		if indef {
			for {
				if len(d.b) > 0 && d.b[0] == 0xff {
					d.b = d.b[1:]
					break
				}
				c, err := d.byte()
				if err != nil {
					return nil, err
				}
				if c>>5 != major || c&0x1f == 31 {
					return nil, errors.New("bad chunk in an indefinite string")
				}
				l, _, err := d.arg(c & 0x1f)
				if err != nil || l > uint64(len(d.b)) {
					return nil, errShort
				}
				s = append(s, d.b[:l]...)
				d.b = d.b[l:]
			}
		} else {
			if n > uint64(len(d.b)) {
				return nil, errShort
			}
			s = append([]byte{}, d.b[:n]...)
			d.b = d.b[n:]
		}
		if major == 3 {
			if !isUTF8(s) {
				return nil, errors.New("invalid UTF-8")
			}
			return string(s), nil
		}
		return s, nil
	case 4:
		arr := []any{}
		for i := uint64(0); indef || i < n; i++ {
			if indef && len(d.b) > 0 && d.b[0] == 0xff {
				d.b = d.b[1:]
				break
			}
			e, err := d.item()
			if err != nil {
				return nil, err
			}
			arr = append(arr, e)
		}
		return arr, nil
	case 5:
		m := Map{}
		for i := uint64(0); indef || i < n; i++ {
			if indef && len(d.b) > 0 && d.b[0] == 0xff {
				d.b = d.b[1:]
				break
			}
			k, err := d.item()
			if err != nil {
				return nil, err
			}
			v, err := d.item()
			if err != nil {
				return nil, err
			}
			m = append(m, KV{k, v})
		}
		return m, nil
	case 6:
		v, err := d.item()
		if err != nil {
			return nil, err
		}
		return Tag{n, v}, nil
	}
	return nil, fmt.Errorf("major type %d", major)
}

func half(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp, frac := uint32(h>>10)&0x1f, uint32(h&0x3ff)
	switch exp {
	case 0:
		return math.Float32frombits(sign) + float32(frac)*float32(math.Pow(2, -24))*sgn(sign)
	case 31:
		return math.Float32frombits(sign | 0x7f800000 | frac<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | frac<<13)
}

func sgn(s uint32) float32 {
	if s != 0 {
		return -1
	}
	return 1
}

func isUTF8(b []byte) bool { return utf8.Valid(b) }

// render prints a decoded value canonically (maps in wire order, which is part of what is
// compared: the reference encodes fields in declaration order).
func render(v any) string {
	var sb strings.Builder
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case nil:
			sb.WriteString("null")
		case undefined:
			sb.WriteString("undefined")
		case string:
			fmt.Fprintf(&sb, "%q", x)
		case []byte:
			fmt.Fprintf(&sb, "h%q", x)
		case []any:
			sb.WriteByte('[')
			for i, e := range x {
				if i > 0 {
					sb.WriteByte(',')
				}
				walk(e)
			}
			sb.WriteByte(']')
		case Map:
			sb.WriteByte('{')
			for i, kv := range x {
				if i > 0 {
					sb.WriteByte(',')
				}
				walk(kv.K)
				sb.WriteByte(':')
				walk(kv.V)
			}
			sb.WriteByte('}')
		case Tag:
			fmt.Fprintf(&sb, "%d(", x.N)
			walk(x.V)
			sb.WriteByte(')')
		default:
			fmt.Fprint(&sb, x)
		}
	}
	walk(v)
	return sb.String()
}

// sortedKeys is a helper for deterministic iteration in generators.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
