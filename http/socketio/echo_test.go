package socketio

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"
)

// TestMountedOnEcho runs a session through the way the coordinator mounts
// the server: echo.WrapHandler under /socket.io/.
func TestMountedOnEcho(t *testing.T) {
	e := &env{t: t, conns: make(chan *Conn, 4), client: &http.Client{Timeout: waitLimit}}
	e.srv = NewServer(Config{Logger: slog.New(slog.DiscardHandler)}, func(_ http.Header, c *Conn) error {
		e.conns <- c
		return nil
	})
	router := echo.New()
	router.Any("/socket.io/", echo.WrapHandler(e.srv))
	e.hs = httptest.NewServer(router)
	t.Cleanup(func() {
		e.srv.Close()
		e.hs.Close()
		e.client.CloseIdleConnections()
	})

	sid, c := e.connectPolling()
	held := e.pollAsync(sid)
	ws := e.dial("EIO=4&transport=websocket&sid=" + sid)
	writeWS(t, ws, "2probe")
	if got := readWS(t, ws); got != "3probe" {
		t.Fatalf("probe answer = %q", got)
	}
	if got := <-held; len(got) != 1 || got[0] != "6" {
		t.Fatalf("held GET = %q", got)
	}
	writeWS(t, ws, "5")
	writeWS(t, ws, `42/fleet,["heartbeat",{}]`)
	wantFrame(t, mustReadFrame(t, c), "heartbeat", "{}", nil)

	ws2, _, c2 := e.connectWebSocket()
	writeWS(t, ws2, `42/fleet,["heartbeat",{}]`)
	wantFrame(t, mustReadFrame(t, c2), "heartbeat", "{}", nil)

	status, body := e.do(http.MethodGet, e.url("EIO=3&transport=polling"), "", nil)
	if status != http.StatusBadRequest || !strings.Contains(body, `"code":5`) {
		t.Fatalf("got %d %q", status, body)
	}
}
