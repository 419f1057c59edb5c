package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/agentd/agentd/host"
	"github.com/agentd/agentd/internal/testkit/testutil"
	"github.com/agentd/agentd/protocol"
)

// agentGenerations are the agents agentctl must drive unchanged: agentd at its generation,
// and agentd announcing 5, which behaves as microsandbox-agentd 0.5.7 does (no type of a later
// generation, no bulk, the reference's session behaviour). The host side (agentctl serve,
// agentctl, the client library) negotiates the lower of its own generation and the agent's.
var agentGenerations = []uint8{protocol.Version, 5}

// TestAgentctlGenerations drives each agent generation through agentctl serve and the agentctl
// commands: ping and touch, exec with a signal to the process group, fs put and get with equal
// sha256 (1 GiB through bulk at 9: about 10 s, a third of it making the random file, a fifth
// hashing; 256 MiB at 5), and forward with half-close both ways.
func TestAgentctlGenerations(t *testing.T) {
	for _, gen := range agentGenerations {
		t.Run(fmt.Sprintf("agent-gen%d", gen), func(t *testing.T) {
			sock, ad, _ := relayedWith(t, "--protocol-generation", strconv.Itoa(int(gen)))
			c, err := host.Connect(sock, host.Options{Log: quiet})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.Generation() != gen || c.Bulk() != (gen >= 8) {
				t.Fatalf("negotiated %d (bulk %v) with an agent at %d", c.Generation(), c.Bulk(), gen)
			}
			t.Run("PingTouch", func(t *testing.T) { pingTouch(t, c, gen) })
			t.Run("ExecGroupSignal", func(t *testing.T) { execGroupSignal(t, sock, gen) })
			size := int64(1 << 30) // through bulk; the gen-5 path moves less (it has TestFsScenarios too)
			if !c.Bulk() {
				size = 256 << 20
			}
			t.Run("FsPutGet", func(t *testing.T) { fsPutGet(t, sock, ad.Process.Pid, size) })
			t.Run("ForwardHalfClose", func(t *testing.T) { forwardHalfClose(t, sock) })
		})
	}
}

// pingTouch: at 6 and later ping answers and touch reports the activity it counted; an agent
// at 5 knows neither, and the client refuses them without sending anything.
func pingTouch(t *testing.T, c *host.Client, gen uint8) {
	if gen < 6 {
		var ue *host.UnsupportedError
		if err := c.Ping(ctx(t)); !errors.As(err, &ue) {
			t.Fatalf("ping toward an agent at %d: %v", gen, err)
		}
		if _, err := c.Touch(ctx(t)); !errors.As(err, &ue) {
			t.Fatalf("touch toward an agent at %d: %v", gen, err)
		}
		return
	}
	if err := c.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	a, err := c.Touch(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx(t)); err != nil { // not activity: the next touch is the next number
		t.Fatal(err)
	}
	if b, err := c.Touch(ctx(t)); err != nil || b != a+1 {
		t.Fatalf("touch after a ping: %d %v, want %d", b, err, a+1)
	}
}

// execGroupSignal: SIGTERM to agentctl exec reaches the program (agentctl exits 128+15); at 6 and later it goes to the
// program's whole process group (a background child dies with it), at 5 to its pid alone, as
// the reference's does.
func execGroupSignal(t *testing.T, sock string, gen uint8) {
	cmd := exec.Command(filepath.Join(binDir, "agentctl"), "exec", "--connect", sock, "--", "sh", "-c", "sleep 300 & echo $$ $!; wait")
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	var shell, child int
	if _, err := fmt.Sscan(line, &shell, &child); err != nil {
		t.Fatalf("pids %q: %v", line, err)
	}
	defer syscall.Kill(child, syscall.SIGKILL)
	gone := func(pid int) func() bool {
		return func() bool { return syscall.Kill(pid, 0) == syscall.ESRCH || zombie(pid) }
	}
	cmd.Process.Signal(syscall.SIGTERM)
	testutil.WaitFor(t, gone(shell), "the program to die of the signal")
	if gen > protocol.ReferenceGeneration {
		testutil.WaitFor(t, gone(child), "the background child to die with its group")
	} else {
		if gone(child)() {
			t.Fatal("an agent at 5 signalled the whole group (the reference signals the pid)")
		}
		syscall.Kill(child, syscall.SIGKILL) // it holds the output open: the session ends with it
	}
	if err := cmd.Wait(); err == nil || cmd.ProcessState.ExitCode() != 128+int(syscall.SIGTERM) {
		t.Fatalf("after SIGTERM: %v (exit %d, want 128+15)", err, cmd.ProcessState.ExitCode())
	}
}

// zombie reports whether pid has exited but is not reaped yet (its parent is agentd's child).
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && len(s) > i+2 && s[i+2] == 'Z'
}

// fsPutGet copies size random bytes into the guest with agentctl fs put and back with
// agentctl fs get, comparing sha256 of both ends, and logs what the transfer costs.
func fsPutGet(t *testing.T, sock string, agentPid int, size int64) {
	dir := t.TempDir()
	local, guest, back := filepath.Join(dir, "local"), filepath.Join(dir, "guest"), filepath.Join(dir, "back")
	f, err := os.Create(local)
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	want := sha256.New()
	if _, err := io.Copy(io.MultiWriter(f, want), io.LimitReader(rand.Reader, size)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Logf("made %d MiB of random bytes and their sha256 in %v", size>>20, time.Since(began).Round(time.Millisecond))
	start := time.Now()
	if _, errOut, code := agentctl(t, sock, "", "fs", "put", local, guest); code != 0 {
		t.Fatalf("put: %d %s", code, errOut)
	}
	put := time.Since(start)
	os.Remove(local) // the page cache of one copy at a time
	start = time.Now()
	if _, errOut, code := agentctl(t, sock, "", "fs", "get", guest, back); code != 0 {
		t.Fatalf("get: %d %s", code, errOut)
	}
	get := time.Since(start)
	start = time.Now()
	for _, p := range []string{guest, back} {
		got, err := sha256File(p)
		if err != nil || !bytes.Equal(got, want.Sum(nil)) {
			t.Fatalf("%s: sha256 %x, want %x (%v)", p, got, want.Sum(nil), err)
		}
		os.Remove(p)
	}
	t.Logf("%d MiB: put %v (%.0f MB/s), get %v (%.0f MB/s); the checks %v; agentd %s", size>>20, put.Round(time.Millisecond),
		float64(size)/put.Seconds()/1e6, get.Round(time.Millisecond), float64(size)/get.Seconds()/1e6, time.Since(start).Round(time.Millisecond), procSummary(agentPid))
}

func sha256File(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	return h.Sum(nil), err
}

// startForward runs agentctl forward to guestAddr and returns its local address.
func startForward(t *testing.T, sock, guestAddr string) string {
	local := "127.0.0.1:" + strconv.Itoa(testutil.ClosedPort(t))
	log := &testutil.Buffer{}
	fwd := exec.Command(filepath.Join(binDir, "agentctl"), "forward", "--connect", sock, local, guestAddr)
	fwd.Stderr = log
	startProc(t, fwd, log)
	waitLog(t, log, "forwarding")
	return local
}

// forwardHalfClose: through agentctl forward, each side's half-close reaches the other while
// the other direction goes on: the client's FIN first (the server answers after it), then the
// server's (the client still sends after it).
func forwardHalfClose(t *testing.T, sock string) {
	clientFirst := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "you sent %d bytes", len(b))
	})
	serverFirst := testutil.Serve(t, func(c *net.TCPConn) {
		defer c.Close()
		c.Write([]byte("hello first"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		fmt.Fprintf(os.Stderr, "") // nothing more may be written after our FIN
		if string(b) != "after your FIN" {
			c.SetLinger(0) // the client sees a reset: the check below fails
		}
	})
	payload := bytes.Repeat([]byte("x"), 3<<20)
	c, err := net.Dial("tcp", startForward(t, sock, clientFirst.Addr.String()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(payload)
	c.(*net.TCPConn).CloseWrite()
	if reply, err := io.ReadAll(c); err != nil || string(reply) != fmt.Sprintf("you sent %d bytes", len(payload)) {
		t.Fatalf("client's FIN first: reply %q %v", reply, err)
	}
	c2, err := net.Dial("tcp", startForward(t, sock, serverFirst.Addr.String()))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	greeting := make([]byte, 11)
	if _, err := io.ReadFull(c2, greeting); err != nil || string(greeting) != "hello first" {
		t.Fatalf("greeting %q %v", greeting, err)
	}
	if n, err := c2.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the server's FIN: %d %v, want EOF", n, err)
	}
	c2.Write([]byte("after your FIN"))
	c2.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(c2); err != nil || len(rest) != 0 {
		t.Fatalf("server's FIN first: %q %v", rest, err)
	}
}

// TestForwardStalledDestination: through agentctl forward (bulk at 9, CBOR at 5), a
// destination that never reads while a client pushes 512 MiB: the stream is held back, agentd
// and the relay stay within the memory bound, and another forwarded stream keeps echoing with
// a p99 under 50 ms.
func TestForwardStalledDestination(t *testing.T) {
	for _, gen := range agentGenerations {
		t.Run(fmt.Sprintf("agent-gen%d", gen), func(t *testing.T) {
			sock, ad, _ := relayedWith(t, "--protocol-generation", strconv.Itoa(int(gen)))
			stalled := make(chan *net.TCPConn, 1)
			sink := testutil.Serve(t, func(c *net.TCPConn) { stalled <- c }) // accepts, never reads
			echo := testutil.Serve(t, testutil.Echo)
			sinkFwd, echoFwd := startForward(t, sock, sink.Addr.String()), startForward(t, sock, echo.Addr.String())
			e, err := net.Dial("tcp", echoFwd)
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			ping := func(n int) []time.Duration {
				msg, buf := make([]byte, 100), make([]byte, 100)
				var rtts []time.Duration
				for i := 0; i < n; i++ {
					start := time.Now()
					e.Write(msg)
					if _, err := io.ReadFull(e, buf); err != nil {
						t.Fatal(err)
					}
					rtts = append(rtts, time.Since(start))
				}
				sortDurations(rtts)
				return rtts
			}
			ping(20) // warm up
			rss0 := testutil.RSS(t, ad.Process.Pid)
			s, err := net.Dial("tcp", sinkFwd)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			dst := <-stalled
			defer dst.Close()
			var pushed atomic.Int64
			go func() {
				chunk := make([]byte, 256<<10)
				for pushed.Load() < stallBytes {
					if _, err := s.Write(chunk); err != nil {
						return
					}
					pushed.Add(int64(len(chunk)))
				}
			}()
			rtts := ping(300)
			waitStable(&pushed)
			rss := testutil.RSS(t, ad.Process.Pid)
			p99 := testutil.Percentile(rtts, 99)
			t.Logf("pushed %d MiB before backpressure; agentd RSS %d -> %d MiB; echo p50 %v p99 %v",
				pushed.Load()>>20, rss0>>20, rss>>20, testutil.Percentile(rtts, 50), p99)
			if rss-rss0 > rssBudget {
				t.Errorf("agentd RSS grew by %d MiB, budget %d MiB", (rss-rss0)>>20, rssBudget>>20)
			}
			if pushed.Load() >= stallBytes {
				t.Errorf("all %d MiB accepted: nothing held the client back", stallBytes>>20)
			}
			if p99 > p99Budget {
				t.Errorf("echo p99 %v beside the stalled stream; budget %v", p99, p99Budget)
			}
		})
	}
}

func sortDurations(d []time.Duration) {
	for i := 1; i < len(d); i++ {
		for j := i; j > 0 && d[j] < d[j-1]; j-- {
			d[j], d[j-1] = d[j-1], d[j]
		}
	}
}

// TestNetworkDocumentPolicy: agentd takes microsandbox's current network document (the
// NetworkConfig a host persists, with its policy inside) as its policy file, and enforces it on
// core.tcp; one asking for what agentd does not do is refused at start, naming the field.
func TestNetworkDocumentPolicy(t *testing.T) {
	allowed, other := testutil.Serve(t, testutil.Echo), testutil.Serve(t, testutil.Echo)
	doc := filepath.Join(t.TempDir(), "network.json")
	os.WriteFile(doc, []byte(fmt.Sprintf(`{"enabled": true, "strict": true, "max_connections": 0, "tls": {"enabled": false},
		"dns": {"rebind_protection": true, "nameservers": []},
		"policy": {"default_egress": "deny", "rules": [
			{"direction": "egress", "destination": {"cidr": "127.0.0.1/32"}, "protocols": ["tcp"], "ports": [{"start": %d, "end": %d}], "action": "allow"}]}}`,
		allowed.Addr.Port, allowed.Addr.Port)), 0o644)
	a := startAgentd(t, "socket", host.Options{}, "--egress-policy", doc)
	conn, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(allowed.Addr.Port))
	if err != nil {
		t.Fatalf("allowed by the document's policy: %v", err)
	}
	conn.Close()
	var te *host.TCPError
	if _, err := a.c.DialTCP(ctx(t), "127.0.0.1", uint16(other.Addr.Port)); !errors.As(err, &te) || !strings.Contains(te.Msg, "denied by egress policy") {
		t.Fatalf("not allowed by the document's policy: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"enabled": true, "rate_limiter": {"egress": {"ops": {"size": 10, "refill_time_ms": 1000}}}}`), 0o644)
	out, err := exec.Command(filepath.Join(binDir, "agentd"), "--standalone", "--port", "unix:/nonexistent", "--egress-policy", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "network: rate_limiter: agentd's netstack has no rate limiter") {
		t.Fatalf("a document asking for a rate limit: %v %s", err, out)
	}
}
