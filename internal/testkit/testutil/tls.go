package testutil

import (
	"bytes"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// ClientHello records the first flight of a real crypto/tls client for serverName ("" for
// none): one TLS record holding the ClientHello.
func ClientHello(t testing.TB, serverName string) []byte {
	t.Helper()
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

// SplitRecords re-frames a one-record handshake into records of at most size bytes of it
// each, as a client may (and as an attacker would, to hide a name from a checker that reads
// only the first record).
func SplitRecords(hello []byte, size int) []byte {
	body := hello[5:]
	var out []byte
	for len(body) > 0 {
		n := min(size, len(body))
		out = append(out, 0x16, hello[1], hello[2], byte(n>>8), byte(n))
		out = append(out, body[:n]...)
		body = body[n:]
	}
	return out
}
