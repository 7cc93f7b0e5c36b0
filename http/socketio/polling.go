package socketio

import (
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"
)

// serveHandshake answers the handshake GET of a polling session.
func (s *session) serveHandshake(w http.ResponseWriter) {
	if err := s.writeResponse(w, "text/plain; charset=UTF-8", s.openPacket()); err != nil {
		s.destroy(transportError(err))
	}
}

// begin marks a polling request in flight (inFlight is s.polling for GETs,
// s.posting for POSTs), or answers the Engine.IO error and returns false.
// As the reference server does, a second request of a kind already in
// flight is a broken client: it is refused and the session dropped.
func (s *session) begin(w http.ResponseWriter, inFlight *bool) bool {
	code := -1
	s.mu.Lock()
	switch {
	case s.closed:
		code = errUnknownSID
	case s.transport != transportPolling:
		code = errBadRequest
	case *inFlight:
		s.destroyLocked(errOverlap)
		code = errBadRequest
	default:
		*inFlight = true
	}
	s.mu.Unlock()
	if code >= 0 {
		writeEngineError(w, code, "")
		return false
	}
	return true
}

// servePoll answers a polling GET with what is queued, waiting until
// something is.
func (s *session) servePoll(w http.ResponseWriter, r *http.Request) {
	if !s.begin(w, &s.polling) {
		return
	}
	held := true // this GET is the one in flight
	defer func() {
		if held {
			s.mu.Lock()
			s.polling = false
			s.mu.Unlock()
		}
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
		if payload != nil {
			// The client may send its next GET the moment it has this
			// answer: it must not find this one still counted in flight.
			s.polling, held = false, false
		}
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
	if !s.begin(w, &s.posting) {
		return
	}
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
