package exec

import (
	"os"
	"reflect"
	"syscall"
	"testing"

	"github.com/agentd/agentd/protocol"
)

func TestBuildEnv(t *testing.T) {
	cases := []struct {
		name  string
		base  []string
		req   []string
		agent string
		home  string
		want  []string
	}{
		{"defaults", nil, nil, "", "/root", []string{"PATH=/s:" + DefaultPath, "HOME=/root"}},
		{"agent PATH, no home: inherited", nil, nil, "/a:/b", "", []string{"PATH=/s:/a:/b", "HOME=/"}},
		{"base HOME is the inherited one", []string{"HOME=/base"}, nil, "", "", []string{"HOME=/base", "PATH=/s:" + DefaultPath}},
		{"user home beats base HOME", []string{"HOME=/base"}, nil, "", "/u", []string{"HOME=/u", "PATH=/s:" + DefaultPath}},
		{"first request PATH prefixed, a later one overrides", nil, []string{"PATH=/x", "PATH=/y"}, "/a", "/h", []string{"PATH=/y", "HOME=/h"}},
		{"one request PATH prefixed", nil, []string{"PATH=/x"}, "/a", "/h", []string{"PATH=/s:/x", "HOME=/h"}},
		{"later entries override", nil, []string{"A=1", "B=2", "A=3"}, "", "/h", []string{"A=3", "B=2", "PATH=/s:" + DefaultPath, "HOME=/h"}},
		{"request HOME wins", nil, []string{"HOME=/mine"}, "", "/root", []string{"HOME=/mine", "PATH=/s:" + DefaultPath}},
		{"no '=' ignored, '=' in value kept", nil, []string{"JUNK", "A=b=c"}, "", "/h", []string{"A=b=c", "PATH=/s:" + DefaultPath, "HOME=/h"}},
		{"request overrides base", []string{"LANG=C", "TZ=UTC"}, []string{"LANG=de"}, "", "/h", []string{"LANG=de", "TZ=UTC", "PATH=/s:" + DefaultPath, "HOME=/h"}},
	}
	for _, c := range cases {
		if got := BuildEnv(c.base, c.req, "/s", c.agent, c.home); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

func TestResolveUser(t *testing.T) {
	cases := []struct {
		spec string
		uid  uint32
		gid  uint32
		err  string
	}{
		{"root", 0, 0, ""},
		{"0", 0, 0, ""},
		{" nobody ", 65534, 65534, ""},
		{"nobody:0", 65534, 0, ""},
		{"nobody:root", 65534, 0, ""},
		{"4242:7", 4242, 7, ""},
		{"no-such-user", 0, 0, "guest user not found: no-such-user"},
		{"root:", 0, 0, "user spec has empty group"},
		{"root:no-such-group", 0, 0, "guest group not found: no-such-group"},
		{":0", 0, 0, "user spec has empty user"},
	}
	for _, c := range cases {
		id, err := ResolveUser(c.spec)
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("%q: got %v, want %q", c.spec, err, c.err)
			}
			continue
		}
		if err != nil || id.UID != c.uid || id.GID != c.gid || !id.Switch {
			t.Errorf("%q: %+v %v", c.spec, id, err)
		}
	}
	if id, _ := ResolveUser("4242"); id.GID != uint32(os.Getgid()) || len(id.Groups) != 0 {
		t.Errorf("unknown numeric uid: %+v (want agentd's gid, no groups)", id)
	}
}

func TestClassify(t *testing.T) {
	cases := map[syscall.Errno]string{
		syscall.ENOENT: protocol.ExecNotFound, syscall.ENOTDIR: protocol.ExecBadCwd,
		syscall.EACCES: protocol.ExecPermissionDenied, syscall.EPERM: protocol.ExecPermissionDenied,
		syscall.ENOEXEC: protocol.ExecNotExecutable, syscall.EISDIR: protocol.ExecNotExecutable,
		syscall.ETXTBSY: protocol.ExecNotExecutable, syscall.E2BIG: protocol.ExecBadArgs,
		syscall.ELOOP: protocol.ExecBadArgs, syscall.ENAMETOOLONG: protocol.ExecBadArgs,
		syscall.EFAULT: protocol.ExecBadArgs, syscall.EMFILE: protocol.ExecResourceLimit,
		syscall.ENFILE: protocol.ExecResourceLimit, syscall.EAGAIN: protocol.ExecResourceLimit,
		syscall.ENOMEM: protocol.ExecOutOfMemory, syscall.EINVAL: protocol.ExecOther, syscall.EIO: protocol.ExecOther,
	}
	for e, want := range cases {
		if got := Classify(e); got != want {
			t.Errorf("%v: %s, want %s", e, got, want)
		}
	}
	f := spawnFailure("/bin/x", "Command::spawn", syscall.ENOENT)
	if f.Message != `spawn "/bin/x": No such file or directory (os error 2)` || *f.ErrnoName != "ENOENT" || *f.Errno != 2 {
		t.Errorf("failure %+v", f)
	}
	if f := spawnFailure("x", "execvp", syscall.EXDEV); f.ErrnoName != nil || f.Kind != protocol.ExecOther {
		t.Errorf("an errno without a reference name: %+v", f)
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/noexec", nil, 0o644)
	os.WriteFile(dir+"/prog", nil, 0o755)
	env := []string{"PATH=" + dir + ":/usr/bin"}
	cases := []struct {
		cmd  string
		want string
		err  error
	}{
		{"prog", dir + "/prog", nil},
		{"./relative/x", "./relative/x", nil},
		{"env", "/usr/bin/env", nil},
		{"noexec", "", syscall.EACCES},
		{"nothing-here", "", syscall.ENOENT},
	}
	for _, c := range cases {
		got, err := LookPath(c.cmd, env)
		if got != c.want || err != c.err {
			t.Errorf("%s: %q %v, want %q %v", c.cmd, got, err, c.want, c.err)
		}
	}
}

// TestInitGroups: initgroups(name, gid) semantics: gid first, then the groups listing name.
func TestInitGroups(t *testing.T) {
	f := t.TempDir() + "/group"
	os.WriteFile(f, []byte("root:x:0:\nstaff:x:50:alice,bob\nusers:x:100:bob\nalice:x:1000:\nbad line\n"), 0o644)
	old := GroupFile
	GroupFile = f
	defer func() { GroupFile = old }()
	cases := []struct {
		name string
		gid  uint32
		want []uint32
	}{
		{"alice", 1000, []uint32{1000, 50}},
		{"alice", 0, []uint32{0, 50}}, // alice:root: not alice's passwd group 1000
		{"bob", 100, []uint32{100, 50}},
		{"carol", 7, []uint32{7}},
	}
	for _, c := range cases {
		if got := initGroups(c.name, c.gid); !reflect.DeepEqual(got, c.want) {
			t.Errorf("initGroups(%s, %d) = %v, want %v", c.name, c.gid, got, c.want)
		}
	}
}

func TestRustQuote(t *testing.T) {
	for in, want := range map[string]string{
		"echo": `"echo"`, "a\x00b": `"a\0b"`, "t\tn\nr\r": `"t\tn\nr\r"`, `q"b\`: `"q\"b\\"`,
		"it's": `"it's"`, "\x01\x7f": `"\u{1}\u{7f}"`, "ü": `"ü"`,
	} {
		if got := RustQuote(in); got != want {
			t.Errorf("RustQuote(%q) = %s, want %s", in, got, want)
		}
	}
}
