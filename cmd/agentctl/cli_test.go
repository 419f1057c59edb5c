package main

import (
	"errors"
	"flag"
	"strings"
	"testing"
)

func TestParseForwards(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string // specs joined by "; ", or the error
	}{
		{[]string{"8080"}, "127.0.0.1:8080 -> guest 127.0.0.1:8080"},
		{[]string{"9000:127.0.0.1:80"}, "127.0.0.1:9000 -> guest 127.0.0.1:80"},
		{[]string{"0:db.internal:5432"}, "127.0.0.1:0 -> guest db.internal:5432"},
		{[]string{"*:9000:127.0.0.1:80"}, ":9000 -> guest 127.0.0.1:80"},
		{[]string{"0.0.0.0:9000:127.0.0.1:80"}, "0.0.0.0:9000 -> guest 127.0.0.1:80"},
		{[]string{"[::1]:9000:[fd00::1]:80"}, "[::1]:9000 -> guest [fd00::1]:80"},
		{[]string{"8080", "9000:10.0.0.1:90"}, "127.0.0.1:8080 -> guest 127.0.0.1:8080; 127.0.0.1:9000 -> guest 10.0.0.1:90"},
		{[]string{"127.0.0.1:2222", "127.0.0.1:22"}, "127.0.0.1:2222 -> guest 127.0.0.1:22"}, // LOCAL_ADDR GUEST_HOST:PORT
		{[]string{"0"}, `local port "0": want a port number 1-65535`},
		{[]string{"80:host:0"}, `guest port "0"`},
		{[]string{"x:host:80"}, `local port "x"`},
		{[]string{"1:2"}, "want PORT, LOCAL_PORT:HOST:PORT or BIND:LOCAL_PORT:HOST:PORT"},
		{[]string{"a:b:c:d:e"}, "want PORT"},
		{[]string{"80::80"}, "empty guest host"},
		{[]string{"127.0.0.1:2222", "nohostport"}, `guest address "nohostport"`},
	} {
		specs, err := parseForwards(c.args)
		var got []string
		for _, s := range specs {
			got = append(got, s.String())
		}
		g := strings.Join(got, "; ")
		if err != nil {
			g = err.Error()
		}
		if wantOK := strings.Contains(c.want, "->"); (err == nil) != wantOK || !strings.Contains(g, c.want) {
			t.Errorf("%v: got %q, want %q", c.args, g, c.want)
		}
	}
}

func TestModeString(t *testing.T) {
	for mode, want := range map[uint32]string{
		0o100644: "-rw-r--r--", 0o040755: "drwxr-xr-x", 0o120777: "lrwxrwxrwx", 0o041777: "drwxrwxrwt",
		0o104755: "-rwsr-xr-x", 0o102644: "-rw-r-Sr--", 0o020620: "crw--w----", 0o060660: "brw-rw----",
		0o010600: "prw-------", 0o140755: "srwxr-xr-x", 0o041770: "drwxrwx--T",
	} {
		if got := modeString(mode); got != want {
			t.Errorf("%o: %s, want %s", mode, got, want)
		}
	}
}

// TestParse: combined short flags, flags after operands, "--", and a command line (exec) that
// starts at the first operand.
func TestParse(t *testing.T) {
	mk := func() (*command, *bool, *bool, *string) {
		c := newCommand("x", "ARGS", "")
		i, tt := c.fs.Bool("i", false, ""), c.fs.Bool("t", false, "")
		u := c.fs.String("u", "", "")
		return c, i, tt, u
	}
	for _, tc := range []struct {
		args        []string
		commandLine bool
		pos         string
		i, t        bool
		u           string
	}{
		{[]string{"-it", "sh"}, true, "sh", true, true, ""},
		{[]string{"-ti", "-u", "bob", "--", "sh", "-c", "x"}, true, "sh -c x", true, true, "bob"},
		{[]string{"sh", "-it"}, true, "sh -it", false, false, ""}, // the program's own flags
		{[]string{"-u", "bob", "-it", "sh"}, true, "sh", true, true, "bob"},
		{[]string{"-u=bob", "-it", "sh"}, true, "sh", true, true, "bob"},
		{[]string{"a", "-i", "b", "-u", "me"}, false, "a b", true, false, "me"},
		{[]string{"a", "--", "-t"}, false, "a -t", false, false, ""},
	} {
		c, i, tt, u := mk()
		pos, err := c.parse(tc.args, tc.commandLine)
		if err != nil || strings.Join(pos, " ") != tc.pos || *i != tc.i || *tt != tc.t || *u != tc.u {
			t.Errorf("%v: pos %q i %v t %v u %q err %v", tc.args, pos, *i, *tt, *u, err)
		}
	}
	c, _, _, _ := mk()
	if _, err := c.parse([]string{"-x"}, false); !errors.As(err, new(usageError)) || !strings.Contains(err.Error(), "see agentctl x --help") {
		t.Errorf("unknown flag: %v", err)
	}
	c, _, _, _ = mk()
	if _, err := c.parse([]string{"a", "--help"}, false); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("--help after an operand: %v", err)
	}
	c, _, _, _ = mk()
	if pos, err := c.parse([]string{"sh", "--help"}, true); err != nil || strings.Join(pos, " ") != "sh --help" {
		t.Errorf("a program's --help: %q %v", pos, err)
	}
}
