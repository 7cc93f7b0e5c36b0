package http

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/http/socketio"
)

var rejectedHandshakes = promauto.NewCounterVec(prometheus.CounterOpts{
	Name: "fleet_rejected_handshakes_total", Help: "Agent handshakes refused, by reason."}, []string{"reason"})

// Reasons a handshake is refused, as counted in metrics and logged.
const (
	rejectNoKey    = "missing_key"
	rejectScheme   = "wrong_scheme"
	rejectChecksum = "bad_checksum"
	rejectUnknown  = "unknown_key"
	rejectNotWS    = "not_websocket"
	rejectStore    = "store_error"
	rejectDraining = "shutting_down"
)

var wsWriteBuffers sync.Pool

// agentNode authenticates an agent by the host API key in its
// Authorization header: the checksum first, so that junk never reaches the
// store, then the hash lookup. It returns the refusal reason on failure.
func (s *Server) agentNode(ctx context.Context, h http.Header) (*fleet.Node, []byte, string) {
	auth := h.Get("Authorization")
	if auth == "" {
		return nil, nil, rejectNoKey
	}
	scheme, key, _ := strings.Cut(auth, " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return nil, nil, rejectScheme
	}
	key = strings.TrimSpace(key)
	if !fleet.CheckAPIKey(key) {
		return nil, nil, rejectChecksum
	}
	hash := fleet.HashAPIKey(key)
	n, err := s.cfg.Nodes.NodeByKeyHash(ctx, hash)
	switch {
	case fleet.ErrorCode(err) == fleet.ENOTFOUND:
		return nil, nil, rejectUnknown
	case err != nil:
		s.log.Error("agent key lookup failed", "error", err)
		return nil, nil, rejectStore
	}
	return n, hash, ""
}

// fleetSocket is GET /fleet: the native agent WebSocket. A refused key gets
// 401 and no upgrade.
func (s *Server) fleetSocket(c echo.Context) error {
	r := c.Request()
	if s.closing.Load() {
		rejectedHandshakes.WithLabelValues(rejectDraining).Inc()
		return c.JSON(http.StatusServiceUnavailable, envelope{Error: &errorBody{Code: "UNAVAILABLE", Message: "Shutting down; connect to another coordinator."}})
	}
	node, hash, reason := s.agentNode(r.Context(), r.Header)
	if reason != "" {
		rejectedHandshakes.WithLabelValues(reason).Inc()
		s.log.Info("agent handshake refused", "reason", reason, "remote", c.RealIP(), "request_id", requestID(c))
		if reason == rejectStore {
			return errors.New("key lookup failed")
		}
		return fleet.Errorf(fleet.EUNAUTHORIZED, "Invalid host API key")
	}
	if !websocket.IsWebSocketUpgrade(r) {
		rejectedHandshakes.WithLabelValues(rejectNotWS).Inc()
		return fleet.Errorf(fleet.EVALIDATION, "This endpoint speaks WebSocket only.")
	}
	up := websocket.Upgrader{
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		WriteBufferPool: &wsWriteBuffers,
		// Agents are not browsers: a browser cannot set the Authorization
		// header on a WebSocket, so the origin proves nothing here.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	ws, err := up.Upgrade(c.Response(), r, nil)
	if err != nil {
		return nil // the upgrader has answered
	}
	// Past the soft limit a frame is refused but the connection lives; past
	// the hard one gorilla closes it with 1009.
	ws.SetReadLimit(int64(s.cfg.MaxFrameBytes) * 16)
	s.cfg.Fleet.Connect(node, hash, &wsConn{ws: ws, maxFrame: s.cfg.MaxFrameBytes, writeTimeout: s.cfg.WriteTimeoutWS})
	return nil
}

// wsConn is a native agent connection: fleet.Conn over gorilla/websocket
// with JSON text frames.
type wsConn struct {
	ws           *websocket.Conn
	maxFrame     int
	writeTimeout time.Duration
	closeOnce    sync.Once
}

func (c *wsConn) ReadFrame() (fleet.Frame, error) {
	data, err := c.ReadRaw()
	if err != nil {
		return fleet.Frame{}, err
	}
	return fleet.DecodeFrame(data)
}

func (c *wsConn) ReadRaw() ([]byte, error) {
	typ, r, err := c.ws.NextReader()
	if err != nil {
		return nil, err
	}
	if typ != websocket.TextMessage {
		return nil, fmt.Errorf("%w: binary frame", fleet.ErrBadFrame)
	}
	data, err := io.ReadAll(io.LimitReader(r, int64(c.maxFrame)+1))
	if err != nil {
		return nil, err
	}
	if len(data) > c.maxFrame {
		return nil, fmt.Errorf("%w: frame over %d bytes", fleet.ErrBadFrame, c.maxFrame)
	}
	return data, nil
}

func (c *wsConn) WriteFrame(f fleet.Frame) error {
	if err := c.ws.SetWriteDeadline(time.Now().Add(c.writeTimeout)); err != nil {
		return err
	}
	return c.ws.WriteMessage(websocket.TextMessage, appendFrame(make([]byte, 0, 64+len(f.Data)), f))
}

// appendFrame encodes f as encoding/json would, without its second pass
// over Data: the fleet marshalled Data itself, so it is valid and compact.
func appendFrame(b []byte, f fleet.Frame) []byte {
	ev, _ := json.Marshal(f.Event)
	b = append(append(append(b, `{"event":`...), ev...), `,"data":`...)
	if len(f.Data) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, f.Data...)
	}
	if f.Ack != nil {
		b = strconv.AppendUint(append(b, `,"ack":`...), *f.Ack, 10)
	}
	return append(b, '}')
}

func (c *wsConn) Close(code int, reason string) error {
	c.closeOnce.Do(func() {
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
		_ = c.ws.Close()
	})
	return nil
}

func (c *wsConn) RemoteAddr() string { return c.ws.RemoteAddr().String() }

// socketIOConnect authenticates a Socket.IO connect to /fleet exactly as the
// native handshake does. A refusal is answered as the auth guide says: the
// connect is acknowledged and at once followed by a server DISCONNECT, with
// no error event.
func (s *Server) socketIOConnect(h http.Header, c *socketio.Conn) error {
	if s.closing.Load() {
		rejectedHandshakes.WithLabelValues(rejectDraining).Inc()
		return errors.New(rejectDraining)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	node, hash, reason := s.agentNode(ctx, h)
	if reason != "" {
		rejectedHandshakes.WithLabelValues(reason).Inc()
		s.log.Info("agent handshake refused", "reason", reason, "remote", c.RemoteAddr(), "transport", "socket.io")
		return errors.New(reason)
	}
	s.cfg.Fleet.Connect(node, hash, c)
	return nil
}
