package initfs

import (
	"slices"
	"testing"
)

// TestPlan pins the boot sequence: which steps run for which configuration, in which order.
// Before any of them, EarlyPlan does only what reading the configuration from the channel needs.
func TestPlan(t *testing.T) {
	var early []string
	for _, s := range EarlyPlan() {
		early = append(early, s.Name)
	}
	if want := []string{"base mounts", "reaper", "console modules"}; !slices.Equal(early, want) {
		t.Errorf("early plan %v, want %v", early, want)
	}
	base := []string{"rlimits", "modules", "runtime share"}
	after := []string{"volumes", "hosts+profile", "lo"}
	cat := func(parts ...[]string) []string { return slices.Concat(parts...) }
	for _, tc := range []struct {
		name string
		conf Config
		opts BootOptions
		want []string
	}{
		{"nothing configured", Config{}, BootOptions{}, cat(base, after, []string{"tls"})},
		{"block root: mounted and moved onto / before anything reads the image",
			Config{BlockRoot: &BlockRoot{}}, BootOptions{},
			cat(base, []string{"block root"}, after, []string{"tls"})},
		{"MSB_NET: network drivers load early, the interface is configured after lo",
			Config{Net: &NetConfig{}}, BootOptions{},
			cat(base, []string{"network modules"}, after, []string{"network", "tls"})},
		{"egress: the tun driver loads early; no interface to configure",
			Config{}, BootOptions{NetworkEarly: true},
			cat(base, []string{"network modules"}, after, []string{"tls"})},
		{"block root and network",
			Config{BlockRoot: &BlockRoot{}, Net: &NetConfig{}}, BootOptions{NetworkEarly: true},
			cat(base, []string{"block root", "network modules"}, after, []string{"network", "tls"})},
	} {
		var got []string
		for _, s := range Plan(tc.conf, tc.opts) {
			got = append(got, s.Name)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s:\n got  %v\n want %v", tc.name, got, tc.want)
		}
	}
}
