package socketio

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"sync"

	"github.com/gorilla/websocket"
)

// OnConnect is called (from a request goroutine) when a client CONNECTs to
// the namespace. header is the HTTP header of the Engine.IO handshake
// request. Return nil to accept: the server replies CONNECT and the caller
// owns c. Return an error to refuse: the server replies CONNECT and at once
// DISCONNECT, so the client sees connect then disconnect("io server
// disconnect") and does not reconnect. OnConnect must not call c.ReadFrame;
// WriteFrame calls made before it returns are sent after the CONNECT reply.
type OnConnect func(header http.Header, c *Conn) error

// Server serves Engine.IO v4 / Socket.IO v5 clients for one namespace. It is
// an http.Handler that routes on the query parameters (EIO, transport, sid),
// so it may be mounted under any path prefix (normally /socket.io/).
type Server struct {
	cfg       Config
	onConnect OnConnect
	log       *slog.Logger
	upgrader  websocket.Upgrader

	mu       sync.Mutex
	sessions map[string]*session
	closed   bool

	// wg counts the goroutines the server starts itself (WebSocket writers).
	wg sync.WaitGroup
}

// NewServer returns a Server. A nil onConnect refuses every connect.
func NewServer(cfg Config, onConnect OnConnect) *Server {
	cfg = cfg.withDefaults()
	if onConnect == nil {
		onConnect = func(http.Header, *Conn) error { return errors.New("no connect handler") }
	}
	s := &Server{
		cfg:       cfg,
		onConnect: onConnect,
		log:       cfg.Logger,
		sessions:  make(map[string]*session),
	}
	s.upgrader = websocket.Upgrader{
		HandshakeTimeout: cfg.WriteTimeout,
		Error: func(w http.ResponseWriter, _ *http.Request, _ int, _ error) {
			writeEngineError(w, errBadRequest, "")
		},
	}
	return s
}

// ServeHTTP answers one Engine.IO request: a handshake, a polling GET or
// POST, or a WebSocket (direct or upgrade of a polling session).
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("EIO") != engineVersion {
		writeEngineError(w, errUnsupportedVersion, "")
		return
	}
	transport := q.Get("transport")
	if transport != transportPolling && transport != transportWebSocket {
		writeEngineError(w, errUnknownTransport, "")
		return
	}
	isUpgrade := websocket.IsWebSocketUpgrade(r)
	if isUpgrade != (transport == transportWebSocket) {
		writeEngineError(w, errBadRequest, "")
		return
	}
	sid := q.Get("sid")
	if sid == "" {
		if r.Method != http.MethodGet {
			writeEngineError(w, errBadHandshakeMethod, "")
			return
		}
		s.handshake(w, r, transport)
		return
	}
	ss := s.session(sid)
	if ss == nil {
		writeEngineError(w, errUnknownSID, "")
		return
	}
	switch {
	case transport == transportWebSocket:
		ss.serveUpgrade(w, r)
	case r.Method == http.MethodGet:
		ss.servePoll(w, r)
	case r.Method == http.MethodPost:
		ss.servePost(w, r)
	default:
		writeEngineError(w, errBadRequest, "")
	}
}

// handshake opens a session: over polling the open packet is the response
// body; over a direct WebSocket it is the first message.
func (s *Server) handshake(w http.ResponseWriter, r *http.Request, transport string) {
	ss, err := s.newSession(r, transport)
	if err != nil {
		s.log.Debug("engine.io handshake refused", "err", err, "remote", r.RemoteAddr)
		writeEngineError(w, errForbidden, refusalMessages[err])
		return
	}
	if transport == transportPolling {
		ss.serveHandshake(w)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		ss.destroy(transportError(err))
		return
	}
	ss.serveWebSocket(ws)
}

// refusalMessages are the messages of the Engine.IO error answered to a
// refused handshake.
var refusalMessages = map[error]string{
	errTooManySessions: "Too many sessions",
	errServerClosed:    "Server closed",
}

// newSession registers a new session, or refuses one past MaxSessions.
func (s *Server) newSession(r *http.Request, transport string) (*session, error) {
	ss := newSession(s, newID(), r, transport)
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return nil, errServerClosed
	case len(s.sessions) >= s.cfg.MaxSessions:
		s.mu.Unlock()
		return nil, errTooManySessions
	}
	s.sessions[ss.id] = ss
	s.mu.Unlock()
	// Timers are armed outside s.mu: session locks are taken before the
	// server's, never after.
	ss.start()
	return ss, nil
}

func (s *Server) session(sid string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions[sid]
}

// remove forgets a destroyed session.
func (s *Server) remove(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[ss.id] == ss {
		delete(s.sessions, ss.id)
	}
}

// Sessions returns the number of live Engine.IO sessions.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// Close closes every session without sending anything special (no
// DISCONNECT: clients see a transport close and reconnect) and refuses new
// handshakes. It returns once the server's own goroutines have exited.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	all := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		all = append(all, ss)
	}
	s.mu.Unlock()
	for _, ss := range all {
		ss.destroy(errServerClosed)
	}
	s.wg.Wait()
}

// writeEngineError answers a request with an Engine.IO error. message
// replaces the standard message of the code when not empty.
func writeEngineError(w http.ResponseWriter, code int, message string) {
	if message == "" {
		message = engineErrorMessages[code]
	}
	status := http.StatusBadRequest
	if code == errForbidden {
		status = http.StatusForbidden
	}
	body, _ := json.Marshal(struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}{code, message})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// newID returns a random identifier for a session or a socket: 120 bits,
// URL-safe, like the reference server's base64id.
func newID() string {
	b := make([]byte, 15)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
