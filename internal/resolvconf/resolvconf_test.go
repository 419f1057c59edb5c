package resolvconf

import (
	"path/filepath"
	"slices"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		text string
		want []string
	}{
		{"", nil},
		{"nameserver 10.0.0.1\n", []string{"10.0.0.1:53"}},
		{"# comment\nsearch example\nnameserver 10.0.0.1\nnameserver  2001:db8::1 \noptions ndots:1\n",
			[]string{"10.0.0.1:53", "[2001:db8::1]:53"}},
		{"nameserver not-an-address\nnameserver\nnameserver 1.2.3.4", []string{"1.2.3.4:53"}},
	} {
		var got []string
		for _, ap := range Parse(tc.text) {
			got = append(got, ap.String())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("Parse(%q) = %v, want %v", tc.text, got, tc.want)
		}
	}
}

func TestServersMissingFile(t *testing.T) {
	if got := Servers(filepath.Join(t.TempDir(), "none")); got != nil {
		t.Fatalf("got %v", got)
	}
}
