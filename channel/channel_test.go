package channel

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
)

func TestDiscover(t *testing.T) {
	dir := t.TempDir()
	for name, port := range map[string]string{"vport0p0": "console\n", "vport0p1": " agent \n", "vport1p1": "other"} {
		os.MkdirAll(filepath.Join(dir, name), 0o755)
		os.WriteFile(filepath.Join(dir, name, "name"), []byte(port), 0o644)
	}
	os.MkdirAll(filepath.Join(dir, "vport2p0"), 0o755) // no name file: skipped
	dev, err := Discover(dir)
	if err != nil || dev != "/dev/vport0p1" {
		t.Fatalf("got %q %v", dev, err)
	}
	os.WriteFile(filepath.Join(dir, "vport0p1", "name"), []byte("x"), 0o644)
	if _, err := Discover(dir); err == nil || !strings.Contains(err.Error(), "serial port not found") {
		t.Fatalf("got %v", err)
	}
	if _, err := Discover(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "serial port not found") {
		t.Fatalf("got %v", err)
	}
}

func TestOpenUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	accepted := make(chan io.ReadWriteCloser, 1)
	go func() {
		c, err := Open("unix-listen:" + sock)
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	var c io.ReadWriteCloser
	var err error
	// The listener appears asynchronously and announces nothing: retry until a deadline (a
	// count of tries ran out before the listener on a loaded machine).
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = Open("unix:" + sock); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	defer c.Close()
	defer s.Close()
	c.Write([]byte("ping"))
	buf := make([]byte, 4)
	io.ReadFull(s, buf)
	if string(buf) != "ping" {
		t.Fatalf("got %q", buf)
	}
	if _, err := Open("unix:" + filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("connecting to a missing socket succeeded")
	}
}

// TestOpenPTYIsRaw: every byte value crosses a pty opened as a channel unchanged (no CR/LF
// translation, no echo, no control characters interpreted).
func TestOpenPTYIsRaw(t *testing.T) {
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer slave.Close()
	m, err := Pollable(master)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ch, err := Open(slave.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	all := make([]byte, 0, 512)
	for i := 0; i < 512; i++ {
		all = append(all, byte(i))
	}
	go m.Write(all)
	got := make([]byte, len(all))
	if _, err := io.ReadFull(ch, got); err != nil || !bytes.Equal(got, all) {
		t.Fatalf("host->agent bytes changed: %v", err)
	}
	go ch.Write(all)
	if _, err := io.ReadFull(m, got); err != nil || !bytes.Equal(got, all) {
		t.Fatalf("agent->host bytes changed: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "open channel") {
		t.Fatalf("got %v", err)
	}
	var _ net.Conn // unix channels are net.Conns
}

// TestWaitReadable: on a socket and on a pty, WaitReadable reports a byte only once one is
// there, ends at its deadline otherwise, and never consumes the byte.
func TestWaitReadable(t *testing.T) {
	a, b := net.Pipe() // no descriptor: refused with a clear error
	defer a.Close()
	defer b.Close()
	if _, err := WaitReadable(a, 0); err == nil || !strings.Contains(err.Error(), "no file descriptor") {
		t.Fatalf("net.Pipe: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	ptyReader, err := Open(slave.Name())
	slave.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ptyReader.Close()
	for _, tc := range []struct {
		name string
		r    io.Reader
		w    io.Writer
	}{{"socket", server, client}, {"pty", ptyReader, master}} {
		if ok, err := WaitReadable(tc.r, 0); ok || err != nil {
			t.Fatalf("%s: nothing sent, yet readable=%v %v", tc.name, ok, err)
		}
		start := time.Now()
		if ok, err := WaitReadable(tc.r, 50*time.Millisecond); ok || err != nil || time.Since(start) < 50*time.Millisecond {
			t.Fatalf("%s: wait with nothing sent: %v %v after %v", tc.name, ok, err, time.Since(start))
		}
		go func() {
			time.Sleep(20 * time.Millisecond) // a byte that arrives during the wait
			tc.w.Write([]byte("x"))
		}()
		if ok, err := WaitReadable(tc.r, 5*time.Second); !ok || err != nil {
			t.Fatalf("%s: byte sent during the wait: %v %v", tc.name, ok, err)
		}
		if ok, _ := WaitReadable(tc.r, 0); !ok {
			t.Fatalf("%s: the byte was consumed by the wait", tc.name)
		}
		buf := make([]byte, 1)
		if n, err := tc.r.Read(buf); n != 1 || buf[0] != 'x' || err != nil {
			t.Fatalf("%s: read after the wait: %d %q %v", tc.name, n, buf, err)
		}
	}
}
