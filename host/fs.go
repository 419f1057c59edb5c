package host

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/agentd/agentd/protocol"
	"github.com/agentd/agentd/sessionio"
)

// FsError is a core.fs.response with ok=false: the agent's message, e.g.
// "stat: No such file or directory (os error 2)".
type FsError struct{ Msg string }

func (e *FsError) Error() string { return e.Msg }

func fsResult(m protocol.Message) (*protocol.FsResponseData, error) {
	if m.Type != protocol.TypeFsResponse {
		if err := AsError(m); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("fs: unexpected reply %s", m.Name())
	}
	var r protocol.FsResponse
	if err := protocol.Unmarshal(m.Payload, &r); err != nil {
		return nil, fmt.Errorf("decode fs.response: %w", err)
	}
	if !r.OK {
		msg := "fs operation failed"
		if r.Error != nil {
			msg = *r.Error
		}
		return nil, &FsError{msg}
	}
	return r.Data, nil
}

// Fs runs one filesystem operation and returns its result (nil for operations without one).
func (c *Client) Fs(ctx context.Context, op protocol.FsOp) (*protocol.FsResponseData, error) {
	m, err := c.Request(ctx, protocol.TypeFsRequest, protocol.FsRequest{Op: op})
	if err != nil {
		return nil, err
	}
	return fsResult(m)
}

// FsRead streams a file handle's bytes from offset (n bytes, or to EOF when n is nil) into w.
func (c *Client) FsRead(ctx context.Context, handle, offset uint64, n *uint64, w io.Writer) (int64, error) {
	if c.Bulk() {
		return c.fsReadBulk(ctx, handle, offset, n, w)
	}
	op := &protocol.FsRead{Handle: handle, Offset: offset, Len: n}
	flow := c.HasFeature(protocol.FeatureFlow)
	if flow {
		op.Window = uint32(c.opts.Window)
	}
	s, err := c.Start(protocol.TypeFsRequest, protocol.FsRequest{Op: op})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	var total int64
	consumed := 0
	for {
		dl, err := s.recv(ctx)
		if err != nil {
			return total, err
		}
		m := dl.m
		if m.Type != protocol.TypeFsData {
			_, err := fsResult(m)
			return total, err
		}
		d, err := protocol.DecodeData(m.Payload)
		if err != nil {
			return total, fmt.Errorf("decode fs.data: %w", err)
		}
		_, err = w.Write(d)
		dl.release()
		if err != nil {
			return total, err
		}
		total += int64(len(d))
		if consumed += len(d); flow && consumed >= c.opts.Window/4 {
			c.SendMsg(s.ID, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(consumed)})
			consumed = 0
		}
	}
}

// FsWrite streams r into a file handle at offset, then sends EOF and waits for the result.
// With n set, the agent checks that exactly n bytes arrived. When r fails, what was sent so
// far stays written (the caller removes it) and r's error is returned.
func (c *Client) FsWrite(ctx context.Context, handle, offset uint64, n *uint64, r io.Reader) (int64, error) {
	if c.Bulk() {
		return c.fsWriteBulk(ctx, handle, offset, n, r)
	}
	op := &protocol.FsWrite{Handle: handle, Offset: offset, Len: n}
	flow := c.HasFeature(protocol.FeatureFlow)
	if flow {
		op.Window = 1
	}
	s, err := c.Start(protocol.TypeFsRequest, protocol.FsRequest{Op: op})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	buf := make([]byte, 64<<10)
	var total int64
	for {
		want := len(buf)
		if flow {
			got, err := s.takeCredit(ctx, want)
			if err != nil {
				return total, err
			}
			want = got
		}
		k, rerr := r.Read(buf[:want])
		if flow && k < want {
			s.credit.Add(int64(want - k))
		}
		if k > 0 {
			if err := c.sendData(s.ID, protocol.TypeFsData, buf[:k]); err != nil {
				return total, err
			}
			total += int64(k)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// End the agent's side too (the protocol has no abort: EOF, then the reply), or its
			// write would wait for more data, holding the handle, and a close would hang.
			if c.sendData(s.ID, protocol.TypeFsData, nil) == nil {
				s.Recv(ctx)
			}
			return total, rerr
		}
		select { // an early terminal reply (a write error) ends the upload
		case d, ok := <-s.ch:
			if !ok {
				return total, ErrClosed
			}
			_, err := fsResult(d.m)
			if err == nil {
				err = fmt.Errorf("fs write ended early")
			}
			return total, err
		default:
		}
	}
	if err := c.sendData(s.ID, protocol.TypeFsData, nil); err != nil {
		return total, err
	}
	m, err := s.Recv(ctx)
	if err != nil {
		return total, err
	}
	_, err = fsResult(m)
	return total, err
}

// ReadFile copies a guest file into w.
func (c *Client) ReadFile(ctx context.Context, path string, w io.Writer) (int64, error) {
	h, err := c.open(ctx, path, protocol.FsOpenOptions{Read: true})
	if err != nil {
		return 0, err
	}
	defer c.Fs(ctx, &protocol.FsCloseHandle{Handle: h})
	return c.FsRead(ctx, h, 0, nil, w)
}

// WriteFile creates or truncates a guest file with mode and copies r into it.
func (c *Client) WriteFile(ctx context.Context, path string, mode uint32, r io.Reader) (int64, error) {
	h, err := c.open(ctx, path, protocol.FsOpenOptions{Write: true, Create: true, Truncate: true, Mode: &mode})
	if err != nil {
		return 0, err
	}
	n, err := c.FsWrite(ctx, h, 0, nil, r)
	if _, cerr := c.Fs(ctx, &protocol.FsCloseHandle{Handle: h}); err == nil {
		err = cerr
	}
	return n, err
}

func (c *Client) open(ctx context.Context, path string, o protocol.FsOpenOptions) (uint64, error) {
	d, err := c.Fs(ctx, &protocol.FsOpenFile{Path: path, Options: o})
	if err != nil {
		return 0, err
	}
	if d == nil || d.Kind != "Handle" {
		return 0, fmt.Errorf("open %s: no handle in reply", path)
	}
	return d.Handle, nil
}

// fsReadBulk is FsRead with generation-8 bulk: the file's bytes come as raw records within the
// credit this side grants as w takes them, then core.bulk.finish and the response.
func (c *Client) fsReadBulk(ctx context.Context, handle, offset uint64, n *uint64, w io.Writer) (int64, error) {
	offer := protocol.BulkOfferFSRead
	offer.GuestToHostCreditLimit = uint64(c.opts.BulkWindow)
	s, err := c.Open()
	if err != nil {
		return 0, err
	}
	defer s.Close()
	in := sessionio.NewBulkIn(sessionio.BulkInOptions{Kind: protocol.BulkFS, Flow: protocol.BulkGuestToHost,
		MaxRecord: int(offer.MaxRecordPayload), Window: offer.GuestToHostCreditLimit,
		Grant: func(consumed, limit uint64) {
			c.SendMsg(s.ID, protocol.TypeBulkCredit, protocol.BulkCredit{Kind: protocol.BulkFS,
				Flow: protocol.BulkGuestToHost, ConsumedOffset: consumed, CreditLimit: limit})
		}})
	in.Open()
	c.mu.Lock()
	s.bulkIn = in
	c.mu.Unlock()
	if err := c.SendMsg(s.ID, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsRead{Handle: handle, Offset: offset, Len: n}, Bulk: &offer}); err != nil {
		return 0, err
	}
	var total int64
	fail := func(err error) (int64, error) { // this side gives up: the agent cancels the stream
		c.SendMsg(s.ID, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS, Reason: protocol.BulkCancelCaller, Message: err.Error()})
		return total, err
	}
	for {
		d, err := s.recv(ctx)
		if err != nil {
			return total, err
		}
		switch {
		case d.err != nil:
			return fail(d.err)
		case d.rec != nil:
			_, werr := w.Write(d.rec.Payload)
			k := len(d.rec.Payload)
			d.release()
			if werr != nil {
				return fail(werr)
			}
			total += int64(k)
			in.Consumed(k)
		case d.m.Type == protocol.TypeBulkAccepted:
			var p protocol.BulkAccepted
			if err := protocol.Unmarshal(d.m.Payload, &p); err != nil {
				return fail(fmt.Errorf("decode core.bulk.accepted: %w", err))
			}
			if p.Kind != protocol.BulkFS || p.Flows != protocol.BulkGuestToHost.Bit() || p.Format != protocol.BulkFormatRawV1 ||
				p.MaxRecordPayload < protocol.BulkMinRecordPayload || p.MaxRecordPayload > offer.MaxRecordPayload ||
				p.GuestToHostCreditLimit != offer.GuestToHostCreditLimit || p.HostToGuestCreditLimit != 0 {
				return fail(fmt.Errorf("core.bulk.accepted %+v does not answer an fs read's offer", p))
			}
		case d.m.Type == protocol.TypeBulkFinish:
			var p protocol.BulkFinish
			if err := protocol.Unmarshal(d.m.Payload, &p); err != nil {
				return fail(fmt.Errorf("decode core.bulk.finish: %w", err))
			}
			if _, err := in.Finish(p.FinalOffset); err != nil || p.Flow != protocol.BulkGuestToHost {
				return fail(fmt.Errorf("agent: core.bulk.finish at %d flow %d: %v", p.FinalOffset, p.Flow, err))
			}
		case d.m.Type == protocol.TypeBulkCancel: // the response that follows says why
		default:
			if _, err := fsResult(d.m); err != nil {
				return total, err
			}
			if !in.Complete() {
				return total, fmt.Errorf("fs read: the agent answered before finishing the stream (%d bytes)", total)
			}
			return total, nil
		}
	}
}

// fsWriteBulk is FsWrite with generation-8 bulk: r's bytes go as raw records within the agent's
// credit, then core.bulk.finish, and the response says whether they were written.
func (c *Client) fsWriteBulk(ctx context.Context, handle, offset uint64, n *uint64, r io.Reader) (int64, error) {
	offer := protocol.BulkOfferFSWrite
	s, err := c.Open()
	if err != nil {
		return 0, err
	}
	defer s.Close()
	out := sessionio.NewBulkOut(0)
	c.mu.Lock()
	s.bulkOut = out
	c.mu.Unlock()
	if err := c.SendMsg(s.ID, protocol.TypeFsRequest, protocol.FsRequest{Op: &protocol.FsWrite{Handle: handle, Offset: offset, Len: n}, Bulk: &offer}); err != nil {
		return 0, err
	}
	d, err := s.recv(ctx)
	if err != nil {
		return 0, err
	}
	if d.m.Type != protocol.TypeBulkAccepted {
		if d.err != nil {
			return 0, d.err
		}
		_, err := fsResult(d.m) // the request was refused
		if err == nil {
			err = fmt.Errorf("fs write: %s before core.bulk.accepted", d.m.Name())
		}
		return 0, err
	}
	var p protocol.BulkAccepted
	if err := protocol.Unmarshal(d.m.Payload, &p); err != nil {
		return 0, fmt.Errorf("decode core.bulk.accepted: %w", err)
	}
	if p.Kind != protocol.BulkFS || p.Flows != protocol.BulkHostToGuest.Bit() || p.Format != protocol.BulkFormatRawV1 ||
		p.MaxRecordPayload < protocol.BulkMinRecordPayload || p.MaxRecordPayload > offer.MaxRecordPayload ||
		p.GuestToHostCreditLimit != 0 || p.HostToGuestCreditLimit == 0 {
		err := fmt.Errorf("core.bulk.accepted %+v does not answer an fs write's offer", p)
		c.SendMsg(s.ID, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS, Reason: protocol.BulkCancelProtocolState, Message: err.Error()})
		return 0, err
	}
	if err := out.Credit(0, p.HostToGuestCreditLimit); err != nil {
		return 0, err
	}
	buf := sessionio.GetBigBuf()
	defer sessionio.PutBuf(buf)
	size := min(int(p.MaxRecordPayload), len(*buf))
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	var total int64
	for {
		k, rerr := r.Read((*buf)[:size])
		for sent := 0; sent < k; {
			off, m, ok := out.Wait(wctx, k-sent)
			if !ok {
				return total, c.endedEarly(ctx, s)
			}
			out.Sent(m) // before the record goes out: the agent's credit may answer it at once
			if err := c.sendRecord(s.ID, protocol.BulkFS, protocol.BulkHostToGuest, off, (*buf)[sent:sent+m]); err != nil {
				return total, err
			}
			sent += m
			total += int64(m)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// End the agent's side too (it would wait for more data, holding the handle).
			c.SendMsg(s.ID, protocol.TypeBulkCancel, protocol.BulkCancel{Kind: protocol.BulkFS, Reason: protocol.BulkCancelCaller, Message: rerr.Error()})
			s.Recv(ctx)
			return total, rerr
		}
		select { // an early terminal reply (a write error) ends the upload
		case d, ok := <-s.ch:
			if !ok {
				return total, ErrClosed
			}
			if err := c.earlyReply(d); err != errAgain {
				return total, err
			}
			return total, c.endedEarly(ctx, s)
		default:
		}
	}
	if err := c.SendMsg(s.ID, protocol.TypeBulkFinish, protocol.BulkFinish{Kind: protocol.BulkFS,
		Flow: protocol.BulkHostToGuest, FinalOffset: out.Finish()}); err != nil {
		return total, err
	}
	for {
		d, err := s.recv(ctx)
		if err != nil {
			return total, err
		}
		if d.err != nil {
			return total, d.err
		}
		if d.m.Type == protocol.TypeBulkCancel || d.m.Type == protocol.TypeBulkCredit {
			continue // the response follows
		}
		_, err = fsResult(d.m)
		return total, err
	}
}

// endedEarly is why a bulk upload could not go on: the caller's context, or what the agent
// said (its terminal reply, after a core.bulk.cancel).
func (c *Client) endedEarly(ctx context.Context, s *Session) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	for {
		d, err := s.recv(ctx)
		if err != nil {
			return err
		}
		if err := c.earlyReply(d); err != errAgain {
			return err
		}
	}
}

var errAgain = errors.New("again")

// earlyReply turns a frame that arrived during an upload into its error (errAgain for a cancel:
// the terminal reply follows).
func (c *Client) earlyReply(d delivery) error {
	if d.err != nil {
		return d.err
	}
	if d.m.Type == protocol.TypeBulkCancel {
		return errAgain
	}
	_, err := fsResult(d.m)
	if err == nil {
		err = fmt.Errorf("fs write ended early")
	}
	return err
}
