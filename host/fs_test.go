package host_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/protocol"
)

// failingReader gives some bytes, then an error (a local file that cannot be read further).
type failingReader struct{ sent bool }

var errLocal = errors.New("local read failed")

func (r *failingReader) Read(b []byte) (int, error) {
	if !r.sent {
		r.sent = true
		return copy(b, "partial"), nil
	}
	return 0, errLocal
}

// TestWriteFileReaderError: a reader that fails mid-upload ends the agent's write as well, so
// WriteFile returns the reader's error at once (it used to leave the agent waiting for data
// and hang in the handle's close), and the handle and client stay usable.
func TestWriteFileReaderError(t *testing.T) {
	c := direct(t, agent.Config{})
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := filepath.Join(dir, "f")
	if _, err := c.WriteFile(ctx, p, 0o644, &failingReader{}); !errors.Is(err, errLocal) {
		t.Fatalf("WriteFile with a failing reader: %v", err)
	}
	if ctx.Err() != nil {
		t.Fatal("WriteFile hung until the deadline")
	}
	// The client goes on: another write and a read of it.
	if _, err := c.WriteFile(ctx, p, 0o644, strings.NewReader("whole")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "whole" {
		t.Fatalf("file: %q", b)
	}
	if _, err := c.Fs(ctx, &protocol.FsStat{Path: p}); err != nil {
		t.Fatal(err)
	}
}
