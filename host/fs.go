package host

import (
	"context"
	"fmt"
	"io"

	"github.com/agentd/agentd/protocol"
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
