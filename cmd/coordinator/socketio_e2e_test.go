package main_test

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const nodeFixture = "../../test/socketio"

// sioClient is the real npm socket.io-client, run by test/socketio/client.mjs,
// printing one JSON line per thing that happens.
type sioClient struct {
	t      *testing.T
	cmd    *exec.Cmd
	mu     sync.Mutex
	events []map[string]any
	done   chan struct{}
}

func needNode(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node is not installed: the Socket.IO interop tests need Node.js")
	}
	if _, err := os.Stat(filepath.Join(nodeFixture, "node_modules", "socket.io-client")); err != nil {
		t.Skip("socket.io-client is not installed: run `npm ci` in test/socketio (make test does)")
	}
}

func startSIO(t *testing.T, c *coordinator, key string, env ...string) *sioClient {
	t.Helper()
	needNode(t)
	s := &sioClient{t: t, done: make(chan struct{})}
	// The URL of the auth guide's snippet: the namespace is the path.
	s.cmd = exec.Command("node", "client.mjs", c.url+"/fleet")
	s.cmd.Dir = nodeFixture
	s.cmd.Env = append(os.Environ(), "HOST_API_KEY="+key, "DEADLINE_MS=120000")
	s.cmd.Env = append(s.cmd.Env, env...)
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(s.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev map[string]any
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				s.mu.Lock()
				s.events = append(s.events, ev)
				s.mu.Unlock()
			}
		}
		_ = s.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		<-s.done
		if t.Failed() {
			t.Logf("socket.io-client events: %v", s.all())
		}
	})
	return s
}

func (s *sioClient) all() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]map[string]any(nil), s.events...)
}

func (s *sioClient) count(event string) int {
	n := 0
	for _, ev := range s.all() {
		if ev["event"] == event {
			n++
		}
	}
	return n
}

func (s *sioClient) first(event string) map[string]any {
	for _, ev := range s.all() {
		if ev["event"] == event {
			return ev
		}
	}
	return nil
}

func registerNode(t *testing.T, c *coordinator) registered {
	t.Helper()
	var reg registered
	if code := c.call("POST", "/api/marketplace/nodes", c.token("user_host"), rigBody, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	return reg
}

// The auth guide's snippet, unmodified, against the coordinator: it
// connects, upgrades to websocket, gets the welcome, heartbeats with and
// without acks, shows online, and shows offline within the deadline once
// the client is gone.
func TestSocketIOGuideSnippet(t *testing.T) {
	needNode(t)
	const deadline = 2 * time.Second
	c := startCoordinator(t, t.TempDir(), "HEARTBEAT_DEADLINE=2s", "HEARTBEAT_MIN_INTERVAL=100ms")
	reg := registerNode(t, c)
	s := startSIO(t, c, reg.APIKey, "KEEP_ALIVE_MS=300")
	eventually(t, 15*time.Second, "welcome, upgrade and acks", func() bool {
		return s.first("welcome") != nil && s.first("upgrade") != nil && s.count("ack") >= 2 && s.count("sent") >= 2
	})
	if w := s.first("welcome")["data"].(map[string]any); w["node_id"] != reg.Node.ID || w["heartbeat_deadline_ms"].(float64) != 2000 {
		t.Fatalf("welcome %v", w)
	}
	if s.first("upgrade")["transport"] != "websocket" || s.first("open")["transport"] != "polling" {
		t.Fatalf("did not start on polling and upgrade to websocket: %v", s.all())
	}
	eventually(t, 2*time.Second, "online", func() bool { return c.node(reg.Node.ID).Status == "online" })
	eventually(t, 5*time.Second, "metrics from socket.io heartbeats", func() bool {
		n := c.node(reg.Node.ID)
		return n.Metrics != nil && n.Metrics.MemoryTotalBytes == 4096
	})
	// Rental events reach a Socket.IO agent too.
	var r rentalState
	if code := c.call("POST", "/api/billing/rentals", c.token("user_renter"), map[string]any{"node_id": reg.Node.ID}, &r); code != 201 {
		t.Fatalf("rent: %d", code)
	}
	eventually(t, 5*time.Second, "rental.started over socket.io", func() bool {
		ev := s.first("rental.started")
		return ev != nil && ev["data"].(map[string]any)["rental_id"] == r.ID
	})
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	killed := time.Now()
	<-s.done
	eventually(t, time.Until(killed.Add(deadline+250*time.Millisecond)), "offline within deadline + 250ms", func() bool {
		return c.node(reg.Node.ID).Status == "offline"
	})
}

// A bad key: connect, then disconnect("io server disconnect"), never
// connect_error, and no reconnection attempt within 5 s.
func TestSocketIOBadKey(t *testing.T) {
	needNode(t)
	c := startCoordinator(t, t.TempDir())
	reg := registerNode(t, c)
	for name, key := range map[string]string{
		"unknown key": "hak_" + strings.Repeat("A", 38),
		"garbage":     "not-a-key",
		"rotated":     reg.APIKey,
	} {
		t.Run(name, func(t *testing.T) {
			if name == "rotated" {
				if code := c.call("POST", "/api/marketplace/nodes/"+reg.Node.ID+"/api-key", c.token("user_host"), nil, nil); code != 200 {
					t.Fatalf("rotate: %d", code)
				}
			}
			s := startSIO(t, c, key, "LINGER_MS=5000")
			select {
			case <-s.done:
			case <-time.After(30 * time.Second):
				t.Fatal("client did not finish")
			}
			var seq []string
			for _, ev := range s.all() {
				seq = append(seq, ev["event"].(string))
			}
			d := s.first("disconnect")
			if s.first("connect") == nil || d == nil || d["reason"] != "io server disconnect" ||
				s.count("connect_error") != 0 || s.count("reconnect_attempt") != 0 || s.first("welcome") != nil || s.first("exit") == nil {
				t.Fatalf("events %v", seq)
			}
		})
	}
}

// Clients limited to one transport both work.
func TestSocketIOSingleTransports(t *testing.T) {
	needNode(t)
	c := startCoordinator(t, t.TempDir(), "HEARTBEAT_MIN_INTERVAL=100ms")
	for _, tr := range []string{"websocket", "polling"} {
		t.Run(tr, func(t *testing.T) {
			reg := registerNode(t, c)
			s := startSIO(t, c, reg.APIKey, "TRANSPORTS="+tr, "KEEP_ALIVE_MS=300")
			eventually(t, 15*time.Second, "welcome and acks", func() bool { return s.first("welcome") != nil && s.count("ack") >= 2 })
			if s.first("upgrade") != nil || s.first("ack")["transport"] != tr {
				t.Fatalf("transport: %v", s.all())
			}
			eventually(t, 2*time.Second, "online", func() bool { return c.node(reg.Node.ID).Status == "online" })
		})
	}
}
