package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/scenario"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

// hostModes are the ways a host may run core.tcp: raw bulk records (generation 9), CBOR with
// agentd's flow extension, and CBOR as a stock generation-5 host does.
var hostModes = []struct {
	name string
	opts host.Options
}{
	{"bulk", host.Options{}},
	{"gen5-flow", host.Options{Generation: 5, Features: []string{protocol.FeatureFlow}}},
	{"gen5-stock", host.Options{Generation: 5, Features: []string{}}},
}

// TestEchoChannels relays through the real binary on both kinds of channel, in every host
// mode, and checks that agentd's fd count returns to where it was.
func TestEchoChannels(t *testing.T) {
	srv := testutil.Serve(t, testutil.Echo)
	for _, kind := range []string{"socket", "pty"} {
		for _, mode := range hostModes {
			t.Run(kind+"/"+mode.name, func(t *testing.T) {
				a := startAgentd(t, kind, mode.opts)
				fd0 := fds(t, a.pid())
				for i := 0; i < 20; i++ {
					conn, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
					if err != nil {
						t.Fatal(err)
					}
					msg := bytes.Repeat([]byte{byte(i)}, 300_000+i)
					go func() { conn.Write(msg); conn.CloseWrite() }()
					got, err := io.ReadAll(conn)
					if err != nil || !bytes.Equal(got, msg) {
						t.Fatalf("echo %d: %d bytes, %v", i, len(got), err)
					}
					conn.Close()
				}
				waitFD(t, a.pid(), fd0)
			})
		}
	}
}

// waitFD waits (bounded polling of /proc; there is no event for it) until a process is back
// to n open fds.
func waitFD(t *testing.T, pid, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for fds(t, pid) > n {
		if time.Now().After(deadline) {
			t.Fatalf("agentd fd leak: %d open, want %d (%s)", fds(t, pid), n, procSummary(pid))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pinger measures 100-byte round trips on its own session.
type pinger struct {
	conn *host.TCPConn
	rtts []time.Duration
}

func newPinger(t *testing.T, c *host.Client, port int) *pinger {
	conn, err := c.DialTCP(ctx(t), "127.0.0.1", uint16(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &pinger{conn: conn}
}

func (p *pinger) run(t *testing.T, n int) {
	msg := bytes.Repeat([]byte("p"), 100)
	buf := make([]byte, 100)
	for i := 0; i < n; i++ {
		start := time.Now()
		if _, err := p.conn.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p.conn, buf); err != nil {
			t.Fatal(err)
		}
		p.rtts = append(p.rtts, time.Since(start))
	}
	sort.Slice(p.rtts, func(i, j int) bool { return p.rtts[i] < p.rtts[j] })
}

func (p *pinger) p99() time.Duration { return testutil.Percentile(p.rtts, 99) }

const (
	rssBudget  = 32 << 20
	p99Budget  = 50 * time.Millisecond
	stallBytes = 512 << 20
)

// TestStalledDestination: a destination that never reads while the host pushes 512 MiB.
// With bulk credit or flow control agentd's RSS stays within budget and another session keeps
// echoing fast; a stock host (no flow control) gets the reference's backpressure with the same
// memory bound.
func TestStalledDestination(t *testing.T) {
	stalled := make(chan *net.TCPConn, 1)
	sink := testutil.Serve(t, func(c *net.TCPConn) { stalled <- c }) // accepts, never reads
	echo := testutil.Serve(t, testutil.Echo)
	for _, mode := range hostModes {
		t.Run(mode.name, func(t *testing.T) {
			a := startAgentd(t, "socket", mode.opts)
			var p *pinger
			if mode.name != "gen5-stock" {
				p = newPinger(t, a.c, echo.Addr.Port)
				p.run(t, 20) // warm up
			}
			rss0 := testutil.RSS(t, a.pid())
			conn, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(sink.Addr.Port))
			if err != nil {
				t.Fatal(err)
			}
			dst := <-stalled
			defer dst.Close()
			var pushed atomic.Int64
			go func() {
				chunk := make([]byte, 64<<10)
				for pushed.Load() < stallBytes {
					if _, err := conn.Write(chunk); err != nil {
						return
					}
					pushed.Add(int64(len(chunk)))
				}
			}()
			if p != nil {
				p.rtts = nil
				p.run(t, 300)
			} else {
				waitStable(&pushed)
			}
			rss := testutil.RSS(t, a.pid())
			t.Logf("pushed %d MiB before backpressure; agentd RSS %d -> %d MiB (+%d KiB)", pushed.Load()>>20, rss0>>20, rss>>20, (rss-rss0)>>10)
			if rss-rss0 > rssBudget {
				t.Errorf("RSS grew by %d MiB, budget %d MiB", (rss-rss0)>>20, rssBudget>>20)
			}
			if pushed.Load() >= stallBytes {
				t.Errorf("all %d MiB accepted: nothing held the host back", stallBytes>>20)
			}
			if p != nil {
				t.Logf("echo p50 %v p99 %v over %d pings", testutil.Percentile(p.rtts, 50), p.p99(), len(p.rtts))
				if p.p99() > p99Budget {
					t.Errorf("echo p99 %v while another stream is stalled; budget %v", p.p99(), p99Budget)
				}
			}
			dst.Close() // unstick the stream so the test can end
			conn.Close()
		})
	}
}

// waitStable waits until a counter stops moving for 300 ms (the sender is blocked).
func waitStable(n *atomic.Int64) {
	last := n.Load()
	for {
		time.Sleep(300 * time.Millisecond) // sampling a counter owned by a blocked writer
		if cur := n.Load(); cur == last {
			return
		} else {
			last = cur
		}
	}
}

// TestStalledHost: a destination sends without end while the host never reads that stream.
func TestStalledHost(t *testing.T) {
	var sent atomic.Int64
	fire := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		chunk := make([]byte, 64<<10)
		for {
			n, err := c.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	echo := testutil.Serve(t, testutil.Echo)
	a := startAgentd(t, "socket", host.Options{})
	p := newPinger(t, a.c, echo.Addr.Port)
	p.run(t, 20)
	rss0 := testutil.RSS(t, a.pid())
	conn, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(fire.Addr.Port))
	if err != nil {
		t.Fatal(err)
	}
	p.rtts = nil
	p.run(t, 300)
	waitStable(&sent)
	rss := testutil.RSS(t, a.pid())
	t.Logf("destination got %d MiB out before backpressure; agentd RSS +%d KiB; echo p50 %v p99 %v",
		sent.Load()>>20, (rss-rss0)>>10, testutil.Percentile(p.rtts, 50), p.p99())
	if rss-rss0 > rssBudget {
		t.Errorf("RSS grew by %d MiB, budget %d MiB", (rss-rss0)>>20, rssBudget>>20)
	}
	if p.p99() > p99Budget {
		t.Errorf("echo p99 %v while the host stalls another stream; budget %v", p.p99(), p99Budget)
	}
	conn.Close()
}

// TestForwardHalfClose runs agentctl serve (the relay) and agentctl forward against the real
// agentd and checks half-close in both directions through the forward.
func TestForwardHalfClose(t *testing.T) {
	relaySock := relayed(t)
	fwdLog := &testutil.Buffer{}
	got := make(chan string, 1)
	srv := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c) // until the forward passes the client's FIN on
		got <- string(b)
		fmt.Fprintf(c, "you sent %d bytes", len(b))
	})
	port := testutil.ClosedPort(t)
	local := "127.0.0.1:" + strconv.Itoa(port)
	fwd := exec.Command(filepath.Join(binDir, "agentctl"), "forward", "--connect", relaySock, local, srv.Addr.String())
	fwd.Stderr = fwdLog
	startProc(t, fwd, fwdLog)
	waitLog(t, fwdLog, "forwarding")

	c, err := net.Dial("tcp", local)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hello guest"))
	c.(*net.TCPConn).CloseWrite()
	if s := <-got; s != "hello guest" {
		t.Fatalf("guest server got %q", s)
	}
	reply, err := io.ReadAll(c)
	if err != nil || string(reply) != "you sent 11 bytes" {
		t.Fatalf("reply %q %v", reply, err)
	}
}

func startProc(t *testing.T, cmd *exec.Cmd, log *testutil.Buffer) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", filepath.Base(cmd.Path), tail(log.String(), 3000))
		}
	})
}

// waitPath and waitLog poll for another process's side effects (no event crosses processes).
func waitPath(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitLog(t *testing.T, log *testutil.Buffer, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !bytes.Contains([]byte(log.String()), []byte(s)) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q:\n%s", s, log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestScenarios runs the shared core.tcp behaviour tests against the real agentd binary on a
// unix socket, with a host at generation 5 and at the newest (bulk); after each, the process
// must be back to its starting fd count.
func TestScenarios(t *testing.T) {
	for _, gen := range []uint8{5, protocol.Version} {
		t.Run(fmt.Sprintf("gen%d", gen), func(t *testing.T) {
			scenario.Run(t, func(t *testing.T, features []string) scenario.Agent {
				a := startAgentd(t, "socket", host.Options{Features: features, Generation: gen})
				fd0 := fds(t, a.pid())
				return scenario.Agent{
					Client: a.c,
					Idle:   func(t *testing.T) { waitFD(t, a.pid(), fd0) },
				}
			})
		})
	}
}

// TestExecScenarios runs the shared exec behaviour tests against the real agentd binary,
// started with a boot variable in its environment that must not reach children.
func TestExecScenarios(t *testing.T) {
	t.Setenv("MSB_SECRET", "must-not-leak")
	scenario.RunExec(t, func(t *testing.T, features []string) scenario.Agent {
		a := startAgentd(t, "socket", host.Options{Features: features})
		fd0 := fds(t, a.pid())
		return scenario.Agent{Client: a.c, Idle: func(t *testing.T) { waitFD(t, a.pid(), fd0) }}
	})
}

// TestRestrictedProfile: with MSB_SECURITY_PROFILE=restricted a root child has no_new_privs
// and lacks CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_NET_RAW in every set, so it cannot undo the
// network setup; MSB_USER sets the default user.
func TestRestrictedProfile(t *testing.T) {
	t.Setenv("MSB_SECURITY_PROFILE", "restricted")
	t.Setenv("MSB_USER", "0:0")
	a := startAgentd(t, "socket", host.Options{})
	out, _, code, err := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: "sh", Args: []string{"-c", "grep -E '^(CapBnd|CapEff|CapPrm|NoNewPrivs)' /proc/self/status"}}, nil)
	if err != nil || code != 0 {
		t.Fatalf("%v code %d", err, code)
	}
	const dropped = 1<<21 | 1<<12 | 1<<13 // SYS_ADMIN, NET_ADMIN, NET_RAW
	fields := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, ":")
		fields[k] = strings.TrimSpace(v)
	}
	if fields["NoNewPrivs"] != "1" {
		t.Fatalf("no_new_privs not set: %q", out)
	}
	for _, k := range []string{"CapBnd", "CapEff", "CapPrm"} {
		v, err := strconv.ParseUint(fields[k], 16, 64)
		if err != nil || v&dropped != 0 || v == 0 {
			t.Fatalf("%s = %s still has a dropped capability (or none at all)", k, fields[k])
		}
	}
	// Creating links needs CAP_NET_ADMIN: it must fail here. (veth, because this kernel has no
	// dummy driver; the same command as an unrestricted root must succeed, or the check proves
	// nothing.)
	probe := []string{"sh", "-c", "ip link add agrx0 type veth peer name agrx1 && ip link del agrx0"}
	_, errOut, code, _ := a.c.Run(ctx(t), protocol.ExecRequest{Cmd: probe[0], Args: probe[1:]}, nil)
	if code == 0 {
		exec.Command("ip", "link", "del", "agrx0").Run()
		t.Fatal("a restricted child could create network links")
	}
	if !strings.Contains(string(errOut), "Operation not permitted") {
		t.Fatalf("restricted link creation failed for another reason: %q", errOut)
	}
	if out, err := exec.Command(probe[0], probe[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("the probe fails even unrestricted, so it proves nothing: %v %s", err, out)
	}
}

// TestBadProfileRefused: a bad MSB_SECURITY_PROFILE stops agentd with a message saying so.
func TestBadProfileRefused(t *testing.T) {
	cmd := exec.Command(filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix:/nonexistent")
	cmd.Env = append(os.Environ(), "MSB_SECURITY_PROFILE=paranoid")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), `MSB_SECURITY_PROFILE=\"paranoid\": want default or restricted`) {
		t.Fatalf("%v: %s", err, out)
	}
}

// TestFsScenarios runs the shared filesystem tests against the real agentd binary, with a host
// at generation 5 (core.fs.data, with and without flow control) and at the newest (bulk),
// including a 128 MiB file written and read back byte-exact.
func TestFsScenarios(t *testing.T) {
	// The 1 GiB transfer is TestAgentctlGenerations' (through agentctl, at both generations).
	for _, gen := range []uint8{5, protocol.Version} {
		t.Run(fmt.Sprintf("gen%d", gen), func(t *testing.T) {
			scenario.RunFs(t, func(t *testing.T, features []string) scenario.Agent {
				a := startAgentd(t, "socket", host.Options{Features: features, Generation: gen})
				fd0 := fds(t, a.pid())
				return scenario.Agent{Client: a.c, Idle: func(t *testing.T) { waitFD(t, a.pid(), fd0) }}
			}, 128<<20)
		})
	}
}

// TestStalledStdin: a child that never reads stdin while the host pushes 256 MiB. agentd's RSS
// stays within budget and another session's output (a cat echoing 100-byte lines) keeps its
// p99 under 50 ms. A stock host gets the reference's backpressure with the same memory bound.
func TestStalledStdin(t *testing.T) {
	for _, features := range [][]string{{protocol.FeatureFlow}, {}} {
		t.Run(fmt.Sprintf("features=%v", features), func(t *testing.T) {
			a := startAgentd(t, "socket", host.Options{Features: features})
			flow := len(features) > 0
			var echo *host.ExecSession
			if flow {
				var err error
				if echo, err = a.c.Exec(ctx(t), protocol.ExecRequest{Cmd: "cat"}); err != nil {
					t.Fatal(err)
				}
				defer echo.Close()
				pingExec(t, echo, 20) // warm up
			}
			rss0 := testutil.RSS(t, a.pid())
			stuck, err := a.c.Exec(ctx(t), protocol.ExecRequest{Cmd: "sleep", Args: []string{"600"}})
			if err != nil {
				t.Fatal(err)
			}
			defer stuck.Close()
			var pushed atomic.Int64
			go func() {
				chunk := make([]byte, 64<<10)
				for pushed.Load() < 256<<20 {
					if stuck.Stdin(context.Background(), chunk) != nil {
						return
					}
					pushed.Add(int64(len(chunk)))
				}
			}()
			var rtts []time.Duration
			if flow {
				rtts = pingExec(t, echo, 300)
			} else {
				waitStable(&pushed)
			}
			rss := testutil.RSS(t, a.pid())
			t.Logf("stdin accepted %d MiB before backpressure; agentd RSS +%d KiB", pushed.Load()>>20, (rss-rss0)>>10)
			if rss-rss0 > rssBudget {
				t.Errorf("RSS grew by %d MiB, budget %d MiB", (rss-rss0)>>20, rssBudget>>20)
			}
			if pushed.Load() >= 256<<20 {
				t.Error("all of stdin accepted: nothing held the host back")
			}
			if flow {
				p99 := testutil.Percentile(rtts, 99)
				t.Logf("other session's output: p50 %v p99 %v", testutil.Percentile(rtts, 50), p99)
				if p99 > p99Budget {
					t.Errorf("exec output p99 %v while another child ignores stdin; budget %v", p99, p99Budget)
				}
			}
			// Without flow control the channel itself waits behind the stalled stdin (the
			// reference's semantics), so no signal frame could get through: kill the child
			// directly, and its stdin fails with EPIPE, which frees the channel.
			syscall.Kill(int(stuck.PID), syscall.SIGKILL)
		})
	}
}

// pingExec writes 100-byte lines to a cat session and times each echo.
func pingExec(t *testing.T, e *host.ExecSession, n int) []time.Duration {
	line := append(bytes.Repeat([]byte("x"), 99), '\n')
	rtts := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		start := time.Now()
		if err := e.Stdin(ctx(t), line); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(line); {
			ev, err := e.Next(ctx(t))
			if err != nil || ev.Exited {
				t.Fatalf("echo session ended: %v", err)
			}
			got += len(ev.Stdout)
		}
		rtts = append(rtts, time.Since(start))
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	return rtts
}

// TestEgressPolicyOnTCPConnect: with --egress-policy, core.tcp.connect reaches only what the
// policy allows; a denied destination is a terminal failed naming the rule; a bad policy file
// stops agentd with a message naming the field.
func TestEgressPolicyOnTCPConnect(t *testing.T) {
	srv := testutil.Serve(t, testutil.Echo)
	pol := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(pol, []byte(fmt.Sprintf(`{"default_egress": "deny", "rules": [
		{"id": "echo-only", "destination": {"cidr": "127.0.0.1/32"}, "protocols": ["tcp"], "ports": [{"start": %d}], "action": "allow"},
		{"id": "localhost-name", "destination": {"domain": "localhost"}, "ports": [{"start": %d}], "action": "allow"}]}`,
		srv.Addr.Port, srv.Addr.Port)), 0o644)
	a := startAgentd(t, "socket", host.Options{}, "--egress-policy", pol)
	conn, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(srv.Addr.Port))
	if err != nil {
		t.Fatalf("allowed destination: %v", err)
	}
	conn.Close()
	if conn, err = a.c.DialTCP(ctx(t), "localhost", uint16(srv.Addr.Port)); err != nil {
		t.Fatalf("allowed by name: %v", err)
	}
	conn.Close()
	other := testutil.Serve(t, testutil.Echo)
	_, err = a.c.DialTCP(ctx(t), "127.0.0.1", uint16(other.Addr.Port))
	var te *host.TCPError
	if !errors.As(err, &te) || !strings.Contains(te.Msg, "denied by egress policy (rule default)") {
		t.Fatalf("denied destination: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"rules": [{"destination": {"group": "intranet"}, "action": "allow"}]}`), 0o644)
	out, err := exec.Command(filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix:/nonexistent", "--egress-policy", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), `rules[0]: destination: group: "intranet"`) {
		t.Fatalf("bad policy: %v %s", err, out)
	}
}
