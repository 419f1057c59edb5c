package fs

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// Generation-8 bulk reads and writes (contract 6.5): a core.fs.request Read or Write that
// carries a bulk offer moves its bytes as raw records under absolute credit instead of
// core.fs.data. The handle rules, the length check and the terminal core.fs.response are the
// CBOR path's.

// BulkRecordMax is the largest record a bulk fs stream sends or accepts (an offer may ask for
// less; the reference's own default is 3 MiB, which hosts must scale down to).
const BulkRecordMax = sessionio.BigChunkSize

// BulkWindow is the host -> guest credit a bulk write grants ahead of the disk (less when the
// write budget runs short).
const BulkWindow = protocol.BulkDefaultWindow

// bulkQueueRecords is how many records a bulk read may queue toward the host: the file is read
// while the last record is written.
const bulkQueueRecords = 4

// RequestBulk runs a core.fs.request that carries a bulk offer, on a frame stamped with
// generation v. Only Read and Write move bytes; any other operation runs as Request would.
func (s *Service) RequestBulk(ctx context.Context, id uint32, op protocol.FsOp, offer protocol.BulkOffer, v uint8) {
	var refuse string
	switch op.(type) {
	case *protocol.FsRead:
		refuse = checkOffer(offer, v, true)
	case *protocol.FsWrite:
		refuse = checkOffer(offer, v, false)
	default:
		s.Request(ctx, id, op, false)
		return
	}
	if refuse != "" {
		s.reply(ctx, id, nil, errors.New(refuse))
		return
	}
	if w, ok := op.(*protocol.FsWrite); ok {
		if err := s.startBulkWrite(ctx, id, w, offer); err != nil {
			s.reply(ctx, id, nil, err)
		}
		return
	}
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	s.wg.Add(1)
	go func() {
		defer func() { <-s.sem; s.wg.Done() }()
		if err := s.startBulkRead(ctx, id, op.(*protocol.FsRead), offer); err != nil {
			s.reply(ctx, id, nil, err)
		}
	}()
}

// checkOffer returns the core.fs.response text refusing an fs bulk offer ("" to take it). A
// read's offer must grant guest -> host credit; a write's must not.
func checkOffer(o protocol.BulkOffer, v uint8, read bool) string {
	switch {
	case v < protocol.TypeBulkAccepted.Info().Generation:
		return fmt.Sprintf("raw bulk offer requires protocol generation %d", protocol.TypeBulkAccepted.Info().Generation)
	case o.Validate() != nil:
		return "invalid filesystem bulk offer: " + o.Validate().Error()
	case read && o.GuestToHostCreditLimit == 0:
		return "filesystem read bulk offer must grant guest-to-host credit"
	case !read && o.GuestToHostCreditLimit != 0:
		return "filesystem write bulk offer must not grant guest-to-host credit"
	}
	return ""
}

// startBulkRead accepts the offer and streams the file as guest -> host records within the
// host's credit, then finishes the flow and answers core.fs.response.
func (s *Service) startBulkRead(ctx context.Context, id uint32, o *protocol.FsRead, offer protocol.BulkOffer) error {
	h, err := s.acquire(id, o.Handle, "read", readHandle)
	if err != nil {
		return err
	}
	record := int(min(offer.MaxRecordPayload, BulkRecordMax))
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rs := &readStream{owner: id, cancel: cancel, bulk: sessionio.NewBulkOut(offer.GuestToHostCreditLimit)}
	s.mu.Lock()
	s.reads[id] = rs
	s.mu.Unlock()
	q := s.out.NewQueue(max(s.opts.HighWater, bulkQueueRecords*record), max(s.opts.LowWater, (bulkQueueRecords-1)*record))
	err = q.PushMsg(rctx, id, protocol.TypeBulkAccepted, protocol.BulkAccepted{Kind: protocol.BulkFS,
		Flows: protocol.BulkGuestToHost.Bit(), Format: protocol.BulkFormatRawV1, MaxRecordPayload: uint32(record),
		GuestToHostCreditLimit: offer.GuestToHostCreditLimit})
	if err == nil {
		err = s.streamBulk(rctx, id, h, o, q, rs.bulk, record)
	}
	h.release()
	s.mu.Lock()
	live := s.reads[id] == rs
	if live {
		delete(s.reads, id)
	}
	fail, byHost := rs.failure, rs.byHost
	s.mu.Unlock()
	switch {
	case fail != "": // the host broke the flow's rules (cancel, then the terminal error), or cancelled
		if !byHost {
			q.PushMsg(context.Background(), id, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS,
				Reason: protocol.BulkCancelProtocolState, Message: fail})
		}
		err = errors.New(fail)
	case !live || rctx.Err() != nil:
		q.Close() // aborted (relay client gone, or the host cancelled): no terminal frame
		return nil
	case err == nil:
		err = q.PushMsg(rctx, id, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkFS,
			Flow: protocol.BulkGuestToHost, FinalOffset: rs.bulk.Finish()})
	}
	r := protocol.FsResponse{OK: err == nil}
	if err != nil {
		msg := err.Error()
		r.Error = &msg
	}
	q.PushMsg(context.Background(), id, protocol.TypeFsResponse, r)
	return nil
}

// streamBulk is stream for records: each read takes the host's credit first and is one
// operation on the handle, so waiting for credit or the channel never holds the handle.
func (s *Service) streamBulk(ctx context.Context, id uint32, h *handle, o *protocol.FsRead, q *sessionio.Queue, out *sessionio.BulkOut, record int) error {
	off := int64(o.Offset)
	remaining := int64(-1)
	if o.Len != nil {
		remaining = int64(*o.Len)
	}
	for remaining != 0 {
		want := record
		if remaining > 0 {
			want = int(min(int64(want), remaining))
		}
		at, n, ok := out.Wait(ctx, want)
		if !ok {
			return ctx.Err()
		}
		buf := sessionio.GetBigBuf()
		m, err := h.readAt((*buf)[:n], off)
		if m > 0 {
			off += int64(m)
			if remaining > 0 {
				remaining -= int64(m)
			}
			out.Sent(m)
			if perr := q.PushRecord(ctx, id, protocol.TypeFsData, protocol.BulkFS, protocol.BulkGuestToHost, at, buf, m, nil); perr != nil {
				return perr
			}
		} else {
			sessionio.PutBuf(buf)
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// startBulkWrite accepts the offer, grants the host credit backed by the write budget, and
// writes its records to the file in order; the host's finish is the end of the data.
func (s *Service) startBulkWrite(ctx context.Context, id uint32, o *protocol.FsWrite, offer protocol.BulkOffer) error {
	h, err := s.acquire(id, o.Handle, "write", writeHandle)
	if err != nil {
		return err
	}
	record := int(min(offer.MaxRecordPayload, BulkRecordMax))
	in := sessionio.NewBulkIn(sessionio.BulkInOptions{Kind: protocol.BulkFS, Flow: protocol.BulkHostToGuest,
		MaxRecord: record, Window: BulkWindow, Budget: s.opts.WriteBudget,
		Grant: func(consumed, limit uint64) {
			s.out.ControlMsg(ctx, id, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkFS,
				Flow: protocol.BulkHostToGuest, ConsumedOffset: consumed, CreditLimit: limit})
		}})
	// Only granted bytes arrive, and each is backed by the budget: the sink never waits.
	ws := &writeStream{owner: id, bulk: in, in: sessionio.NewSink(ctx, sessionio.SinkConfig{
		Limit: protocol.BulkMaxWindow + BulkRecordMax, Big: true, GrantEvery: sessionio.ChunkSize, Grant: in.Consumed})}
	s.mu.Lock()
	s.writes[id] = ws
	s.mu.Unlock()
	s.out.ControlMsg(ctx, id, protocol.TypeBulkAccepted, protocol.BulkAccepted{Kind: protocol.BulkFS,
		Flows: protocol.BulkHostToGuest.Bit(), Format: protocol.BulkFormatRawV1, MaxRecordPayload: uint32(record),
		HostToGuestCreditLimit: in.Open()})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer in.Close()
		w := &fileWriter{h: h, off: int64(o.Offset)}
		err := ws.in.Run(w)
		h.release()
		s.mu.Lock()
		live := s.writes[id] == ws
		if live {
			delete(s.writes, id)
		}
		fail, byHost := ws.failure, ws.byHost
		s.mu.Unlock()
		switch {
		case fail != "":
			if !byHost {
				s.out.ControlMsg(ctx, id, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS,
					Reason: protocol.BulkCancelProtocolState, Message: fail})
			}
			err = errors.New(fail)
		case !live || err == nil: // aborted: no terminal frame
			return
		case err == io.EOF:
			err = nil
			if o.Len != nil && uint64(w.n) != *o.Len {
				err = fmt.Errorf("write length mismatch: expected %d, wrote %d", *o.Len, w.n)
			}
		}
		ws.in.Close()
		s.reply(ctx, id, nil, err)
	}()
	return nil
}

// Record takes a host raw record for a bulk write stream (its payload aliases the channel's
// buffer and is copied). It reports false when no bulk write stream has the id.
func (s *Service) Record(r protocol.BulkRecord) bool {
	s.mu.Lock()
	ws := s.writes[r.ID]
	s.mu.Unlock()
	if ws == nil || ws.bulk == nil {
		return false
	}
	if err := ws.bulk.Accept(r); err != nil {
		s.failWrite(ws, "invalid filesystem bulk record: "+err.Error(), false)
		return true
	}
	if ws.in.Write(r.Payload) == nil && ws.bulk.Complete() {
		ws.in.CloseWrite()
	}
	return true
}

// BulkControl applies a host core.bulk.credit, finish or cancel to the bulk stream of its id;
// it reports false when there is none.
func (s *Service) BulkControl(id uint32, payload any) bool {
	s.mu.Lock()
	ws, rs := s.writes[id], s.reads[id]
	s.mu.Unlock()
	switch p := payload.(type) {
	case protocol.BulkCredit:
		if rs == nil || rs.bulk == nil {
			return false
		}
		if p.Kind != protocol.BulkFS || p.Flow != protocol.BulkGuestToHost {
			s.failRead(rs, fmt.Sprintf("invalid filesystem bulk credit: kind %d flow %d", p.Kind, p.Flow), false)
		} else if err := rs.bulk.Credit(p.ConsumedOffset, p.CreditLimit); err != nil {
			s.failRead(rs, "invalid filesystem bulk credit: "+err.Error(), false)
		}
	case protocol.BulkFinish:
		if ws == nil || ws.bulk == nil {
			return false
		}
		if p.Kind != protocol.BulkFS || p.Flow != protocol.BulkHostToGuest {
			s.failWrite(ws, fmt.Sprintf("invalid filesystem bulk finish: kind %d flow %d", p.Kind, p.Flow), false)
		} else if complete, err := ws.bulk.Finish(p.FinalOffset); err != nil {
			s.failWrite(ws, "invalid filesystem bulk finish: "+err.Error(), false)
		} else if complete {
			ws.in.CloseWrite()
		}
	case protocol.BulkCancel: // the host gave up: the stream ends with its message
		switch {
		case ws != nil && ws.bulk != nil:
			s.failWrite(ws, p.Message, true)
		case rs != nil && rs.bulk != nil:
			s.failRead(rs, p.Message, true)
		default:
			return false
		}
	default:
		return false
	}
	return true
}

// failWrite and failRead end a bulk stream: for a protocol error its goroutine sends
// core.bulk.cancel, then (as for the host's own cancel, byHost) the terminal core.fs.response
// with msg.
func (s *Service) failWrite(ws *writeStream, msg string, byHost bool) {
	s.mu.Lock()
	if ws.failure == "" {
		ws.failure, ws.byHost = msg, byHost
	}
	s.mu.Unlock()
	ws.in.Close()
}

func (s *Service) failRead(rs *readStream, msg string, byHost bool) {
	s.mu.Lock()
	if rs.failure == "" {
		rs.failure, rs.byHost = msg, byHost
	}
	s.mu.Unlock()
	rs.cancel()
}
