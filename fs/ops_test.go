package fs

import (
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
		{"no access", o{}, 0, errNoAccess},
		{"create without access", o{Create: true}, 0, errNeedWrite},
		{"create without write", o{Read: true, Create: true}, 0, errNeedWrite},
		{"truncate without write", o{Read: true, Truncate: true}, 0, errNeedWrite},
		{"append and truncate", o{Append: true, Truncate: true}, 0, errNeedWrite},
		{"append, truncate and create new", o{Append: true, Truncate: true, CreateNew: true}, unix.O_WRONLY | unix.O_APPEND | unix.O_CREAT | unix.O_EXCL, nil},
	}
	for _, c := range cases {
		got, err := openFlags(c.opts)
		if err != c.err || (err == nil && got != c.want|unix.O_CLOEXEC) {
			t.Errorf("%s: %#x %v, want %#x %v", c.name, got, err, c.want, c.err)
		}
	}
}

// TestRustParent pins Rust's Path::parent and Path::file_name, which RealPath and Mkdir use.
func TestRustParent(t *testing.T) {
	cases := []struct {
		path, parent, name string
		ok                 bool
	}{
		{"", "", "", false},
		{"/", "", "", false},
		{"//", "", "", false},
		{"a", "", "a", true},
		{"/a", "/", "a", true},
		{"/a/b", "/a", "b", true},
		{"/a/b/", "/a", "b", true},
		{"a//b", "a", "b", true},
		{"a/./b", "a", "b", true},
		{"a/.", "", "a", true},
		{"./a", ".", "a", true},
		{".", "", "", true},
		{"/a/..", "/a", "", true},
		{"/a/b//", "/a", "b", true},
	}
	for _, c := range cases {
		parent, name, ok := rustParent(c.path)
		if parent != c.parent || name != c.name || ok != c.ok {
			t.Errorf("%q: (%q, %q, %v), want (%q, %q, %v)", c.path, parent, name, ok, c.parent, c.name, c.ok)
		}
	}
	for _, c := range [][3]string{{"", "x", "x"}, {"/", "x", "/x"}, {"a", "x", "a/x"}, {"a//", "x", "a//x"}} {
		if got := rustJoin(c[0], c[1]); got != c[2] {
			t.Errorf("join(%q, %q) = %q, want %q", c[0], c[1], got, c[2])
		}
	}
}
