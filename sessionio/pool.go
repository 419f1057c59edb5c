package sessionio

import "sync"

// Data buffers are pooled so a relayed chunk costs no allocation in steady state.
var (
	bufPool = sync.Pool{New: func() any { b := make([]byte, ChunkSize); return &b }}
	bigPool = sync.Pool{New: func() any { b := make([]byte, BigChunkSize); return &b }}
)

// ChunkSize is the size of pooled data buffers: the largest tcp.data chunk the reference sends.
const ChunkSize = 64 << 10

// BigChunkSize is the size of the large pooled buffers: one raw bulk record of TCP (the
// reference's default record payload).
const BigChunkSize = 256 << 10

// GetBuf returns a pooled ChunkSize buffer.
func GetBuf() *[]byte { return bufPool.Get().(*[]byte) }

// GetBigBuf returns a pooled BigChunkSize buffer.
func GetBigBuf() *[]byte { return bigPool.Get().(*[]byte) }

// PutBuf returns a buffer from either pool to the pool of its size.
func PutBuf(b *[]byte) {
	switch c := cap(*b); {
	case c >= BigChunkSize:
		*b = (*b)[:BigChunkSize]
		bigPool.Put(b)
	case c >= ChunkSize:
		*b = (*b)[:ChunkSize]
		bufPool.Put(b)
	}
}
