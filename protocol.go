package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Events of the agent protocol, the same on the native WebSocket and on
// Socket.IO.
const (
	EventWelcome       = "welcome"        // server -> agent, once after the handshake
	EventHeartbeat     = "heartbeat"      // agent -> server, carries Metrics
	EventAck           = "ack"            // server -> agent (native only; Socket.IO has ACK packets)
	EventRentalStarted = "rental.started" // server -> agent
	EventRentalStopped = "rental.stopped" // server -> agent
)

// Close codes of the agent protocol. Socket.IO has no close codes: there the
// server sends a DISCONNECT after logging the reason.
const (
	CloseGoingAway        = 1001 // coordinator shutting down; reconnect, maybe elsewhere
	ClosePolicyViolation  = 1008 // flooding, oversized or malformed frames
	CloseInternalError    = 1011 // the node actor failed; reconnect
	CloseKeyRevoked       = 4001 // key revoked or rotated, or node deleted; do not reconnect
	CloseHeartbeatTimeout = 4008 // no heartbeat within the deadline
	CloseReplaced         = 4009 // another connection for the same node took over
)

// CloseReason returns the short reason sent with a close code.
func CloseReason(code int) string {
	switch code {
	case CloseGoingAway:
		return "server shutting down"
	case ClosePolicyViolation:
		return "policy violation"
	case CloseInternalError:
		return "internal error"
	case CloseKeyRevoked:
		return "key revoked"
	case CloseHeartbeatTimeout:
		return "heartbeat timeout"
	case CloseReplaced:
		return "replaced"
	}
	return ""
}

// Frame is one message of the agent protocol. On the native WebSocket it is
// one JSON text frame; on Socket.IO an EVENT (Ack set: with an ack id) or an
// ACK packet.
type Frame struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data,omitempty"`
	// Ack, when set on an inbound frame, asks the server to
	// acknowledge it; on an "ack" frame it names the frame acknowledged.
	Ack *uint64 `json:"ack,omitempty"`
}

// Welcome is the data of the welcome event.
type Welcome struct {
	NodeID                 string    `json:"node_id"`
	Name                   string    `json:"name"`
	HeartbeatDeadlineMS    int64     `json:"heartbeat_deadline_ms"`
	HeartbeatMinIntervalMS int64     `json:"heartbeat_min_interval_ms"`
	ServerTime             time.Time `json:"server_time"`
}

// HeartbeatAck is the data of an acknowledgement of a heartbeat.
type HeartbeatAck struct {
	ReceivedAt time.Time `json:"received_at"`
	// Accepted is false when the heartbeat came too soon after the last one
	// and was dropped.
	Accepted bool `json:"accepted"`
}

// RentalStartedEvent is the data of the rental.started event.
type RentalStartedEvent struct {
	RentalID  string    `json:"rental_id"`
	RenterID  string    `json:"renter_id"`
	StartedAt time.Time `json:"started_at"`
	MaxHours  *float64  `json:"max_hours,omitempty"`
}

// RentalStoppedEvent is the data of the rental.stopped event.
type RentalStoppedEvent struct {
	RentalID string `json:"rental_id"`
	Reason   string `json:"reason"`
}

// ErrBadFrame is returned by a connection's ReadFrame for an inbound frame
// that is malformed, oversized or binary. The connection stays usable: the
// caller counts such frames and closes with ClosePolicyViolation past a
// small tolerance.
var ErrBadFrame = errors.New("bad frame")

// Conn is one live agent connection, whatever its transport (the native
// WebSocket or Socket.IO). The fleet's node actor owns it: one goroutine
// reads, one writes, and Close may come from anywhere.
type Conn interface {
	// ReadFrame blocks for the next inbound frame. An error wrapping
	// ErrBadFrame leaves the connection usable; any other error ends it.
	ReadFrame() (Frame, error)
	// WriteFrame writes one frame within the transport's write deadline.
	WriteFrame(f Frame) error
	// Close ends the connection, telling the agent code and reason where the
	// transport can. It is idempotent.
	Close(code int, reason string) error
	// RemoteAddr is the agent's address, for logs.
	RemoteAddr() string
}

// RawConn is a Conn that can hand over a text frame undecoded, so that the
// decoding runs where the frame is handled rather than on the goroutine
// that waits on the socket (whose stack then stays small for as long as the
// connection lives).
type RawConn interface {
	Conn
	// ReadRaw returns the next text frame as received, within the frame
	// size limit; errors as ReadFrame's.
	ReadRaw() ([]byte, error)
}

// DecodeFrame decodes a native text frame.
func DecodeFrame(b []byte) (Frame, error) {
	var f Frame
	if err := json.Unmarshal(b, &f); err != nil || f.Event == "" {
		return Frame{}, fmt.Errorf("%w: not a JSON frame with an event", ErrBadFrame)
	}
	return f, nil
}
