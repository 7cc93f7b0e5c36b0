package actors

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/persistence"
)

// pipeConn is an in-memory fleet.Conn: the test plays the agent.
type pipeConn struct {
	in     chan fleet.Frame
	out    chan fleet.Frame
	closed chan struct{}
	once   sync.Once
	mu     sync.Mutex
	code   int
}

func newPipeConn() *pipeConn {
	return &pipeConn{in: make(chan fleet.Frame, 16), out: make(chan fleet.Frame, 128), closed: make(chan struct{})}
}

func (p *pipeConn) ReadFrame() (fleet.Frame, error) {
	select {
	case f := <-p.in:
		return f, nil
	case <-p.closed:
		return fleet.Frame{}, io.EOF
	}
}

func (p *pipeConn) WriteFrame(f fleet.Frame) error {
	select {
	case p.out <- f:
		return nil
	case <-p.closed:
		return errors.New("closed")
	}
}

func (p *pipeConn) Close(code int, _ string) error {
	p.once.Do(func() {
		p.mu.Lock()
		p.code = code
		p.mu.Unlock()
		close(p.closed)
	})
	return nil
}

func (p *pipeConn) RemoteAddr() string { return "pipe" }

func (p *pipeConn) closeCode(t *testing.T) int {
	t.Helper()
	select {
	case <-p.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("connection not closed")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.code
}

type testFleet struct {
	*System
	store *persistence.Store
}

func newTestFleet(t *testing.T, cfg Config) *testFleet {
	t.Helper()
	store, err := persistence.Open(filepath.Join(t.TempDir(), "fleet.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	cfg.Nodes, cfg.Sessions, cfg.Rentals = store, store, store
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return &testFleet{System: s, store: store}
}

func (f *testFleet) node(t *testing.T, id string) (*fleet.Node, []byte) {
	t.Helper()
	key := fleet.NewAPIKey()
	now := time.Now()
	n := &fleet.Node{ID: id, OwnerID: "user_a", Name: id, Region: "r", PricePerHourCents: 1,
		Specs: fleet.Specs{CPUCores: 1, RAMGB: 1}, CreatedAt: now, UpdatedAt: now}
	if err := f.store.CreateNode(context.Background(), n, key.Hash); err != nil {
		t.Fatal(err)
	}
	return n, key.Hash
}

func (f *testFleet) connect(t *testing.T, n *fleet.Node, hash []byte) *pipeConn {
	t.Helper()
	c := newPipeConn()
	f.Connect(n, hash, c)
	select {
	case w := <-c.out:
		if w.Event != fleet.EventWelcome {
			t.Fatalf("first frame %+v", w)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no welcome")
	}
	return c
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A node actor that panics is stopped and its socket closed with 1011; the
// process and the other nodes carry on.
func TestNodeActorPanicIsContained(t *testing.T) {
	f := newTestFleet(t, Config{})
	n1, h1 := f.node(t, "node_a")
	n2, h2 := f.node(t, "node_b")
	c1, c2 := f.connect(t, n1, h1), f.connect(t, n2, h2)
	waitFor(t, "both online", func() bool { return len(f.Online()) == 2 })

	f.sys.Root.Send(f.sys.NewLocalPID("fleet/node_a"), panicNow{})
	if code := c1.closeCode(t); code != fleet.CloseInternalError {
		t.Fatalf("panicked actor closed its socket with %d, want 1011", code)
	}
	waitFor(t, "node_a offline", func() bool { return !f.Presence("node_a").Online })
	if !f.Presence("node_b").Online {
		t.Fatal("node_b went offline")
	}
	select {
	case <-c2.closed:
		t.Fatal("node_b's socket was closed")
	default:
	}
	// The agent reconnects and is served again.
	f.connect(t, n1, h1)
	waitFor(t, "node_a back", func() bool { return f.Presence("node_a").Online })
}

// A registry that panics restarts and rebuilds its view from the node actors.
func TestRegistryRestartRebuildsView(t *testing.T) {
	f := newTestFleet(t, Config{})
	for _, id := range []string{"node_a", "node_b", "node_c"} {
		n, h := f.node(t, id)
		f.connect(t, n, h)
	}
	waitFor(t, "three online", func() bool { return len(f.Online()) == 3 })
	f.sys.Root.Send(f.sys.NewLocalPID("fleet/registry"), panicNow{})
	// The view is cleared on restart and refilled by the node actors.
	waitFor(t, "view rebuilt", func() bool { return len(f.Online()) == 3 })
	if f.Connected() != 3 {
		t.Fatalf("%d node actors after the registry restart", f.Connected())
	}
}

// The deadline closes a silent connection with 4008 and records last seen
// as the last heartbeat, not the time of detection.
func TestDeadlineRecordsLastHeartbeat(t *testing.T) {
	f := newTestFleet(t, Config{HeartbeatDeadline: 200 * time.Millisecond, HeartbeatMinInterval: time.Millisecond})
	n, h := f.node(t, "node_a")
	c := f.connect(t, n, h)
	c.in <- fleet.Frame{Event: fleet.EventHeartbeat, Data: []byte(`{"cpu_percent":1}`)}
	waitFor(t, "heartbeat seen", func() bool {
		p := f.Presence("node_a")
		return p.Metrics != nil && p.Metrics.CPUPercent == 1
	})
	last := f.Presence("node_a").LastSeenAt
	if code := c.closeCode(t); code != fleet.CloseHeartbeatTimeout {
		t.Fatalf("closed with %d, want 4008", code)
	}
	waitFor(t, "offline", func() bool { return !f.Presence("node_a").Online })
	waitFor(t, "last seen stored", func() bool {
		stored, err := f.store.Node(context.Background(), "node_a")
		return err == nil && stored.LastSeenAt != nil && stored.LastSeenAt.Equal(last)
	})
	sessions, err := f.store.Sessions(context.Background(), "node_a", time.Time{})
	if err != nil || len(sessions) != 1 || sessions[0].Reason != "heartbeat timeout" || !sessions[0].EndedAt.Equal(last) {
		t.Fatalf("sessions %+v %v", sessions, err)
	}
}

// Shutdown closes every connection with 1001 and records the sessions.
func TestShutdownSaysGoingAway(t *testing.T) {
	f := newTestFleet(t, Config{})
	n, h := f.node(t, "node_a")
	c := f.connect(t, n, h)
	waitFor(t, "online", func() bool { return f.Presence("node_a").Online })
	if err := f.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code := c.closeCode(t); code != fleet.CloseGoingAway {
		t.Fatalf("closed with %d, want 1001", code)
	}
	sessions, _ := f.store.Sessions(context.Background(), "node_a", time.Time{})
	if len(sessions) != 1 || sessions[0].EndedAt.IsZero() {
		t.Fatalf("session not closed: %+v", sessions)
	}
}
