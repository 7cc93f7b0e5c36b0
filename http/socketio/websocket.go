package socketio

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
)

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
