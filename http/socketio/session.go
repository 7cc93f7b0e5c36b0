package socketio

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/distributedcompute/fleet"
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
	err       error

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
	s.err = err
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

// serveHandshake answers the handshake GET of a polling session.
func (s *session) serveHandshake(w http.ResponseWriter) {
	if err := s.writeResponse(w, "text/plain; charset=UTF-8", s.openPacket()); err != nil {
		s.destroy(transportError(err))
	}
}

// servePoll answers a polling GET with what is queued, waiting until
// something is.
func (s *session) servePoll(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		writeEngineError(w, errUnknownSID, "")
		return
	case s.transport != transportPolling:
		s.mu.Unlock()
		writeEngineError(w, errBadRequest, "")
		return
	case s.polling:
		// As the reference server: a second GET in flight is a broken
		// client; refuse it and drop the session.
		s.destroyLocked(errOverlap)
		s.mu.Unlock()
		writeEngineError(w, errBadRequest, "")
		return
	}
	s.polling = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.polling = false
		s.mu.Unlock()
	}()

	for {
		var payload []string
		finish := false
		s.mu.Lock()
		switch {
		case s.closed:
			payload = []string{string(rune(engineClose))}
		case len(s.out) > 0:
			payload, s.out = s.out, nil
		case s.transport != transportPolling || s.probed:
			// Completes the poll so that the client can pause polling and
			// finish the upgrade.
			payload = []string{string(rune(engineNoop))}
		case s.closing && s.closeReady:
			payload = []string{string(rune(engineClose))}
			finish = true
		}
		changed := s.changed
		s.mu.Unlock()

		if payload != nil {
			err := s.writeResponse(w, "text/plain; charset=UTF-8", encodePayload(payload))
			switch {
			case finish:
				s.destroy(errClosedByServer)
			case err != nil:
				s.destroy(transportError(err))
			}
			return
		}
		select {
		case <-changed:
		case <-r.Context().Done():
			s.destroy(transportError(errors.New("poll request closed prematurely")))
			return
		}
	}
}

// servePost reads a polling POST body and handles its packets.
func (s *session) servePost(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		writeEngineError(w, errUnknownSID, "")
		return
	case s.transport != transportPolling:
		s.mu.Unlock()
		writeEngineError(w, errBadRequest, "")
		return
	case s.posting:
		s.destroyLocked(errOverlap)
		s.mu.Unlock()
		writeEngineError(w, errBadRequest, "")
		return
	}
	s.posting = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.posting = false
		s.mu.Unlock()
	}()

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(s.cfg.MaxPayload)))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.destroy(errPayloadTooLarge)
			http.Error(w, "Payload Too Large", http.StatusRequestEntityTooLarge)
			return
		}
		s.destroy(transportError(err))
		writeEngineError(w, errBadRequest, "")
		return
	}
	packets, err := decodePayload(body)
	if err != nil {
		s.destroy(transportError(err))
		writeEngineError(w, errBadRequest, "")
		return
	}
	s.handlePackets(packets)
	_ = s.writeResponse(w, "text/html", "ok")
}

// writeResponse writes a whole polling response within WriteTimeout.
func (s *session) writeResponse(w http.ResponseWriter, contentType, body string) error {
	rc := http.NewResponseController(w)
	// Not every ResponseWriter supports deadlines; then the server's own
	// timeouts apply.
	_ = rc.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Cache-Control", "no-store")
	_, err := io.WriteString(w, body)
	if err == nil {
		err = rc.Flush()
		if errors.Is(err, http.ErrNotSupported) {
			err = nil
		}
	}
	// The deadline would outlive the request on a kept-alive connection.
	_ = rc.SetWriteDeadline(time.Time{})
	return err
}

// serveWebSocket runs a session that started on a WebSocket: the open packet
// is its first message.
func (s *session) serveWebSocket(ws *websocket.Conn) {
	ws.SetReadLimit(int64(s.cfg.MaxPayload))
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = ws.Close()
		return
	}
	s.ws = ws
	s.out = append([]string{s.openPacket()}, s.out...)
	s.startWriterLocked(ws)
	s.mu.Unlock()
	s.readLoop(ws)
}

// serveUpgrade takes a WebSocket for a polling session and, once the probe
// and the upgrade packet went through, makes it the session's transport.
func (s *session) serveUpgrade(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	ok := !s.closed && s.transport == transportPolling && s.probe == nil
	s.mu.Unlock()
	if !ok {
		writeEngineError(w, errBadRequest, "")
		return
	}
	ws, err := s.srv.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	ws.SetReadLimit(int64(s.cfg.MaxPayload))
	s.mu.Lock()
	if s.closed || s.transport != transportPolling || s.probe != nil {
		s.mu.Unlock()
		_ = ws.Close()
		return
	}
	s.probe = ws
	s.mu.Unlock()

	if err := s.upgrade(ws); err != nil {
		s.log.Debug("engine.io upgrade abandoned", "err", err)
		s.mu.Lock()
		if s.probe == ws {
			s.probe = nil
			s.probed = false
			s.notifyLocked()
		}
		s.mu.Unlock()
		_ = ws.Close()
		return
	}
	s.readLoop(ws)
}

// upgrade runs the upgrade handshake on ws: "2probe" is answered "3probe",
// then "5" switches the session over. It gives up after UpgradeTimeout.
func (s *session) upgrade(ws *websocket.Conn) error {
	_ = ws.SetReadDeadline(time.Now().Add(s.cfg.UpgradeTimeout))
	for {
		mt, data, err := ws.ReadMessage()
		if err != nil {
			return err
		}
		if mt != websocket.TextMessage {
			return errors.New("binary message during upgrade")
		}
		p, err := decodeEnginePacket(data)
		if err != nil {
			return err
		}
		switch {
		case p.typ == enginePing && string(p.data) == probe:
			// No writer runs on ws yet: this goroutine is its only writer.
			if err := s.writeWS(ws, string(rune(enginePong))+probe); err != nil {
				return err
			}
			s.mu.Lock()
			s.probed = true
			s.notifyLocked()
			s.mu.Unlock()
		case p.typ == engineUpgrade:
			s.mu.Lock()
			if s.closed || s.probe != ws {
				s.mu.Unlock()
				return errors.New("session gone during upgrade")
			}
			s.probe, s.probed = nil, false
			s.transport, s.ws = transportWebSocket, ws
			s.startWriterLocked(ws)
			s.notifyLocked()
			s.mu.Unlock()
			_ = ws.SetReadDeadline(time.Time{})
			s.log.Debug("engine.io session upgraded", "transport", transportWebSocket)
			return nil
		default:
			return fmt.Errorf("unexpected packet %q during upgrade", p.typ)
		}
	}
}

// startWriterLocked starts the goroutine that drains the queue onto ws.
func (s *session) startWriterLocked(ws *websocket.Conn) {
	s.srv.wg.Add(1)
	go s.writeLoop(ws)
}

func (s *session) writeLoop(ws *websocket.Conn) {
	defer s.srv.wg.Done()
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return
		}
		batch := s.out
		s.out = nil
		finish := len(batch) == 0 && s.closing && s.closeReady
		changed := s.changed
		s.mu.Unlock()

		for _, pkt := range batch {
			if err := s.writeWS(ws, pkt); err != nil {
				s.destroy(transportError(err))
				return
			}
		}
		if finish {
			_ = s.writeWS(ws, string(rune(engineClose)))
			_ = ws.WriteControl(websocket.CloseMessage,
				websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""),
				time.Now().Add(s.cfg.WriteTimeout))
			s.destroy(errClosedByServer)
			return
		}
		if len(batch) == 0 {
			<-changed
		}
	}
}

func (s *session) writeWS(ws *websocket.Conn, pkt string) error {
	_ = ws.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	return ws.WriteMessage(websocket.TextMessage, []byte(pkt))
}

// readLoop reads the WebSocket transport until it fails or the session ends.
func (s *session) readLoop(ws *websocket.Conn) {
	for {
		mt, data, err := ws.ReadMessage()
		if err != nil {
			if websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway, websocket.CloseNoStatusReceived) {
				err = io.EOF
			} else {
				err = transportError(err)
			}
			s.destroy(err)
			return
		}
		p := enginePacket{typ: engineMessage, data: data, binary: true}
		if mt == websocket.TextMessage {
			if p, err = decodeEnginePacket(data); err != nil {
				s.destroy(transportError(err))
				return
			}
		}
		if !s.handlePackets([]enginePacket{p}) {
			return
		}
	}
}

// handlePackets handles inbound Engine.IO packets in order; false once the
// session is over.
func (s *session) handlePackets(packets []enginePacket) bool {
	s.inMu.Lock()
	defer s.inMu.Unlock()
	for _, p := range packets {
		select {
		case <-s.done:
			return false
		default:
		}
		switch p.typ {
		case engineClose:
			s.destroy(io.EOF)
			return false
		case enginePong:
			s.mu.Lock()
			if s.awaitingPong {
				s.schedulePingLocked(s.cfg.PingInterval, false)
			}
			s.mu.Unlock()
		case engineMessage:
			if p.binary {
				s.onBinary()
			} else {
				s.onPacket(p.data)
			}
		default:
			// open, ping (a v3 heartbeat), upgrade on the live transport and
			// noop mean nothing here.
		}
	}
	return true
}

// onBinary discards a binary message: an attachment of a binary packet, or
// a stray one, which is a bad frame.
func (s *session) onBinary() {
	if s.attachments > 0 {
		s.attachments--
		return
	}
	s.badFrame(fmt.Errorf("%w: binary message outside a binary packet", errMalformed))
}

// onPacket handles one Socket.IO packet from the client.
func (s *session) onPacket(data []byte) {
	// A text packet ends an unfinished binary packet.
	s.attachments = 0
	p, err := decodePacket(data)
	if err != nil {
		s.badFrame(err)
		return
	}
	ns := s.cfg.Namespace
	switch p.typ {
	case packetConnect:
		if p.nsp != ns {
			msg, _ := json.Marshal(map[string]string{"message": "Invalid namespace"})
			s.mu.Lock()
			if !s.closed {
				s.forcePushLocked(packet{typ: packetConnectError, nsp: p.nsp, data: msg}.encode())
			}
			s.mu.Unlock()
			return
		}
		s.connect()
	case packetDisconnect:
		if p.nsp == ns {
			s.remoteDisconnect()
		}
	case packetEvent:
		if p.nsp != ns {
			return
		}
		if len(data) > s.cfg.MaxFrameSize {
			s.badFrame(fmt.Errorf("event packet of %d bytes exceeds %d", len(data), s.cfg.MaxFrameSize))
			return
		}
		name, arg, err := eventArgs(p.data)
		if err != nil {
			s.badFrame(err)
			return
		}
		s.deliver(inbound{frame: fleet.Frame{Event: name, Data: arg, Ack: p.id}})
	case packetBinaryEvent, packetBinaryAck:
		s.attachments = p.attachments
		if p.nsp == ns {
			s.badFrame(errors.New("binary packets are not supported"))
		}
	default:
		// ACKs: the server never asks the client for one. CONNECT_ERROR
		// only travels to the client.
	}
}

// connect runs OnConnect for a CONNECT to the namespace. A CONNECT while
// connected, or while closing, is ignored.
func (s *session) connect() {
	s.mu.Lock()
	if s.closed || s.closing || s.conn != nil {
		s.mu.Unlock()
		return
	}
	c := newConn(s)
	s.conn = c
	s.stopConnectTimerLocked()
	s.mu.Unlock()

	err := s.srv.onConnect(s.header, c)

	s.mu.Lock()
	defer s.mu.Unlock()
	c.replied = true
	if s.closed || s.conn != c {
		return
	}
	sid, _ := json.Marshal(map[string]string{"sid": c.id})
	s.forcePushLocked(packet{typ: packetConnect, nsp: s.cfg.Namespace, data: sid}.encode())
	if err != nil {
		s.log.Debug("socket.io connect refused", "err", err)
		c.finishLocked(fmt.Errorf("%w: %w", errRefused, err))
		s.disconnectLocked(refuseCloseDelay)
		return
	}
	c.accepted = true
	for _, pkt := range c.early {
		s.forcePushLocked(pkt)
	}
	c.early = nil
	if c.closeCalled {
		s.disconnectLocked(0)
	}
}

// disconnectLocked sends DISCONNECT for the namespace and closes the
// session after it, delay after it was delivered at the earliest.
func (s *session) disconnectLocked(delay time.Duration) {
	s.conn = nil
	s.forcePushLocked(packet{typ: packetDisconnect, nsp: s.cfg.Namespace}.encode())
	s.beginClosingLocked(delay)
}

// remoteDisconnect ends the namespace connection on the client's DISCONNECT;
// the session stays for a new CONNECT, within connectTimeout.
func (s *session) remoteDisconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil || !s.conn.accepted {
		return
	}
	s.conn.finishLocked(io.EOF)
	s.conn = nil
	s.armConnectTimerLocked()
}

// badFrame reports a bad inbound frame to the connection, if there is one.
func (s *session) badFrame(err error) {
	s.deliver(inbound{err: fmt.Errorf("%w: %w", fleet.ErrBadFrame, err)})
}

// deliver hands an inbound frame to the connection, waiting for room.
func (s *session) deliver(in inbound) {
	s.mu.Lock()
	c := s.conn
	if c == nil || !c.accepted || c.finished {
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	select {
	case c.in <- in:
	case <-c.done:
	}
}
