package initfs

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestResolveHandoff(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "init")
	os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755)
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("x"), 0o644)
	saved := HandoffCandidates
	defer func() { HandoffCandidates = saved }()

	HandoffCandidates = []string{filepath.Join(dir, "missing"), exe}
	if p, err := ResolveHandoff(&Handoff{Path: "auto"}); err != nil || p != exe {
		t.Fatalf("auto: %q %v", p, err)
	}
	HandoffCandidates = []string{filepath.Join(dir, "a"), filepath.Join(dir, "b")}
	if _, err := ResolveHandoff(&Handoff{Path: "auto"}); err == nil || !strings.Contains(err.Error(), dir+"/a, "+dir+"/b") {
		t.Fatalf("auto with none: %v", err)
	}
	for _, c := range []struct{ path, want string }{
		{plain, "is not an executable regular file"},
		{dir, "is not an executable regular file"},
		{filepath.Join(dir, "nope"), "no such file"},
	} {
		if _, err := ResolveHandoff(&Handoff{Path: c.path}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.path, err, c.want)
		}
	}
}

func TestHandoffArgvEnv(t *testing.T) {
	h := &Handoff{Path: "/sbin/init", Args: []string{"--log-level=debug", "", "bad\x00arg"}, Env: [][2]string{{"container", "agentd"}, {"PATH", "/usr/bin"}}}
	if got := HandoffArgv("/sbin/init", h); !reflect.DeepEqual(got, []string{"/sbin/init", "--log-level=debug", ""}) {
		t.Fatalf("argv %q", got)
	}
	env := HandoffEnv([]string{"PATH=/bin", "MSB_HANDOFF_INIT=/sbin/init", "MSB_HANDOFF_INIT_ARGS=x", "MSB_HANDOFF_INIT_ENV=y", "MSB_USER=1000", "SSL_CERT_FILE=/etc/ssl/x"}, h)
	want := []string{"MSB_USER=1000", "SSL_CERT_FILE=/etc/ssl/x", "container=agentd", "PATH=/usr/bin"}
	if !reflect.DeepEqual(env, want) {
		t.Fatalf("env %q, want %q", env, want)
	}
}
