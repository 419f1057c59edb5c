package e2e

import (
	"errors"
	"strings"
	"testing"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

func strp(s string) *string { return &s }

// TestBootstrapStandalone: agentd configured by a core.bootstrap frame that the host writes
// first, as a current host does (standalone, so only the exec settings apply): the default
// user, cwd and environment of requests that name none, and agentd's own AGENTD_* settings
// from the environment list, which workloads do not see.
func TestBootstrapStandalone(t *testing.T) {
	a := startAgentd(t, "socket", host.Options{Bootstrap: &protocol.Bootstrap{
		User: strp("nobody"), DefaultCwd: strp("/tmp"),
		DefaultEnv: []protocol.EnvVar{{Key: "GREETING", Value: "hi"}, {Key: "AGENTD_TCP_MAX_SESSIONS", Value: "1"}},
	}}, "--boot-config", "bootstrap")
	out, errOut, code, err := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", `echo $(id -un) $PWD $GREETING; env | grep -c AGENTD_ || true`}}, nil)
	if err != nil || code != 0 || string(out) != "nobody /tmp hi\n0\n" {
		t.Fatalf("exec with the bootstrap's defaults: %q %q %d %v", out, errOut, code, err)
	}
	if got := a.c.Resolved.DefaultUser; got.UID != 65534 {
		t.Errorf("core.init.resolved default user %+v, want nobody's", got)
	}
	echo := echoServer(t)
	first, err := a.c.DialTCP(ctx(t), "127.0.0.1", echo)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = a.c.DialTCP(ctx(t), "127.0.0.1", echo)
	var te *host.TCPError
	if !errors.As(err, &te) || !strings.Contains(te.Msg, "too many TCP sessions (limit 1)") {
		t.Fatalf("AGENTD_TCP_MAX_SESSIONS=1 from default_env: second connect %v", err)
	}
}

// TestBootstrapRefused: a bootstrap that fails validation stops the boot before anything runs,
// yet the agent comes up far enough to say why: the console line names the field, and every
// session start gets its terminal failure with that text. core.shutdown still ends it.
func TestBootstrapRefused(t *testing.T) {
	a := startAgentd(t, "socket", host.Options{Bootstrap: &protocol.Bootstrap{
		DirMounts: []protocol.BootstrapDirMount{{Tag: "work", GuestPath: "relative/path"}},
	}}, "--boot-config", "bootstrap")
	const why = `bootstrap validation failed: dir_mounts[0].guest_path: "relative/path" must be an absolute path`
	_, _, _, err := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "true"}, nil)
	var ef *protocol.ExecFailed
	if !errors.As(err, &ef) || ef.Kind != protocol.ExecOther || !strings.Contains(ef.Message, why) {
		t.Fatalf("exec after a refused bootstrap: %v", err)
	}
	_, err = a.c.Fs(ctx(t), &protocol.FsStat{Path: "/"})
	var fe *host.FsError
	if !errors.As(err, &fe) || !strings.Contains(fe.Msg, why) {
		t.Fatalf("fs after a refused bootstrap: %v", err)
	}
	_, err = a.c.DialTCP(ctx(t), "127.0.0.1", echoServer(t))
	var te *host.TCPError
	if !errors.As(err, &te) || !strings.Contains(te.Msg, why) {
		t.Fatalf("tcp after a refused bootstrap: %v", err)
	}
	if !strings.Contains(a.log.String(), "agentd: "+why) {
		t.Errorf("the console does not name the field:\n%s", a.log)
	}
	a.c.Shutdown()
}

// echoServer starts an echo server on loopback and returns its port.
func echoServer(t *testing.T) uint16 {
	return uint16(testutil.Serve(t, testutil.Echo).Addr.Port)
}
