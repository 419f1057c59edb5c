// Package fs serves core.fs requests: one-shot operations, a handle table owned per relay
// client, and streaming reads and writes with bounded buffers. Operations run off the agent
// loop (at most Options.Parallel at a time), so a slow disk never stalls the channel reader.
package fs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/internal/oserr"
	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Options bound the filesystem service.
type Options struct {
	// ChunkSize is the largest fs.data chunk sent (at most sessionio.ChunkSize; the reference's 3 MiB
	// is the protocol's ceiling, not a requirement).
	ChunkSize int
	// HighWater and LowWater bound read-stream bytes queued toward the host, per stream.
	HighWater, LowWater int
	// WriteLimit bounds write-stream bytes queued for the disk, per stream; WriteBudget is
	// shared by all write streams.
	WriteLimit  int
	WriteBudget *sessionio.Budget
	// MaxHandlesPerClient is the reference's 1024 open handles per relay client.
	MaxHandlesPerClient int
	// Parallel bounds operations in flight; beyond it the agent loop waits.
	Parallel int
}

// DefaultOptions for the filesystem service.
var DefaultOptions = Options{ChunkSize: sessionio.ChunkSize, HighWater: 1 << 20, LowWater: 256 << 10,
	WriteLimit: 1 << 20, MaxHandlesPerClient: 1024, Parallel: 64}

// DefaultReadDirLimit is ReadDir's page size when the request gives none.
const DefaultReadDirLimit = 128

// handle is an open file or directory. Its lock is held for one operation at a time (a
// stream takes it per chunk, never across a wait for the host or the channel), so a request
// on a handle is never held up by another session's stream. The file is closed when the last
// user lets go: the table (until CloseHandle), and every operation and stream in flight, as
// the reference's shared file does.
type handle struct {
	owner                uint32
	path                 string
	file                 *os.File
	dir                  bool
	read, write, append_ bool
	mu                   sync.Mutex
	refs                 atomic.Int32
}

// release drops one reference; the last one closes the file.
func (h *handle) release() {
	if h.refs.Add(-1) == 0 {
		h.file.Close()
	}
}

// writeStream is an open core.fs Write: host chunks queue in a sink drained to the file.
type writeStream struct {
	owner uint32
	in    *sessionio.Sink
	bulk  *sessionio.BulkIn // a bulk write's flow (bulk.go)
	// failure (guarded by Service.mu) ends a bulk stream with this text; byHost when the host
	// cancelled it (then no core.bulk.cancel goes back).
	failure string
	byHost  bool
}

type readStream struct {
	owner   uint32
	cancel  context.CancelFunc
	flow    *sessionio.Credit
	bulk    *sessionio.BulkOut // a bulk read's flow (bulk.go)
	failure string             // as writeStream's
	byHost  bool
}

// Service is the filesystem side of one agent.
type Service struct {
	opts Options
	out  *sessionio.Writer
	log  *slog.Logger
	sem  chan struct{}
	wg   sync.WaitGroup

	mu      sync.Mutex
	next    uint64
	handles map[uint64]*handle
	writes  map[uint32]*writeStream
	reads   map[uint32]*readStream
}

// New makes a service writing its replies to out.
func New(out *sessionio.Writer, opts Options, log *slog.Logger) *Service {
	d := DefaultOptions
	if opts.ChunkSize <= 0 || opts.ChunkSize > sessionio.ChunkSize {
		opts.ChunkSize = d.ChunkSize
	}
	if opts.HighWater <= 0 {
		opts.HighWater, opts.LowWater = d.HighWater, d.LowWater
	}
	if opts.LowWater <= 0 || opts.LowWater > opts.HighWater {
		opts.LowWater = opts.HighWater / 4
	}
	if opts.WriteLimit <= 0 {
		opts.WriteLimit = d.WriteLimit
	}
	if opts.MaxHandlesPerClient <= 0 {
		opts.MaxHandlesPerClient = d.MaxHandlesPerClient
	}
	if opts.Parallel <= 0 {
		opts.Parallel = d.Parallel
	}
	return &Service{opts: opts, out: out, log: log, sem: make(chan struct{}, opts.Parallel), next: 1,
		handles: map[uint64]*handle{}, writes: map[uint32]*writeStream{}, reads: map[uint32]*readStream{}}
}

func (s *Service) reply(ctx context.Context, id uint32, data *protocol.FsResponseData, err error) {
	r := protocol.FsResponse{OK: err == nil, Data: data}
	if err != nil {
		msg := err.Error()
		r.Error, r.Data = &msg, nil
	}
	s.out.ControlMsg(ctx, id, protocol.TypeFsResponse, r)
}

// Request runs one core.fs.request. It returns once the operation is scheduled: the agent loop
// waits only when Parallel operations are already in flight. A Write stream is registered
// before Request returns, so the host's fs.data frames that follow always find it.
func (s *Service) Request(ctx context.Context, id uint32, op protocol.FsOp, flow bool) {
	if w, ok := op.(*protocol.FsWrite); ok {
		if err := s.startWrite(ctx, id, w, flow); err != nil {
			s.reply(ctx, id, nil, err)
		}
		return
	}
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	s.wg.Add(1)
	go func() {
		defer func() { <-s.sem; s.wg.Done() }()
		s.run(ctx, id, op, flow)
	}()
}

// Wait waits for every operation and stream to finish (after Close).
func (s *Service) Wait() { s.wg.Wait() }

func (s *Service) run(ctx context.Context, id uint32, op protocol.FsOp, flow bool) {
	var data *protocol.FsResponseData
	var err error
	switch o := op.(type) {
	case *protocol.FsRealPath:
		var p string
		if p, err = realPath(o.Path); err == nil {
			data = pathData(p)
		}
	case *protocol.FsStat:
		st, serr := statPath(o.Path, o.FollowSymlink)
		if err = serr; err != nil {
			err = opError("stat", err)
		} else {
			data = statData(entryInfo(o.Path, st))
		}
	case *protocol.FsSetStat:
		err = setStat(o.Path, o.FollowSymlink, o.Attrs)
	case *protocol.FsList:
		var list []protocol.FsEntryInfo
		if list, err = listDir(o.Path); err == nil {
			data = &protocol.FsResponseData{Kind: "List", List: list}
		}
	case *protocol.FsReadLink:
		var p string
		if err = checkNUL(o.Path); err == nil {
			p, err = os.Readlink(o.Path)
		}
		if err != nil {
			err = opError("readlink", err)
		} else {
			data = pathData(p)
		}
	case *protocol.FsSymlink:
		if err = checkNUL(o.Target); err == nil {
			if err = checkNUL(o.LinkPath); err == nil {
				err = unix.Symlink(o.Target, o.LinkPath)
			}
		}
		if err != nil {
			err = opError("symlink", err)
		}
	case *protocol.FsMkdir:
		err = mkdir(o.Path, o.Mode)
	case *protocol.FsRemove:
		if err = checkNUL(o.Path); err == nil {
			err = unix.Unlink(o.Path)
		}
		if err != nil {
			err = opError("remove", err)
		}
	case *protocol.FsRemoveDir:
		err = removeDir(o.Path, o.Recursive)
	case *protocol.FsCopy:
		err = copyFile(o.Src, o.Dst)
	case *protocol.FsRename:
		err = rename(o.Src, o.Dst)
	case *protocol.FsOpenFile:
		var h uint64
		if h, err = s.openFile(id, o); err == nil {
			data = &protocol.FsResponseData{Kind: "Handle", Handle: h}
		}
	case *protocol.FsOpenDir:
		var h uint64
		if h, err = s.openDir(id, o.Path); err == nil {
			data = &protocol.FsResponseData{Kind: "Handle", Handle: h}
		}
	case *protocol.FsCloseHandle:
		err = s.closeHandle(id, o.Handle)
	case *protocol.FsRead:
		if err = s.startRead(ctx, id, o, flow); err == nil {
			return // the stream sends its own terminal response
		}
	case *protocol.FsReadDir:
		var list []protocol.FsEntryInfo
		if list, err = s.readDir(id, o); err == nil {
			data = &protocol.FsResponseData{Kind: "List", List: list}
		}
	case *protocol.FsFStat:
		var info protocol.FsEntryInfo
		if info, err = s.fstat(id, o.Handle); err == nil {
			data = statData(info)
		}
	case *protocol.FsFSetStat:
		err = s.fsetStat(id, o)
	default:
		err = fmt.Errorf("unsupported fs operation %T", op)
	}
	s.reply(ctx, id, data, err)
}

func listDir(path string) ([]protocol.FsEntryInfo, error) {
	f, err := openDirectory(path)
	if err != nil {
		return nil, fmt.Errorf("readdir: %w", opError("opendir", err))
	}
	defer f.Close()
	names, err := f.Readdirnames(-1) // directory order, as readdir returns it
	if err != nil {
		return nil, opError("readdir", err)
	}
	list := make([]protocol.FsEntryInfo, 0, len(names))
	for _, n := range names {
		list = append(list, listEntry(path, n))
	}
	return list, nil
}

// --- handles ---

func (s *Service) addHandle(h *handle) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	count := 0
	for _, o := range s.handles {
		if protocol.SameRelayClient(o.owner, h.owner) {
			count++
		}
	}
	if count >= s.opts.MaxHandlesPerClient {
		return 0, fmt.Errorf("too many open filesystem handles for relay client: %d", count)
	}
	for s.next == 0 || s.handles[s.next] != nil {
		s.next++
	}
	n := s.next
	s.next++
	s.handles[n] = h
	return n, nil
}

// Which kind of handle an operation needs; the checks run in the reference's order: the
// handle exists, is of the right kind, belongs to the caller's relay client, allows the access.
type need int

const (
	anyHandle need = iota
	fileHandle
	readHandle
	writeHandle
	dirHandle
)

// acquire finds a handle the caller may use for an operation and takes a reference to it;
// the caller releases it when done.
func (s *Service) acquire(caller uint32, n uint64, prefix string, want need) (*handle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.handles[n]
	switch {
	case h == nil:
		return nil, fmt.Errorf("%s: invalid handle: %d", prefix, n)
	case want == dirHandle && !h.dir:
		return nil, fmt.Errorf("%s: handle %d is a file", prefix, n)
	case want != dirHandle && want != anyHandle && h.dir:
		return nil, fmt.Errorf("%s: handle %d is a directory", prefix, n)
	case !protocol.SameRelayClient(caller, h.owner):
		return nil, fmt.Errorf("%s: handle %d is owned by a different relay client", prefix, n)
	case want == readHandle && !h.read:
		return nil, fmt.Errorf("%s: handle %d is not open for reading", prefix, n)
	case want == writeHandle && !h.write:
		return nil, fmt.Errorf("%s: handle %d is not open for writing", prefix, n)
	}
	h.refs.Add(1)
	return h, nil
}

func (s *Service) openFile(id uint32, o *protocol.FsOpenFile) (uint64, error) {
	if err := checkNUL(o.Path); err != nil {
		return 0, opError("open", err)
	}
	flags, err := openFlags(o.Options)
	if err != nil {
		return 0, opError("open", err)
	}
	mode := uint32(0o666)
	if o.Options.Mode != nil {
		mode = *o.Options.Mode
	}
	f, err := os.OpenFile(o.Path, flags, os.FileMode(mode&0o777)|modeBits(mode))
	if err != nil {
		return 0, opError("open", err)
	}
	h := &handle{owner: id, path: o.Path, file: f, read: o.Options.Read,
		write: o.Options.Write || o.Options.Append, append_: o.Options.Append}
	h.refs.Store(1) // the table's
	n, err := s.addHandle(h)
	if err != nil {
		f.Close()
	}
	return n, err
}

// modeBits carries setuid/setgid/sticky bits from a numeric mode into an os.FileMode.
func modeBits(m uint32) os.FileMode {
	var fm os.FileMode
	if m&unix.S_ISUID != 0 {
		fm |= os.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		fm |= os.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		fm |= os.ModeSticky
	}
	return fm
}

// openDirectory is opendir(3): O_DIRECTORY, so a file is ENOTDIR and a FIFO never blocks.
func openDirectory(path string) (*os.File, error) {
	if err := checkNUL(path); err != nil {
		return nil, err
	}
	return os.OpenFile(path, os.O_RDONLY|unix.O_DIRECTORY, 0)
}

func (s *Service) openDir(id uint32, path string) (uint64, error) {
	f, err := openDirectory(path)
	if err != nil {
		return 0, opError("opendir", err)
	}
	h := &handle{owner: id, path: path, file: f, dir: true}
	h.refs.Store(1) // the table's
	n, err := s.addHandle(h)
	if err != nil {
		f.Close()
	}
	return n, err
}

// closeHandle removes the handle from the table at once; operations and streams still using
// it finish with it (the last one closes the file).
func (s *Service) closeHandle(id uint32, n uint64) error {
	s.mu.Lock()
	h := s.handles[n]
	switch {
	case h == nil:
		s.mu.Unlock()
		return fmt.Errorf("close: invalid handle: %d", n)
	case !protocol.SameRelayClient(id, h.owner):
		s.mu.Unlock()
		return fmt.Errorf("close: handle %d is owned by a different relay client", n)
	}
	delete(s.handles, n)
	s.mu.Unlock()
	h.release()
	return nil
}

func (s *Service) readDir(id uint32, o *protocol.FsReadDir) ([]protocol.FsEntryInfo, error) {
	h, err := s.acquire(id, o.Handle, "readdir", dirHandle)
	if err != nil {
		return nil, err
	}
	defer h.release()
	limit := DefaultReadDirLimit
	if o.Limit != nil {
		limit = max(int(*o.Limit), 1)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	names, err := h.file.Readdirnames(limit)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("readdir %s: %s", h.path, oserr.Text(err))
	}
	list := make([]protocol.FsEntryInfo, 0, len(names))
	for _, n := range names {
		list = append(list, listEntry(h.path, n))
	}
	return list, nil
}

func (s *Service) fstat(id uint32, n uint64) (protocol.FsEntryInfo, error) {
	h, err := s.acquire(id, n, "fstat", anyHandle)
	if err != nil {
		return protocol.FsEntryInfo{}, err
	}
	defer h.release()
	h.mu.Lock()
	defer h.mu.Unlock()
	var st unix.Stat_t
	if h.dir {
		err = unix.Stat(h.path, &st)
	} else {
		err = unix.Fstat(int(h.file.Fd()), &st)
	}
	if err != nil {
		return protocol.FsEntryInfo{}, opError("fstat", err)
	}
	return entryInfo(h.path, &st), nil
}

func (s *Service) fsetStat(id uint32, o *protocol.FsFSetStat) error {
	h, err := s.acquire(id, o.Handle, "fsetstat", fileHandle)
	if err != nil {
		return err
	}
	defer h.release()
	h.mu.Lock()
	defer h.mu.Unlock()
	return fsetStat(h.file, h.path, o.Attrs)
}

// --- streams ---

func (s *Service) startRead(ctx context.Context, id uint32, o *protocol.FsRead, flow bool) error {
	h, err := s.acquire(id, o.Handle, "read", readHandle)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithCancel(ctx)
	rs := &readStream{owner: id, cancel: cancel}
	if flow && o.Window > 0 {
		rs.flow = sessionio.NewCredit(int64(o.Window))
	}
	s.mu.Lock()
	s.reads[id] = rs
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer cancel()
		q := s.out.NewQueue(s.opts.HighWater, s.opts.LowWater)
		err := s.stream(rctx, id, h, o, q, rs.flow)
		h.release()
		s.mu.Lock()
		live := s.reads[id] == rs
		if live {
			delete(s.reads, id)
		}
		s.mu.Unlock()
		if !live || rctx.Err() != nil {
			q.Close() // aborted (relay client gone): no terminal frame
			return
		}
		r := protocol.FsResponse{OK: err == nil}
		if err != nil {
			msg := err.Error()
			r.Error = &msg
		}
		q.PushMsg(context.Background(), id, protocol.TypeFsResponse, r)
	}()
	return nil
}

// stream reads the file from offset in chunks onto q (which applies backpressure). Each chunk
// is one operation on the handle (seek, read), so waiting for the channel or for credit never
// holds the handle.
func (s *Service) stream(ctx context.Context, id uint32, h *handle, o *protocol.FsRead, q *sessionio.Queue, flow *sessionio.Credit) error {
	off := int64(o.Offset) // 2^63 and above are negative: lseek refuses them, as the reference's
	remaining := int64(-1)
	if o.Len != nil {
		remaining = int64(*o.Len)
	}
	for remaining != 0 {
		n := s.opts.ChunkSize
		if remaining > 0 {
			n = int(min(int64(n), remaining))
		}
		if flow != nil {
			var ok bool
			if n, ok = flow.Take(ctx, n); !ok {
				return ctx.Err()
			}
		}
		buf := sessionio.GetBuf()
		m, err := h.readAt((*buf)[:n], off)
		if flow != nil && m < n {
			flow.Add(int64(n - m)) // the unread part of the grant goes back
		}
		if m > 0 {
			off += int64(m)
			if remaining > 0 {
				remaining -= int64(m)
			}
			if perr := q.PushData(ctx, id, protocol.TypeFsData, buf, m); perr != nil {
				return perr
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// readAt is one read of the handle's file at off, as the reference's seek then read: lseek's
// error is "seek: ...", read's "read: ...", and io.EOF when nothing is left.
func (h *handle) readAt(p []byte, off int64) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := h.file.Seek(off, io.SeekStart); err != nil {
		return 0, opError("seek", err)
	}
	n, err := h.file.Read(p)
	if err != nil && err != io.EOF {
		return n, opError("read", err)
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

func (s *Service) startWrite(ctx context.Context, id uint32, o *protocol.FsWrite, flow bool) error {
	h, err := s.acquire(id, o.Handle, "write", writeHandle)
	if err != nil {
		return err
	}
	cfg := sessionio.SinkConfig{Limit: s.opts.WriteLimit, Budget: s.opts.WriteBudget}
	flow = flow && o.Window > 0
	if flow {
		cfg.Grant = func(n int) {
			s.out.ControlMsg(ctx, id, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(n)})
		}
	}
	ws := &writeStream{owner: id, in: sessionio.NewSink(ctx, cfg)}
	s.mu.Lock()
	s.writes[id] = ws
	s.mu.Unlock()
	if flow {
		s.out.ControlMsg(ctx, id, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(s.opts.WriteLimit)})
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		w := &fileWriter{h: h, off: int64(o.Offset)}
		err := ws.in.Run(w)
		h.release()
		s.mu.Lock()
		live := s.writes[id] == ws
		if live {
			delete(s.writes, id)
		}
		s.mu.Unlock()
		switch {
		case !live || err == nil: // aborted: no terminal frame
			return
		case err == io.EOF:
			err = nil
			if o.Len != nil && uint64(w.n) != *o.Len {
				err = fmt.Errorf("write length mismatch: expected %d, wrote %d", *o.Len, w.n)
			}
		}
		ws.in.Close()
		s.reply(ctx, id, nil, err)
	}()
	return nil
}

// fileWriter writes each chunk at a running offset (or appends, for append handles) as the
// reference does: one operation on the handle, seek then write; a chunk whose write failed
// does not count as written.
type fileWriter struct {
	h   *handle
	off int64 // 2^63 and above are negative: lseek refuses them
	n   int64
}

func (w *fileWriter) Write(p []byte) (int, error) {
	w.h.mu.Lock()
	defer w.h.mu.Unlock()
	if !w.h.append_ {
		if _, err := w.h.file.Seek(w.off, io.SeekStart); err != nil {
			return 0, opError("seek", err)
		}
	}
	n, err := w.h.file.Write(p)
	if err != nil {
		return n, opError("write", err)
	}
	w.off += int64(n)
	w.n += int64(n)
	return n, nil
}

// Data handles a host core.fs.data chunk: it goes to the write stream of its id; an empty one
// is EOF. It reports false for an unknown id (the caller answers "unknown write session").
func (s *Service) Data(id uint32, data []byte) bool {
	s.mu.Lock()
	ws := s.writes[id]
	s.mu.Unlock()
	if ws == nil {
		return false
	}
	if len(data) == 0 {
		ws.in.CloseWrite()
	} else {
		ws.in.Write(data) // waits for room only if the host ignores flow control
	}
	return true
}

// Credit adds flow-control credit to a read stream; it reports whether one had the id.
func (s *Service) Credit(id uint32, n uint32) bool {
	s.mu.Lock()
	rs := s.reads[id]
	s.mu.Unlock()
	if rs == nil || rs.flow == nil {
		return false
	}
	rs.flow.Add(int64(n))
	return true
}

// CloseRange drops the handles and streams owned by ids in [start, end), without frames.
func (s *Service) CloseRange(start, end uint32) int {
	return s.closeWhere(func(id uint32) bool { return id >= start && id < end })
}

// Close ends every handle and stream (shutdown, or the host is gone).
func (s *Service) Close() { s.closeWhere(func(uint32) bool { return true }) }

func (s *Service) closeWhere(in func(id uint32) bool) int {
	s.mu.Lock()
	var files []*handle
	for n, h := range s.handles {
		if in(h.owner) {
			files = append(files, h)
			delete(s.handles, n)
		}
	}
	var sinks []*sessionio.Sink
	for id, ws := range s.writes {
		if in(id) {
			sinks = append(sinks, ws.in)
			delete(s.writes, id)
		}
	}
	var cancels []context.CancelFunc
	for id, rs := range s.reads {
		if in(id) {
			cancels = append(cancels, rs.cancel)
			delete(s.reads, id)
		}
	}
	s.mu.Unlock()
	for _, c := range cancels {
		c()
	}
	for _, w := range sinks {
		w.Close()
	}
	for _, h := range files {
		h.release() // the table's reference: the file closes once no stream uses it
	}
	return len(files) + len(sinks) + len(cancels)
}

// Counts returns the open handles, and the open read and write streams (the heartbeat's
// active_fs_streams).
func (s *Service) Counts() (handles, streams int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.handles), len(s.reads) + len(s.writes)
}
