package netstack

import (
	"bytes"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// clientHello records the first flight of a real crypto/tls client for serverName.
func clientHello(t testing.TB, serverName string) []byte {
	a, b := net.Pipe()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(time.Second))
		c.Handshake()
		a.Close()
	}()
	var buf bytes.Buffer
	b.SetReadDeadline(time.Now().Add(time.Second))
	tmp := make([]byte, 4096)
	for {
		n, err := b.Read(tmp)
		buf.Write(tmp[:n])
		if err != nil || buf.Len() >= 5 && buf.Len() >= 5+int(buf.Bytes()[3])<<8|int(buf.Bytes()[4]) {
			break
		}
	}
	b.Close()
	return buf.Bytes()
}

func TestClientHelloSNI(t *testing.T) {
	hello := clientHello(t, "api.example.com")
	cases := []struct {
		name string
		in   []byte
		sni  string
		done bool
	}{
		{"full hello", hello, "api.example.com", true},
		{"first 3 bytes: wait", hello[:3], "", false},
		{"half the record: wait", hello[:len(hello)/2], "", false},
		{"no SNI (an IP literal)", clientHello(t, ""), "", true},
		{"not TLS", []byte("GET / HTTP/1.1\r\n\r\n"), "", true},
		{"handshake type but garbage", append([]byte{0x16, 3, 1, 0, 4}, 1, 2, 3, 4), "", true},
	}
	for _, c := range cases {
		sni, done := clientHelloSNI(c.in)
		if sni != c.sni || done != c.done {
			t.Errorf("%s: %q %v, want %q %v", c.name, sni, done, c.sni, c.done)
		}
	}
}

func FuzzClientHelloSNI(f *testing.F) {
	f.Add(clientHello(f, "api.example.com"))
	f.Add([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		sni, done := clientHelloSNI(b)
		if !done && (len(b) >= maxHello || sni != "") {
			t.Fatalf("not done with %d bytes (sni %q)", len(b), sni)
		}
	})
}
