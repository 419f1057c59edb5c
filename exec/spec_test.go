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
		{"agent PATH", nil, nil, "/a:/b", "", []string{"PATH=/s:/a:/b"}},
		{"request PATH, first wins", nil, []string{"PATH=/x", "PATH=/y"}, "/a", "/h", []string{"PATH=/s:/x", "HOME=/h"}},
		{"request HOME wins", nil, []string{"HOME=/mine"}, "", "/root", []string{"HOME=/mine", "PATH=/s:" + DefaultPath}},
		{"no '=' ignored, '=' in value kept", nil, []string{"JUNK", "A=b=c"}, "", "", []string{"A=b=c", "PATH=/s:" + DefaultPath}},
		{"request overrides base", []string{"LANG=C", "TZ=UTC"}, []string{"LANG=de"}, "", "", []string{"LANG=de", "TZ=UTC", "PATH=/s:" + DefaultPath}},
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
