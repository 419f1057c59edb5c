package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, doc string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(doc), 0o644)
		return p
	}
	pol := write("p.yaml", "default_egress: deny\nrules:\n  - id: web\n    destination: {group: public}\n    action: allow\n")
	floor := write("f.json", `{"rules": [{"id": "no-private", "destination": {"group": "private"}, "action": "deny"}]}`)
	bad := write("bad.json", `{"rules": [{"destination": {"group": "intranet"}, "action": "allow"}]}`)

	p, err := Load("", "")
	if err != nil || p.DefaultEgress != Allow || len(p.Rules) != len(DefaultFloor) || p.Rules[0].ID != "floor-metadata" {
		t.Fatalf("no file: %+v %v", p, err)
	}
	p, err = Load(pol, "")
	if err != nil || p.DefaultEgress != Deny || len(p.Rules) != 2 || p.Rules[0].ID != "floor-metadata" || p.Rules[1].ID != "web" {
		t.Fatalf("file: %+v %v", p, err)
	}
	p, err = Load(pol, floor)
	if err != nil || len(p.Rules) != 2 || p.Rules[0].ID != "no-private" {
		t.Fatalf("own floor: %+v %v", p, err)
	}
	for _, tc := range []struct{ policy, floor, want string }{
		{bad, "", bad + `: policy: rules[0]: destination: group: "intranet"`},
		{"", bad, "floor: " + bad + ": policy: rules[0]"},
		{filepath.Join(dir, "none.json"), "", "no such file"},
	} {
		if _, err := Load(tc.policy, tc.floor); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Load(%q, %q) = %v, want an error containing %q", tc.policy, tc.floor, err, tc.want)
		}
	}
}

func TestCanonicalName(t *testing.T) {
	for in, want := range map[string]string{
		"Example.COM.":        "example.com",
		"example.com":         "example.com",
		"\u212aelvin.example": "\u212aelvin.example", // the Kelvin sign is not an ASCII K
		"ÄBC.example":         "Äbc.example",
		"":                    "",
		"trailing.dots..":     "trailing.dots.",
	} {
		if got := CanonicalName(in); got != want {
			t.Errorf("CanonicalName(%q) = %q, want %q", in, got, want)
		}
	}
}
