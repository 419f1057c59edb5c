// Package sessionio is bounded session I/O, the kit both ends of the agent channel build their
// sessions from:
//
//   - Writer and Queue (out): one bounded queue per session, a small priority queue for control
//     replies, and one writer that takes frames round-robin from the sessions that have output,
//     so a bulk stream cannot starve another session's frames and a session that produces faster
//     than the channel drains blocks only itself.
//   - Sink (in): one session's bounded byte queue toward a local writer (a socket, a child's
//     stdin), granting flow-control credit as bytes leave.
//   - Budget: a byte budget shared by many sessions; Credit: one stream's send window.
//   - GetBuf/PutBuf: the pool of chunk-sized buffers all of them share.
package sessionio

import (
	"os"
	"time"
)

// Defaults shared by every kind of session, tuned for a virtio-serial port or a unix socket.
const (
	// DefaultHighWater and DefaultLowWater are a session's output queue watermarks: at the
	// high one it stops reading its source until the writer drains the queue to the low one.
	DefaultHighWater = 256 << 10
	DefaultLowWater  = 64 << 10
	// DefaultStreamWindow is the receive window each end of a guest-initiated stream grants.
	DefaultStreamWindow = 256 << 10
)

// Wait blocks until wake or done is signalled (the caller then looks at its state again) or
// the deadline dl passes (os.ErrDeadlineExceeded); a zero dl never passes, a nil done never
// fires. It is the blocking step of a net.Conn's Read with deadlines.
func Wait(wake, done <-chan struct{}, dl time.Time) error {
	var timeout <-chan time.Time
	if !dl.IsZero() {
		d := time.Until(dl)
		if d <= 0 {
			return os.ErrDeadlineExceeded
		}
		t := time.NewTimer(d)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-wake:
	case <-done:
	case <-timeout:
		return os.ErrDeadlineExceeded
	}
	return nil
}
