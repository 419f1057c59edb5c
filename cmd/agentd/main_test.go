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
