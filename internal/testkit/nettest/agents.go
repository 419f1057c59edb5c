package nettest

import (
	"io"
	"log/slog"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/agentd/agentd/channel"
	"github.com/agentd/agentd/hostserver"
)

// ChannelAgent starts the agentd binary in the guest namespace in --egress channel mode on a
// pty (a channel as slow as a virtio port), plus extra flags, and serves its guest-initiated
// streams from this namespace with an in-process relay. agentd's stderr goes to log.
func (tp *Topology) ChannelAgent(t testing.TB, bin string, log io.Writer, extra ...string) *hostserver.Server {
	t.Helper()
	master, slave, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slave.Close() })
	hostEnd, err := channel.Pollable(master)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{bin, "--standalone", "--port", slave.Name(), "--egress", "channel", "--egress-tun", "agtun" + tp.ID, "--log-level", "warn"}, extra...)
	cmd := tp.Cmd(args...)
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	r, err := hostserver.New(hostEnd, hostserver.Options{Log: quiet, DialOut: &hostserver.DialOutOptions{Log: quiet}})
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return r
}

// Iperf3Server starts `iperf3 -s` on ip:port in this namespace (one test only with once) and
// returns once it listens; it is stopped when the test ends.
func Iperf3Server(t testing.TB, ip netip.Addr, port int, once bool) {
	t.Helper()
	args := []string{"-s", "-B", ip.String(), "-p", strconv.Itoa(port)}
	if once {
		args = append(args, "-1")
	}
	srv := exec.Command("iperf3", args...)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	addr := netip.AddrPortFrom(ip, uint16(port)).String()
	for deadline := time.Now().Add(5 * time.Second); ; {
		// Probe with ss rather than a connection, which iperf3 would take for a test client.
		if out, _ := exec.Command("ss", "-Hltn", "src", addr).Output(); len(out) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("iperf3 never listened on %s", addr)
		}
		time.Sleep(10 * time.Millisecond) // iperf3 gives no readiness signal
	}
}
