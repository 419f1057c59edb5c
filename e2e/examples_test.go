package e2e

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestExamples: every policy in examples/ passes agentctl policy check, and each decides the
// flows its comments promise (agentctl policy explain, as agentd decides them).
func TestExamples(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(repoRoot(t), "examples", "*.yaml"))
	if len(files) < 4 {
		t.Fatalf("examples: %v", files)
	}
	for _, f := range files {
		if r := runCtl(t, nil, "", "policy", "check", f); r.code != 0 || !strings.Contains(r.stdout, `"default_egress"`) {
			t.Errorf("policy check %s: %+v", f, r)
		}
	}
	ex := func(name string) string { return filepath.Join(repoRoot(t), "examples", name) }
	for _, c := range []struct {
		file string
		args []string
		want string // ALLOW or DENY, and the rule
	}{
		{"make-vm.yaml", []string{"tcp", "10.0.2.2", "8000"}, "ALLOW\n  rule:   default"},
		{"make-vm.yaml", []string{"tcp", "169.254.169.254", "80"}, "DENY\n  rule:   floor"},
		{"deny-by-default.yaml", []string{"tcp", "10.0.2.2", "8000"}, "DENY\n  rule:   default"},
		{"deny-by-default.yaml", []string{"--name", "pypi.org", "tcp", "151.101.0.223", "443"}, "ALLOW\n  rule:   pypi"},
		{"deny-by-default.yaml", []string{"tcp", "151.101.0.223", "443"}, "DENY"}, // the same address, no pin
		{"deny-by-default.yaml", []string{"--name", "api.github.com", "tcp", "140.82.112.6", "443"}, "ALLOW\n  rule:   github"},
		{"deny-by-default.yaml", []string{"udp", "example.net", "53"}, "DNS query for example.net over udp/53: DENY"},
		{"public-only.yaml", []string{"tcp", "93.184.216.34", "443"}, "ALLOW\n  rule:   public"},
		{"public-only.yaml", []string{"tcp", "192.168.1.1", "22"}, "DENY\n  rule:   no-private"},
		{"public-only.yaml", []string{"udp", "10.87.0.1", "53"}, "ALLOW\n  rule:   dns"},
		{"names-only.yaml", []string{"--name", "api.example.com", "tcp", "203.0.113.7", "443"}, "ALLOW\n  rule:   api"},
		{"names-only.yaml", []string{"--name", "api.example.com", "tcp", "203.0.113.7", "80"}, "DENY"},
		{"names-only.yaml", []string{"tcp", "203.0.113.7", "443"}, "DENY"},
	} {
		args := append([]string{"policy", "explain"}, c.args[:len(c.args)-3]...)
		args = append(append(args, ex(c.file)), c.args[len(c.args)-3:]...)
		if r := runCtl(t, nil, "", args...); r.code != 0 || !strings.Contains(r.stdout, c.want) {
			t.Errorf("%s %v: %q %q, want %q", c.file, c.args, r.stdout, r.stderr, c.want)
		}
	}
}
