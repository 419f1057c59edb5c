package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestLayout keeps the README's Layout table true: every package of the module is in it, and
// each imports (outside its tests) only packages listed below itself, so no import runs from a
// lower layer to a higher one.
func TestLayout(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	const mod = "github.com/agentd/agentd/"
	// Rows: "| `pkg/` | ... |" or "| `a`, `b` | ... |"; a trailing "…" covers a whole tree.
	rank := map[string]int{}
	var trees []string
	row := 0
	section := strings.SplitN(string(readme), "## Layout", 2)
	if len(section) != 2 {
		t.Fatal("README has no Layout section")
	}
	for _, line := range strings.Split(section[1], "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 3 || !strings.Contains(cells[1], "`") {
			continue
		}
		row++
		for _, f := range strings.Split(cells[1], ",") {
			name := strings.Trim(strings.TrimSpace(f), "`")
			name = strings.TrimSuffix(name, "/")
			if strings.HasSuffix(name, "/…") {
				trees = append(trees, strings.TrimSuffix(name, "…"))
				name = strings.TrimSuffix(name, "/…")
			}
			rank[name] = row
		}
	}
	rankOf := func(pkg string) (int, bool) {
		if r, ok := rank[pkg]; ok {
			return r, true
		}
		for _, tr := range trees {
			if strings.HasPrefix(pkg, tr) {
				return rank[strings.TrimSuffix(tr, "/")], true
			}
		}
		return 0, false
	}
	out, err := exec.Command("go", "list", "-json", "../...").Output()
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(p.ImportPath, mod)
		r, ok := rankOf(name)
		if !ok {
			t.Errorf("package %s is not in the README's Layout table", name)
			continue
		}
		for _, imp := range p.Imports {
			if !strings.HasPrefix(imp, mod) {
				continue
			}
			dep := strings.TrimPrefix(imp, mod)
			dr, ok := rankOf(dep)
			if ok && dr <= r && !strings.HasPrefix(name, "cmd/") && !strings.HasPrefix(name, "internal/testkit") && name != "e2e" && name != "bench" {
				t.Errorf("%s (row %d) imports %s (row %d): imports must point down the table", name, r, dep, dr)
			}
		}
	}
}
