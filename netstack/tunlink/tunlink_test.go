package tunlink

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

var seq atomic.Int32

func tunName() string { return fmt.Sprintf("agtl%d%d", os.Getpid()%10000, seq.Add(1)) }

// TestOpen: each mode opens the endpoint it names, with every queue close-on-exec (a workload
// agentd starts must not inherit the guest's tun).
func TestOpen(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for tun devices")
	}
	for _, c := range []struct {
		mode    Mode
		queues  int
		offload bool
	}{{Plain, 1, false}, {Plain, 2, false}, {Offload, 1, true}, {Offload, 2, true}, {Auto, 1, true}} {
		t.Run(fmt.Sprintf("%s-%d", c.mode, c.queues), func(t *testing.T) {
			l, err := Open(Options{Name: tunName(), MTU: 1500, Queues: c.queues, Mode: c.mode})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			if l.Offload != c.offload || len(l.fds) != c.queues {
				t.Fatalf("offload %v with %d queues (%s), want %v with %d", l.Offload, len(l.fds), l, c.offload, c.queues)
			}
			for _, fd := range l.fds {
				flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
				if err != nil || flags&unix.FD_CLOEXEC == 0 {
					t.Fatalf("fd %d: flags %#x %v, want FD_CLOEXEC", fd, flags, err)
				}
			}
		})
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": Auto, "auto": Auto, "offload": Offload, "plain": Plain} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseMode("fast"); err == nil {
		t.Error("ParseMode(fast): no error")
	}
}
