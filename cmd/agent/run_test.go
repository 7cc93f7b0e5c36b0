package main

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/gorilla/websocket"
)

// waitLimit is how long a test waits for something that should happen
// at once; reaching it means the test failed, not that it was slow.
const waitLimit = 15 * time.Second

func TestBackoffBounds(t *testing.T) {
	for _, b := range []backoff{
		{Min: time.Second, Max: 30 * time.Second},
		{Min: 5 * time.Millisecond, Max: 20 * time.Millisecond},
		{Min: time.Second, Max: time.Second},
	} {
		for n := range 100 {
			ceil := b.Min << min(n+1, 40)
			if ceil > b.Max || ceil <= 0 {
				ceil = b.Max
			}
			for range 200 {
				d := b.delay(n)
				if d < b.Min || d > ceil {
					t.Fatalf("%+v: delay(%d) = %v, want within [%v, %v]", b, n, d, b.Min, ceil)
				}
			}
		}
	}
	// The jitter spreads the delays: 200 draws are not all the same.
	b := backoff{Min: time.Second, Max: 30 * time.Second}
	seen := map[time.Duration]bool{}
	for range 200 {
		seen[b.delay(10)] = true
	}
	if len(seen) < 2 {
		t.Errorf("delay(10) drew %d distinct values in 200 draws", len(seen))
	}
}

func TestHeartbeatInterval(t *testing.T) {
	w := func(deadline, minIv int64) fleet.Welcome {
		return fleet.Welcome{HeartbeatDeadlineMS: deadline, HeartbeatMinIntervalMS: minIv}
	}
	for _, tt := range []struct {
		name       string
		configured time.Duration
		welcome    fleet.Welcome
		want       time.Duration
		warn       bool
	}{
		{"default fits", 2 * time.Second, w(5000, 1000), 2 * time.Second, false},
		{"no limits sent", 2 * time.Second, w(0, 0), 2 * time.Second, false},
		{"equal to deadline", 5 * time.Second, w(5000, 1000), 2 * time.Second, true},
		{"above deadline", 10 * time.Second, w(3000, 500), 1200 * time.Millisecond, true},
		{"deadline/2.5 below minimum", 10 * time.Second, w(3000, 1500), 1500 * time.Millisecond, true},
		{"below minimum", 500 * time.Millisecond, w(5000, 1000), time.Second, true},
		{"at minimum", time.Second, w(5000, 1000), time.Second, false},
		{"server minimum not below deadline", 10 * time.Second, w(1000, 2000), 2 * time.Second, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, warn := heartbeatInterval(tt.configured, tt.welcome)
			if got != tt.want || (warn != "") != tt.warn {
				t.Errorf("heartbeatInterval = %v, %q; want %v, warning %v", got, warn, tt.want, tt.warn)
			}
		})
	}
}

// fakeServer is a coordinator's /fleet endpoint driven by the test.
type fakeServer struct {
	*httptest.Server
	conns chan *peer
}

// peer is the server side of one agent connection. Only the test goroutine
// writes data frames; a goroutine reads frames into a channel.
type peer struct {
	t      *testing.T
	conn   *websocket.Conn
	frames chan fleet.Frame
	closed chan error // the read error that ended the connection
}

func newFakeServer(t *testing.T, key string, tlsServer bool) *fakeServer {
	fs := &fakeServer{conns: make(chan *peer, 16)}
	var up websocket.Upgrader
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+key {
			http.Error(w, `{"success":false}`, http.StatusUnauthorized)
			return
		}
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		p := &peer{t: t, conn: c, frames: make(chan fleet.Frame, 4096), closed: make(chan error, 1)}
		go func() {
			for {
				var f fleet.Frame
				if err := c.ReadJSON(&f); err != nil {
					p.closed <- err
					return
				}
				select {
				case p.frames <- f:
				default: // the test stopped looking at frames
				}
			}
		}()
		fs.conns <- p
	})
	if tlsServer {
		fs.Server = httptest.NewTLSServer(h)
	} else {
		fs.Server = httptest.NewServer(h)
	}
	t.Cleanup(fs.Close)
	return fs
}

func (fs *fakeServer) wsURL() string { return "ws" + strings.TrimPrefix(fs.URL, "http") + "/fleet" }

func (fs *fakeServer) accept(t *testing.T) *peer {
	t.Helper()
	select {
	case p := <-fs.conns:
		t.Cleanup(func() { p.conn.Close() })
		return p
	case <-time.After(waitLimit):
		t.Fatal("agent did not connect")
		return nil
	}
}

func (p *peer) send(event string, data any, ack *uint64) {
	p.t.Helper()
	raw, err := json.Marshal(data)
	if err != nil {
		p.t.Fatal(err)
	}
	p.conn.SetWriteDeadline(time.Now().Add(waitLimit))
	if err := p.conn.WriteJSON(fleet.Frame{Event: event, Data: raw, Ack: ack}); err != nil {
		p.t.Fatalf("send %s: %v", event, err)
	}
}

func (p *peer) welcome() {
	p.t.Helper()
	p.send(fleet.EventWelcome, fleet.Welcome{
		NodeID: "node_1", Name: "test node",
		HeartbeatDeadlineMS: 5000, HeartbeatMinIntervalMS: 10,
		ServerTime: time.Now().UTC(),
	}, nil)
}

// heartbeat waits for the next heartbeat, checks it and acknowledges it.
func (p *peer) heartbeat() fleet.Metrics {
	p.t.Helper()
	for {
		select {
		case f := <-p.frames:
			if f.Event != fleet.EventHeartbeat {
				p.t.Fatalf("agent sent %q, want only heartbeats", f.Event)
			}
			var m fleet.Metrics
			if err := json.Unmarshal(f.Data, &m); err != nil {
				p.t.Fatalf("heartbeat data %s: %v", f.Data, err)
			}
			if err := m.Validate(); err != nil {
				p.t.Fatalf("heartbeat metrics %s: %v", f.Data, err)
			}
			if f.Ack == nil {
				p.t.Fatal("heartbeat asks for no ack")
			}
			p.send(fleet.EventAck, fleet.HeartbeatAck{ReceivedAt: time.Now().UTC(), Accepted: true}, f.Ack)
			return m
		case err := <-p.closed:
			p.t.Fatalf("connection closed while waiting for a heartbeat: %v", err)
		case <-time.After(waitLimit):
			p.t.Fatal("no heartbeat")
		}
	}
}

func (p *peer) closeWith(code int) {
	p.t.Helper()
	msg := websocket.FormatCloseMessage(code, fleet.CloseReason(code))
	if err := p.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(waitLimit)); err != nil {
		p.t.Fatalf("close %d: %v", code, err)
	}
}

// waitClosed returns the error that ended the connection on the server side.
func (p *peer) waitClosed() error {
	p.t.Helper()
	select {
	case err := <-p.closed:
		return err
	case <-time.After(waitLimit):
		p.t.Fatal("connection not closed")
		return nil
	}
}

func testConfig(t *testing.T, key string, urls ...string) config {
	return config{
		APIKey:            key,
		URLs:              urls,
		HeartbeatInterval: 20 * time.Millisecond,
		LogLevel:          slog.LevelDebug,
		BackoffMin:        time.Millisecond,
		BackoffMax:        10 * time.Millisecond,
		StableAfter:       time.Hour,
		HookTimeout:       waitLimit,
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startRun runs the agent and returns the channel its result arrives on.
func startRun(t *testing.T, ctx context.Context, cfg config) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, cfg, testLogger(t)) }()
	return errc
}

func waitRun(t *testing.T, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(waitLimit):
		t.Fatal("run did not return")
		return nil
	}
}

// eventually polls cond until it holds, failing the test after waitLimit.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	limit := time.After(waitLimit)
	for !cond() {
		select {
		case <-tick.C:
		case <-limit:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestRunSession(t *testing.T) {
	key := fleet.NewAPIKey().Raw
	t.Setenv("HOST_API_KEY", key) // must not reach the hook
	srv := newFakeServer(t, key, false)

	dir := t.TempDir()
	out := filepath.Join(dir, "event.json")
	script := fmt.Sprintf("#!/bin/sh\nset -e\ncat > '%[1]s.tmp'\nenv > '%[2]s'\nmv '%[1]s.tmp' '%[1]s'\n", out, filepath.Join(dir, "env.txt"))
	hook := filepath.Join(dir, "hook.sh")
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, key, srv.wsURL())
	cfg.RentalHook = hook

	errc := startRun(t, t.Context(), cfg)

	p := srv.accept(t)
	p.welcome()
	p.heartbeat()
	p.heartbeat()

	// A malformed frame is ignored, not fatal.
	if err := p.conn.WriteMessage(websocket.TextMessage, []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	p.heartbeat()

	maxHours := 1.5
	started := fleet.RentalStartedEvent{RentalID: "rental_1", RenterID: "user_2", StartedAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC), MaxHours: &maxHours}
	p.send(fleet.EventRentalStarted, started, nil)
	eventually(t, "the rental hook's output", func() bool {
		_, err := os.Stat(out)
		return err == nil
	})
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Event string                   `json:"event"`
		Data  fleet.RentalStartedEvent `json:"data"`
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatalf("hook stdin %q: %v", raw, err)
	}
	if got.Event != fleet.EventRentalStarted || got.Data.RentalID != "rental_1" || got.Data.RenterID != "user_2" ||
		!got.Data.StartedAt.Equal(started.StartedAt) || got.Data.MaxHours == nil || *got.Data.MaxHours != 1.5 {
		t.Errorf("hook stdin = %s", raw)
	}
	env, err := os.ReadFile(filepath.Join(dir, "env.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(env), key) {
		t.Error("the hook's environment holds the host API key")
	}
	if !strings.Contains(string(env), "FLEET_EVENT=rental.started") {
		t.Error("the hook's environment lacks FLEET_EVENT")
	}
	p.heartbeat() // heartbeats go on while and after the hook runs

	// A heartbeat timeout is followed by a reconnect.
	p.closeWith(fleet.CloseHeartbeatTimeout)
	p.waitClosed()
	p2 := srv.accept(t)
	p2.welcome()
	p2.heartbeat()

	// So is a replacement, with a warning.
	p2.closeWith(fleet.CloseReplaced)
	p3 := srv.accept(t)
	p3.welcome()
	p3.heartbeat()

	// A revoked key ends the run.
	p3.closeWith(fleet.CloseKeyRevoked)
	if err := waitRun(t, errc); !errors.Is(err, errKeyRevoked) {
		t.Fatalf("run = %v, want errKeyRevoked", err)
	}
}

func TestRunRefused(t *testing.T) {
	srv := newFakeServer(t, fleet.NewAPIKey().Raw, false)
	errc := startRun(t, t.Context(), testConfig(t, fleet.NewAPIKey().Raw, srv.wsURL()))
	if err := waitRun(t, errc); !errors.Is(err, errKeyRefused) {
		t.Fatalf("run = %v, want errKeyRefused", err)
	}
}

func TestRunShutdown(t *testing.T) {
	key := fleet.NewAPIKey().Raw
	srv := newFakeServer(t, key, false)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := startRun(t, ctx, testConfig(t, key, srv.wsURL()))
	p := srv.accept(t)
	p.welcome()
	p.heartbeat()

	cancel()
	var ce *websocket.CloseError
	if err := p.waitClosed(); !errors.As(err, &ce) || ce.Code != websocket.CloseNormalClosure {
		t.Errorf("server saw %v, want a normal closure", err)
	}
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("run = %v, want nil", err)
	}
}

func TestRunTriesURLsInTurn(t *testing.T) {
	key := fleet.NewAPIKey().Raw
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := "ws" + strings.TrimPrefix(dead.URL, "http") + "/fleet"
	dead.Close()
	srv := newFakeServer(t, key, false)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := startRun(t, ctx, testConfig(t, key, deadURL, srv.wsURL()))
	p := srv.accept(t)
	p.welcome()
	p.heartbeat()
	cancel()
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("run = %v, want nil", err)
	}
}

func TestRunTLS(t *testing.T) {
	key := fleet.NewAPIKey().Raw
	srv := newFakeServer(t, key, true)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(ca, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"HOST_API_KEY": key, "BACKEND_WS_URL": srv.wsURL(), "TLS_CA_FILE": ca}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(cfg.URLs[0], "wss://") {
		t.Fatalf("URL = %q", cfg.URLs[0])
	}
	cfg.HeartbeatInterval = 20 * time.Millisecond

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := startRun(t, ctx, cfg)
	p := srv.accept(t)
	p.welcome()
	p.heartbeat()
	cancel()
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("run = %v, want nil", err)
	}
}
