package socketio

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Why a session ended. A Conn's ReadFrame returns these once its session is
// gone; io.EOF means the client closed it.
var (
	errPingTimeout     = errors.New("socketio: ping timeout")
	errSlowConsumer    = errors.New("socketio: outbound queue full (slow consumer)")
	errConnectTimeout  = errors.New("socketio: no namespace connect in time")
	errRefused         = errors.New("socketio: connect refused")
	errServerClosed    = errors.New("socketio: server closed")
	errClosedByServer  = errors.New("socketio: session closed by server")
	errTooManySessions = errors.New("socketio: too many sessions")
	errOverlap         = errors.New("socketio: overlapping polling request")
	errPayloadTooLarge = errors.New("socketio: payload too large")
)

func transportError(err error) error {
	return fmt.Errorf("socketio: transport error: %w", err)
}

// session is one Engine.IO session: a sid, its transport (polling, maybe
// upgraded to a WebSocket, or a WebSocket from the start), the outbound
// queue, the ping timers and the one namespace connection on top of it.
//
// States, all under mu: polling (GETs and POSTs) -> probing (a WebSocket is
// attached and being tested; probed once "2probe" was answered, so polls get
// a noop) -> websocket (after "5") ; any -> closing (a DISCONNECT is being
// flushed; no more writes) -> closed (destroyed, removed from the server).
type session struct {
	srv    *Server
	cfg    *Config
	id     string
	header http.Header
	remote string
	log    *slog.Logger

	// inMu serializes the handling of inbound packets (polling POST bodies,
	// WebSocket messages), so they reach the Conn in order. It is taken
	// before mu, never after.
	inMu sync.Mutex
	// attachments counts binary messages still to discard after a binary
	// packet. Guarded by inMu.
	attachments int

	mu        sync.Mutex
	transport string   // transportPolling or transportWebSocket
	out       []string // encoded Engine.IO packets waiting for the transport
	changed   chan struct{}
	done      chan struct{}
	closed    bool

	polling bool // a GET is being answered
	posting bool // a POST is being read

	probe  *websocket.Conn // a WebSocket being probed for the upgrade
	probed bool            // "2probe" answered: answer GETs with a noop
	ws     *websocket.Conn // the WebSocket transport

	pingSeq      uint64
	pingTimer    *time.Timer
	awaitingPong bool

	connectSeq   uint64
	connectTimer *time.Timer

	closing     bool // the namespace is disconnected; close once flushed
	closeReady  bool // the close may be sent once the queue is empty
	closeTimers []*time.Timer

	conn *Conn // the namespace connection, nil when not connected
}

func newSession(srv *Server, id string, r *http.Request, transport string) *session {
	return &session{
		srv:       srv,
		cfg:       &srv.cfg,
		id:        id,
		header:    r.Header.Clone(),
		remote:    r.RemoteAddr,
		log:       srv.log.With("sid", id, "remote", r.RemoteAddr),
		transport: transport,
		changed:   make(chan struct{}),
		done:      make(chan struct{}),
	}
}

// start arms the ping and connect timers of a new session.
func (s *session) start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.schedulePingLocked(s.cfg.PingInterval, false)
	s.armConnectTimerLocked()
	s.log.Debug("engine.io session opened", "transport", s.transport)
}

// openPacket returns the Engine.IO open packet of the session.
func (s *session) openPacket() string {
	upgrades := []string{}
	if s.transport == transportPolling {
		upgrades = append(upgrades, transportWebSocket)
	}
	b, _ := json.Marshal(struct {
		SID          string   `json:"sid"`
		Upgrades     []string `json:"upgrades"`
		PingInterval int64    `json:"pingInterval"`
		PingTimeout  int64    `json:"pingTimeout"`
		MaxPayload   int      `json:"maxPayload"`
	}{s.id, upgrades, s.cfg.PingInterval.Milliseconds(), s.cfg.PingTimeout.Milliseconds(), s.cfg.MaxPayload})
	return string(rune(engineOpen)) + string(b)
}

// notifyLocked wakes whoever waits for a change (a polling GET, the
// WebSocket writer).
func (s *session) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// pushLocked queues an encoded packet; false when the queue is full.
func (s *session) pushLocked(pkt string) bool {
	if len(s.out) >= s.cfg.QueueSize {
		return false
	}
	s.forcePushLocked(pkt)
	return true
}

// forcePushLocked queues a protocol answer (CONNECT, DISCONNECT,
// CONNECT_ERROR) regardless of the limit: there is at most one per inbound
// packet, and the queue is drained or the session closed soon.
func (s *session) forcePushLocked(pkt string) {
	s.out = append(s.out, pkt)
	s.notifyLocked()
}

// destroy ends the session; err says why. Idempotent.
func (s *session) destroy(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.destroyLocked(err)
}

func (s *session) destroyLocked(err error) {
	if s.closed {
		return
	}
	s.closed = true
	for _, t := range append(s.closeTimers, s.pingTimer, s.connectTimer) {
		if t != nil {
			t.Stop()
		}
	}
	close(s.done)
	s.notifyLocked()
	if s.ws != nil {
		_ = s.ws.Close()
	}
	if s.probe != nil {
		_ = s.probe.Close()
	}
	if s.conn != nil {
		s.conn.finishLocked(err)
		s.conn = nil
	}
	s.out = nil
	s.srv.remove(s)
	s.log.Debug("engine.io session closed", "reason", err)
}

// schedulePingLocked arms the ping timer: after d, send a ping (awaiting
// false) or give up on the pong (awaiting true).
func (s *session) schedulePingLocked(d time.Duration, awaiting bool) {
	if s.pingTimer != nil {
		s.pingTimer.Stop()
	}
	s.pingSeq++
	seq := s.pingSeq
	s.awaitingPong = awaiting
	s.pingTimer = time.AfterFunc(d, func() { s.onPingTimer(seq) })
}

func (s *session) onPingTimer(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || seq != s.pingSeq {
		return
	}
	// A polling client that stopped polling never sees the ping, so it is
	// dropped here too, PingInterval+PingTimeout after its last exchange.
	if s.awaitingPong {
		s.destroyLocked(errPingTimeout)
		return
	}
	if !s.pushLocked(string(rune(enginePing))) {
		s.destroyLocked(errSlowConsumer)
		return
	}
	s.schedulePingLocked(s.cfg.PingTimeout, true)
}

// armConnectTimerLocked closes the session unless a namespace connect
// happens within connectTimeout.
func (s *session) armConnectTimerLocked() {
	if s.connectTimer != nil {
		s.connectTimer.Stop()
	}
	s.connectSeq++
	seq := s.connectSeq
	s.connectTimer = time.AfterFunc(connectTimeout, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if seq == s.connectSeq && s.conn == nil && !s.closing {
			s.destroyLocked(errConnectTimeout)
		}
	})
}

func (s *session) stopConnectTimerLocked() {
	s.connectSeq++
	if s.connectTimer != nil {
		s.connectTimer.Stop()
	}
}

// beginClosingLocked stops new writes and closes the session once what is
// queued (the DISCONNECT) has been delivered and delay has passed; the
// Engine.IO close then travels on its own. If the client does not take the
// queue within WriteTimeout more, the session is dropped anyway.
func (s *session) beginClosingLocked(delay time.Duration) {
	if s.closing || s.closed {
		return
	}
	s.closing = true
	if delay <= 0 {
		s.closeReady = true
		s.notifyLocked()
	} else {
		s.closeTimers = append(s.closeTimers, time.AfterFunc(delay, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if !s.closed {
				s.closeReady = true
				s.notifyLocked()
			}
		}))
	}
	s.closeTimers = append(s.closeTimers, time.AfterFunc(delay+s.cfg.WriteTimeout, func() {
		s.destroy(errClosedByServer)
	}))
}
