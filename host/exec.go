package host

import (
	"context"
	"fmt"

	"github.com/agentd/agentd/protocol"
)

// ExecSession is a running core.exec session.
type ExecSession struct {
	c        *Client
	s        *Session
	PID      uint32
	flow     bool
	win      int
	consumed int
	held     delivery // the pooled buffer behind the last event's output
}

// ExecEvent is one thing that happened in a session: output, a stdin error, or the end.
type ExecEvent struct {
	Stdout, Stderr []byte
	StdinError     *protocol.ExecStdinError
	Exited         bool
	Code           int32
	// Signal killed the program (Code -1), when the agent says which (agentd does for a session
	// under flow control); 0 when unknown.
	Signal int32
}

// Exec starts a program. It returns after core.exec.started; an exec.failed reply is returned
// as *protocol.ExecFailed, a core.error as *RemoteError.
func (c *Client) Exec(ctx context.Context, req protocol.ExecRequest) (*ExecSession, error) {
	if req.Rows == 0 && req.Cols == 0 {
		req.Rows, req.Cols = protocol.DefaultRows, protocol.DefaultCols
	}
	e := &ExecSession{c: c, flow: c.HasFeature(protocol.FeatureFlow), win: c.opts.Window}
	if e.flow {
		req.Window = uint32(e.win)
	}
	s, err := c.Start(protocol.TypeExecRequest, req)
	if err != nil {
		return nil, err
	}
	e.s = s
	m, err := s.Recv(ctx)
	if err != nil {
		s.Close()
		return nil, err
	}
	switch m.Type {
	case protocol.TypeExecStarted:
		var p protocol.ExecStarted
		if err := protocol.Unmarshal(m.Payload, &p); err != nil {
			s.Close()
			return nil, fmt.Errorf("decode exec.started: %w", err)
		}
		e.PID = p.PID
		if e.flow && p.Window == 0 {
			e.flow = false // an agent that does not do flow control for exec
		}
		s.credit.Add(int64(p.Window))
		return e, nil
	case protocol.TypeExecFailed:
		var f protocol.ExecFailed
		if err := protocol.Unmarshal(m.Payload, &f); err != nil {
			return nil, fmt.Errorf("decode exec.failed: %w", err)
		}
		return nil, &f
	}
	s.Close()
	if err := AsError(m); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("exec: unexpected first reply %s", m.Name())
}

// ID returns the session id.
func (e *ExecSession) ID() uint32 { return e.s.ID }

// Next returns the next event. After the Exited event the session is over. An event's output
// is valid until the next call to Next (its buffer is reused).
func (e *ExecSession) Next(ctx context.Context) (ExecEvent, error) {
	e.held.release()
	for {
		d, err := e.s.recv(ctx)
		if err != nil {
			return ExecEvent{}, err
		}
		e.held = d
		m := d.m
		var ev ExecEvent
		switch m.Type {
		case protocol.TypeExecStdout, protocol.TypeExecStderr:
			d, err := protocol.DecodeData(m.Payload)
			if err != nil {
				return ev, fmt.Errorf("decode %s: %w", m.Type, err)
			}
			if m.Type == protocol.TypeExecStdout {
				ev.Stdout = d
			} else {
				ev.Stderr = d
			}
			e.grant(len(d))
		case protocol.TypeExecStdinError:
			var p protocol.ExecStdinError
			protocol.Unmarshal(m.Payload, &p)
			ev.StdinError = &p
		case protocol.TypeExecExited:
			var p protocol.ExecExited
			if err := protocol.Unmarshal(m.Payload, &p); err != nil {
				return ev, fmt.Errorf("decode exec.exited: %w", err)
			}
			ev.Exited, ev.Code, ev.Signal = true, p.Code, p.Signal
		default:
			if err := AsError(m); err != nil {
				return ev, err
			}
			continue
		}
		return ev, nil
	}
}

// grant returns output credit to the agent once a quarter of the window was consumed.
func (e *ExecSession) grant(n int) {
	if !e.flow {
		return
	}
	e.consumed += n
	if e.consumed >= e.win/4 {
		e.c.SendMsg(e.s.ID, protocol.TypeFlowCredit, protocol.FlowCredit{Bytes: uint32(e.consumed)})
		e.consumed = 0
	}
}

// Stdin sends data to the program's stdin, within the agent's grant under flow control.
func (e *ExecSession) Stdin(ctx context.Context, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), 64<<10)
		if e.flow {
			c, err := e.s.takeCredit(ctx, n)
			if err != nil {
				return err
			}
			n = c
		}
		if err := e.c.sendData(e.s.ID, protocol.TypeExecStdin, data[:n]); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// CloseStdin sends the empty stdin chunk that means EOF (pipe and PTY mode alike).
func (e *ExecSession) CloseStdin() error {
	return e.c.sendData(e.s.ID, protocol.TypeExecStdin, nil)
}

// Signal sends a signal to the program.
func (e *ExecSession) Signal(sig int32) error {
	return e.c.SendMsg(e.s.ID, protocol.TypeExecSignal, protocol.ExecSignal{Signal: sig})
}

// Resize sets the PTY window size.
func (e *ExecSession) Resize(rows, cols uint16) error {
	return e.c.SendMsg(e.s.ID, protocol.TypeExecResize, protocol.ExecResize{Rows: rows, Cols: cols})
}

// Close forgets the session locally (the program keeps running unless signalled).
func (e *ExecSession) Close() { e.held.release(); e.s.Close() }

// Run is a convenience: run a program to completion, collecting its output.
func (c *Client) Run(ctx context.Context, req protocol.ExecRequest, stdin []byte) (stdout, stderr []byte, code int32, err error) {
	e, err := c.Exec(ctx, req)
	if err != nil {
		return nil, nil, 0, err
	}
	defer e.Close()
	go func() {
		if len(stdin) > 0 {
			e.Stdin(ctx, stdin)
		}
		e.CloseStdin()
	}()
	for {
		ev, err := e.Next(ctx)
		if err != nil {
			return stdout, stderr, 0, err
		}
		stdout = append(stdout, ev.Stdout...)
		stderr = append(stderr, ev.Stderr...)
		if ev.Exited {
			return stdout, stderr, ev.Code, nil
		}
	}
}
