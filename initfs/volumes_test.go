package initfs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEnsureProfileBlock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "etc", "profile")
	if err := EnsureProfileBlock(p); err != nil { // created when missing
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if !strings.HasPrefix(string(b), profileStart+"\n") || !strings.Contains(string(b), `export PATH="/.msb/scripts:$PATH"`) ||
		!strings.HasSuffix(string(b), profileEnd+"\n") {
		t.Fatalf("block %q", b)
	}
	if err := EnsureProfileBlock(p); err != nil { // idempotent
		t.Fatal(err)
	}
	if again, _ := os.ReadFile(p); string(again) != string(b) {
		t.Fatalf("second run changed the file: %q", again)
	}
	q := filepath.Join(t.TempDir(), "profile")
	os.WriteFile(q, []byte("umask 022"), 0o644) // no trailing newline: one is added first
	EnsureProfileBlock(q)
	if b, _ := os.ReadFile(q); !strings.HasPrefix(string(b), "umask 022\n"+profileStart+"\n") {
		t.Fatalf("block after a line without newline: %q", b)
	}
}
