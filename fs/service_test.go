package fs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// harness runs a Service on a mux writer whose channel end the test reads frame by frame.
type harness struct {
	t       *testing.T
	s       *Service
	frames  chan protocol.Message
	pending []protocol.Message
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	a, b := testutil.SocketPair(t)
	w := sessionio.NewWriter(a, sessionio.WriterOptions{})
	h := &harness{t: t, s: New(w, Options{}, quiet), frames: make(chan protocol.Message, 64)}
	fr := protocol.NewFrameReader(b)
	go func() {
		defer close(h.frames)
		for {
			f, err := fr.Next()
			if err != nil {
				return
			}
			m, err := protocol.DecodeMessage(f)
			if err != nil {
				return
			}
			m.Payload = append([]byte(nil), m.Payload...)
			h.frames <- m
		}
	}()
	t.Cleanup(func() { h.s.Close(); h.s.Wait(); w.Close(); a.Close(); b.Close() })
	return h
}

// next returns the next frame for id (frames of other ids are kept for later). A reply that
// does not come within 5 s fails the test: it is waiting on something it must not wait on.
func (h *harness) next(id uint32) protocol.Message {
	h.t.Helper()
	for i, m := range h.pending {
		if m.ID == id {
			h.pending = append(h.pending[:i], h.pending[i+1:]...)
			return m
		}
	}
	timeout := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-h.frames:
			if !ok {
				h.t.Fatalf("channel closed waiting for id %d", id)
			}
			if m.ID == id {
				return m
			}
			h.pending = append(h.pending, m)
		case <-timeout:
			h.t.Fatalf("no frame for id %d within 5 s", id)
		}
	}
}

// do runs op on id and returns its terminal response.
func (h *harness) do(id uint32, op protocol.FsOp) protocol.FsResponse {
	h.t.Helper()
	h.s.Request(context.Background(), id, op, false)
	return h.response(id)
}

func (h *harness) response(id uint32) protocol.FsResponse {
	h.t.Helper()
	for {
		m := h.next(id)
		if m.Type == protocol.TypeFsData {
			continue
		}
		if m.Type != protocol.TypeFsResponse {
			h.t.Fatalf("id %d: got %s", id, m.Name())
		}
		var r protocol.FsResponse
		if err := protocol.Unmarshal(m.Payload, &r); err != nil {
			h.t.Fatal(err)
		}
		return r
	}
}

func (h *harness) handle(id uint32, op protocol.FsOp) uint64 {
	h.t.Helper()
	r := h.do(id, op)
	if !r.OK || r.Data == nil || r.Data.Kind != "Handle" {
		h.t.Fatalf("%s: %+v %s", op.FsOpName(), r, errText(r))
	}
	return r.Data.Handle
}

func errText(r protocol.FsResponse) string {
	if r.Error == nil {
		return ""
	}
	return *r.Error
}

func u32(v uint32) *uint32 { return &v }
func u64(v uint64) *uint64 { return &v }

// fixture makes D/f (a file holding "hello"), D/d (a directory with one file), D/e (an empty
// directory), D/l -> f and D/dl -> d.
func fixture(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	os.WriteFile(filepath.Join(d, "f"), []byte("hello"), 0o644)
	os.Mkdir(filepath.Join(d, "d"), 0o755)
	os.WriteFile(filepath.Join(d, "d", "x"), []byte("x"), 0o644)
	os.Mkdir(filepath.Join(d, "e"), 0o755)
	os.Symlink("f", filepath.Join(d, "l"))
	os.Symlink("d", filepath.Join(d, "dl"))
	return d
}

// TestOneShotParity pins the reference's answers (Rust's std semantics and error texts) for
// one-shot operations where agentd used to differ (issue 16 items 1, 5, 6, 8).
func TestOneShotParity(t *testing.T) {
	const nul = "file name contained an unexpected NUL byte"
	cases := []struct {
		name  string
		op    func(d string) protocol.FsOp
		err   string // "" = ok; $D is the fixture directory, $N the length of "$D/f"
		path  string // for ok answers carrying a Path
		check func(t *testing.T, d string)
	}{
		{"RemoveDir recursive on a file", func(d string) protocol.FsOp { return &protocol.FsRemoveDir{Path: d + "/f", Recursive: true} },
			"remove_dir: Not a directory (os error 20)", "", exists("f")},
		{"RemoveDir recursive on a symlink to a dir removes the link", func(d string) protocol.FsOp {
			return &protocol.FsRemoveDir{Path: d + "/dl", Recursive: true}
		}, "", "", func(t *testing.T, d string) { gone("dl")(t, d); exists("d/x")(t, d) }},
		{"RemoveDir recursive on a missing path", func(d string) protocol.FsOp { return &protocol.FsRemoveDir{Path: d + "/nope", Recursive: true} },
			"remove_dir: No such file or directory (os error 2)", "", nil},
		{"RemoveDir on a file", func(d string) protocol.FsOp { return &protocol.FsRemoveDir{Path: d + "/f"} },
			"remove_dir: Not a directory (os error 20)", "", exists("f")},
		{"RealPath of the empty path", func(string) protocol.FsOp { return &protocol.FsRealPath{Path: ""} },
			"realpath: No such file or directory (os error 2)", "", nil},
		{"RealPath of a missing relative name", func(string) protocol.FsOp { return &protocol.FsRealPath{Path: "no-such-name-here"} },
			"realpath: No such file or directory (os error 2)", "", nil},
		{"RealPath through a link then ..", func(d string) protocol.FsOp { return &protocol.FsRealPath{Path: d + "/dl/../f"} },
			"", "$D/f", nil},
		{"RealPath of a missing leaf", func(d string) protocol.FsOp { return &protocol.FsRealPath{Path: d + "/dl/new"} },
			"", "$D/d/new", nil},
		{"RealPath of a missing leaf with a trailing slash", func(d string) protocol.FsOp { return &protocol.FsRealPath{Path: d + "/d/new/"} },
			"", "$D/d/new", nil},
		{"Mkdir of the empty path", func(string) protocol.FsOp { return &protocol.FsMkdir{Path: ""} }, "", "", nil},
		{"Mkdir of the empty path with a mode", func(string) protocol.FsOp { return &protocol.FsMkdir{Path: "", Mode: u32(0o700)} },
			"chmod: No such file or directory (os error 2)", "", nil},
		{"Mkdir over a file", func(d string) protocol.FsOp { return &protocol.FsMkdir{Path: d + "/f"} },
			"mkdir: File exists (os error 17)", "", nil},
		{"Mkdir under a file", func(d string) protocol.FsOp { return &protocol.FsMkdir{Path: d + "/f/sub"} },
			"mkdir: Not a directory (os error 20)", "", nil},
		{"Mkdir over a symlink to a dir", func(d string) protocol.FsOp { return &protocol.FsMkdir{Path: d + "/dl"} }, "", "", nil},
		{"Rename a dir onto an empty dir", func(d string) protocol.FsOp { return &protocol.FsRename{Src: d + "/d", Dst: d + "/e"} },
			"", "", func(t *testing.T, d string) { exists("e/x")(t, d); gone("d")(t, d) }},
		{"Rename a dir onto a non-empty dir", func(d string) protocol.FsOp { return &protocol.FsRename{Src: d + "/e", Dst: d + "/d"} },
			"rename: Directory not empty (os error 39)", "", nil},
		{"Rename a file over a dir", func(d string) protocol.FsOp { return &protocol.FsRename{Src: d + "/f", Dst: d + "/e"} },
			"rename: Is a directory (os error 21)", "", exists("f")},
		{"Copy a directory", func(d string) protocol.FsOp { return &protocol.FsCopy{Src: d + "/d", Dst: d + "/copy"} },
			"copy: the source path is neither a regular file nor a symlink to a regular file", "", gone("copy")},
		{"Copy onto a directory", func(d string) protocol.FsOp { return &protocol.FsCopy{Src: d + "/f", Dst: d + "/e"} },
			"copy: Is a directory (os error 21)", "", nil},
		{"SetStat with a size of 2^63", func(d string) protocol.FsOp {
			return &protocol.FsSetStat{Path: d + "/f", FollowSymlink: true, Attrs: protocol.FsSetAttrs{Size: u64(1 << 63)}}
		}, "setstat: set_len: out of range integral type conversion attempted", "", nil},
		{"Stat with a NUL byte", func(d string) protocol.FsOp { return &protocol.FsStat{Path: d + "/f\x00x"} }, "stat: " + nul, "", nil},
		{"List with a NUL byte", func(d string) protocol.FsOp { return &protocol.FsList{Path: d + "\x00"} }, "readdir: opendir: " + nul, "", nil},
		{"Rename with a NUL byte", func(d string) protocol.FsOp { return &protocol.FsRename{Src: d + "/f", Dst: d + "/g\x00"} }, "rename: " + nul, "", exists("f")},
		{"SetStat owner with a NUL byte", func(d string) protocol.FsOp {
			return &protocol.FsSetStat{Path: d + "/f\x00", Attrs: protocol.FsSetAttrs{UID: u32(0)}}
		}, "setstat: path contains NUL: nul byte found in provided data at position: $N", "", nil},
		{"OpenFile without access", func(d string) protocol.FsOp { return &protocol.FsOpenFile{Path: d + "/f"} },
			"open: must specify at least one of read, write, or append access", "", nil},
		{"OpenFile create without access", func(d string) protocol.FsOp {
			return &protocol.FsOpenFile{Path: d + "/new", Options: protocol.FsOpenOptions{Create: true}}
		}, "open: creating or truncating a file requires write or append access", "", gone("new")},
		{"OpenFile read with truncate", func(d string) protocol.FsOp {
			return &protocol.FsOpenFile{Path: d + "/f", Options: protocol.FsOpenOptions{Read: true, Truncate: true}}
		}, "open: creating or truncating a file requires write or append access", "", nil},
		{"OpenFile append with truncate", func(d string) protocol.FsOp {
			return &protocol.FsOpenFile{Path: d + "/f", Options: protocol.FsOpenOptions{Append: true, Truncate: true}}
		}, "open: creating or truncating a file requires write or append access", "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			d := fixture(t)
			r := h.do(1, c.op(d))
			got := strings.ReplaceAll(errText(r), d, "$D")
			want := strings.ReplaceAll(c.err, "$N", fmt.Sprint(len(d)+2))
			if r.OK != (c.err == "") || got != want {
				t.Fatalf("ok %v error %q, want %q", r.OK, got, want)
			}
			if c.path != "" {
				want := strings.ReplaceAll(c.path, "$D", realDir(t, d))
				if r.Data == nil || r.Data.Path != want {
					t.Fatalf("path %+v, want %q", r.Data, want)
				}
			}
			if c.check != nil {
				c.check(t, d)
			}
		})
	}
}

func realDir(t *testing.T, d string) string {
	p, err := filepath.EvalSymlinks(d)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func exists(rel string) func(*testing.T, string) {
	return func(t *testing.T, d string) {
		t.Helper()
		if _, err := os.Lstat(filepath.Join(d, rel)); err != nil {
			t.Fatalf("%s is gone: %v", rel, err)
		}
	}
}

func gone(rel string) func(*testing.T, string) {
	return func(t *testing.T, d string) {
		t.Helper()
		if _, err := os.Lstat(filepath.Join(d, rel)); err == nil {
			t.Fatalf("%s still exists", rel)
		}
	}
}

// TestListJoinsVerbatim: entry paths are the request path joined as Rust's Path::join does
// (a separator is added only when the path does not end in one), not cleaned (item 5).
func TestListJoinsVerbatim(t *testing.T) {
	h := newHarness(t)
	d := fixture(t)
	for _, p := range []string{d + "/d//", d + "/d/", d + "/./d", d + "/dl"} {
		want := p + "/x"
		if strings.HasSuffix(p, "/") {
			want = p + "x"
		}
		r := h.do(1, &protocol.FsList{Path: p})
		if !r.OK || len(r.Data.List) != 1 || r.Data.List[0].Path != want {
			t.Fatalf("List %q: %+v %s", p, r.Data, errText(r))
		}
		hd := h.handle(2, &protocol.FsOpenDir{Path: p})
		r = h.do(3, &protocol.FsReadDir{Handle: hd})
		if !r.OK || len(r.Data.List) != 1 || r.Data.List[0].Path != want {
			t.Fatalf("ReadDir %q: %+v %s", p, r.Data, errText(r))
		}
		h.do(4, &protocol.FsCloseHandle{Handle: hd})
	}
}

// TestHandleErrors pins the reference's texts and the order of its checks for operations on
// the wrong kind of handle (item 8): the handle's kind is checked before its owner.
func TestHandleErrors(t *testing.T) {
	h := newHarness(t)
	d := fixture(t)
	fh := h.handle(1, &protocol.FsOpenFile{Path: d + "/f", Options: protocol.FsOpenOptions{Read: true}})
	dh := h.handle(2, &protocol.FsOpenDir{Path: d + "/d"})
	foreign := uint32(protocol.RelayIDRangeStep + 5)
	cases := []struct {
		id   uint32
		op   protocol.FsOp
		want string
	}{
		{3, &protocol.FsReadDir{Handle: fh}, fmt.Sprintf("readdir: handle %d is a file", fh)},
		{3, &protocol.FsWrite{Handle: dh}, fmt.Sprintf("write: handle %d is a directory", dh)},
		{3, &protocol.FsRead{Handle: dh}, fmt.Sprintf("read: handle %d is a directory", dh)},
		{3, &protocol.FsFSetStat{Handle: dh}, fmt.Sprintf("fsetstat: handle %d is a directory", dh)},
		{3, &protocol.FsWrite{Handle: fh}, fmt.Sprintf("write: handle %d is not open for writing", fh)},
		{foreign, &protocol.FsRead{Handle: dh}, fmt.Sprintf("read: handle %d is a directory", dh)},
		{foreign, &protocol.FsReadDir{Handle: fh}, fmt.Sprintf("readdir: handle %d is a file", fh)},
		{foreign, &protocol.FsWrite{Handle: fh}, fmt.Sprintf("write: handle %d is owned by a different relay client", fh)},
		{foreign, &protocol.FsFStat{Handle: dh}, fmt.Sprintf("fstat: handle %d is owned by a different relay client", dh)},
		{foreign, &protocol.FsCloseHandle{Handle: fh}, fmt.Sprintf("close: handle %d is owned by a different relay client", fh)},
		{3, &protocol.FsFStat{Handle: 999}, "fstat: invalid handle: 999"},
	}
	for _, c := range cases {
		if r := h.do(c.id, c.op); r.OK || errText(r) != c.want {
			t.Errorf("%s on id %d: %q, want %q", c.op.FsOpName(), c.id, errText(r), c.want)
		}
	}
}

// TestHugeOffsets: offsets and sizes of 2^63 or more are the reference's lseek/set_len errors,
// not Go's "negative offset" (item 8).
func TestHugeOffsets(t *testing.T) {
	h := newHarness(t)
	d := fixture(t)
	fh := h.handle(1, &protocol.FsOpenFile{Path: d + "/f", Options: protocol.FsOpenOptions{Read: true, Write: true}})
	if r := h.do(2, &protocol.FsRead{Handle: fh, Offset: 1 << 63}); r.OK || errText(r) != "seek: Invalid argument (os error 22)" {
		t.Errorf("read at 2^63: %q", errText(r))
	}
	if r := h.do(3, &protocol.FsFSetStat{Handle: fh, Attrs: protocol.FsSetAttrs{Size: u64(1 << 63)}}); r.OK ||
		errText(r) != "fsetstat: set_len: out of range integral type conversion attempted" {
		t.Errorf("fsetstat size 2^63: %q", errText(r))
	}
	h.s.Request(context.Background(), 4, &protocol.FsWrite{Handle: fh, Offset: 1 << 63}, false)
	h.s.Data(4, []byte("x"))
	if r := h.response(4); r.OK || errText(r) != "seek: Invalid argument (os error 22)" {
		t.Errorf("write at 2^63: %q", errText(r))
	}
	if h.s.Data(4, []byte("y")) {
		t.Error("the write session outlived its error")
	}
}

// TestWriteStreamDoesNotHoldHandle: while a write stream on a handle waits for the host's
// next chunk, other requests on the handle are answered at once (item 2), and the stream still
// finishes its file after the handle was closed, as the reference's does.
func TestWriteStreamDoesNotHoldHandle(t *testing.T) {
	h := newHarness(t)
	d := fixture(t)
	path := d + "/w"
	fh := h.handle(1, &protocol.FsOpenFile{Path: path, Options: protocol.FsOpenOptions{Write: true, Create: true}})
	h.s.Request(context.Background(), 2, &protocol.FsWrite{Handle: fh, Offset: 0}, false)
	h.s.Data(2, []byte("abc"))
	if r := h.do(3, &protocol.FsFStat{Handle: fh}); !r.OK || r.Data.Stat.Path != path {
		t.Fatalf("fstat during a write stream: %+v %s", r, errText(r))
	}
	if r := h.do(4, &protocol.FsFSetStat{Handle: fh, Attrs: protocol.FsSetAttrs{Mode: u32(0o600)}}); !r.OK {
		t.Fatalf("fsetstat during a write stream: %s", errText(r))
	}
	if r := h.do(5, &protocol.FsCloseHandle{Handle: fh}); !r.OK {
		t.Fatalf("close during a write stream: %s", errText(r))
	}
	if r := h.do(6, &protocol.FsFStat{Handle: fh}); r.OK || errText(r) != fmt.Sprintf("fstat: invalid handle: %d", fh) {
		t.Fatalf("fstat after close: %s", errText(r))
	}
	h.s.Data(2, []byte("def"))
	h.s.Data(2, nil)
	if r := h.response(2); !r.OK {
		t.Fatalf("write stream after its handle was closed: %s", errText(r))
	}
	if b, _ := os.ReadFile(path); string(b) != "abcdef" {
		t.Fatalf("file has %q", b)
	}
	if n, _ := h.s.Counts(); n != 0 {
		t.Fatalf("%d handles left", n)
	}
}

// TestReadStreamDoesNotHoldHandle: a read stream that the host's channel holds back (no
// credit) does not keep other requests on its handle waiting.
func TestReadStreamDoesNotHoldHandle(t *testing.T) {
	h := newHarness(t)
	d := fixture(t)
	big := d + "/big"
	os.WriteFile(big, make([]byte, 1<<20), 0o644)
	fh := h.handle(1, &protocol.FsOpenFile{Path: big, Options: protocol.FsOpenOptions{Read: true}})
	h.s.Request(context.Background(), 2, &protocol.FsRead{Handle: fh, Offset: 0, Window: 1}, true) // one byte of credit: the stream waits
	if m := h.next(2); m.Type != protocol.TypeFsData {
		t.Fatalf("first frame %s", m.Name())
	}
	if r := h.do(3, &protocol.FsFStat{Handle: fh}); !r.OK || r.Data.Stat.Size != 1<<20 {
		t.Fatalf("fstat during a read stream: %s", errText(r))
	}
	if r := h.do(4, &protocol.FsCloseHandle{Handle: fh}); !r.OK {
		t.Fatalf("close during a read stream: %s", errText(r))
	}
}
