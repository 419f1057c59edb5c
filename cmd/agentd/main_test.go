package main

import (
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	cases := []struct {
		args []string
		err  string // "" = ok
	}{
		{[]string{"--standalone", "--port", "unix:/x"}, ""},
		{[]string{"--tcp-chunk", "0"}, "--tcp-chunk 0: must be between 1 and 65536"},
		{[]string{"--tcp-chunk", "70000"}, "--tcp-chunk 70000"},
		{[]string{"--tcp-low-water", "10", "--tcp-high-water", "5"}, "need 0 < low <= high"},
		{[]string{"--tcp-inbound-limit", "100"}, "must be at least 65536"},
		{[]string{"--init-ack-timeout", "0s"}, "must be positive"},
		{[]string{"--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"--egress", "tunnel"}, `--egress "tunnel": want off, netstack or channel`},
		{[]string{"--egress", "netstack", "--egress-mtu", "100"}, "--egress-mtu 100: must be between 1280 and 65520"},
		{[]string{"--egress-queues", "0"}, "--egress-queues 0"},
		{[]string{"--egress-dns", "1.1.1.1,example.com"}, `--egress-dns "1.1.1.1,example.com": "example.com" is not an address`},
		{[]string{"--egress", "channel", "--egress-dns", "1.1.1.1:53,[::1]:5353"}, ""},
		{[]string{"--tcp-dialer", "netstack"}, "--tcp-dialer netstack needs --egress"},
		{[]string{"--tcp-dialer", "magic"}, `--tcp-dialer "magic"`},
	}
	for _, c := range cases {
		_, err := parseFlags(c.args)
		if c.err == "" {
			if err != nil {
				t.Errorf("%v: %v", c.args, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%v: got %v, want %q", c.args, err, c.err)
		}
	}
	if _, err := newLogger("loud"); err == nil || !strings.Contains(err.Error(), `--log-level "loud"`) {
		t.Errorf("log level: %v", err)
	}
}

func TestFlagsFromEnv(t *testing.T) {
	t.Setenv("AGENTD_EGRESS", "channel")
	t.Setenv("AGENTD_EGRESS_MTU", "9000")
	t.Setenv("AGENTD_TCP_CHUNK", "4096")
	o, err := parseFlags([]string{"--tcp-chunk", "8192"}) // the command line wins
	if err != nil {
		t.Fatal(err)
	}
	if o.egress.mode != "channel" || o.egress.mtu != 9000 || o.chunk != 8192 {
		t.Fatalf("mode %q mtu %d chunk %d", o.egress.mode, o.egress.mtu, o.chunk)
	}
	t.Setenv("AGENTD_EGRESS_MTU", "big")
	if _, err := parseFlags(nil); err == nil || !strings.Contains(err.Error(), `AGENTD_EGRESS_MTU="big"`) {
		t.Fatalf("bad env value: %v", err)
	}
}

// TestEnvErrorsNameTheVariable: a value from AGENTD_* that parses but fails a check is named as
// the variable (what the user wrote on the kernel command line), not as the flag.
func TestEnvErrorsNameTheVariable(t *testing.T) {
	for _, c := range []struct{ env, value, want string }{
		{"AGENTD_TCP_CHUNK", "0", "AGENTD_TCP_CHUNK=0: must be between 1 and 65536"},
		{"AGENTD_TCP_INBOUND_LIMIT", "100", "AGENTD_TCP_INBOUND_LIMIT=100: must be at least 65536"},
		{"AGENTD_EGRESS", "tunnel", `AGENTD_EGRESS="tunnel": want off, netstack or channel`},
		{"AGENTD_EGRESS_MTU", "100", "AGENTD_EGRESS_MTU=100: must be between 1280 and 65520"},
		{"AGENTD_EGRESS_QUEUES", "99", "AGENTD_EGRESS_QUEUES=99: must be between 1 and 16"},
		{"AGENTD_EGRESS_DNS", "resolver.example", `AGENTD_EGRESS_DNS="resolver.example": "resolver.example" is not an address`},
		{"AGENTD_TCP_DIALER", "magic", `AGENTD_TCP_DIALER="magic": want kernel or netstack`},
		{"AGENTD_LOG_LEVEL", "loud", `AGENTD_LOG_LEVEL="loud": want debug, info, warn or error`},
	} {
		t.Run(c.env, func(t *testing.T) {
			t.Setenv(c.env, c.value)
			_, err := parseFlags(nil)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
			if strings.Contains(err.Error(), "--") {
				t.Fatalf("names a flag the user did not give: %v", err)
			}
		})
	}
	// The same value on the command line is named as the flag.
	if _, err := parseFlags([]string{"--tcp-chunk", "0"}); err == nil || !strings.Contains(err.Error(), "--tcp-chunk 0:") {
		t.Fatalf("flag: %v", err)
	}
}
