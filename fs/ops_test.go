package fs

import (
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/protocol"
)

// TestOpenFlags pins Rust's OpenOptions semantics, which the reference's OpenFile has.
func TestOpenFlags(t *testing.T) {
	type o = protocol.FsOpenOptions
	cases := []struct {
		name string
		opts o
		want int
		err  error
	}{
		{"read", o{Read: true}, unix.O_RDONLY, nil},
		{"write", o{Write: true}, unix.O_WRONLY, nil},
		{"read write", o{Read: true, Write: true}, unix.O_RDWR, nil},
		{"append", o{Append: true}, unix.O_WRONLY | unix.O_APPEND, nil},
		{"create truncate", o{Write: true, Create: true, Truncate: true}, unix.O_WRONLY | unix.O_CREAT | unix.O_TRUNC, nil},
		{"create new", o{Write: true, Create: true, CreateNew: true, Truncate: true}, unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL, nil},
		{"no access", o{}, 0, syscall.EINVAL},
		{"create without write", o{Read: true, Create: true}, 0, syscall.EINVAL},
		{"truncate without write", o{Read: true, Truncate: true}, 0, syscall.EINVAL},
		{"append and truncate", o{Append: true, Truncate: true}, 0, syscall.EINVAL},
	}
	for _, c := range cases {
		got, err := openFlags(c.opts)
		if err != c.err || (err == nil && got != c.want|unix.O_CLOEXEC) {
			t.Errorf("%s: %#x %v, want %#x %v", c.name, got, err, c.want, c.err)
		}
	}
}
