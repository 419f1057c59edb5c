package refmodel

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agentd/agentd/agent"
	"github.com/agentd/agentd/exec"
	"github.com/agentd/agentd/internal/testkit/testutil"
)

var (
	flagCases = flag.Int("cases", 240, "generated cases (make diff-ref N=...)")
	flagSeed  = flag.Int64("seed", 1, "generator seed (make diff-ref SEED=...)")
	flagOnly  = flag.String("only", "", "run only the cases whose name contains this")
	flagShow  = flag.Bool("show", false, "print every case's normalized transcripts")
)

// TestMain lets the test binary act as agentd's pre-exec helper, as agentd itself does.
func TestMain(m *testing.M) {
	if exec.IsHelper() {
		exec.HelperMain()
	}
	os.Exit(m.Run())
}

// stepTimeout bounds a wait for a reply; it only runs out when a side never answers (which is
// itself a difference).
const stepTimeout = 5 * time.Second

// system is one agent under test, with everything it sent so far.
type system struct {
	name    string
	root    string
	send    func([]byte)
	mu      sync.Mutex
	log     []frame
	notify  chan struct{}
	handles map[string]uint64 // symbolic handle name -> this system's number
}

func (s *system) collect(frames <-chan frame) {
	for f := range frames {
		s.mu.Lock()
		s.log = append(s.log, f)
		s.mu.Unlock()
		select {
		case s.notify <- struct{}{}:
		default:
		}
	}
}

// of returns the frames sent so far on the given ids.
func (s *system) of(ids map[uint32]bool) []frame {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []frame
	for _, f := range s.log {
		if ids[f.ID] {
			out = append(out, f)
		}
	}
	return out
}

// The configuration both sides share.
var (
	baseEnv   = []string{"LANG=C", "BASE=from-config"}
	agentPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// startAgentd runs agentd in-process on a socket pair, with a stock host's handshake (no
// extensions: the reference's protocol only).
func startAgentd(t *testing.T, root string) *system {
	a, b := testutil.SocketPair(t)
	ag := agent.New(agent.Config{Port: a, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Exec: exec.Options{BaseEnv: baseEnv, AgentPath: agentPath}})
	served := make(chan struct{})
	go func() {
		defer close(served)
		if ag.Handshake() == nil {
			ag.Serve(context.Background())
		}
		a.Close()
	}()
	s := &system{name: "agentd", root: root, notify: make(chan struct{}, 1), handles: map[string]uint64{}}
	var wmu sync.Mutex
	s.send = func(raw []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		b.Write(raw)
	}
	read := func() (frame, error) {
		var hdr [4]byte
		if _, err := io.ReadFull(b, hdr[:]); err != nil {
			return frame{}, err
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(b, body); err != nil {
			return frame{}, err
		}
		return parseGuestFrame(body)
	}
	if f, err := read(); err != nil || f.Type != "core.init.resolved" {
		t.Fatalf("agentd: first frame %+v %v", f, err)
	}
	s.send(hostFrame{typ: "core.init.ack", payload: Map{}}.encode(s))
	if f, err := read(); err != nil || f.Type != "core.ready" {
		t.Fatalf("agentd: %+v %v", f, err)
	}
	frames := make(chan frame, 256)
	go func() {
		defer close(frames)
		for {
			f, err := read()
			if err != nil {
				return
			}
			frames <- f
		}
	}()
	go s.collect(frames)
	t.Cleanup(func() { b.Close(); <-served })
	return s
}

// parseGuestFrame decodes a frame (after its length prefix) with our own codec.
func parseGuestFrame(b []byte) (frame, error) {
	if len(b) < 5 {
		return frame{}, fmt.Errorf("short frame")
	}
	f := frame{ID: binary.BigEndian.Uint32(b), Flags: b[4]}
	env, err := decode(b[5:])
	if err != nil {
		return f, err
	}
	m, _ := env.(Map)
	t, _ := m.get("t")
	f.Type, _ = t.(string)
	p, _ := m.get("p")
	pb, _ := p.([]byte)
	if f.P, err = decode(pb); err != nil {
		f.P = fmt.Sprintf("undecodable payload %x", pb)
	}
	return f, nil
}

func startModel(t *testing.T, root string) *system {
	m := newModel(modelConfig{BaseEnv: baseEnv, AgentPath: agentPath, ScriptsDir: "/.msb/scripts"})
	s := &system{name: "model", root: root, send: m.handle, notify: make(chan struct{}, 1), handles: map[string]uint64{}}
	go s.collect(m.out)
	t.Cleanup(func() { m.close(); close(m.out) })
	return s
}

// --- host frames ---

// pathRef is a path under the system's scratch root ("" and paths starting with "=" are
// used as they are, without the "=").
type pathRef string

// hRef is a handle by symbolic name (an unknown name is a handle number nobody has).
type hRef string

const noSuchHandle = 424242

type hostFrame struct {
	id      uint32
	typ     string
	flags   *byte                 // nil: the type's own
	v       int                   // 0: 5
	payload any                   // with pathRef and hRef placeholders
	body    any                   // a whole envelope, instead of {v, t, p}
	mangle  func(p []byte) []byte // rewrites the encoded payload
}

// encoded is v's encoding as a byte string (a payload inside a hand-made envelope); asInts
// is the same as an array of integers.
type (
	encoded struct{ v any }
	asInts  struct{ v any }
)

func (h hostFrame) encode(s *system) []byte {
	var body []byte
	if h.body != nil {
		body = encode(resolve(s, h.body))
	} else {
		v := h.v
		if v == 0 {
			v = 5
		}
		p := encode(resolve(s, h.payload))
		if h.mangle != nil {
			p = h.mangle(p)
		}
		body = encode(Map{{"v", uint64(v)}, {"t", h.typ}, {"p", p}})
	}
	flags := types[h.typ].flags
	if h.flags != nil {
		flags = *h.flags
	}
	out := binary.BigEndian.AppendUint32(nil, uint32(5+len(body)))
	out = binary.BigEndian.AppendUint32(out, h.id)
	return append(append(out, flags), body...)
}

func resolve(s *system, v any) any {
	switch x := v.(type) {
	case pathRef:
		p := string(x)
		if p == "" {
			return ""
		}
		if strings.HasPrefix(p, "=") {
			return p[1:]
		}
		return s.root + "/" + p
	case hRef:
		if n, ok := s.handles[string(x)]; ok {
			return n
		}
		return uint64(noSuchHandle)
	case Map:
		out := make(Map, len(x))
		for i, kv := range x {
			out[i] = KV{resolve(s, kv.K), resolve(s, kv.V)}
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = resolve(s, e)
		}
		return out
	case Tag:
		return Tag{x.N, resolve(s, x.V)}
	case Indef:
		return Indef{resolve(s, x.V)}
	case Raw:
		return x
	case encoded:
		return encode(resolve(s, x.v))
	case asInts:
		b := encode(resolve(s, x.v))
		arr := make([]any, len(b))
		for i, c := range b {
			arr[i] = uint64(c)
		}
		return arr
	}
	return v
}

// --- cases ---

// step sends frames, then waits until done holds for what the system sent on the case's ids.
type step struct {
	frames []hostFrame
	done   func(fs []frame) bool
	opens  map[uint32]string // ids whose Handle reply names a symbolic handle
}

type testCase struct {
	name   string
	ids    map[uint32]bool
	steps  []step
	fsTree bool // compare the scratch trees afterwards
	serial bool // run the two sides one after the other
	setup  func(root string)
}

// run drives one system through a case.
func (s *system) run(c *testCase) error {
	for i, st := range c.steps {
		for _, f := range st.frames {
			s.send(f.encode(s))
		}
		deadline := time.NewTimer(stepTimeout)
		for st.done != nil && !st.done(s.of(c.ids)) {
			select {
			case <-s.notify:
			case <-deadline.C:
				return fmt.Errorf("step %d: no complete answer within %s", i, stepTimeout)
			}
		}
		deadline.Stop()
		for _, f := range s.of(c.ids) {
			if name, ok := st.opens[f.ID]; ok && f.Type == "core.fs.response" {
				if d, ok := mget(f.P, "data"); ok {
					if h, ok := mget(d, "Handle"); ok {
						if n, ok := h.(uint64); ok {
							s.handles[name] = n
						}
					}
				}
			}
		}
	}
	return nil
}

func mget(v any, k string) (any, bool) {
	m, ok := v.(Map)
	if !ok {
		return nil, false
	}
	return m.get(k)
}

// --- normalization ---

var handleNum = regexp.MustCompile(`handle(:? )(\d+)`)

// normalize renders one system's frames per id, keeping what must match and dropping what may
// legitimately differ: pids, times, chunk boundaries (data merged), the order across ids, the
// handle numbers (named), the scratch root, decoder wording in core.error.
func normalize(s *system, frames []frame) map[uint32][]string {
	names := map[uint64]string{}
	for n, v := range s.handles {
		names[v] = n
	}
	byID := map[uint32][]frame{}
	for _, f := range frames {
		byID[f.ID] = append(byID[f.ID], f)
	}
	out := map[uint32][]string{}
	for id, fs := range byID {
		// Session output (exec, tcp and fs data) is produced apart from the replies to the
		// host's frames on both sides, so where it falls between them is timing: data is
		// merged per type and listed after the id's other frames.
		var lines []string
		data := map[string][]byte{}
		for _, f := range fs {
			switch f.Type {
			case "core.exec.stdout", "core.exec.stderr", "core.fs.data", "core.tcp.data":
				d, _ := mget(f.P, "data")
				b, _ := d.([]byte)
				data[f.Type] = append(data[f.Type], b...)
				if f.Flags != 0 {
					lines = append(lines, fmt.Sprintf("%s with flags %d", f.Type, f.Flags))
				}
				continue
			}
			lines = append(lines, fmt.Sprintf("%s flags=%d %s", f.Type, f.Flags, render(clean(s, f, names))))
		}
		for _, t := range sortedKeys(data) {
			lines = append(lines, fmt.Sprintf("%s %q", t, strings.ReplaceAll(string(data[t]), s.root, "$R")))
		}
		// The probe's answer comes from the loop at once; a session's own frames from its
		// goroutine: on both sides their order is timing. It goes last.
		for i, l := range lines {
			if strings.Contains(l, fmt.Sprintf(`"unknown TCP session: %d"`, id)) && i < len(lines)-1 {
				lines = append(append(lines[:i:i], lines[i+1:]...), l)
				break
			}
		}
		out[id] = lines
	}
	return out
}

// clean normalizes a payload.
func clean(s *system, f frame, names map[uint64]string) any {
	var walk func(v any, key string) any
	walk = func(v any, key string) any {
		switch x := v.(type) {
		case string:
			x = strings.ReplaceAll(x, s.root, "$R")
			return handleNum.ReplaceAllStringFunc(x, func(m string) string {
				sub := handleNum.FindStringSubmatch(m)
				var n uint64
				fmt.Sscan(sub[2], &n)
				if name, ok := names[n]; ok {
					return "handle" + sub[1] + name
				}
				return m
			})
		case uint64:
			switch key {
			case "pid":
				return "PID"
			case "Handle":
				if name, ok := names[x]; ok {
					return name
				}
				return "unnamed handle"
			case "atime", "mtime", "modified":
				if x >= 1e9 {
					return "T"
				}
			}
			return x
		case int64:
			if (key == "atime" || key == "mtime" || key == "modified") && x >= 1e9 {
				return "T"
			}
			return x
		case Map:
			out := make(Map, len(x))
			for i, kv := range x {
				k, _ := kv.K.(string)
				out[i] = KV{kv.K, walk(kv.V, k)}
			}
			if key == "" && f.Type == "core.error" { // decoder wording differs: kind and type count
				if k, _ := out.get("kind"); k != "invalid_flags" {
					for i := range out {
						if out[i].K == "message" {
							out[i].V = "…"
						}
					}
				}
			}
			return out
		case []any:
			out := make([]any, len(x))
			for i, e := range x {
				out[i] = walk(e, "")
			}
			if key == "List" { // directory order is the filesystem's
				sort.Slice(out, func(i, j int) bool { return render(out[i]) < render(out[j]) })
			}
			return out
		}
		return v
	}
	return walk(f.P, "")
}

// tree describes a scratch root: every entry's type, mode, owner, size, content and target.
func tree(root string) []string {
	var out []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil {
			return nil
		}
		rel := strings.TrimPrefix(p, root)
		line := fmt.Sprintf("%s %o %d:%d", rel, st.Mode, st.Uid, st.Gid)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, _ := os.ReadFile(p)
			line += fmt.Sprintf(" %d %x", len(b), sha256.Sum256(b))
		case unix.S_IFLNK:
			target, _ := os.Readlink(p)
			line += " -> " + strings.ReplaceAll(target, root, "$R")
		}
		out = append(out, line)
		return nil
	})
	return out
}

// fixture is the tree every fs and exec case starts from.
func fixture(root string) {
	os.RemoveAll(root)
	os.MkdirAll(root+"/d/sub", 0o755)
	os.Chmod(root+"/d/sub", 0o700)
	os.Mkdir(root+"/e", 0o755)
	for p, c := range map[string]string{"f": "hello", "g": "0123456789", "d/x": "x", "d/y": "yy", "d/sub/z": ""} {
		os.WriteFile(root+"/"+p, []byte(c), 0o644)
	}
	os.Chmod(root+"/g", 0o600)
	os.WriteFile(root+"/script", []byte("echo script-ran $0 \"$@\"\n"), 0o755)
	os.WriteFile(root+"/shebang", []byte("#!/bin/sh\necho shebang-ran \"$@\"\n"), 0o755)
	os.WriteFile(root+"/noexec", []byte("echo x\n"), 0o644)
	os.Symlink("f", root+"/l")
	os.Symlink("d", root+"/dl")
	os.Symlink("missing", root+"/broken")
	for _, p := range []string{"", "/d", "/d/sub", "/e", "/f", "/g", "/d/x", "/d/y", "/d/sub/z", "/script", "/shebang", "/noexec"} {
		unix.Lutimes(root+p, []unix.Timeval{{Sec: 1000}, {Sec: 2000}})
	}
}

// TestDifferential runs the generated cases against agentd and the model and fails on every
// difference between their normalized answers (or the trees they leave behind).
func TestDifferential(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the exec cases switch users: needs root")
	}
	base := t.TempDir()
	echo := testutil.Serve(t, testutil.Echo)
	// The sink takes everything and never closes its side while the test runs: its sessions end
	// only by what the host does.
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	sink := testutil.Serve(t, func(c *net.TCPConn) { io.Copy(io.Discard, c); <-release; c.Close() })
	env := genEnv{echo: echo.Addr.Port, sink: sink.Addr.Port, closed: testutil.ClosedPort(t)}
	cases := generate(rand.New(rand.NewSource(*flagSeed)), *flagCases, env)
	roots := [2]string{base + "/a", base + "/m"} // of one length: messages quote positions in paths
	sys := [2]*system{startAgentd(t, roots[0]), startModel(t, roots[1])}
	type result struct {
		frames []frame
		tree   []string
		err    error
	}
	// Run every case; compare at the end, over all that each side sent (a late frame still
	// counts against the case whose id it carries).
	type ran struct {
		c       *testCase
		errs    [2]error
		trees   [2][]string
		handles [2]map[string]uint64
	}
	var done []ran
	for _, c := range cases {
		if *flagOnly != "" && !strings.Contains(c.name, *flagOnly) {
			continue
		}
		r := ran{c: c}
		var wg sync.WaitGroup
		for i, s := range sys {
			fixture(roots[i])
			if c.setup != nil {
				c.setup(roots[i])
			}
			wg.Add(1)
			run := func() {
				defer wg.Done()
				r.errs[i] = s.run(c)
				if c.fsTree {
					r.trees[i] = tree(roots[i])
				}
				r.handles[i], s.handles = s.handles, map[string]uint64{}
			}
			if c.serial { // one side at a time: the other's forks would hold its pipes open
				run()
			} else {
				go run()
			}
		}
		wg.Wait()
		done = append(done, r)
	}
	differences := 0
	for _, r := range done {
		c := r.c
		var n [2]map[uint32][]string
		for i, s := range sys {
			s.handles = r.handles[i]
			n[i] = normalize(s, s.of(c.ids))
		}
		var diff []string
		for _, id := range sortedIDs(c.ids) {
			a, m := strings.Join(n[0][id], "\n  "), strings.Join(n[1][id], "\n  ")
			if a != m {
				diff = append(diff, fmt.Sprintf("id %d\n agentd:\n  %s\n model:\n  %s", id, a, m))
			} else if *flagShow {
				t.Logf("%s id %d:\n  %s", c.name, id, a)
			}
		}
		if a, m := strings.Join(r.trees[0], "\n  "), strings.Join(r.trees[1], "\n  "); a != m {
			diff = append(diff, fmt.Sprintf("trees differ\n agentd:\n  %s\n model:\n  %s", a, m))
		}
		for i := range r.errs {
			if r.errs[i] != nil {
				diff = append(diff, fmt.Sprintf("%s: %v", sys[i].name, r.errs[i]))
			}
		}
		if len(diff) > 0 {
			differences++
			t.Errorf("case %s differs:\n%s\n sent:\n%s", c.name, strings.Join(diff, "\n"), sentFrames(sys[1], c))
		}
	}
	t.Logf("%d cases (seed %d), %d with differences", len(done), *flagSeed, differences)
}

func sortedIDs(ids map[uint32]bool) []uint32 {
	out := make([]uint32, 0, len(ids))
	for id := range ids {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// sentFrames renders the host frames of a case (as sent to s).
func sentFrames(s *system, c *testCase) string {
	var b strings.Builder
	for i, st := range c.steps {
		for _, f := range st.frames {
			raw := f.encode(s)
			env, _ := decode(raw[9:])
			p := any(nil)
			if m, ok := env.(Map); ok {
				if pb, ok := m.get("p"); ok {
					if bb, ok := pb.([]byte); ok {
						p, _ = decode(bb)
					}
				}
			}
			fmt.Fprintf(&b, "  step %d: id %d flags %d %s\n    payload %s\n", i, f.id, raw[8], render(env), render(p))
		}
	}
	return strings.ReplaceAll(b.String(), s.root, "$R")
}
