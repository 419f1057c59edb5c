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
