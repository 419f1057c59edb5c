package sessionio

import "sync"

// Data buffers are pooled so a relayed chunk costs no allocation in steady state.
var bufPool = sync.Pool{New: func() any { b := make([]byte, ChunkSize); return &b }}

// ChunkSize is the size of pooled data buffers: the largest tcp.data chunk the reference sends.
const ChunkSize = 64 << 10

// GetBuf returns a pooled ChunkSize buffer.
func GetBuf() *[]byte { return bufPool.Get().(*[]byte) }

// PutBuf returns a buffer to the pool.
func PutBuf(b *[]byte) {
	if cap(*b) >= ChunkSize {
		*b = (*b)[:ChunkSize]
		bufPool.Put(b)
	}
}
