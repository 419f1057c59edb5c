package initfs

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseModuleList(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       []Module
		err        string
	}{
		{name: "empty", text: "\n\n"},
		{name: "plain", text: "virtio_ring.ko\nvirtio.ko\n", want: []Module{{Name: "virtio_ring.ko"}, {Name: "virtio.ko"}}},
		{name: "comments and blanks", text: "# channel\n\n  virtio.ko  \n", want: []Module{{Name: "virtio.ko"}}},
		{name: "params", text: "virtio_pci.ko async_probe=1 force_legacy=1", want: []Module{{Name: "virtio_pci.ko", Params: "async_probe=1 force_legacy=1"}}},
		{name: "condition", text: "virtio_pci.ko when=virtio-pci\nvirtio_mmio.ko when=virtio-mmio", want: []Module{{Name: "virtio_pci.ko", When: "virtio-pci"}, {Name: "virtio_mmio.ko", When: "virtio-mmio"}}},
		{name: "condition and params", text: "virtio_pci.ko async_probe=1 when=virtio-pci", want: []Module{{Name: "virtio_pci.ko", Params: "async_probe=1", When: "virtio-pci"}}},
		{name: "unknown condition", text: "virtio.ko\nvirtio_pci.ko when=pci", err: `agentd.load line 2: virtio_pci.ko: unknown condition "pci"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseModuleList("agentd.load", tc.text)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// fakeSys builds a directory shaped like the guest's /sys and /proc: files maps paths under
// it to contents.
func fakeSys(t *testing.T, files map[string]string) Sys {
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Sys{Root: root}
}

func TestTransportConditions(t *testing.T) {
	list := []Module{{Name: "virtio.ko"}, {Name: "virtio_pci.ko", When: "virtio-pci"}, {Name: "virtio_mmio.ko", When: "virtio-mmio"}, {Name: "virtio_console.ko"}}
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  []string
	}{
		{name: "pc: virtio PCI devices", files: map[string]string{
			"sys/bus/pci/devices/0000:00:01.0/vendor": "0x8086\n",
			"sys/bus/pci/devices/0000:00:04.0/vendor": "0x1af4\n",
		}, want: []string{"virtio.ko", "virtio_pci.ko", "virtio_console.ko"}},
		{name: "PCI without virtio", files: map[string]string{
			"sys/bus/pci/devices/0000:00:01.0/vendor": "0x8086\n",
		}, want: []string{"virtio.ko", "virtio_console.ko"}},
		{name: "microvm: ACPI", files: map[string]string{
			"sys/bus/platform/devices/LNRO0005:00/modalias": "acpi:LNRO0005:\n",
		}, want: []string{"virtio.ko", "virtio_mmio.ko", "virtio_console.ko"}},
		{name: "device tree", files: map[string]string{
			"sys/bus/platform/devices/a003e00.virtio_mmio/modalias": "of:Nvirtio_mmio\n",
		}, want: []string{"virtio.ko", "virtio_mmio.ko", "virtio_console.ko"}},
		{name: "command line", files: map[string]string{
			"proc/cmdline": "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\n",
		}, want: []string{"virtio.ko", "virtio_mmio.ko", "virtio_console.ko"}},
		{name: "both", files: map[string]string{
			"sys/bus/pci/devices/0000:00:04.0/vendor": "0x1af4\n",
			"proc/cmdline": "virtio_mmio.device=4K@0xd0000000:5\n",
		}, want: []string{"virtio.ko", "virtio_pci.ko", "virtio_mmio.ko", "virtio_console.ko"}},
		{name: "nothing known", want: []string{"virtio.ko", "virtio_console.ko"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, m := range Wanted(list, fakeSys(t, tc.files)) {
				got = append(got, m.Name)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// FuzzParseModuleList: any list text parses or fails with an error, never a panic, and what
// parses is well formed.
func FuzzParseModuleList(f *testing.F) {
	f.Add("virtio_ring.ko\nvirtio.ko\n")
	f.Add("# comment\nvirtio_pci.ko async_probe=1 when=virtio-pci\nvirtio_mmio.ko when=virtio-mmio\n")
	f.Add("x.ko when=\n")
	f.Add(" \t\r\n when=virtio-pci")
	f.Fuzz(func(t *testing.T, text string) {
		mods, err := ParseModuleList("list", text)
		if err != nil {
			return
		}
		for _, m := range mods {
			if m.Name == "" || strings.ContainsAny(m.Name, " \t\n") || strings.HasPrefix(m.Name, "#") {
				t.Fatalf("module name %q", m.Name)
			}
			if _, ok := Conditions[m.When]; m.When != "" && !ok {
				t.Fatalf("condition %q", m.When)
			}
		}
	})
}
