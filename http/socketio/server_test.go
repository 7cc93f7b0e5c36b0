package socketio

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/gorilla/websocket"
)

// waitLimit bounds every wait of these tests; it only turns a hang into a
// failure, it is never what a test asserts.
const waitLimit = 10 * time.Second

// env is a Server mounted under /socket.io/ on an httptest server, with a
// client of its own.
type env struct {
	t      *testing.T
	srv    *Server
	hs     *httptest.Server
	client *http.Client
	conns  chan *Conn
}

// newEnv starts a server; a nil onConnect accepts every connect and hands
// the Conn to e.conns.
func newEnv(t *testing.T, cfg Config, onConnect OnConnect) *env {
	t.Helper()
	e := &env{t: t, conns: make(chan *Conn, 16)}
	if onConnect == nil {
		onConnect = func(_ http.Header, c *Conn) error {
			e.conns <- c
			return nil
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	e.srv = NewServer(cfg, onConnect)
	mux := http.NewServeMux()
	mux.Handle("/socket.io/", e.srv)
	e.hs = httptest.NewServer(mux)
	transport := &http.Transport{}
	e.client = &http.Client{Transport: transport, Timeout: waitLimit}
	t.Cleanup(func() {
		e.srv.Close()
		e.hs.Close()
		transport.CloseIdleConnections()
	})
	return e
}

func (e *env) url(query string) string {
	return e.hs.URL + "/socket.io/?" + query
}

func (e *env) wsURL(query string) string {
	return "ws" + strings.TrimPrefix(e.url(query), "http")
}

// do sends a request and returns the status and body.
func (e *env) do(method, target, body string, header http.Header) (int, string) {
	e.t.Helper()
	req, err := http.NewRequest(method, target, strings.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := e.client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, target, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		e.t.Fatalf("%s %s: read body: %v", method, target, err)
	}
	return res.StatusCode, string(b)
}

type openMsg struct {
	SID          string   `json:"sid"`
	Upgrades     []string `json:"upgrades"`
	PingInterval int64    `json:"pingInterval"`
	PingTimeout  int64    `json:"pingTimeout"`
	MaxPayload   int      `json:"maxPayload"`
}

func parseOpen(t *testing.T, pkt string) openMsg {
	t.Helper()
	if !strings.HasPrefix(pkt, "0") {
		t.Fatalf("open packet = %q", pkt)
	}
	var o openMsg
	if err := json.Unmarshal([]byte(pkt[1:]), &o); err != nil {
		t.Fatalf("open packet %q: %v", pkt, err)
	}
	if o.SID == "" {
		t.Fatalf("open packet without sid: %q", pkt)
	}
	return o
}

// handshake opens a polling session.
func (e *env) handshake(header http.Header) openMsg {
	e.t.Helper()
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling"), "", header)
	if status != http.StatusOK {
		e.t.Fatalf("handshake: %d %s", status, body)
	}
	return parseOpen(e.t, body)
}

// poll sends a GET and returns the packets of its payload.
func (e *env) poll(sid string) []string {
	e.t.Helper()
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling&sid="+sid), "", nil)
	if status != http.StatusOK {
		e.t.Fatalf("poll: %d %s", status, body)
	}
	return strings.Split(body, "\x1e")
}

// pollAsync sends a GET in the background and waits until the server is
// holding it.
func (e *env) pollAsync(sid string) <-chan []string {
	e.t.Helper()
	ch := make(chan []string, 1)
	go func() {
		res, err := e.client.Get(e.url("EIO=4&transport=polling&sid=" + sid))
		if err != nil {
			ch <- []string{"error: " + err.Error()}
			return
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		ch <- strings.Split(string(b), "\x1e")
	}()
	e.eventually("GET held", func() bool {
		ss := e.srv.session(sid)
		if ss == nil {
			return true
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		return ss.polling
	})
	return ch
}

// post sends packets in one POST and expects "ok".
func (e *env) post(sid string, packets ...string) {
	e.t.Helper()
	status, body := e.do(http.MethodPost, e.url("EIO=4&transport=polling&sid="+sid), encodePayload(packets), nil)
	if status != http.StatusOK || body != "ok" {
		e.t.Fatalf("post: %d %q", status, body)
	}
}

func (e *env) dial(query string) *websocket.Conn {
	e.t.Helper()
	ws, res, err := websocket.DefaultDialer.Dial(e.wsURL(query), nil)
	if err != nil {
		status := 0
		if res != nil {
			status = res.StatusCode
		}
		e.t.Fatalf("dial %s: %v (status %d)", query, err, status)
	}
	e.t.Cleanup(func() { ws.Close() })
	return ws
}

func (e *env) nextConn() *Conn {
	e.t.Helper()
	select {
	case c := <-e.conns:
		return c
	case <-time.After(waitLimit):
		e.t.Fatal("no connect")
		return nil
	}
}

// eventually polls cond until it holds, failing after waitLimit.
func (e *env) eventually(what string, cond func() bool) {
	e.t.Helper()
	eventually(e.t, what, cond)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *env) sessionGone(sid string) {
	e.t.Helper()
	e.eventually("session "+sid+" gone", func() bool { return e.srv.session(sid) == nil })
}

// connectPolling opens a polling session and connects to the namespace.
func (e *env) connectPolling() (string, *Conn) {
	e.t.Helper()
	sid := e.handshake(nil).SID
	e.post(sid, "40/fleet,")
	var got []string
	for _, p := range e.poll(sid) {
		if p != "2" { // a ping, when the test pings often
			got = append(got, p)
		}
	}
	if len(got) != 1 || !strings.HasPrefix(got[0], `40/fleet,{"sid":"`) {
		e.t.Fatalf("connect reply = %q", got)
	}
	return sid, e.nextConn()
}

// connectWebSocket opens a direct WebSocket session and connects.
func (e *env) connectWebSocket() (*websocket.Conn, string, *Conn) {
	e.t.Helper()
	ws := e.dial("EIO=4&transport=websocket")
	open := parseOpen(e.t, readWS(e.t, ws))
	writeWS(e.t, ws, "40/fleet,")
	got := readWS(e.t, ws)
	for got == "2" { // a ping, when the test pings often
		got = readWS(e.t, ws)
	}
	if !strings.HasPrefix(got, `40/fleet,{"sid":"`) {
		e.t.Fatalf("connect reply = %q", got)
	}
	return ws, open.SID, e.nextConn()
}

func readWS(t *testing.T, ws *websocket.Conn) string {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(waitLimit))
	mt, b, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("read ws: %v", err)
	}
	if mt != websocket.TextMessage {
		t.Fatalf("read ws: message type %d", mt)
	}
	return string(b)
}

func writeWS(t *testing.T, ws *websocket.Conn, msg string) {
	t.Helper()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("write ws: %v", err)
	}
}

// wsClosed reads until the server closes ws and returns the read error.
func wsClosed(t *testing.T, ws *websocket.Conn) error {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(waitLimit))
	for {
		if _, _, err := ws.ReadMessage(); err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("ws not closed by the server")
			}
			return err
		}
	}
}

type readResult struct {
	f   fleet.Frame
	err error
}

func readFrame(t *testing.T, c *Conn) (fleet.Frame, error) {
	t.Helper()
	ch := make(chan readResult, 1)
	go func() {
		f, err := c.ReadFrame()
		ch <- readResult{f, err}
	}()
	select {
	case r := <-ch:
		return r.f, r.err
	case <-time.After(waitLimit):
		t.Fatal("ReadFrame blocked")
		return fleet.Frame{}, nil
	}
}

func mustReadFrame(t *testing.T, c *Conn) fleet.Frame {
	t.Helper()
	f, err := readFrame(t, c)
	if err != nil {
		t.Fatalf("ReadFrame: %v", err)
	}
	return f
}

func wantFrame(t *testing.T, got fleet.Frame, event, data string, ack *uint64) {
	t.Helper()
	if got.Event != event || string(got.Data) != data || (got.Ack == nil) != (ack == nil) || (ack != nil && *got.Ack != *ack) {
		t.Fatalf("frame = {%q %s ack=%v}, want {%q %s ack=%v}", got.Event, got.Data, fmtAck(got.Ack), event, data, fmtAck(ack))
	}
}

func fmtAck(a *uint64) string {
	if a == nil {
		return "none"
	}
	return fmt.Sprint(*a)
}

func wantEngineError(t *testing.T, status int, body string, wantStatus, wantCode int) {
	t.Helper()
	var e struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || status != wantStatus || e.Code != wantCode || e.Message == "" {
		t.Fatalf("answer %d %q, want %d with code %d", status, body, wantStatus, wantCode)
	}
}

func TestHandshake(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	res, err := e.client.Get(e.url("EIO=4&transport=polling&t=abc"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("handshake: %d %s", res.StatusCode, res.Header.Get("Content-Type"))
	}
	open := parseOpen(t, string(b))
	want := openMsg{SID: open.SID, Upgrades: []string{"websocket"}, PingInterval: 4000, PingTimeout: 5000, MaxPayload: 128 << 10}
	if fmt.Sprint(open) != fmt.Sprint(want) {
		t.Fatalf("open = %+v, want %+v", open, want)
	}
	if e.srv.Sessions() != 1 {
		t.Fatalf("Sessions() = %d", e.srv.Sessions())
	}
	if other := e.handshake(nil); other.SID == open.SID {
		t.Fatal("two sessions with one sid")
	}
}

func TestEngineErrors(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid := e.handshake(nil).SID
	tests := []struct {
		name   string
		method string
		query  string
		status int
		code   int
	}{
		{"EIO 3", "GET", "EIO=3&transport=polling", 400, errUnsupportedVersion},
		{"no EIO", "GET", "transport=polling", 400, errUnsupportedVersion},
		{"unknown transport", "GET", "EIO=4&transport=flash", 400, errUnknownTransport},
		{"no transport", "GET", "EIO=4", 400, errUnknownTransport},
		{"unknown sid", "GET", "EIO=4&transport=polling&sid=nope", 400, errUnknownSID},
		{"unknown sid post", "POST", "EIO=4&transport=polling&sid=nope", 400, errUnknownSID},
		{"POST handshake", "POST", "EIO=4&transport=polling", 400, errBadHandshakeMethod},
		{"websocket without upgrade", "GET", "EIO=4&transport=websocket", 400, errBadRequest},
		{"websocket sid without upgrade", "GET", "EIO=4&transport=websocket&sid=" + sid, 400, errBadRequest},
		{"PUT", "PUT", "EIO=4&transport=polling&sid=" + sid, 400, errBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, body := e.do(tt.method, e.url(tt.query), "", nil)
			wantEngineError(t, status, body, tt.status, tt.code)
		})
	}
	// A polling POST with a malformed payload is a broken client: refused,
	// and the session is dropped.
	status, body := e.do(http.MethodPost, e.url("EIO=4&transport=polling&sid="+sid), "9garbage", nil)
	wantEngineError(t, status, body, 400, errBadRequest)
	e.sessionGone(sid)
}

func TestPollingExchange(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	header := http.Header{"Authorization": {"Bearer good"}}
	open := e.handshake(header)
	sid := open.SID

	e.post(sid, "40/fleet,")
	got := e.poll(sid)
	if len(got) != 1 || !strings.HasPrefix(got[0], `40/fleet,{"sid":"`) {
		t.Fatalf("connect reply = %q", got)
	}
	c := e.nextConn()
	if c.Header().Get("Authorization") != "Bearer good" {
		t.Fatalf("Header() = %v", c.Header())
	}
	if c.RemoteAddr() == "" {
		t.Fatal("no RemoteAddr")
	}

	if err := c.WriteFrame(fleet.Frame{Event: fleet.EventWelcome, Data: json.RawMessage(`{"node_id":"n1"}`)}); err != nil {
		t.Fatal(err)
	}
	if got := e.poll(sid); len(got) != 1 || got[0] != `42/fleet,["welcome",{"node_id":"n1"}]` {
		t.Fatalf("welcome = %q", got)
	}

	e.post(sid, `42/fleet,7["heartbeat",{"cpu":1}]`)
	wantFrame(t, mustReadFrame(t, c), "heartbeat", `{"cpu":1}`, id(7))

	ack := uint64(7)
	if err := c.WriteFrame(fleet.Frame{Event: fleet.EventAck, Ack: &ack, Data: json.RawMessage(`{"accepted":true}`)}); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteFrame(fleet.Frame{Event: fleet.EventRentalStopped}); err != nil {
		t.Fatal(err)
	}
	if got := e.poll(sid); len(got) != 2 || got[0] != `43/fleet,7[{"accepted":true}]` || got[1] != `42/fleet,["rental.stopped"]` {
		t.Fatalf("ack and event = %q", got)
	}

	// Several packets in one payload arrive in order; ACKs from the client
	// and packets for other namespaces are ignored.
	e.post(sid, `42/fleet,["a"]`, `43/fleet,1[]`, `42/other,["x"]`, `42/fleet,["b",[1,2]]`, "3")
	wantFrame(t, mustReadFrame(t, c), "a", "", nil)
	wantFrame(t, mustReadFrame(t, c), "b", "[1,2]", nil)

	// Malformed events are bad frames, not fatal.
	e.post(sid, `42/fleet,{"a":1}`, `42/fleet,[1]`, "4", `42/fleet,["ok"]`)
	for range 3 {
		if _, err := readFrame(t, c); !errors.Is(err, fleet.ErrBadFrame) {
			t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
		}
	}
	wantFrame(t, mustReadFrame(t, c), "ok", "", nil)

	if err := c.WriteFrame(fleet.Frame{Event: "x", Data: json.RawMessage(`{bad`)}); err == nil {
		t.Fatal("WriteFrame accepted invalid JSON")
	}
	if e.srv.Sessions() != 1 {
		t.Fatalf("Sessions() = %d", e.srv.Sessions())
	}
}

func TestWritesDuringOnConnectFollowTheReply(t *testing.T) {
	e := newEnv(t, Config{}, func(_ http.Header, c *Conn) error {
		return c.WriteFrame(fleet.Frame{Event: fleet.EventWelcome, Data: json.RawMessage(`{}`)})
	})
	sid := e.handshake(nil).SID
	e.post(sid, "40/fleet,")
	var got []string
	for len(got) < 2 {
		got = append(got, e.poll(sid)...)
	}
	if !strings.HasPrefix(got[0], "40/fleet,") || got[1] != `42/fleet,["welcome",{}]` {
		t.Fatalf("got %q", got)
	}
}

func TestSecondConnectIgnored(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, c := e.connectPolling()
	e.post(sid, "40/fleet,", `42/fleet,["after"]`)
	wantFrame(t, mustReadFrame(t, c), "after", "", nil)
	if len(e.conns) != 0 {
		t.Fatal("second CONNECT made a second connection")
	}
}

func TestOverlappingGetClosesSession(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, c := e.connectPolling()
	first := e.pollAsync(sid)
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling&sid="+sid), "", nil)
	wantEngineError(t, status, body, 400, errBadRequest)
	if got := <-first; len(got) != 1 || got[0] != "1" {
		t.Fatalf("held GET = %q, want close packet", got)
	}
	e.sessionGone(sid)
	if _, err := readFrame(t, c); err == nil || errors.Is(err, fleet.ErrBadFrame) {
		t.Fatalf("ReadFrame after session end = %v", err)
	}
}

func TestUpgrade(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, c := e.connectPolling()

	held := e.pollAsync(sid)
	ws := e.dial("EIO=4&transport=websocket&sid=" + sid)
	writeWS(t, ws, "2probe")
	if got := readWS(t, ws); got != "3probe" {
		t.Fatalf("probe answer = %q", got)
	}
	if got := <-held; len(got) != 1 || got[0] != "6" {
		t.Fatalf("held GET = %q, want noop", got)
	}
	// Written while the client has paused polling: delivered on the
	// WebSocket once upgraded.
	if err := c.WriteFrame(fleet.Frame{Event: "queued"}); err != nil {
		t.Fatal(err)
	}
	writeWS(t, ws, "5")
	if got := readWS(t, ws); got != `42/fleet,["queued"]` {
		t.Fatalf("after upgrade = %q", got)
	}

	if err := c.WriteFrame(fleet.Frame{Event: "x", Data: json.RawMessage(`{"a":1}`)}); err != nil {
		t.Fatal(err)
	}
	if got := readWS(t, ws); got != `42/fleet,["x",{"a":1}]` {
		t.Fatalf("event over ws = %q", got)
	}
	writeWS(t, ws, `42/fleet,3["heartbeat",{"cpu":2}]`)
	wantFrame(t, mustReadFrame(t, c), "heartbeat", `{"cpu":2}`, id(3))

	// Polling is over for this session.
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling&sid="+sid), "", nil)
	wantEngineError(t, status, body, 400, errBadRequest)
	status, body = e.do(http.MethodPost, e.url("EIO=4&transport=polling&sid="+sid), "3", nil)
	wantEngineError(t, status, body, 400, errBadRequest)
	if e.srv.Sessions() != 1 {
		t.Fatalf("Sessions() = %d", e.srv.Sessions())
	}

	// The client closing the WebSocket ends the session.
	_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	if _, err := readFrame(t, c); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame after close = %v, want io.EOF", err)
	}
	e.sessionGone(sid)
}

func TestSecondUpgradeRefused(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, _ := e.connectPolling()
	ws := e.dial("EIO=4&transport=websocket&sid=" + sid)
	writeWS(t, ws, "2probe")
	readWS(t, ws)
	_, res, err := websocket.DefaultDialer.Dial(e.wsURL("EIO=4&transport=websocket&sid="+sid), nil)
	if err == nil || res == nil || res.StatusCode != http.StatusBadRequest {
		t.Fatalf("second upgrade: err %v, response %v", err, res)
	}
}

func TestUpgradeTimeout(t *testing.T) {
	e := newEnv(t, Config{UpgradeTimeout: 50 * time.Millisecond}, nil)
	sid := e.handshake(nil).SID
	ws := e.dial("EIO=4&transport=websocket&sid=" + sid)
	writeWS(t, ws, "2probe")
	if got := readWS(t, ws); got != "3probe" {
		t.Fatalf("probe answer = %q", got)
	}
	// No "5": the server abandons the upgrade and closes the WebSocket; the
	// session goes on polling.
	wsClosed(t, ws)
	e.eventually("probe released", func() bool {
		ss := e.srv.session(sid)
		ss.mu.Lock()
		defer ss.mu.Unlock()
		return ss.probe == nil && !ss.probed
	})
	e.post(sid, "40/fleet,")
	if got := e.poll(sid); len(got) != 1 || !strings.HasPrefix(got[0], "40/fleet,") {
		t.Fatalf("poll after abandoned upgrade = %q", got)
	}
	// A new upgrade may be tried.
	ws2 := e.dial("EIO=4&transport=websocket&sid=" + sid)
	writeWS(t, ws2, "2probe")
	if got := readWS(t, ws2); got != "3probe" {
		t.Fatalf("probe answer = %q", got)
	}
}

func TestDirectWebSocket(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	ws := e.dial("EIO=4&transport=websocket")
	open := parseOpen(t, readWS(t, ws))
	if len(open.Upgrades) != 0 || open.PingInterval != 4000 {
		t.Fatalf("open = %+v", open)
	}
	writeWS(t, ws, "40/fleet,")
	if got := readWS(t, ws); !strings.HasPrefix(got, `40/fleet,{"sid":"`) {
		t.Fatalf("connect reply = %q", got)
	}
	c := e.nextConn()
	if err := c.WriteFrame(fleet.Frame{Event: fleet.EventWelcome, Data: json.RawMessage(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if got := readWS(t, ws); got != `42/fleet,["welcome",{}]` {
		t.Fatalf("welcome = %q", got)
	}
	writeWS(t, ws, `42/fleet,1["heartbeat",{}]`)
	wantFrame(t, mustReadFrame(t, c), "heartbeat", `{}`, id(1))

	// A polling request for a WebSocket session is refused.
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling&sid="+open.SID), "", nil)
	wantEngineError(t, status, body, 400, errBadRequest)

	writeWS(t, ws, "1")
	if _, err := readFrame(t, c); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame after client close = %v, want io.EOF", err)
	}
	e.sessionGone(open.SID)
}

func TestPingTimeout(t *testing.T) {
	cfg := Config{PingInterval: 20 * time.Millisecond, PingTimeout: 50 * time.Millisecond}

	t.Run("websocket", func(t *testing.T) {
		e := newEnv(t, cfg, nil)
		ws, sid, c := e.connectWebSocket()
		// Pings are read, never answered: the session is closed.
		wsClosed(t, ws)
		e.sessionGone(sid)
		if _, err := readFrame(t, c); !errors.Is(err, errPingTimeout) {
			t.Fatalf("ReadFrame = %v, want ping timeout", err)
		}
		if err := c.WriteFrame(fleet.Frame{Event: "x"}); err == nil {
			t.Fatal("WriteFrame after ping timeout succeeded")
		}
	})

	t.Run("polling client stops polling", func(t *testing.T) {
		e := newEnv(t, cfg, nil)
		sid, c := e.connectPolling()
		e.sessionGone(sid)
		if _, err := readFrame(t, c); !errors.Is(err, errPingTimeout) {
			t.Fatalf("ReadFrame = %v, want ping timeout", err)
		}
	})

	t.Run("polling, ping delivered but not answered", func(t *testing.T) {
		e := newEnv(t, cfg, nil)
		sid := e.handshake(nil).SID
		if got := e.poll(sid); len(got) != 1 || got[0] != "2" {
			t.Fatalf("poll = %q, want ping", got)
		}
		e.sessionGone(sid)
	})

	t.Run("answered", func(t *testing.T) {
		e := newEnv(t, Config{PingInterval: 10 * time.Millisecond, PingTimeout: waitLimit}, nil)
		ws, sid, _ := e.connectWebSocket()
		for range 5 {
			if got := readWS(t, ws); got != "2" {
				t.Fatalf("got %q, want ping", got)
			}
			writeWS(t, ws, "3")
		}
		if e.srv.session(sid) == nil {
			t.Fatal("session closed although pongs were sent")
		}
	})
}

func TestInvalidNamespace(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid := e.handshake(nil).SID
	e.post(sid, "40/other,")
	if got := e.poll(sid); len(got) != 1 || got[0] != `44/other,{"message":"Invalid namespace"}` {
		t.Fatalf("got %q", got)
	}
	e.post(sid, "40")
	if got := e.poll(sid); len(got) != 1 || got[0] != `44{"message":"Invalid namespace"}` {
		t.Fatalf("got %q", got)
	}
	if len(e.conns) != 0 {
		t.Fatal("OnConnect called for another namespace")
	}

	ws := e.dial("EIO=4&transport=websocket")
	readWS(t, ws)
	writeWS(t, ws, "40/admin,")
	if got := readWS(t, ws); got != `44/admin,{"message":"Invalid namespace"}` {
		t.Fatalf("got %q", got)
	}
}

func TestRefusedConnect(t *testing.T) {
	var refused chan *Conn
	refuse := func(h http.Header, c *Conn) error {
		refused <- c
		return errors.New("bad key")
	}

	t.Run("polling", func(t *testing.T) {
		refused = make(chan *Conn, 1)
		e := newEnv(t, Config{}, refuse)
		sid := e.handshake(nil).SID
		e.post(sid, "40/fleet,")
		var got []string
		for len(got) < 2 {
			payload := e.poll(sid)
			for _, p := range payload {
				if p == "1" {
					t.Fatalf("close packet in payload %q", payload)
				}
			}
			got = append(got, payload...)
		}
		if len(got) != 2 || !strings.HasPrefix(got[0], `40/fleet,{"sid":"`) || got[1] != "41/fleet," {
			t.Fatalf("got %q, want CONNECT then DISCONNECT", got)
		}
		// The next poll gets the Engine.IO close, on its own, and the
		// session is gone.
		if got := e.poll(sid); len(got) != 1 || got[0] != "1" {
			t.Fatalf("poll after DISCONNECT = %q", got)
		}
		e.sessionGone(sid)
		status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling&sid="+sid), "", nil)
		wantEngineError(t, status, body, 400, errUnknownSID)

		c := <-refused
		if err := c.WriteFrame(fleet.Frame{Event: "x"}); err == nil {
			t.Fatal("WriteFrame on a refused connection succeeded")
		}
		if _, err := readFrame(t, c); err == nil {
			t.Fatal("ReadFrame on a refused connection succeeded")
		}
	})

	t.Run("polling client closes first", func(t *testing.T) {
		refused = make(chan *Conn, 1)
		e := newEnv(t, Config{}, refuse)
		sid := e.handshake(nil).SID
		e.post(sid, "40/fleet,")
		<-refused
		e.post(sid, "1")
		e.sessionGone(sid)
	})

	t.Run("client never polls again", func(t *testing.T) {
		refused = make(chan *Conn, 1)
		e := newEnv(t, Config{WriteTimeout: 50 * time.Millisecond}, refuse)
		sid := e.handshake(nil).SID
		e.post(sid, "40/fleet,")
		<-refused
		e.sessionGone(sid)
	})

	t.Run("websocket", func(t *testing.T) {
		refused = make(chan *Conn, 1)
		e := newEnv(t, Config{}, refuse)
		ws := e.dial("EIO=4&transport=websocket")
		sid := parseOpen(t, readWS(t, ws)).SID
		writeWS(t, ws, "40/fleet,")
		<-refused
		if got := readWS(t, ws); !strings.HasPrefix(got, `40/fleet,{"sid":"`) {
			t.Fatalf("got %q, want CONNECT", got)
		}
		if got := readWS(t, ws); got != "41/fleet," {
			t.Fatalf("got %q, want DISCONNECT", got)
		}
		if got := readWS(t, ws); got != "1" {
			t.Fatalf("got %q, want close packet", got)
		}
		if err := wsClosed(t, ws); !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
			t.Fatalf("ws closed with %v", err)
		}
		e.sessionGone(sid)
	})
}

func TestConnClose(t *testing.T) {
	t.Run("polling", func(t *testing.T) {
		e := newEnv(t, Config{}, nil)
		sid, c := e.connectPolling()
		if err := c.WriteFrame(fleet.Frame{Event: "last"}); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(fleet.CloseKeyRevoked, "key revoked"); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(fleet.CloseKeyRevoked, "key revoked"); err != nil {
			t.Fatal(err)
		}
		if err := c.WriteFrame(fleet.Frame{Event: "x"}); err == nil {
			t.Fatal("WriteFrame after Close succeeded")
		}
		if _, err := c.ReadFrame(); err == nil {
			t.Fatal("ReadFrame after Close succeeded")
		}
		if got := e.poll(sid); len(got) != 2 || got[0] != `42/fleet,["last"]` || got[1] != "41/fleet," {
			t.Fatalf("poll = %q, want the last event then DISCONNECT", got)
		}
		if got := e.poll(sid); len(got) != 1 || got[0] != "1" {
			t.Fatalf("poll = %q, want close", got)
		}
		e.sessionGone(sid)
	})

	t.Run("websocket", func(t *testing.T) {
		e := newEnv(t, Config{}, nil)
		ws, sid, c := e.connectWebSocket()
		if err := c.Close(fleet.CloseHeartbeatTimeout, "heartbeat timeout"); err != nil {
			t.Fatal(err)
		}
		if got := readWS(t, ws); got != "41/fleet," {
			t.Fatalf("got %q, want DISCONNECT", got)
		}
		if got := readWS(t, ws); got != "1" {
			t.Fatalf("got %q, want close packet", got)
		}
		wsClosed(t, ws)
		e.sessionGone(sid)
	})

	t.Run("concurrent with reads and writes", func(t *testing.T) {
		e := newEnv(t, Config{QueueSize: 1 << 10}, nil)
		ws, sid, c := e.connectWebSocket()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				if _, err := c.ReadFrame(); err != nil && !errors.Is(err, fleet.ErrBadFrame) {
					return
				}
			}
		}()
		go func() {
			for {
				if c.WriteFrame(fleet.Frame{Event: "spam"}) != nil {
					return
				}
			}
		}()
		go func() {
			for {
				if ws.WriteMessage(websocket.TextMessage, []byte(`42/fleet,["hb"]`)) != nil {
					return
				}
			}
		}()
		go func() {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					return
				}
			}
		}()
		for range 3 {
			go c.Close(fleet.CloseReplaced, "replaced")
		}
		<-done
		e.sessionGone(sid)
	})
}

func TestClientDisconnect(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, c := e.connectPolling()
	e.post(sid, `42/fleet,["before"]`, "41/fleet,")
	wantFrame(t, mustReadFrame(t, c), "before", "", nil)
	if _, err := readFrame(t, c); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame = %v, want io.EOF", err)
	}
	if _, err := readFrame(t, c); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame again = %v, want io.EOF", err)
	}
	if err := c.WriteFrame(fleet.Frame{Event: "x"}); err == nil {
		t.Fatal("WriteFrame after DISCONNECT succeeded")
	}
	// The session stays and may connect again.
	e.post(sid, "40/fleet,")
	if got := e.poll(sid); len(got) != 1 || !strings.HasPrefix(got[0], "40/fleet,") {
		t.Fatalf("reconnect reply = %q", got)
	}
	c2 := e.nextConn()
	e.post(sid, `42/fleet,["again"]`)
	wantFrame(t, mustReadFrame(t, c2), "again", "", nil)

	// The Engine.IO close ends everything.
	e.post(sid, "1")
	e.sessionGone(sid)
	if _, err := readFrame(t, c2); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame = %v, want io.EOF", err)
	}
}

func TestOversizeEvent(t *testing.T) {
	e := newEnv(t, Config{MaxFrameSize: 100}, nil)
	sid, c := e.connectPolling()
	big := fmt.Sprintf(`42/fleet,["heartbeat",{"pad":%q}]`, strings.Repeat("x", 200))
	e.post(sid, big)
	if _, err := readFrame(t, c); !errors.Is(err, fleet.ErrBadFrame) {
		t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
	}
	e.post(sid, `42/fleet,["heartbeat",{"cpu":1}]`)
	wantFrame(t, mustReadFrame(t, c), "heartbeat", `{"cpu":1}`, nil)
	if err := c.WriteFrame(fleet.Frame{Event: "still"}); err != nil {
		t.Fatal(err)
	}
	if got := e.poll(sid); len(got) != 1 || got[0] != `42/fleet,["still"]` {
		t.Fatalf("poll = %q", got)
	}
}

func TestPayloadTooLarge(t *testing.T) {
	e := newEnv(t, Config{MaxPayload: 100}, nil)
	sid, c := e.connectPolling()
	status, _ := e.do(http.MethodPost, e.url("EIO=4&transport=polling&sid="+sid), "4"+strings.Repeat("x", 200), nil)
	if status != http.StatusRequestEntityTooLarge {
		t.Fatalf("status = %d", status)
	}
	e.sessionGone(sid)
	if _, err := readFrame(t, c); err == nil {
		t.Fatal("ReadFrame succeeded")
	}

	ws, sid, _ := e.connectWebSocket()
	writeWS(t, ws, "4"+strings.Repeat("x", 200))
	wsClosed(t, ws)
	e.sessionGone(sid)
}

func TestBinaryEventDiscarded(t *testing.T) {
	header := `451-/fleet,["upload",{"_placeholder":true,"num":0}]`

	t.Run("websocket", func(t *testing.T) {
		e := newEnv(t, Config{}, nil)
		ws, _, c := e.connectWebSocket()
		writeWS(t, ws, header)
		if err := ws.WriteMessage(websocket.BinaryMessage, []byte{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		writeWS(t, ws, `462-/fleet,1[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]`)
		for range 2 {
			if err := ws.WriteMessage(websocket.BinaryMessage, []byte{4}); err != nil {
				t.Fatal(err)
			}
		}
		writeWS(t, ws, `42/fleet,["after"]`)
		for range 2 {
			if _, err := readFrame(t, c); !errors.Is(err, fleet.ErrBadFrame) {
				t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
			}
		}
		wantFrame(t, mustReadFrame(t, c), "after", "", nil)
	})

	t.Run("polling", func(t *testing.T) {
		e := newEnv(t, Config{}, nil)
		sid, c := e.connectPolling()
		e.post(sid, header, "bAQID", `42/fleet,["after"]`)
		if _, err := readFrame(t, c); !errors.Is(err, fleet.ErrBadFrame) {
			t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
		}
		wantFrame(t, mustReadFrame(t, c), "after", "", nil)
		// A binary message outside a binary packet is a bad frame too.
		e.post(sid, "bAQID", `42/fleet,["next"]`)
		if _, err := readFrame(t, c); !errors.Is(err, fleet.ErrBadFrame) {
			t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
		}
		wantFrame(t, mustReadFrame(t, c), "next", "", nil)
	})
}

func TestSlowConsumer(t *testing.T) {
	e := newEnv(t, Config{QueueSize: 4}, nil)
	sid, c := e.connectPolling()
	for i := range 4 {
		if err := c.WriteFrame(fleet.Frame{Event: "x"}); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if err := c.WriteFrame(fleet.Frame{Event: "x"}); !errors.Is(err, errSlowConsumer) {
		t.Fatalf("WriteFrame on a full queue = %v", err)
	}
	e.sessionGone(sid)
	if _, err := readFrame(t, c); !errors.Is(err, errSlowConsumer) {
		t.Fatalf("ReadFrame = %v, want slow consumer", err)
	}
}

func TestMaxSessions(t *testing.T) {
	e := newEnv(t, Config{MaxSessions: 1}, nil)
	sid := e.handshake(nil).SID
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling"), "", nil)
	wantEngineError(t, status, body, http.StatusForbidden, errForbidden)
	_, res, err := websocket.DefaultDialer.Dial(e.wsURL("EIO=4&transport=websocket"), nil)
	if err == nil || res == nil || res.StatusCode != http.StatusForbidden {
		t.Fatalf("direct ws past MaxSessions: %v %v", err, res)
	}
	e.post(sid, "1")
	e.sessionGone(sid)
	e.handshake(nil)
}

func TestServerClose(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	sid, c := e.connectPolling()
	held := e.pollAsync(sid)
	ws, _, c2 := e.connectWebSocket()
	probeSID := e.handshake(nil).SID
	probe := e.dial("EIO=4&transport=websocket&sid=" + probeSID)

	e.srv.Close()
	if got := <-held; len(got) != 1 || got[0] != "1" {
		t.Fatalf("held GET = %q", got)
	}
	wsClosed(t, ws)
	wsClosed(t, probe)
	if n := e.srv.Sessions(); n != 0 {
		t.Fatalf("Sessions() = %d after Close", n)
	}
	for _, c := range []*Conn{c, c2} {
		if _, err := readFrame(t, c); !errors.Is(err, errServerClosed) {
			t.Fatalf("ReadFrame = %v, want server closed", err)
		}
	}
	status, body := e.do(http.MethodGet, e.url("EIO=4&transport=polling"), "", nil)
	wantEngineError(t, status, body, http.StatusForbidden, errForbidden)
}

// TestNoGoroutineLeak runs sessions through every ending and checks that
// the goroutines return to what they were.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	sub := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}
	sub("sessions", func(t *testing.T) {
		e := newEnv(t, Config{PingInterval: 20 * time.Millisecond, PingTimeout: 50 * time.Millisecond, UpgradeTimeout: 50 * time.Millisecond}, nil)
		// Upgraded, then closed by the server.
		sid, c := e.connectPolling()
		ws := e.dial("EIO=4&transport=websocket&sid=" + sid)
		writeWS(t, ws, "2probe")
		readWS(t, ws)
		writeWS(t, ws, "5")
		c.Close(fleet.CloseGoingAway, "bye")
		wsClosed(t, ws)
		// Abandoned mid-upgrade, then ping timeout.
		sid2 := e.handshake(nil).SID
		ws2 := e.dial("EIO=4&transport=websocket&sid=" + sid2)
		wsClosed(t, ws2)
		e.sessionGone(sid2)
		// Direct, ping timeout.
		ws3, sid3, _ := e.connectWebSocket()
		wsClosed(t, ws3)
		e.sessionGone(sid3)
		// Left to Server.Close.
		e.connectWebSocket()
		e.connectPolling()
		e.sessionGone(sid)
	})
	eventually(t, "goroutines back to the baseline", func() bool {
		return runtime.NumGoroutine() <= before
	})
}

func TestURLQueryOnly(t *testing.T) {
	// The server ignores the path: mounted anywhere, it answers on the
	// query parameters.
	e := newEnv(t, Config{}, nil)
	u, _ := url.Parse(e.hs.URL + "/socket.io/anything/?EIO=4&transport=polling")
	status, body := e.do(http.MethodGet, u.String(), "", nil)
	if status != http.StatusOK || !strings.HasPrefix(body, "0{") {
		t.Fatalf("got %d %q", status, body)
	}
}
