package initfs

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/agentd/agentd/protocol"
)

// TestReadConfig: the boot's first-frame read, on a console holding given bytes. How long it
// waits follows BootstrapWait; a frame that is not core.bootstrap, and whatever follows a
// bootstrap, stay in the frame reader for the agent loop; errors say which side failed.
func TestReadConfig(t *testing.T) {
	str := func(s string) *string { return &s }
	good, _ := protocol.EncodeFrame(0, protocol.TypeBootstrap, protocol.Bootstrap{User: str("1000:1000"),
		DefaultEnv: []protocol.EnvVar{{Key: "PATH", Value: "/opt/bin"}, {Key: "AGENTD_EGRESS", Value: "netstack"}}})
	v9 := restamp(good, 9)
	bad, _ := protocol.EncodeFrame(0, protocol.TypeBootstrap, protocol.Bootstrap{DirMounts: []protocol.BootstrapDirMount{{Tag: "w", GuestPath: "work"}}})
	ack, _ := protocol.EncodeFrame(0, protocol.TypeInitAck, protocol.InitAck{})
	env := map[string]string{"MSB_USER": "0:0"}
	noEnv := map[string]string{}
	cases := []struct {
		name    string
		opt     ConfigSource
		env     map[string]string
		console []byte
		wait    time.Duration // what Readable must be asked for
		source  ConfigSource
		user    string
		left    protocol.Type // the frame left for the loop (0: none)
		err     string
	}{
		{"current host: bootstrap, then the init.ack it coalesced with", SourceAuto, noEnv, append(v9, ack...), BootstrapGrace, SourceBootstrap, "1000:1000", protocol.TypeInitAck, ""},
		{"old host with nothing to set: the grace passes", SourceAuto, noEnv, nil, BootstrapGrace, SourceEnv, "", 0, ""},
		{"old host: MSB_* and no wait", SourceAuto, env, nil, 0, SourceEnv, "0:0", 0, ""},
		{"both: the bootstrap already there wins", SourceAuto, env, v9, 0, SourceBootstrap, "1000:1000", 0, ""},
		{"another first frame stays for the loop", SourceAuto, noEnv, ack, BootstrapGrace, SourceEnv, "", protocol.TypeInitAck, ""},
		{"env: the console is not read", SourceEnv, noEnv, v9, -1, SourceEnv, "", protocol.TypeBootstrap, ""},
		{"bootstrap required and sent", SourceBootstrap, env, v9, BootstrapDeadline, SourceBootstrap, "1000:1000", 0, ""},
		{"bootstrap required, none sent", SourceBootstrap, noEnv, nil, BootstrapDeadline, SourceBootstrap, "", 0, "bootstrap receive failed: boot configuration: no core.bootstrap frame"},
		{"bootstrap stamped by an old generation", SourceBootstrap, noEnv, restamp(good, 5), BootstrapDeadline, SourceBootstrap, "", 0, "bootstrap receive failed: guest bootstrap requires protocol generation 7 or newer, got 5"},
		{"invalid bootstrap names the field", SourceAuto, noEnv, restamp(bad, 9), BootstrapGrace, SourceBootstrap, "", 0, `bootstrap validation failed: dir_mounts[0].guest_path: "work" must be an absolute path`},
		{"a bad MSB_* variable", SourceAuto, map[string]string{"MSB_SECURITY_PROFILE": "x"}, nil, 0, SourceEnv, "", 0, "MSB_SECURITY_PROFILE"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			asked := time.Duration(-1)
			con := Console{
				Frames:   protocol.NewFrameReader(bytes.NewReader(c.console)),
				Readable: func(d time.Duration) (bool, error) { asked = d; return len(c.console) > 0, nil },
				Deadline: func(time.Time) error { return nil },
			}
			bc, err := ReadConfig(con, c.opt, func(k string) string { return c.env[k] })
			if asked != c.wait {
				t.Errorf("waited %v for the first byte, want %v", asked, c.wait)
			}
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("error %v, want %q", err, c.err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if bc.Source != c.source || bc.User != c.user && err == nil {
				t.Fatalf("source %s user %q, want %s %q", bc.Source, bc.User, c.source, c.user)
			}
			if bc.Source == SourceBootstrap && err == nil {
				if bc.WorkloadPath() != "/opt/bin" || bc.AgentSetting("AGENTD_EGRESS") != "netstack" {
					t.Errorf("default_env: PATH %q, AGENTD_EGRESS %q", bc.WorkloadPath(), bc.AgentSetting("AGENTD_EGRESS"))
				}
				again, err := BootstrapConfig(bc.Payload)
				if err != nil || again.User != bc.User || again.WorkloadPath() != bc.WorkloadPath() {
					t.Errorf("the payload mapped again: %+v %v", again.Config, err)
				}
			}
			f, ferr := con.Frames.Next()
			switch {
			case c.left == 0 && ferr == nil:
				t.Errorf("left a %s frame, want none", protocol.FrameType(f))
			case c.left != 0 && (ferr != nil || protocol.FrameType(f) != c.left):
				t.Errorf("left %v (%v), want %s", protocol.FrameType(f), ferr, c.left)
			}
		})
	}
}

// restamp rewrites a frame's generation byte (the v of an envelope built by EncodeFrame).
func restamp(frame []byte, v byte) []byte {
	out := append([]byte(nil), frame...)
	if out[9] != 0xa3 || out[10] != 0x61 || out[11] != 'v' || out[12] > 23 {
		panic("unexpected envelope")
	}
	out[12] = v
	return out
}
