package socketio

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

// fixtureDir holds client.mjs and the pinned socket.io-client.
const fixtureDir = "../../test/socketio"

// clientEvent is one JSON line printed by client.mjs.
type clientEvent struct {
	Event     string          `json:"event"`
	Transport string          `json:"transport"`
	Reason    string          `json:"reason"`
	Message   string          `json:"message"`
	Attempt   int             `json:"attempt"`
	Data      json.RawMessage `json:"data"`
}

// echoServer is what the interop test talks to: it accepts the key "good",
// sends a welcome on connect and acknowledges every frame that asks for it,
// echoing its data.
func echoServer(t *testing.T) (*Server, *httptest.Server) {
	t.Helper()
	srv := NewServer(Config{Logger: slog.New(slog.DiscardHandler)}, func(h http.Header, c *Conn) error {
		if h.Get("Authorization") != "Bearer good" {
			return errors.New("invalid host API key")
		}
		go serveEcho(c)
		return nil
	})
	mux := http.NewServeMux()
	mux.Handle("/socket.io/", srv)
	hs := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		hs.Close()
	})
	return srv, hs
}

func serveEcho(c *Conn) {
	defer c.Close(fleet.CloseGoingAway, "done")
	welcome, _ := json.Marshal(fleet.Welcome{NodeID: "node_1", Name: "test", HeartbeatDeadlineMS: 5000})
	if c.WriteFrame(fleet.Frame{Event: fleet.EventWelcome, Data: welcome}) != nil {
		return
	}
	for {
		f, err := c.ReadFrame()
		if errors.Is(err, fleet.ErrBadFrame) {
			continue
		}
		if err != nil {
			return
		}
		if f.Ack != nil {
			data, _ := json.Marshal(map[string]any{"accepted": true, "echo": f.Data})
			if c.WriteFrame(fleet.Frame{Event: fleet.EventAck, Ack: f.Ack, Data: data}) != nil {
				return
			}
		}
	}
}

// runClient runs client.mjs against url with the given environment and
// returns the events it printed.
func runClient(t *testing.T, url string, env ...string) []clientEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "client.mjs", url)
	cmd.Dir = fixtureDir
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client.mjs: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	var events []clientEvent
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var ev clientEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("client.mjs printed %q: %v", sc.Text(), err)
		}
		events = append(events, ev)
	}
	t.Logf("client events:\n%s", out)
	return events
}

func find(events []clientEvent, name string) []clientEvent {
	var found []clientEvent
	for _, ev := range events {
		if ev.Event == name {
			found = append(found, ev)
		}
	}
	return found
}

// requireNode skips the interop test when Node.js or the fixture's
// dependencies are missing.
func requireNode(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("interop with socket.io-client skipped in -short mode")
	}
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("interop with socket.io-client skipped: node is not on PATH")
	}
	mod := filepath.Join(fixtureDir, "node_modules", "socket.io-client", "package.json")
	if _, err := os.Stat(mod); err != nil {
		t.Skipf("interop with socket.io-client skipped: %s missing; run `npm ci` in test/socketio", mod)
	}
}

// TestInterop drives the server with the real npm socket.io-client, written
// as the auth guide shows.
func TestInterop(t *testing.T) {
	requireNode(t)

	t.Run("default options: polling, upgrade, welcome, ack", func(t *testing.T) {
		t.Parallel()
		srv, hs := echoServer(t)
		events := runClient(t, hs.URL+"/fleet", "HOST_API_KEY=good", "EMITS=2", "WAIT_UPGRADE=1")
		wantSequence(t, events, "open", "connect", "welcome", "ack", "ack", "done", "disconnect", "exit")
		if open := find(events, "open")[0]; open.Transport != "polling" {
			t.Errorf("opened on %q, want polling", open.Transport)
		}
		if up := find(events, "upgrade"); len(up) != 1 || up[0].Transport != "websocket" {
			t.Errorf("upgrades = %+v, want one to websocket", up)
		}
		wantWelcome(t, events)
		for _, ack := range find(events, "ack") {
			if ack.Transport != "websocket" {
				t.Errorf("ack over %q, want websocket", ack.Transport)
			}
			var data struct {
				Accepted bool `json:"accepted"`
				Echo     struct {
					Seq *int `json:"seq"`
				} `json:"echo"`
			}
			if err := json.Unmarshal(ack.Data, &data); err != nil || !data.Accepted || data.Echo.Seq == nil {
				t.Errorf("ack data = %s", ack.Data)
			}
		}
		if d := find(events, "disconnect")[0]; d.Reason != "io client disconnect" {
			t.Errorf("disconnect reason %q", d.Reason)
		}
		wantNo(t, events, "connect_error", "reconnect_attempt", "deadline")
		eventually(t, "sessions closed", func() bool { return srv.Sessions() == 0 })
	})

	for _, transports := range []string{"websocket", "polling"} {
		t.Run("transports "+transports, func(t *testing.T) {
			t.Parallel()
			srv, hs := echoServer(t)
			events := runClient(t, hs.URL+"/fleet", "HOST_API_KEY=good", "TRANSPORTS="+transports, "EMITS=3")
			wantSequence(t, events, "open", "connect", "welcome", "ack", "ack", "ack", "done", "disconnect", "exit")
			for _, ev := range append(find(events, "open"), find(events, "ack")...) {
				if ev.Transport != transports {
					t.Errorf("%s over %q, want %q", ev.Event, ev.Transport, transports)
				}
			}
			wantWelcome(t, events)
			wantNo(t, events, "upgrade", "connect_error", "reconnect_attempt", "deadline")
			eventually(t, "sessions closed", func() bool { return srv.Sessions() == 0 })
		})
	}

	t.Run("bad key: connect then server disconnect, no reconnect", func(t *testing.T) {
		t.Parallel()
		srv, hs := echoServer(t)
		// LINGER_MS leaves time for the reconnection the client would make
		// (its first delay is at most 1.5 s) if it were going to.
		events := runClient(t, hs.URL+"/fleet", "HOST_API_KEY=hak_bad", "LINGER_MS=3000")
		wantSequence(t, events, "open", "connect", "disconnect", "exit")
		if d := find(events, "disconnect")[0]; d.Reason != "io server disconnect" {
			t.Errorf("disconnect reason %q, want io server disconnect", d.Reason)
		}
		wantNo(t, events, "welcome", "connect_error", "reconnect_attempt", "deadline")
		eventually(t, "session closed", func() bool { return srv.Sessions() == 0 })
	})

	t.Run("bad key over websocket", func(t *testing.T) {
		t.Parallel()
		srv, hs := echoServer(t)
		events := runClient(t, hs.URL+"/fleet", "HOST_API_KEY=hak_bad", "TRANSPORTS=websocket", "LINGER_MS=3000")
		wantSequence(t, events, "open", "connect", "disconnect", "exit")
		if d := find(events, "disconnect")[0]; d.Reason != "io server disconnect" {
			t.Errorf("disconnect reason %q, want io server disconnect", d.Reason)
		}
		wantNo(t, events, "welcome", "connect_error", "reconnect_attempt", "deadline")
		eventually(t, "session closed", func() bool { return srv.Sessions() == 0 })
	})

	t.Run("other namespace: connect_error", func(t *testing.T) {
		t.Parallel()
		srv, hs := echoServer(t)
		events := runClient(t, hs.URL+"/other", "HOST_API_KEY=good", "LINGER_MS=3000")
		wantSequence(t, events, "open", "connect_error", "exit")
		if e := find(events, "connect_error")[0]; e.Message != "Invalid namespace" {
			t.Errorf("connect_error %q, want Invalid namespace", e.Message)
		}
		wantNo(t, events, "connect", "reconnect_attempt", "deadline")
		eventually(t, "session closed", func() bool { return srv.Sessions() == 0 })
	})
}

// wantSequence checks that the events named appear in this order (other
// events may come between them).
func wantSequence(t *testing.T, events []clientEvent, names ...string) {
	t.Helper()
	i := 0
	for _, ev := range events {
		if i < len(names) && ev.Event == names[i] {
			i++
		}
	}
	if i < len(names) {
		t.Fatalf("events do not contain %q in order (missing from %q)", names, names[i])
	}
}

func wantNo(t *testing.T, events []clientEvent, names ...string) {
	t.Helper()
	for _, n := range names {
		if got := find(events, n); len(got) > 0 {
			t.Errorf("unexpected %q events: %+v", n, got)
		}
	}
}

func wantWelcome(t *testing.T, events []clientEvent) {
	t.Helper()
	var w fleet.Welcome
	if err := json.Unmarshal(find(events, "welcome")[0].Data, &w); err != nil || w.NodeID != "node_1" {
		t.Errorf("welcome data = %s", find(events, "welcome")[0].Data)
	}
}
