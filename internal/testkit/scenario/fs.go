package scenario

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/protocol"
)

// RunFs runs every filesystem scenario; bigFile is the size of the round-trip transfer.
func RunFs(t *testing.T, start Start, bigFile int64) {
	t.Run("Ops", func(t *testing.T) { FsOps(t, start(t, nil)) })
	t.Run("Errors", func(t *testing.T) { FsErrors(t, start(t, nil)) })
	t.Run("Handles", func(t *testing.T) { FsHandles(t, start(t, nil)) })
	t.Run("WriteStreamKeepsHandleFree", func(t *testing.T) { FsWriteStreamKeepsHandleFree(t, start(t, nil)) })
	t.Run("NullPayloads", func(t *testing.T) { FsNullPayloads(t, start(t, nil)) })
	for _, features := range [][]string{{protocol.FeatureFlow}, {}} {
		t.Run(fmt.Sprintf("RoundTrip/features=%v", features), func(t *testing.T) { FsRoundTrip(t, start(t, features), bigFile) })
	}
}

func fsOK(t *testing.T, a Agent, op protocol.FsOp) *protocol.FsResponseData {
	t.Helper()
	d, err := a.Client.Fs(Ctx(t), op)
	if err != nil {
		t.Fatalf("%s: %v", op.FsOpName(), err)
	}
	return d
}

func fsErr(t *testing.T, a Agent, op protocol.FsOp, want string) {
	t.Helper()
	_, err := a.Client.Fs(Ctx(t), op)
	var fe *host.FsError
	if !errors.As(err, &fe) || fe.Msg != want {
		t.Fatalf("%s: got %v, want %q", op.FsOpName(), err, want)
	}
}

func u32(v uint32) *uint32 { return &v }
func u64(v uint64) *uint64 { return &v }
func i64(v int64) *int64   { return &v }

// FsOps exercises every one-shot operation.
func FsOps(t *testing.T, a Agent) {
	dir := t.TempDir()
	deep := filepath.Join(dir, "a", "b", "c")
	fsOK(t, a, &protocol.FsMkdir{Path: deep, Mode: u32(0o700)})
	st := fsOK(t, a, &protocol.FsStat{Path: deep, FollowSymlink: true})
	if st.Kind != "Stat" || st.Stat.Kind != "dir" || st.Stat.Mode != 0o40700 || st.Stat.Path != deep {
		t.Fatalf("stat of new dir: %+v", st.Stat)
	}
	fsOK(t, a, &protocol.FsMkdir{Path: deep}) // existing dir: success
	file := filepath.Join(dir, "a", "f.txt")
	os.WriteFile(file, []byte("hello"), 0o640)
	fsOK(t, a, &protocol.FsSymlink{Target: "f.txt", LinkPath: filepath.Join(dir, "a", "link")})
	if d := fsOK(t, a, &protocol.FsReadLink{Path: filepath.Join(dir, "a", "link")}); d.Path != "f.txt" {
		t.Fatalf("readlink %q", d.Path)
	}
	if d := fsOK(t, a, &protocol.FsStat{Path: filepath.Join(dir, "a", "link")}); d.Stat.Kind != "symlink" {
		t.Fatalf("lstat of a link: %s", d.Stat.Kind)
	}
	if d := fsOK(t, a, &protocol.FsStat{Path: filepath.Join(dir, "a", "link"), FollowSymlink: true}); d.Stat.Kind != "file" || d.Stat.Size != 5 || d.Stat.Mode != 0o100640 {
		t.Fatalf("stat through a link: %+v", d.Stat)
	}
	real := fsOK(t, a, &protocol.FsRealPath{Path: filepath.Join(dir, "a", "b", "..", "link")})
	wantReal, _ := filepath.EvalSymlinks(file)
	if real.Path != wantReal {
		t.Fatalf("realpath %q want %q", real.Path, wantReal)
	}
	if d := fsOK(t, a, &protocol.FsRealPath{Path: filepath.Join(dir, "a", "missing-leaf")}); !strings.HasSuffix(d.Path, "/a/missing-leaf") {
		t.Fatalf("realpath of a missing leaf: %q", d.Path)
	}
	list := fsOK(t, a, &protocol.FsList{Path: filepath.Join(dir, "a")})
	kinds := map[string]string{}
	for _, e := range list.List {
		kinds[filepath.Base(e.Path)] = e.Kind
	}
	if len(kinds) != 3 || kinds["b"] != "dir" || kinds["f.txt"] != "file" || kinds["link"] != "symlink" {
		t.Fatalf("list: %v", kinds)
	}
	fsOK(t, a, &protocol.FsSetStat{Path: file, FollowSymlink: true, Attrs: protocol.FsSetAttrs{
		Size: u64(2), Mode: u32(0o600), UID: u32(1), GID: u32(2), Atime: i64(1000), Mtime: i64(2000)}})
	d := fsOK(t, a, &protocol.FsStat{Path: file, FollowSymlink: true})
	if s := d.Stat; s.Size != 2 || s.Mode != 0o100600 || (os.Getuid() == 0 && (s.UID != 1 || s.GID != 2)) || *s.Atime != 1000 || *s.Mtime != 2000 || *s.Modified != 2000 {
		t.Fatalf("after setstat: %+v atime %d mtime %d", s, *s.Atime, *s.Mtime)
	}
	fsErr(t, a, &protocol.FsSetStat{Path: filepath.Join(dir, "a", "link"), Attrs: protocol.FsSetAttrs{Mode: u32(0o600)}},
		"setstat: chmod on symlink without following is not supported")
	cp := filepath.Join(dir, "copy.txt")
	fsOK(t, a, &protocol.FsCopy{Src: file, Dst: cp})
	if b, _ := os.ReadFile(cp); string(b) != "he" {
		t.Fatalf("copy has %q", b)
	}
	if st, _ := os.Stat(cp); st.Mode().Perm() != 0o600 {
		t.Fatalf("copy mode %v", st.Mode())
	}
	mv := filepath.Join(dir, "moved.txt")
	fsOK(t, a, &protocol.FsRename{Src: cp, Dst: mv})
	fsOK(t, a, &protocol.FsRemove{Path: mv})
	if _, err := os.Stat(mv); !os.IsNotExist(err) {
		t.Fatal("remove left the file")
	}
	fsErr(t, a, &protocol.FsRemoveDir{Path: filepath.Join(dir, "a")}, "remove_dir: Directory not empty (os error 39)")
	fsOK(t, a, &protocol.FsRemoveDir{Path: filepath.Join(dir, "a"), Recursive: true})
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Fatal("recursive remove_dir left the tree")
	}
}

// FsErrors: failures carry the reference's prefixes and strerror text (hosts match on it).
func FsErrors(t *testing.T, a Agent) {
	missing := filepath.Join(t.TempDir(), "missing")
	enoent := "No such file or directory (os error 2)"
	fsErr(t, a, &protocol.FsStat{Path: missing}, "stat: "+enoent)
	fsErr(t, a, &protocol.FsList{Path: missing}, "readdir: opendir: "+enoent)
	fsErr(t, a, &protocol.FsReadLink{Path: missing}, "readlink: "+enoent)
	fsErr(t, a, &protocol.FsRemove{Path: missing}, "remove: "+enoent)
	fsErr(t, a, &protocol.FsRemoveDir{Path: missing}, "remove_dir: "+enoent)
	fsErr(t, a, &protocol.FsRename{Src: missing, Dst: missing + "2"}, "rename: "+enoent)
	fsErr(t, a, &protocol.FsCopy{Src: missing, Dst: missing + "2"}, "copy: "+enoent)
	fsErr(t, a, &protocol.FsOpenFile{Path: missing, Options: protocol.FsOpenOptions{Read: true}}, "open: "+enoent)
	fsErr(t, a, &protocol.FsOpenDir{Path: missing}, "opendir: "+enoent)
	fsErr(t, a, &protocol.FsRealPath{Path: missing + "/x/y"}, "realpath: "+enoent)
	fsErr(t, a, &protocol.FsOpenFile{Path: "/etc/hostname", Options: protocol.FsOpenOptions{Read: true, Truncate: true}},
		"open: creating or truncating a file requires write or append access")
	fsErr(t, a, &protocol.FsOpenFile{Path: "/etc/hostname"}, "open: must specify at least one of read, write, or append access")
	// A recursive RemoveDir of a file refuses, and the file stays (issue 16, item 1).
	file := filepath.Join(filepath.Dir(missing), "file")
	os.WriteFile(file, []byte("keep me"), 0o644)
	fsErr(t, a, &protocol.FsRemoveDir{Path: file, Recursive: true}, "remove_dir: Not a directory (os error 20)")
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Fatalf("RemoveDir of a file: %q %v", b, err)
	}
	fsErr(t, a, &protocol.FsOpenFile{Path: "/sys/kernel/notes", Options: protocol.FsOpenOptions{Write: true}},
		"open: Permission denied (os error 13)")
	fsErr(t, a, &protocol.FsCloseHandle{Handle: 999999}, "close: invalid handle: 999999")
	// fs.data for no write session
	s, _ := a.Client.Open()
	defer s.Close()
	a.Client.SendMsg(s.ID, protocol.TypeFsData, protocol.Data{Data: []byte("x")})
	m, err := s.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var r protocol.FsResponse
	protocol.Unmarshal(m.Payload, &r)
	if m.Type != protocol.TypeFsResponse || r.OK || *r.Error != fmt.Sprintf("unknown write session: %d", s.ID) {
		t.Fatalf("fs.data without session: %s %+v", m.Name(), r)
	}
}

// FsHandles: handle operations, directory paging, ownership by relay client, the per-client cap.
func FsHandles(t *testing.T, a Agent) {
	dir := t.TempDir()
	for i := 0; i < 5; i++ {
		os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), nil, 0o644)
	}
	h := fsOK(t, a, &protocol.FsOpenDir{Path: dir}).Handle
	seen := 0
	for {
		page := fsOK(t, a, &protocol.FsReadDir{Handle: h, Limit: u32(2)}).List
		if len(page) == 0 {
			break
		}
		if len(page) > 2 {
			t.Fatalf("page of %d entries with limit 2", len(page))
		}
		seen += len(page)
	}
	if seen != 5 {
		t.Fatalf("paged through %d entries, want 5", seen)
	}
	if d := fsOK(t, a, &protocol.FsFStat{Handle: h}); d.Stat.Kind != "dir" {
		t.Fatalf("fstat of a dir handle: %+v", d.Stat)
	}
	fsOK(t, a, &protocol.FsCloseHandle{Handle: h})
	fsErr(t, a, &protocol.FsReadDir{Handle: h}, fmt.Sprintf("readdir: invalid handle: %d", h))

	f := filepath.Join(dir, "data")
	fh := fsOK(t, a, &protocol.FsOpenFile{Path: f, Options: protocol.FsOpenOptions{Write: true, Create: true, Mode: u32(0o600)}}).Handle
	if _, err := a.Client.FsWrite(Ctx(t), fh, 3, u64(5), strings.NewReader("abcde")); err != nil {
		t.Fatal(err)
	}
	_, err := a.Client.FsWrite(Ctx(t), fh, 0, u64(9), strings.NewReader("short"))
	var fe *host.FsError
	if !errors.As(err, &fe) || fe.Msg != "write length mismatch: expected 9, wrote 5" {
		t.Fatalf("length check: %v", err)
	}
	fsOK(t, a, &protocol.FsFSetStat{Handle: fh, Attrs: protocol.FsSetAttrs{Size: u64(8), Mode: u32(0o644)}})
	if d := fsOK(t, a, &protocol.FsFStat{Handle: fh}); d.Stat.Size != 8 || d.Stat.Mode != 0o100644 || d.Stat.Path != f {
		t.Fatalf("fstat: %+v", d.Stat)
	}
	var buf bytes.Buffer
	_, err = a.Client.FsRead(Ctx(t), fh, 0, nil, &buf)
	if !errors.As(err, &fe) || fe.Msg != fmt.Sprintf("read: handle %d is not open for reading", fh) {
		t.Fatalf("read on a write handle: %v", err)
	}
	fsOK(t, a, &protocol.FsCloseHandle{Handle: fh})
	rh := fsOK(t, a, &protocol.FsOpenFile{Path: f, Options: protocol.FsOpenOptions{Read: true}}).Handle
	// "short" landed at 0 although its length check failed (the reference checks at EOF).
	if _, err := a.Client.FsRead(Ctx(t), rh, 2, u64(4), &buf); err != nil || buf.String() != "ortc" {
		t.Fatalf("read 4 at 2: %q %v", buf.String(), err)
	}
	// Another relay client's ids may not use the handle.
	foreign := uint32(protocol.RelayIDRangeStep + 5)
	m := rawRequest(t, a, foreign, &protocol.FsFStat{Handle: rh})
	if r := fsResp(t, m); r.OK || *r.Error != fmt.Sprintf("fstat: handle %d is owned by a different relay client", rh) {
		t.Fatalf("foreign client: %+v", r)
	}
	fsOK(t, a, &protocol.FsCloseHandle{Handle: rh})
	// At most 1,024 handles per relay client.
	var hs []uint64
	for i := 0; i < 1024; i++ {
		hs = append(hs, fsOK(t, a, &protocol.FsOpenFile{Path: "/dev/null", Options: protocol.FsOpenOptions{Read: true}}).Handle)
	}
	fsErr(t, a, &protocol.FsOpenFile{Path: "/dev/null", Options: protocol.FsOpenOptions{Read: true}},
		"too many open filesystem handles for relay client: 1024")
	for _, h := range hs {
		fsOK(t, a, &protocol.FsCloseHandle{Handle: h})
	}
}

// rawRequest sends an fs request on a chosen id and returns the reply.
func rawRequest(t *testing.T, a Agent, id uint32, op protocol.FsOp) protocol.Message {
	t.Helper()
	s, err := a.Client.OpenID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := a.Client.SendMsg(id, protocol.TypeFsRequest, protocol.FsRequest{Op: op}); err != nil {
		t.Fatal(err)
	}
	m, err := s.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func fsResp(t *testing.T, m protocol.Message) protocol.FsResponse {
	var r protocol.FsResponse
	if err := protocol.Unmarshal(m.Payload, &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// FsRoundTrip writes size random bytes and reads them back, comparing digests.
func FsRoundTrip(t *testing.T, a Agent, size int64) {
	path := filepath.Join(t.TempDir(), "big")
	hw := sha256.New()
	n, err := a.Client.WriteFile(Ctx(t), path, 0o600, io.TeeReader(io.LimitReader(rand.Reader, size), hw))
	if err != nil || n != size {
		t.Fatalf("write %d of %d: %v", n, size, err)
	}
	hr := sha256.New()
	m, err := a.Client.ReadFile(Ctx(t), path, hr)
	if err != nil || m != size {
		t.Fatalf("read %d of %d: %v", m, size, err)
	}
	if !bytes.Equal(hw.Sum(nil), hr.Sum(nil)) {
		t.Fatal("read back different bytes")
	}
	if st, _ := os.Stat(path); st.Size() != size {
		t.Fatalf("file has %d bytes", st.Size())
	}
}

// writeStream opens path for writing and starts a Write stream on a fresh id (no reply is due
// until its EOF).
func writeStream(t *testing.T, a Agent, path string) (uint64, *host.Session) {
	t.Helper()
	h := fsOK(t, a, &protocol.FsOpenFile{Path: path, Options: protocol.FsOpenOptions{Write: true, Create: true}}).Handle
	s, err := a.Client.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := a.Client.SendMsg(s.ID, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsWrite{Handle: h}}); err != nil {
		t.Fatal(err)
	}
	return h, s
}

func sendData(t *testing.T, a Agent, id uint32, data string) {
	t.Helper()
	if err := a.Client.SendMsg(id, protocol.TypeFsData, protocol.Data{Data: []byte(data)}); err != nil {
		t.Fatal(err)
	}
}

// FsWriteStreamKeepsHandleFree: while a write stream waits for the host's next chunk, FStat
// and CloseHandle on its handle are answered at once; the stream then finishes the file
// (issue 16, item 2).
func FsWriteStreamKeepsHandleFree(t *testing.T, a Agent) {
	path := filepath.Join(t.TempDir(), "upload")
	h, w := writeStream(t, a, path)
	sendData(t, a, w.ID, "abc")
	if d := fsOK(t, a, &protocol.FsFStat{Handle: h}); d.Stat.Path != path {
		t.Fatalf("fstat during an upload: %+v", d.Stat)
	}
	fsOK(t, a, &protocol.FsCloseHandle{Handle: h})
	sendData(t, a, w.ID, "def")
	sendData(t, a, w.ID, "")
	m, err := w.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if r := fsResp(t, m); !r.OK {
		t.Fatalf("upload after its handle was closed: %+v", r)
	}
	if b, _ := os.ReadFile(path); string(b) != "abcdef" {
		t.Fatalf("file has %q", b)
	}
}

// nullData is {"data": null}.
var nullData = []byte{0xa1, 0x64, 'd', 'a', 't', 'a', 0xf6}

// expectInvalidPayload reads a core.error invalid_payload for offending from s.
func expectInvalidPayload(t *testing.T, s *host.Session, offending protocol.Type) {
	t.Helper()
	m, err := s.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var e protocol.CoreError
	if m.Type != protocol.TypeError || protocol.Unmarshal(m.Payload, &e) != nil ||
		e.Kind != protocol.KindInvalidPayload || e.OffendingType != offending.String() {
		t.Fatalf("got %s %+v, want core.error invalid_payload for %s", m.Name(), e, offending)
	}
}

// FsNullPayloads: a null where bytes or a bool belong is core.error invalid_payload on that
// id; the write stream around a null chunk goes on, and an OpenFile with a null option opens
// nothing (issue 16, item 3).
func FsNullPayloads(t *testing.T, a Agent) {
	dir := t.TempDir()
	path := filepath.Join(dir, "upload")
	_, w := writeStream(t, a, path)
	sendData(t, a, w.ID, "abc")
	if err := a.Client.Send(w.ID, protocol.TypeFsData, nullData); err != nil {
		t.Fatal(err)
	}
	expectInvalidPayload(t, w, protocol.TypeFsData)
	w2, err := a.Client.OpenID(w.ID) // core.error is terminal for the client: listen again
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	sendData(t, a, w.ID, "def")
	sendData(t, a, w.ID, "")
	m, err := w2.Recv(Ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if r := fsResp(t, m); !r.OK {
		t.Fatalf("upload after a null chunk: %+v", r)
	}
	if b, _ := os.ReadFile(path); string(b) != "abcdef" {
		t.Fatalf("file has %q", b)
	}

	created := filepath.Join(dir, "created")
	p, _ := protocol.Marshal(map[string]any{"op": map[string]any{"OpenFile": map[string]any{"path": created,
		"options": map[string]any{"read": false, "write": true, "append": false, "create": nil, "truncate": false, "create_new": false}}}})
	s, _ := a.Client.Open()
	defer s.Close()
	if err := a.Client.Send(s.ID, protocol.TypeFsRequest, p); err != nil {
		t.Fatal(err)
	}
	expectInvalidPayload(t, s, protocol.TypeFsRequest)
	if _, err := os.Stat(created); err == nil {
		t.Fatal("an OpenFile with a null option created the file")
	}
}
