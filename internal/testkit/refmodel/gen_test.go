package refmodel

import (
	"fmt"
	"math/rand"
	"strings"
)

// The generator: random cases over exec, fs (every FsOp, handles, streams, errors), tcp and
// malformed payloads, from a seed.

type genEnv struct{ echo, sink, closed int }

type gen struct {
	r      *rand.Rand
	env    genEnv
	nextID uint32
	c      *testCase
	nh     int // handle names given out
}

func generate(r *rand.Rand, n int, env genEnv) []*testCase {
	g := &gen{r: r, env: env}
	kinds := []struct {
		name string
		w    int
		fn   func()
	}{{"fs", 40, g.fsCase}, {"exec", 25, g.execCase}, {"tcp", 12, g.tcpCase}, {"malformed", 23, g.malformedCase}}
	total := 0
	for _, k := range kinds {
		total += k.w
	}
	var cases []*testCase
	for i := 0; i < n; i++ {
		x := r.Intn(total)
		for _, k := range kinds {
			if x < k.w {
				g.c = &testCase{name: fmt.Sprintf("%03d-%s", i, k.name), ids: map[uint32]bool{}}
				k.fn()
				cases = append(cases, g.c)
				break
			}
			x -= k.w
		}
	}
	return cases
}

func (g *gen) pick(xs ...string) string { return xs[g.r.Intn(len(xs))] }
func (g *gen) chance(p float64) bool    { return g.r.Float64() < p }

func (g *gen) id() uint32 {
	g.nextID++
	g.c.ids[g.nextID] = true
	return g.nextID
}

// foreignID is an id of another relay client (slot 1).
func (g *gen) foreignID() uint32 {
	id := g.id() + relayStep
	g.c.ids[id] = true
	return id
}

func (g *gen) add(st step) { g.c.steps = append(g.c.steps, st) }

// --- waits ---

func terminals(id uint32, n int) func([]frame) bool {
	return func(fs []frame) bool {
		k := 0
		for _, f := range fs {
			if f.ID == id && f.Flags&1 != 0 {
				k++
			}
		}
		return k >= n
	}
}

func isProbeReply(f frame, id uint32) bool {
	e, _ := mget(f.P, "error")
	return f.ID == id && f.Type == "core.tcp.failed" && e == fmt.Sprintf("unknown TCP session: %d", id)
}

// probe is tcp.data on an id that has no tcp session: its answer (tcp.failed "unknown TCP
// session") comes once everything sent before it on the channel was handled.
func probe(id uint32) hostFrame {
	return hostFrame{id: id, typ: "core.tcp.data", payload: Map{{"data", []byte("probe")}}}
}

func probed(id uint32) func([]frame) bool {
	return func(fs []frame) bool {
		for _, f := range fs {
			if isProbeReply(f, id) {
				return true
			}
		}
		return false
	}
}

// fsProbe is fs.data on an id without a write session ("unknown write session"): the probe
// for cases whose own frames may get the tcp probe's answer.
func fsProbe(id uint32) hostFrame {
	return hostFrame{id: id, typ: "core.fs.data", payload: Map{{"data", []byte("probe")}}}
}

func fsProbed(id uint32) func([]frame) bool {
	return func(fs []frame) bool {
		for _, f := range fs {
			e, _ := mget(f.P, "error")
			if f.ID == id && f.Type == "core.fs.response" && e == fmt.Sprintf("unknown write session: %d", id) {
				return true
			}
		}
		return false
	}
}

func all(conds ...func([]frame) bool) func([]frame) bool {
	return func(fs []frame) bool {
		for _, c := range conds {
			if !c(fs) {
				return false
			}
		}
		return true
	}
}

func hasType(id uint32, t string, n int) func([]frame) bool {
	return func(fs []frame) bool {
		k := 0
		for _, f := range fs {
			if f.ID == id && f.Type == t {
				k++
			}
		}
		return k >= n
	}
}

func stdoutHas(id uint32, s string) func([]frame) bool {
	return func(fs []frame) bool {
		var b []byte
		for _, f := range fs {
			if f.ID == id && f.Type == "core.exec.stdout" {
				d, _ := mget(f.P, "data")
				x, _ := d.([]byte)
				b = append(b, x...)
			}
		}
		return strings.Contains(string(b), s)
	}
}

// execEnded: exec.exited, exec.failed, or a core.error for the request itself.
func execEnded(id uint32) func([]frame) bool {
	return func(fs []frame) bool {
		for _, f := range fs {
			if f.ID == id && (f.Type == "core.exec.exited" || f.Type == "core.exec.failed") {
				return true
			}
		}
		return len(fs) > 0 && fs[0].ID == id && fs[0].Type == "core.error" && !hasType(id, "core.exec.started", 1)(fs)
	}
}

// --- fs ---

var fsPaths = []string{"f", "g", "d", "d/x", "d/y", "d/sub", "d/sub/z", "e", "l", "dl", "broken", "missing",
	"missing/leaf", "f/child", "d/", "d//", "dl/", "d/.", "d/./x", "e/new", "d/sub/../x", "script", "new",
	"new/deeper/", "", "f\x00x", "new\x00"}

// path picks a path; readOnly ones may also be relative names nobody has.
func (g *gen) path(readOnly bool) pathRef {
	if readOnly && g.chance(0.05) {
		return pathRef("=" + g.pick("no-such-relative-name", "./no-such", "missing/.."))
	}
	return pathRef(g.pick(fsPaths...))
}

func (g *gen) handleRef() hRef {
	if g.nh == 0 || g.chance(0.1) {
		return hRef("never-opened")
	}
	return hRef(fmt.Sprintf("h%d", 1+g.r.Intn(g.nh)))
}

func (g *gen) fsID() uint32 {
	if g.chance(0.1) {
		return g.foreignID()
	}
	return g.id()
}

func fsReq(id uint32, op string, fields Map) hostFrame {
	return hostFrame{id: id, typ: "core.fs.request", payload: Map{{"op", Map{{op, fields}}}}}
}

func (g *gen) optU(p float64, v uint64) any {
	if g.chance(p) {
		return v
	}
	return nil
}

func (g *gen) attrs() Map {
	size := []uint64{0, 2, 100, 1 << 63}[g.r.Intn(4)]
	return Map{{"mode", g.optU(0.4, []uint64{0o600, 0o755, 0o4755, 0o100644}[g.r.Intn(4)])},
		{"uid", g.optU(0.2, uint64(g.r.Intn(3)))}, {"gid", g.optU(0.2, uint64(g.r.Intn(3)))},
		{"size", g.optU(0.3, size)}, {"atime", g.optU(0.3, 1234)}, {"mtime", g.optU(0.3, 5678)}}
}

func (g *gen) fsCase() {
	g.c.fsTree = true
	if g.chance(0.1) {
		g.disconnectCase()
		return
	}
	for n := 2 + g.r.Intn(7); n > 0; n-- {
		g.fsStep()
	}
}

// disconnect is core.relay.client.disconnected for relay slot 1 (the foreign ids): sent on an
// id of its own, answered by nobody.
func (g *gen) disconnect() hostFrame {
	return hostFrame{id: g.id(), typ: "core.relay.client.disconnected",
		payload: Map{{"id_start", uint64(relayStep + 1)}, {"id_end_exclusive", uint64(2*relayStep + 1)}}}
}

// disconnectCase: a relay client's handles and sessions end with it, without frames; another
// client's stay.
func (g *gen) disconnectCase() {
	g.c.name += "-disconnect"
	mine, theirs := g.id(), g.foreignID()
	g.nh += 2
	hm, ht := fmt.Sprintf("h%d", g.nh-1), fmt.Sprintf("h%d", g.nh)
	open := Map{{"path", pathRef("f")}, {"options", Map{{"read", true}, {"write", false}, {"append", false},
		{"create", false}, {"truncate", false}, {"create_new", false}, {"mode", nil}}}}
	g.add(step{frames: []hostFrame{fsReq(mine, "OpenFile", open)}, done: terminals(mine, 1), opens: map[uint32]string{mine: hm}})
	g.add(step{frames: []hostFrame{fsReq(theirs, "OpenFile", open)}, done: terminals(theirs, 1), opens: map[uint32]string{theirs: ht}})
	g.add(step{frames: []hostFrame{g.disconnect()}})
	a, b := g.id(), g.foreignID()
	g.add(step{frames: []hostFrame{fsReq(a, "FStat", Map{{"handle", hRef(hm)}}), fsReq(b, "FStat", Map{{"handle", hRef(ht)}})},
		done: all(terminals(a, 1), terminals(b, 1))})
}

func (g *gen) fsStep() {
	id := g.fsID()
	one := func(op string, f Map) { g.add(step{frames: []hostFrame{fsReq(id, op, f)}, done: terminals(id, 1)}) }
	b := func() bool { return g.chance(0.5) }
	switch g.pick("RealPath", "Stat", "SetStat", "List", "ReadLink", "Symlink", "Mkdir", "Remove", "RemoveDir",
		"Copy", "Rename", "OpenFile", "OpenFile", "OpenFile", "OpenDir", "CloseHandle", "Read", "Read", "Write",
		"Write", "ReadDir", "FStat", "FSetStat") {
	case "RealPath":
		one("RealPath", Map{{"path", g.path(true)}})
	case "Stat":
		one("Stat", Map{{"path", g.path(true)}, {"follow_symlink", b()}})
	case "SetStat":
		one("SetStat", Map{{"path", g.path(false)}, {"follow_symlink", b()}, {"attrs", g.attrs()}})
	case "List":
		one("List", Map{{"path", g.path(true)}})
	case "ReadLink":
		one("ReadLink", Map{{"path", g.path(true)}})
	case "Symlink":
		one("Symlink", Map{{"target", g.pick("f", "d", "../x", "missing", "")}, {"link_path", g.path(false)}})
	case "Mkdir":
		one("Mkdir", Map{{"path", g.path(false)}, {"mode", g.optU(0.4, 0o700)}})
	case "Remove":
		one("Remove", Map{{"path", g.path(false)}})
	case "RemoveDir":
		one("RemoveDir", Map{{"path", g.path(false)}, {"recursive", b()}})
	case "Copy":
		one("Copy", Map{{"src", g.path(false)}, {"dst", g.path(false)}})
	case "Rename":
		one("Rename", Map{{"src", g.path(false)}, {"dst", g.path(false)}})
	case "OpenFile":
		g.nh++
		name := fmt.Sprintf("h%d", g.nh)
		opts := Map{{"read", b()}, {"write", b()}, {"append", g.chance(0.2)}, {"create", b()},
			{"truncate", g.chance(0.2)}, {"create_new", g.chance(0.1)}, {"mode", g.optU(0.3, 0o640)}}
		if g.chance(0.6) { // mostly something that opens
			opts[0].V, opts[1].V, opts[2].V, opts[4].V, opts[5].V = true, true, false, false, false
		}
		g.add(step{frames: []hostFrame{fsReq(id, "OpenFile", Map{{"path", g.path(false)}, {"options", opts}})},
			done: terminals(id, 1), opens: map[uint32]string{id: name}})
	case "OpenDir":
		g.nh++
		g.add(step{frames: []hostFrame{fsReq(id, "OpenDir", Map{{"path", g.path(true)}})},
			done: terminals(id, 1), opens: map[uint32]string{id: fmt.Sprintf("h%d", g.nh)}})
	case "CloseHandle":
		one("CloseHandle", Map{{"handle", g.handleRef()}})
	case "FStat":
		one("FStat", Map{{"handle", g.handleRef()}})
	case "FSetStat":
		one("FSetStat", Map{{"handle", g.handleRef()}, {"attrs", g.attrs()}})
	case "ReadDir":
		one("ReadDir", Map{{"handle", g.handleRef()}, {"limit", g.optU(0.5, uint64(g.r.Intn(3)))}})
	case "Read":
		off := []uint64{0, 1, 3, 100, 1 << 63}[g.r.Intn(5)]
		one("Read", Map{{"handle", g.handleRef()}, {"offset", off}, {"len", g.optU(0.5, uint64(g.r.Intn(8)))}})
	case "Write":
		g.writeStream(id)
	}
}

// writeStream is Write, its chunks (maybe a null one, maybe other requests on the handle in
// between, as while an upload is open), EOF, and a probe.
func (g *gen) writeStream(id uint32) {
	h := g.handleRef()
	off := []uint64{0, 2, 7, 1 << 63}[g.r.Intn(4)]
	var chunks []string
	total := 0
	for k := g.r.Intn(4); k > 0; k-- {
		c := g.pick("abc", "0123456789", "x", "zz")
		chunks = append(chunks, c)
		total += len(c)
	}
	var ln any
	if g.chance(0.5) {
		ln = uint64(total + []int{0, 0, 1, -1}[g.r.Intn(4)])
	}
	g.add(step{frames: []hostFrame{fsReq(id, "Write", Map{{"handle", h}, {"offset", off}, {"len", ln}})}})
	for i, c := range chunks {
		st := step{frames: []hostFrame{{id: id, typ: "core.fs.data", payload: Map{{"data", []byte(c)}}}}}
		if off == 1<<63 { // this chunk fails (lseek): see it fail before sending more
			st.done = terminals(id, 1)
			g.add(st)
			continue
		}
		g.add(st)
		if i == 0 && g.chance(0.3) {
			g.add(step{frames: []hostFrame{{id: id, typ: "core.fs.data", payload: Map{{"data", nil}}}}, done: terminals(id, 1)})
		}
		if g.chance(0.3) { // another request on the same handle while the upload is open
			other := g.id()
			op := g.pick("FStat", "CloseHandle", "FSetStat")
			f := Map{{"handle", h}}
			if op == "FSetStat" {
				f = append(f, KV{"attrs", Map{{"mode", uint64(0o600)}}})
			}
			g.add(step{frames: []hostFrame{fsReq(other, op, f)}, done: terminals(other, 1)})
		}
	}
	g.add(step{frames: []hostFrame{{id: id, typ: "core.fs.data", payload: Map{{"data", []byte{}}}}, probe(id)},
		done: all(probed(id), func(fs []frame) bool {
			for _, f := range fs { // the stream's own answer (or its refusal), not just "unknown write session"
				e, _ := mget(f.P, "error")
				if f.ID == id && f.Type == "core.fs.response" && !strings.HasPrefix(fmt.Sprint(e), "unknown write session") {
					return true
				}
			}
			return false
		})})
}

// --- exec ---

func execReq(cmd string, args []any, f ...KV) Map {
	if args == nil {
		args = []any{}
	}
	m := Map{{"cmd", cmd}, {"args", args}, {"env", []any{}}, {"cwd", nil}, {"user", nil}, {"tty", false},
		{"rows", uint64(24)}, {"cols", uint64(80)}, {"rlimits", []any{}}}
	for _, kv := range f {
		for i := range m {
			if m[i].K == kv.K {
				m[i].V = kv.V
			}
		}
	}
	return m
}

func strs(xs ...string) []any {
	out := make([]any, len(xs))
	for i, x := range xs {
		out[i] = x
	}
	return out
}

// run1 is an exec request that runs to its end.
func (g *gen) run1(req Map, stdin ...any) {
	id := g.id()
	fr := []hostFrame{{id: id, typ: "core.exec.request", payload: req}}
	for _, d := range stdin {
		fr = append(fr, hostFrame{id: id, typ: "core.exec.stdin", payload: Map{{"data", d}}})
	}
	g.add(step{frames: fr, done: execEnded(id)})
}

func (g *gen) execCase() {
	g.c.serial = true
	tty := KV{"tty", g.chance(0.25)}
	switch g.r.Intn(15) {
	case 0:
		g.run1(execReq(g.pick("echo", "printf", "/bin/echo"), strs(g.pick("hi", "%s|", "a b", "\t"), g.pick("x", "y z", "")), tty))
	case 1:
		g.run1(execReq("sh", strs("-c", fmt.Sprintf("echo out; echo err >&2; exit %d", g.r.Intn(4))), tty))
	case 2: // stdin, maybe with a null chunk (item 3); EOF ends cat
		chunks := []any{[]byte("one\n"), []byte("two")}
		if g.chance(0.4) {
			chunks = []any{[]byte("a"), nil, []byte("b\n")}
		}
		id := g.id()
		fr := []hostFrame{{id: id, typ: "core.exec.request", payload: execReq("cat", nil)}} // no PTY: its echo races cat
		for _, c := range chunks {
			fr = append(fr, hostFrame{id: id, typ: "core.exec.stdin", payload: Map{{"data", c}}})
		}
		fr = append(fr, hostFrame{id: id, typ: "core.exec.stdin", payload: Map{{"data", []byte{}}}})
		g.add(step{frames: fr, done: hasType(id, "core.exec.exited", 1)})
	case 3:
		g.run1(execReq(g.pick("/no/such/prog", "no-such-program", "", "noexec"), nil, tty))
	case 4: // executables under the scratch root: scripts with and without #!, a directory
		cmd := pathRef(g.pick("script", "shebang", "noexec", "d", "missing"))
		f := []KV{tty}
		if g.chance(0.3) { // through the helper (agentd uses it for any rlimit)
			f = append(f, KV{"rlimits", []any{Map{{"resource", "bogus"}, {"soft", uint64(1)}, {"hard", uint64(1)}}}})
		}
		g.run1(execReq("", nil, f...).with("cmd", cmd).with("args", strs("arg")))
	case 5:
		g.run1(execReq("pwd", nil, KV{"cwd", pathRef(g.pick("d", "dl", "missing", "f", "", "d/"))}, tty))
	case 6: // environment (item 7)
		env := [][]any{strs("FOO=1"), strs("PATH=/bin:/usr/bin"), strs("PATH=/x", "PATH=/bin:/usr/bin", "FOO=a", "FOO=b"),
			strs("HOME=/custom", "NOEQUALS"), strs("A=b=c")}[g.r.Intn(5)]
		g.run1(execReq("sh", strs("-c", `echo "$PATH|$FOO|$HOME|$A|$BASE|$LANG"`), KV{"env", env}, tty))
	case 7: // users and groups (item 7)
		user := g.pick("nobody", "65534", "4242", "nobody:root", "0:65534", "no-such-user", "nobody:no-such-group", "nobody:", ":0", " root ", "", "4242:4242")
		g.run1(execReq("sh", strs("-c", `echo "$(id -u) $(id -g) $(id -G) $HOME"`), KV{"user", user}, tty))
	case 8: // NUL bytes (item 8)
		req := [][2]any{{"ec\x00ho", strs("x")}, {"echo", strs("a\x00b")}, {"echo", strs("ok")}}[g.r.Intn(3)]
		m := execReq(req[0].(string), nil, tty).with("args", req[1])
		if g.chance(0.4) {
			m = m.with("env", strs("BAD=\x00"))
		}
		if g.chance(0.2) {
			m = m.with("cwd", "/tmp\x00")
		}
		g.run1(m)
	case 9: // a PTY's size, and a resize
		id := g.id()
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.request", payload: execReq("sh", strs("-c", "stty size; read x; stty size"),
			KV{"tty", true}, KV{"rows", uint64(10 + g.r.Intn(40))}, KV{"cols", uint64(20 + g.r.Intn(100))})}},
			done: stdoutHas(id, "\n")})
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.resize", payload: Map{{"rows", uint64(33)}, {"cols", uint64(77)}}},
			{id: id, typ: "core.exec.stdin", payload: Map{{"data", []byte("go\n")}}}}, done: execEnded(id)})
	case 10: // signals: a non-standard one is ignored, SIGTERM ends the child
		id := g.id()
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.request", payload: execReq("sh", strs("-c", "echo up; exec sleep 30"), tty)}},
			done: stdoutHas(id, "up")})
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.signal", payload: Map{{"signal", int64(g.pick2(0, 64, -1))}}},
			{id: id, typ: "core.exec.signal", payload: Map{{"signal", int64(15)}}}}, done: execEnded(id)})
	case 11: // stdin to a child that closed it (item 10): one error per chunk
		id := g.id()
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.request", payload: execReq("sh",
			strs("-c", `exec 0<&-; trap "exit 3" TERM; echo closed; while :; do sleep 0.01; done`))}}, done: stdoutHas(id, "closed")})
		n := 1 + g.r.Intn(3)
		var fr []hostFrame
		for i := 0; i < n; i++ {
			fr = append(fr, hostFrame{id: id, typ: "core.exec.stdin", payload: Map{{"data", []byte("lost\n")}}})
		}
		g.add(step{frames: fr, done: hasType(id, "core.exec.stdin.error", n)})
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.signal", payload: Map{{"signal", int64(15)}}}}, done: execEnded(id)})
	case 12: // frames for exec ids that have no session are ignored
		id := g.id()
		g.add(step{frames: []hostFrame{{id: id, typ: "core.exec.stdin", payload: Map{{"data", []byte("x")}}},
			{id: id, typ: "core.exec.resize", payload: Map{{"rows", uint64(1)}, {"cols", uint64(1)}}},
			{id: id, typ: "core.exec.signal", payload: Map{{"signal", int64(9)}}}, probe(id)}, done: probed(id)})
	case 13: // a minimal request: defaults for everything optional
		g.run1(Map{{"cmd", "sh"}, {"args", strs("-c", "echo $0 $#")}})
	case 14: // exit by signal
		g.run1(execReq("sh", strs("-c", "kill -9 $$"), tty))
	}
}

func (g *gen) pick2(xs ...int) int { return xs[g.r.Intn(len(xs))] }

// with replaces a field of a map.
func (m Map) with(k string, v any) Map {
	out := append(Map{}, m...)
	for i := range out {
		if out[i].K == k {
			out[i].V = v
			return out
		}
	}
	return append(out, KV{k, v})
}

// --- tcp ---

func (g *gen) tcpCase() {
	id := g.id()
	connect := func(host string, port int) hostFrame {
		return hostFrame{id: id, typ: "core.tcp.connect", payload: Map{{"host", host}, {"port", uint64(port)}}}
	}
	data := func(d any) hostFrame { return hostFrame{id: id, typ: "core.tcp.data", payload: Map{{"data", d}}} }
	ctl := func(t string) hostFrame { return hostFrame{id: id, typ: t, payload: Map{}} }
	switch g.r.Intn(7) {
	case 0: // names and addresses that do not connect (item 8)
		host := g.pick("127.0.0.1", "::1", "localhost", "[::1]", "", "no such host", "bad..name", "127.1", "0x7f000001", "2130706433", "1.2.3.4.5", "0x")
		g.add(step{frames: []hostFrame{connect(host, g.env.closed)}, done: terminals(id, 1)})
	case 1: // echo, half-closes both ways, close: no reply
		g.add(step{frames: []hostFrame{connect(g.pick("127.0.0.1", "localhost"), g.env.echo)}, done: hasType(id, "core.tcp.connected", 1)})
		g.add(step{frames: []hostFrame{data([]byte("hello ")), data([]byte("world"))}, done: func(fs []frame) bool {
			n := 0
			for _, f := range fs {
				if f.ID == id && f.Type == "core.tcp.data" {
					d, _ := mget(f.P, "data")
					n += len(d.([]byte))
				}
			}
			return n >= 11
		}})
		g.add(step{frames: []hostFrame{ctl("core.tcp.eof")}, done: hasType(id, "core.tcp.eof", 1)})
		g.add(step{frames: []hostFrame{ctl("core.tcp.close"), probe(id)}, done: probed(id)})
	case 2: // data after the host's own eof (item 9)
		g.add(step{frames: []hostFrame{connect("127.0.0.1", g.env.sink)}, done: hasType(id, "core.tcp.connected", 1)})
		g.add(step{frames: []hostFrame{data([]byte("before")), ctl("core.tcp.eof"), data([]byte{}), data([]byte("after"))}, done: terminals(id, 1)})
		g.add(step{frames: []hostFrame{probe(id)}, done: probed(id)})
	case 3: // a null chunk (item 3) is refused; the session goes on
		g.add(step{frames: []hostFrame{connect("127.0.0.1", g.env.echo)}, done: hasType(id, "core.tcp.connected", 1)})
		g.add(step{frames: []hostFrame{data([]byte("a")), data(nil), data([]byte("b"))}, done: func(fs []frame) bool {
			return terminals(id, 1)(fs) && hasType(id, "core.tcp.data", 1)(fs) && func() bool {
				n := 0
				for _, f := range fs {
					if f.ID == id && f.Type == "core.tcp.data" {
						d, _ := mget(f.P, "data")
						n += len(d.([]byte))
					}
				}
				return n >= 2
			}()
		}})
		g.add(step{frames: []hostFrame{ctl("core.tcp.close"), probe(id)}, done: probed(id)})
	case 4: // frames for an id without a session
		g.add(step{frames: []hostFrame{ctl("core.tcp.eof"), ctl("core.tcp.close"), data([]byte("x"))}, done: terminals(id, 1)})
	case 6: // a disconnected relay client's session ends without a frame
		id = g.foreignID()
		g.add(step{frames: []hostFrame{connect("127.0.0.1", g.env.sink)}, done: hasType(id, "core.tcp.connected", 1)})
		g.add(step{frames: []hostFrame{g.disconnect()}})
		g.add(step{frames: []hostFrame{probe(id)}, done: probed(id)})
	case 5: // close, then data: the id is unknown
		g.add(step{frames: []hostFrame{connect("127.0.0.1", g.env.sink)}, done: hasType(id, "core.tcp.connected", 1)})
		g.add(step{frames: []hostFrame{ctl("core.tcp.close"), data([]byte("x"))}, done: terminals(id, 1)})
	}
}

// --- malformed payloads and frames ---

// valid payloads of every host type, for an id of their own (sessions that start end by
// themselves: "true", a Stat, a connect to a closed port).
func (g *gen) validPayload(t string) Map {
	switch t {
	case "core.exec.request":
		return execReq("true", strs("x"))
	case "core.exec.stdin", "core.fs.data", "core.tcp.data":
		return Map{{"data", []byte("d")}}
	case "core.exec.resize":
		return Map{{"rows", uint64(3)}, {"cols", uint64(4)}}
	case "core.exec.signal":
		return Map{{"signal", int64(9)}}
	case "core.fs.request":
		return Map{{"op", Map{{g.pick("Stat", "Mkdir", "OpenFile", "Read"), nil}}}}
	case "core.tcp.connect":
		return Map{{"host", "127.0.0.1"}, {"port", uint64(g.env.closed)}}
	case "core.clock.sync":
		return Map{{"unix_time_nanos", uint64(1)}}
	case "core.relay.client.disconnected":
		return Map{{"id_start", uint64(4000000000)}, {"id_end_exclusive", uint64(4000000001)}}
	}
	return Map{}
}

var hostTypes = []string{"core.exec.request", "core.exec.stdin", "core.exec.resize", "core.exec.signal", "core.fs.request",
	"core.fs.data", "core.tcp.connect", "core.tcp.data", "core.tcp.eof", "core.tcp.close", "core.clock.sync",
	"core.relay.client.disconnected", "core.init.ack"}

// fsVariant fills in an FsOp's fields (valid).
func fsVariant(op string) Map {
	switch op {
	case "Stat":
		return Map{{"path", pathRef("f")}, {"follow_symlink", true}}
	case "Mkdir":
		return Map{{"path", pathRef("new")}, {"mode", uint64(0o700)}}
	case "OpenFile":
		return Map{{"path", pathRef("f")}, {"options", Map{{"read", true}, {"write", false}, {"append", false},
			{"create", false}, {"truncate", false}, {"create_new", false}, {"mode", nil}}}}
	case "Read":
		return Map{{"handle", uint64(noSuchHandle)}, {"offset", uint64(0)}, {"len", nil}}
	}
	return Map{}
}

// junk values to put where a field belongs.
func (g *gen) junk() any {
	return []any{nil, undefined{}, true, uint64(70000), int64(-1), "text", []byte("bytes"), []any{uint64(1)},
		Map{}, 1.5, uint64(1 << 40), Tag{1, uint64(1)}}[g.r.Intn(12)]
}

// mutate changes a payload map: a field gets junk, goes missing, is duplicated, renamed to
// bytes; an unknown field appears; the map's encoding changes.
func (g *gen) mutate(m Map) any {
	if len(m) == 0 || g.chance(0.1) {
		return g.junk()
	}
	i := g.r.Intn(len(m))
	switch g.r.Intn(8) {
	case 0, 1:
		m[i].V = g.junk()
	case 2:
		m = append(m[:i:i], m[i+1:]...)
	case 3:
		m = append(m, m[i])
	case 4:
		m = append(m, KV{"unknown_field", g.junk()})
	case 5:
		m[i].K = []byte(m[i].K.(string))
	case 6:
		return Indef{m}
	case 7:
		return Tag{55799, m}
	}
	return m
}

func (g *gen) malformedCase() {
	t := g.pick(hostTypes...)
	id := g.id()
	p := g.validPayload(t)
	if t == "core.fs.request" {
		op := p[0].V.(Map)
		name := op[0].K.(string)
		inner := fsVariant(name)
		if g.chance(0.6) {
			op[0].V = g.mutate(inner)
		} else {
			op[0].V = inner
			p = Map{{"op", g.mutate(op)}}
		}
	} else if t == "core.exec.request" && g.chance(0.3) { // inside the rlimits or an argument
		if g.chance(0.5) {
			p = p.with("rlimits", []any{g.mutate(Map{{"resource", "nofile"}, {"soft", uint64(64)}, {"hard", uint64(64)}})})
		} else {
			p = p.with("args", []any{"x", g.junk()})
		}
	}
	var hf hostFrame
	switch g.r.Intn(10) {
	case 0: // the envelope itself
		hf = hostFrame{id: id, typ: t, body: g.mutateEnvelope(t, p)}
	case 1: // flags
		f := byte(0x80 | g.r.Intn(4))
		hf = hostFrame{id: id, typ: t, payload: p, flags: &f}
		if g.chance(0.3) {
			hf.v = 4 // a pre-generation-5 sender: dropped, not answered
		}
	case 2: // p's own encoding
		k := g.r.Intn(5)
		hf = hostFrame{id: id, typ: t, payload: p, mangle: func(b []byte) []byte {
			return [][]byte{{}, {0xff}, {0xf6}, b[:1], append(b, 0xff, 0x00)}[k]
		}}
	default:
		var pm any = p
		if t != "core.fs.request" && !(t == "core.exec.request" && g.chance(0.3)) {
			pm = g.mutate(p)
		}
		hf = hostFrame{id: id, typ: t, payload: pm}
	}
	pr, done := probe(id), probed(id)
	if t == "core.tcp.data" { // its own answer may be the tcp probe's
		pr, done = fsProbe(id), fsProbed(id)
	}
	switch {
	case hf.v == 4: // dropped: nothing but the probe's answer
	case t == "core.tcp.connect": // a connect that was accepted is not a tcp-less id: wait for its end
		g.add(step{frames: []hostFrame{hf}, done: terminals(id, 1)})
		return
	case t == "core.exec.request":
		done = all(probed(id), func(fs []frame) bool {
			return !hasType(id, "core.exec.started", 1)(fs) || hasType(id, "core.exec.exited", 1)(fs)
		})
	case t == "core.fs.request":
		// agentd runs fs operations off its loop: its answer may come after the probe's, so
		// wait for the one terminal frame a request gets instead of probing.
		g.add(step{frames: []hostFrame{hf}, done: terminals(id, 1)})
		return
	}
	g.add(step{frames: []hostFrame{hf, pr}, done: done})
}

func (g *gen) mutateEnvelope(t string, p Map) any {
	v, ty, pp := KV{"v", uint64(5)}, KV{"t", t}, KV{"p", encoded{p}}
	switch g.r.Intn(9) {
	case 0:
		return Map{v, ty}
	case 1:
		return Map{v, pp}
	case 2:
		return Map{ty, pp}
	case 3:
		return Map{v, {"t", "core.no.such.type"}, pp}
	case 4:
		return Map{v, {"t", []byte(t)}, pp}
	case 5:
		return Map{v, ty, {"p", nil}}
	case 6:
		return Map{v, ty, {"p", asInts{p}}}
	case 7:
		return Map{pp, v, ty, {"x", uint64(1)}} // other order, an unknown key
	}
	return []any{uint64(5), t, encoded{p}}
}
