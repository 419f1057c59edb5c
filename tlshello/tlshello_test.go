package tlshello

import (
	"testing"

	"github.com/agentd/agentd/internal/testkit/testutil"
)

func TestParse(t *testing.T) {
	hello := testutil.ClientHello(t, "api.example.com")
	two := testutil.SplitRecords(hello, len(hello[5:])/2+1)
	tiny := testutil.SplitRecords(hello, 1)
	withData := append(append([]byte(nil), hello...), []byte("early data")...)
	other := append([]byte(nil), hello...)
	other[5] = 2 // a ServerHello where the ClientHello should be
	ccsInside := append(append(append([]byte(nil), two[:5+len(hello[5:])/2+1]...), 0x14, 3, 3, 0, 1, 1), two[5+len(hello[5:])/2+1:]...)
	corrupt := append([]byte(nil), hello...)
	corrupt[5+4+2+32] = 0xff // session id length beyond the message
	for _, c := range []struct {
		name string
		in   []byte
		st   State
		sni  string
		n    int
	}{
		{"one record", hello, Complete, "api.example.com", len(hello)},
		{"split across two records", two, Complete, "api.example.com", len(two)},
		{"one handshake byte per record", tiny, Complete, "api.example.com", len(tiny)},
		{"data after the hello", withData, Complete, "api.example.com", len(hello)},
		{"no SNI (an IP literal)", testutil.ClientHello(t, ""), Complete, "", -1},
		{"nothing yet", nil, Incomplete, "", 0},
		{"first 3 bytes", hello[:3], Incomplete, "", 0},
		{"half the record", hello[:len(hello)/2], Incomplete, "", 0},
		{"first of two records", two[:5+len(hello[5:])/2+1], Incomplete, "", 0},
		{"tiny records, most of them", tiny[:len(tiny)-6], Incomplete, "", 0},
		{"not TLS", []byte("GET / HTTP/1.1\r\n\r\n"), NotTLS, "", 0},
		{"handshake type, garbage", append([]byte{0x16, 3, 1, 0, 4}, 1, 2, 3, 4), Invalid, "", 0},
		{"not a ClientHello", other, Invalid, "", 0},
		{"a record of another type inside the hello", ccsInside, Invalid, "", 0},
		{"malformed hello", corrupt, Invalid, "", 0},
		{"SSL 2-style version byte", append([]byte{0x16, 2, 0, 0, 4}, 1, 0, 0, 0), Invalid, "", 0},
		{"empty record", []byte{0x16, 3, 1, 0, 0}, Invalid, "", 0},
		{"oversized hello", append([]byte{0x16, 3, 1, 0x40, 0x00, 1, 0x01, 0, 0}, make([]byte, 100)...), Invalid, "", 0},
		{"oversized record", []byte{0x16, 3, 1, 0xff, 0xff}, Invalid, "", 0},
	} {
		st, sni, n := Parse(c.in)
		if st != c.st || sni != c.sni || (c.n >= 0 && n != c.n) {
			t.Errorf("%s: %v %q %d, want %v %q %d", c.name, st, sni, n, c.st, c.sni, c.n)
		}
	}
}

// TestIncompleteIsBounded: an attacker that trickles a hello that never ends cannot make the
// checker hold more than MaxHello bytes.
func TestIncompleteIsBounded(t *testing.T) {
	var b []byte
	for i := 0; i < 4; i++ { // records of 16 KiB of a ClientHello that claims 16 MiB
		rec := []byte{0x16, 3, 1, 0x40, 0x00}
		if i == 0 {
			rec = append(rec, 1, 0xff, 0xff, 0xff)
			rec = append(rec, make([]byte, 0x4000-4)...)
		} else {
			rec = append(rec, make([]byte, 0x4000)...)
		}
		b = append(b, rec...)
		if st, _, _ := Parse(b); st != Invalid {
			t.Fatalf("after %d bytes: %v", len(b), st)
		}
	}
}

func FuzzParse(f *testing.F) {
	hello := testutil.ClientHello(f, "api.example.com")
	f.Add(hello)
	f.Add(testutil.SplitRecords(hello, 7))
	f.Add([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, sni, n := Parse(b)
		switch st {
		case Complete:
			if n <= 0 || n > len(b) || n > MaxHello {
				t.Fatalf("complete with n=%d of %d bytes", n, len(b))
			}
			// The verdict depends on the hello's records only, not on what follows them.
			if st2, sni2, n2 := Parse(b[:n]); st2 != Complete || sni2 != sni || n2 != n {
				t.Fatalf("the hello alone: %v %q %d, with what follows: %q %d", st2, sni2, n2, sni, n)
			}
		case Incomplete:
			if len(b) >= MaxHello || sni != "" {
				t.Fatalf("incomplete with %d bytes (sni %q)", len(b), sni)
			}
		case NotTLS, Invalid:
			if sni != "" {
				t.Fatalf("%v with sni %q", st, sni)
			}
		}
	})
}

func BenchmarkParse(b *testing.B) {
	hello := testutil.ClientHello(b, "api.example.com")
	for i := 0; i < b.N; i++ {
		Parse(hello)
	}
}
