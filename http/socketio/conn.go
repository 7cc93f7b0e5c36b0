package socketio

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"

	"github.com/distributedcompute/fleet"
)

// inbound is one result of ReadFrame: a frame, or a bad-frame error.
type inbound struct {
	frame fleet.Frame
	err   error
}

// Conn is one client's connection to the namespace. The server creates it
// on CONNECT and hands it to OnConnect; once accepted, the caller owns it:
// one goroutine reads (ReadFrame), any goroutine may write (WriteFrame) or
// Close.
type Conn struct {
	s    *session
	id   string // the Socket.IO socket id sent in the CONNECT reply
	in   chan inbound
	done chan struct{} // closed once the connection is over

	// Guarded by s.mu.
	replied     bool     // OnConnect returned
	accepted    bool     // OnConnect returned nil
	finished    bool     // done is closed
	closeCalled bool     // Close was called
	err         error    // why it is over; set before done is closed
	early       []string // writes made before the CONNECT reply went out
}

func newConn(s *session) *Conn {
	return &Conn{
		s:    s,
		id:   newID(),
		in:   make(chan inbound, s.cfg.QueueSize),
		done: make(chan struct{}),
	}
}

// finishLocked ends the connection with err. Idempotent.
func (c *Conn) finishLocked(err error) {
	if c.finished {
		return
	}
	c.finished = true
	c.err = err
	close(c.done)
}

// ReadFrame blocks for the next EVENT from the client. It returns an error
// wrapping fleet.ErrBadFrame for a malformed, oversized or binary event (the
// connection stays usable); io.EOF when the client disconnected; another
// error when the session ended otherwise (ping timeout, transport error,
// server close) or net.ErrClosed after Close. Once it returned an error
// other than a bad frame, every later call does too.
func (c *Conn) ReadFrame() (fleet.Frame, error) {
	c.s.mu.Lock()
	closed := c.closeCalled
	c.s.mu.Unlock()
	if closed {
		return fleet.Frame{}, net.ErrClosed
	}
	select {
	case in := <-c.in:
		return in.frame, in.err
	default:
	}
	select {
	case in := <-c.in:
		return in.frame, in.err
	case <-c.done:
	}
	// Frames that arrived before the end are still delivered.
	select {
	case in := <-c.in:
		return in.frame, in.err
	default:
	}
	return fleet.Frame{}, c.err
}

// WriteFrame queues a frame for the client: an ACK packet for an "ack" frame
// with Ack set, an EVENT otherwise. It never blocks on the network; when the
// session's queue is full the session is closed and an error returned.
func (c *Conn) WriteFrame(f fleet.Frame) error {
	pkt, err := c.encode(f)
	if err != nil {
		return err
	}
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case c.finished || s.closed || s.closing:
		return fmt.Errorf("socketio: write %q: %w", f.Event, net.ErrClosed)
	case !c.replied:
		if len(c.early) >= s.cfg.QueueSize {
			return fmt.Errorf("socketio: write %q: %w", f.Event, errSlowConsumer)
		}
		c.early = append(c.early, pkt)
		return nil
	case !s.pushLocked(pkt):
		s.destroyLocked(errSlowConsumer)
		return fmt.Errorf("socketio: write %q: %w", f.Event, errSlowConsumer)
	}
	return nil
}

// encode returns the Socket.IO packet of a frame.
func (c *Conn) encode(f fleet.Frame) (string, error) {
	if f.Data != nil && !json.Valid(f.Data) {
		return "", fmt.Errorf("socketio: write %q: data is not valid JSON", f.Event)
	}
	p := packet{nsp: c.s.cfg.Namespace}
	var data []byte
	if f.Event == fleet.EventAck && f.Ack != nil {
		p.typ, p.id = packetAck, f.Ack
		data = append(data, '[')
	} else {
		name, err := json.Marshal(f.Event)
		if err != nil {
			return "", fmt.Errorf("socketio: write: event name: %w", err)
		}
		p.typ = packetEvent
		data = append(append(data, '['), name...)
		if f.Data != nil {
			data = append(data, ',')
		}
	}
	data = append(append(data, f.Data...), ']')
	p.data = data
	return p.message(), nil
}

// Close ends the connection: the client gets DISCONNECT for the namespace
// (so it does not reconnect), then the Engine.IO session is closed once that
// was delivered. code and reason are only logged: Socket.IO has no close
// codes. Idempotent and safe concurrently with ReadFrame and WriteFrame.
func (c *Conn) Close(code int, reason string) error {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.closeCalled {
		return nil
	}
	c.closeCalled = true
	s.log.Debug("socket.io connection closed by server", "code", code, "reason", reason)
	active := c.accepted && !c.finished && s.conn == c && !s.closed
	c.finishLocked(net.ErrClosed)
	if active {
		s.disconnectLocked(0)
	}
	// Before OnConnect returned, connect() sends the DISCONNECT.
	return nil
}

// RemoteAddr returns the network address of the client's handshake request.
func (c *Conn) RemoteAddr() string { return c.s.remote }

// Header returns the HTTP header of the client's Engine.IO handshake
// request.
func (c *Conn) Header() http.Header { return c.s.header }
