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
		{[]string{"--egress-dns", "1.1.1.1,example.com"}, `--egress-dns "example.com": not an address`},
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
