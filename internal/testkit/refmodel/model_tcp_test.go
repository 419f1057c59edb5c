package refmodel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
)

// TCP sessions, §2.4 and §3.12.

type mTCP struct {
	m      *Model
	id     uint32
	cmds   chan []byte // nil entry = EOF; a queue of 32, as TCP_COMMAND_CAPACITY
	ctx    context.Context
	cancel context.CancelFunc
	once   sync.Once // one terminal frame
	done   chan struct{}
	mu     sync.Mutex
	closed bool // the task ended: the queue takes nothing more
}

func (m *Model) tcpFrame(id uint32, t string, p any) error {
	f, err := asStruct(p)
	if err != nil {
		return err
	}
	switch t {
	case "core.tcp.connect":
		host, err := f.str("host")
		if err != nil {
			return err
		}
		port, err := f.uint("port", math.MaxUint16, nil)
		if err != nil {
			return err
		}
		m.connect(id, host, uint16(port))
	case "core.tcp.data":
		data, err := f.data("data")
		if err != nil {
			return err
		}
		s := m.tcp(id)
		if s == nil {
			m.emit(id, "core.tcp.failed", Map{{"error", fmt.Sprintf("unknown TCP session: %d", id)}})
		} else if !s.enqueue(data) {
			m.dropTCP(id, s)
			m.emit(id, "core.tcp.failed", Map{{"error", "TCP session is closed"}})
		}
	case "core.tcp.eof":
		if s := m.tcp(id); s != nil && !s.enqueue(nil) {
			m.dropTCP(id, s)
			m.emit(id, "core.tcp.failed", Map{{"error", "TCP session is closed"}})
		}
	case "core.tcp.close":
		if s := m.tcp(id); s != nil {
			m.dropTCP(id, s)
			s.abort()
		}
	}
	return nil
}

func (m *Model) tcp(id uint32) *mTCP {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tcps[id]
}

func (m *Model) dropTCP(id uint32, s *mTCP) {
	m.mu.Lock()
	if m.tcps[id] == s {
		delete(m.tcps, id)
	}
	m.mu.Unlock()
}

func (s *mTCP) enqueue(data []byte) bool {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return false
	}
	select {
	case s.cmds <- data:
		return true
	case <-s.done:
		return false
	}
}

func (s *mTCP) abort() { s.cancel() }

// terminal sends the session's one terminal frame; the session leaves the table first, as it
// does when the reference's loop passes the frame on.
func (s *mTCP) terminal(t string, p Map) {
	s.once.Do(func() {
		s.m.dropTCP(s.id, s)
		s.m.emit(s.id, t, p)
	})
}

func (m *Model) connect(id uint32, host string, port uint16) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &mTCP{m: m, id: id, cmds: make(chan []byte, 32), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	m.mu.Lock()
	if old := m.tcps[id]; old != nil {
		old.cancel() // a duplicate id replaces the entry
	}
	m.tcps[id] = s
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer func() {
			s.mu.Lock()
			s.closed = true
			s.mu.Unlock()
			close(s.done)
		}()
		dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
		conn, err := dialLikeRust(dctx, host, port)
		dcancel()
		if err != nil {
			if ctx.Err() != nil {
				return // aborted
			}
			msg := fmt.Sprintf("connect %s:%d: %s", host, port, err)
			if errors.Is(err, context.DeadlineExceeded) {
				msg = fmt.Sprintf("connect %s:%d timed out", host, port)
			}
			s.terminal("core.tcp.failed", Map{{"error", msg}})
			return
		}
		defer conn.Close()
		go func() { <-ctx.Done(); conn.Close() }()
		m.emit(id, "core.tcp.connected", Map{})
		readDone := make(chan struct{})
		go func() {
			defer close(readDone)
			buf := make([]byte, 64<<10)
			for {
				n, err := conn.Read(buf)
				if n > 0 {
					m.emit(id, "core.tcp.data", Map{{"data", append([]byte{}, buf[:n]...)}})
				}
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					if errors.Is(err, io.EOF) {
						m.emit(id, "core.tcp.eof", Map{})
						return // stop reading; the session stays up for the host's writes
					}
					s.terminal("core.tcp.failed", Map{{"error", "read TCP stream: " + text(err)}})
					cancel()
					return
				}
			}
		}()
		for {
			select {
			case data := <-s.cmds:
				var err error
				prefix := "write TCP stream: "
				if data == nil {
					prefix = "shutdown TCP stream: "
					err = conn.(*net.TCPConn).CloseWrite()
				} else if len(data) > 0 { // write_all of nothing writes nothing
					_, err = conn.Write(data)
				}
				if err != nil {
					s.terminal("core.tcp.failed", Map{{"error", prefix + text(err)}})
					cancel()
					<-readDone
					return
				}
			case <-ctx.Done():
				<-readDone
				return
			}
		}
	}()
}

// dialLikeRust is TcpStream::connect((host, port)): an IP literal (Rust's parser: no
// brackets, no zone) is used as is; anything else goes to getaddrinfo, whose failures read as
// "failed to lookup address information: <gai_strerror>". Every address is tried; the last
// error is the answer.
func dialLikeRust(ctx context.Context, host string, port uint16) (net.Conn, error) {
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil && a.Zone() == "" {
		addrs = []netip.Addr{a}
	} else if a, ok := atonExact(host); ok { // getaddrinfo takes inet_aton's forms: 127.1, 0x7f000001
		addrs = []netip.Addr{a}
	} else {
		noName := errors.New("failed to lookup address information: Name or service not known")
		if host == "" || containsAny(host, "[]") {
			return nil, noName
		}
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil {
			var dns *net.DNSError
			if errors.As(err, &dns) && !dns.IsNotFound && (dns.IsTimeout || dns.IsTemporary) {
				return nil, errors.New("failed to lookup address information: Temporary failure in name resolution")
			}
			return nil, noName
		}
		addrs = ips
	}
	var last error
	for _, a := range addrs {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(a.Unmap().String(), strconv.Itoa(int(port))))
		if err == nil {
			return c, nil
		}
		last = err
	}
	if last == nil {
		return nil, errors.New("could not resolve to any addresses")
	}
	var errno syscall.Errno
	if errors.As(last, &errno) {
		return nil, errors.New(osText(errno))
	}
	return nil, last
}

func containsAny(s, chars string) bool {
	for _, c := range s {
		for _, d := range chars {
			if c == d {
				return true
			}
		}
	}
	return false
}

// atonExact is glibc's __inet_aton_exact: one to four parts, each decimal, octal (leading 0)
// or hex (0x); the last fills the remaining bytes.
func atonExact(s string) (netip.Addr, bool) {
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var vals []uint64
	for _, p := range parts {
		base := 10
		switch {
		case strings.HasPrefix(p, "0x") || strings.HasPrefix(p, "0X"):
			base, p = 16, p[2:]
		case len(p) > 1 && p[0] == '0':
			base, p = 8, p[1:]
		}
		if p == "" && base != 8 {
			return netip.Addr{}, false
		}
		v := uint64(0)
		for _, c := range p {
			d := strings.IndexRune("0123456789abcdef", unicode.ToLower(c))
			if d < 0 || d >= base {
				return netip.Addr{}, false
			}
			if v = v*uint64(base) + uint64(d); v > math.MaxUint32 {
				return netip.Addr{}, false
			}
		}
		vals = append(vals, v)
	}
	var ip uint64
	for i, v := range vals[:len(vals)-1] {
		if v > 255 {
			return netip.Addr{}, false
		}
		ip |= v << (8 * (3 - i))
	}
	last := vals[len(vals)-1]
	if last >= 1<<(8*(5-len(vals))) {
		return netip.Addr{}, false
	}
	ip |= last
	return netip.AddrFrom4([4]byte{byte(ip >> 24), byte(ip >> 16), byte(ip >> 8), byte(ip)}), true
}
