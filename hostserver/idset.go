package hostserver

// idSet remembers which correlation ids of one client's range are finished, one bit each, in
// pages allocated as ids are used: memory follows the ids a client really used (a client
// allocates them in order), never the size of its 33-million-id range.
type idSet struct {
	start uint32
	pages map[uint32]*[idPageWords]uint64
}

const (
	idPageWords = 512 // 4 KiB
	idPageBits  = idPageWords * 64
)

func newIDSet(start uint32) *idSet {
	return &idSet{start: start, pages: map[uint32]*[idPageWords]uint64{}}
}

func (s *idSet) locate(id uint32) (page, word uint32, mask uint64) {
	off := id - s.start
	return off / idPageBits, off % idPageBits / 64, 1 << (off % 64)
}

// add marks id finished.
func (s *idSet) add(id uint32) {
	page, word, mask := s.locate(id)
	p := s.pages[page]
	if p == nil {
		p = new([idPageWords]uint64)
		s.pages[page] = p
	}
	p[word] |= mask
}

// has reports whether id is finished.
func (s *idSet) has(id uint32) bool {
	page, word, mask := s.locate(id)
	p := s.pages[page]
	return p != nil && p[word]&mask != 0
}
