package http_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/actors"
)

func fleetEnv(t *testing.T, ac actors.Config) *testEnv {
	return newTestEnv(t, func(c *envConfig) { c.actors = &ac })
}

func (e *testEnv) wsURL() string { return "ws" + strings.TrimPrefix(e.srv.URL, "http") + "/fleet" }

// agent is a bare native client, driven frame by frame.
type agent struct {
	t  *testing.T
	ws *websocket.Conn
}

func (e *testEnv) dial(t *testing.T, key string) *agent {
	t.Helper()
	ws, res, err := websocket.DefaultDialer.Dial(e.wsURL(), http.Header{"Authorization": {"Bearer " + key}})
	if err != nil {
		t.Fatalf("dial: %v (%v)", err, res)
	}
	t.Cleanup(func() { ws.Close() })
	a := &agent{t: t, ws: ws}
	if f := a.read(); f.Event != fleet.EventWelcome {
		t.Fatalf("first frame %+v, want welcome", f)
	}
	return a
}

func (a *agent) read() fleet.Frame {
	a.t.Helper()
	_ = a.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	var f fleet.Frame
	if err := a.ws.ReadJSON(&f); err != nil {
		a.t.Fatalf("read: %v", err)
	}
	return f
}

func (a *agent) heartbeat(ack uint64) {
	a.t.Helper()
	f := map[string]any{"event": "heartbeat", "data": map[string]any{"cpu_percent": 12.5, "memory_used_bytes": 1, "memory_total_bytes": 2}}
	if ack > 0 {
		f["ack"] = ack
	}
	if err := a.ws.WriteJSON(f); err != nil {
		a.t.Fatalf("write: %v", err)
	}
}

// closedWith reads until the server closes, and returns the close code.
func (a *agent) closedWith() int {
	a.t.Helper()
	_ = a.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		_, _, err := a.ws.ReadMessage()
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if errors.As(err, &ce) {
			return ce.Code
		}
		a.t.Fatalf("connection ended without a close frame: %v", err)
	}
}

func (e *testEnv) status(t *testing.T, id string) string {
	t.Helper()
	var n nodeJSON
	e.do(t, "GET", "/api/marketplace/nodes/"+id, "", nil).want(t, 200).data(t, &n)
	return n.Status
}

func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestHandshakeRefusals(t *testing.T) {
	env := fleetEnv(t, actors.Config{})
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	revoked := env.register(t, "user_alice", validNode("rig2", 100, "A100", 1))
	env.do(t, "DELETE", "/api/marketplace/nodes/"+revoked.Node.ID+"/api-key", env.as(t, "user_alice"), nil).want(t, 200)
	good := env.dial(t, k.APIKey) // a healthy agent that must keep being served

	bad := []byte(k.APIKey)
	bad[10] ^= 1
	cases := map[string]http.Header{
		"no header":    {},
		"wrong scheme": {"Authorization": {"Basic " + k.APIKey}},
		"bad checksum": {"Authorization": {"Bearer " + string(bad)}},
		"not a key":    {"Authorization": {"Bearer hak_short"}},
		"unknown":      {"Authorization": {"Bearer " + fleet.NewAPIKey().Raw}},
		"revoked":      {"Authorization": {"Bearer " + revoked.APIKey}},
	}
	for name, h := range cases {
		t.Run(name, func(t *testing.T) {
			ws, res, err := websocket.DefaultDialer.Dial(env.wsURL(), h)
			if err == nil {
				ws.Close()
				t.Fatal("upgraded")
			}
			if res == nil || res.StatusCode != 401 {
				t.Fatalf("want 401, got %v %v", res, err)
			}
		})
	}
	good.heartbeat(1)
	if f := good.read(); f.Event != fleet.EventAck {
		t.Fatalf("healthy agent got %+v", f)
	}
}

func TestHeartbeatAckAndOnline(t *testing.T) {
	env := fleetEnv(t, actors.Config{HeartbeatMinInterval: 10 * time.Millisecond})
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	a := env.dial(t, k.APIKey)
	eventually(t, time.Second, "online", func() bool { return env.status(t, k.Node.ID) == "online" })
	a.heartbeat(7)
	f := a.read()
	var ack fleet.HeartbeatAck
	if f.Event != fleet.EventAck || f.Ack == nil || *f.Ack != 7 || json.Unmarshal(f.Data, &ack) != nil || !ack.Accepted {
		t.Fatalf("ack frame %+v", f)
	}
	var n struct {
		Metrics *fleet.Metrics `json:"metrics"`
	}
	eventually(t, time.Second, "metrics", func() bool {
		env.do(t, "GET", "/api/marketplace/nodes/"+k.Node.ID, "", nil).want(t, 200).data(t, &n)
		return n.Metrics != nil && n.Metrics.CPUPercent == 12.5
	})
	var stats map[string]any
	env.do(t, "GET", "/api/marketplace/stats", "", nil).want(t, 200).data(t, &stats)
	if stats["online_nodes"].(float64) != 1 || stats["online_gpus"].(float64) != 1 {
		t.Fatalf("stats %v", stats)
	}
}

func TestFrameAbuseClosesWith1008(t *testing.T) {
	env := fleetEnv(t, actors.Config{HeartbeatMinInterval: 200 * time.Millisecond})
	bystander := env.register(t, "user_alice", validNode("by", 100, "A100", 1))
	by := env.dial(t, bystander.APIKey)
	abuse := map[string]func(a *agent){
		"oversized": func(a *agent) {
			_ = a.ws.WriteMessage(websocket.TextMessage, []byte(`{"event":"heartbeat","data":"`+strings.Repeat("x", 70<<10)+`"}`))
		},
		"malformed json": func(a *agent) { _ = a.ws.WriteMessage(websocket.TextMessage, []byte(`{"event":`)) },
		"binary":         func(a *agent) { _ = a.ws.WriteMessage(websocket.BinaryMessage, []byte{1, 2, 3}) },
		"unknown event":  func(a *agent) { _ = a.ws.WriteJSON(map[string]any{"event": "rm -rf"}) },
		"bad metrics": func(a *agent) {
			_ = a.ws.WriteJSON(map[string]any{"event": "heartbeat", "data": map[string]any{"cpu_percent": 900}})
		},
		"flooding": func(a *agent) {
			_ = a.ws.WriteJSON(map[string]any{"event": "heartbeat", "data": map[string]any{"cpu_percent": 1}})
		},
	}
	for name, send := range abuse {
		t.Run(name, func(t *testing.T) {
			k := env.register(t, "user_alice", validNode(name, 100, "A100", 1))
			a := env.dial(t, k.APIKey)
			done := make(chan int, 1)
			go func() { done <- a.closedWith() }()
			var code int
		loop:
			for i := 0; i < 100; i++ {
				select {
				case code = <-done:
					break loop
				default:
					send(a)
				}
			}
			if code == 0 {
				code = <-done
			}
			if code != fleet.ClosePolicyViolation {
				t.Fatalf("closed with %d, want 1008", code)
			}
			eventually(t, 2*time.Second, "abuser offline", func() bool { return env.status(t, k.Node.ID) == "offline" })
		})
	}
	by.heartbeat(3)
	if f := by.read(); f.Event != fleet.EventAck {
		t.Fatalf("bystander got %+v", f)
	}
	if env.status(t, bystander.Node.ID) != "online" {
		t.Fatal("bystander went offline")
	}
}

func TestSecondConnectionReplacesFirst(t *testing.T) {
	env := fleetEnv(t, actors.Config{})
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	first := env.dial(t, k.APIKey)
	second := env.dial(t, k.APIKey)
	if code := first.closedWith(); code != fleet.CloseReplaced {
		t.Fatalf("first closed with %d, want 4009", code)
	}
	second.heartbeat(1)
	if f := second.read(); f.Event != fleet.EventAck {
		t.Fatalf("second got %+v", f)
	}
	if env.status(t, k.Node.ID) != "online" {
		t.Fatal("node offline after replacement")
	}
}

func TestHeartbeatTimeoutAndKeyChanges(t *testing.T) {
	env := fleetEnv(t, actors.Config{HeartbeatDeadline: 300 * time.Millisecond, HeartbeatMinInterval: 10 * time.Millisecond})
	alice := env.as(t, "user_alice")
	k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
	a := env.dial(t, k.APIKey)
	if code := a.closedWith(); code != fleet.CloseHeartbeatTimeout {
		t.Fatalf("silent agent closed with %d, want 4008", code)
	}
	eventually(t, time.Second, "offline", func() bool { return env.status(t, k.Node.ID) == "offline" })

	for _, change := range []struct{ method, path string }{
		{"POST", "/api-key"}, {"DELETE", "/api-key"}, {"DELETE", ""},
	} {
		t.Run(change.method+change.path, func(t *testing.T) {
			k := env.register(t, "user_alice", validNode("rig", 100, "A100", 1))
			a := env.dial(t, k.APIKey)
			done := make(chan int, 1)
			go func() { done <- a.closedWith() }()
			env.do(t, change.method, "/api/marketplace/nodes/"+k.Node.ID+change.path, alice, nil).want(t, 200)
			if code := <-done; code != fleet.CloseKeyRevoked {
				t.Fatalf("closed with %d, want 4001", code)
			}
		})
	}
}

// A reconnect storm: many agents at once all come online.
func TestThousandAgentsConnectAtOnce(t *testing.T) {
	const n = 1000
	env := fleetEnv(t, actors.Config{HeartbeatDeadline: time.Minute})
	keys := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := fleet.NewAPIKey()
			now := time.Now()
			node := &fleet.Node{ID: fmt.Sprintf("node_storm%04d", i), OwnerID: "user_storm", Name: "storm", Region: "us-east-1",
				PricePerHourCents: 100, Specs: fleet.Specs{CPUCores: 1, RAMGB: 1}, APIKeyPrefix: key.Prefix, CreatedAt: now, UpdatedAt: now}
			if err := env.store.CreateNode(t.Context(), node, key.Hash); err != nil {
				errs <- err
			}
			keys[i] = key.Raw
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	dialer := websocket.Dialer{HandshakeTimeout: 30 * time.Second}
	conns := make(chan *websocket.Conn, n)
	errc := make(chan error, n)
	for _, key := range keys {
		go func() {
			ws, _, err := dialer.Dial(env.wsURL(), http.Header{"Authorization": {"Bearer " + key}})
			if err != nil {
				errc <- err
				return
			}
			conns <- ws
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case ws := <-conns:
			defer ws.Close()
		case err := <-errc:
			t.Fatalf("dial: %v", err)
		}
	}
	eventually(t, 30*time.Second, "all agents online", func() bool { return len(env.fleet.Online()) == n })
	var stats map[string]any
	env.do(t, "GET", "/api/marketplace/stats", "", nil).want(t, 200).data(t, &stats)
	if stats["online_nodes"].(float64) != n {
		t.Fatalf("stats: %v", stats["online_nodes"])
	}
}
