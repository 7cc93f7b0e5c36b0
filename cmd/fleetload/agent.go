package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/distributedcompute/fleet"
)

// Limits of one simulated agent's connection.
const (
	handshakeTimeout = 30 * time.Second // generous: a connect storm queues handshakes
	welcomeWait      = 30 * time.Second
	writeWait        = 10 * time.Second
	// ackDrainWait bounds the wait for the ack of the last heartbeat when an
	// agent is stopped, so that its last heartbeat is known.
	ackDrainWait = 2 * time.Second
)

// How a sample agent is stopped at the end of a run.
const (
	// stopClose drops the TCP connection without a WebSocket close frame,
	// as a crashed agent's kernel does: the coordinator reads EOF at once.
	stopClose = "close"
	// stopSilent stops heartbeating but keeps the connection open, as a
	// hung agent or a partitioned network does: only the heartbeat
	// deadline can find it.
	stopSilent = "silent"
)

// wsWriteBuffers is shared by all agents of a process: a heartbeat needs a
// write buffer only while it is written.
var wsWriteBuffers sync.Pool

// nodeKey is a registered node and its host API key.
type nodeKey struct {
	NodeID string `json:"node_id"`
	Key    string `json:"key"`
	Home   int    `json:"home,omitempty"` // the cluster member (index) it connects to first
}

// recorder gathers what all agents of one process measure. Acks are counted
// and timed only while a measurement window is open.
type recorder struct {
	measuring atomic.Bool

	mu       sync.Mutex
	hist     *histogram // send -> ack received
	inbound  *histogram // send -> the coordinator's received_at (one clock only on one host)
	acked    uint64     // heartbeats acked in the window
	rejected uint64     // acked with accepted=false in the window

	// members is, against a cluster, what the window saw of each member
	// (by index); nil against one coordinator.
	members []memberRec

	sent atomic.Uint64 // heartbeats sent, all the time
}

// memberRec is what one cluster member's agents measured in the window.
type memberRec struct {
	hist     *histogram // send -> ack received
	acked    uint64
	bytesIn  uint64 // WebSocket payload the agents read from the member
	bytesOut uint64 // WebSocket payload the agents wrote to it
}

// newRecorder makes a recorder; members > 1 keeps figures per member too.
func newRecorder(members int) *recorder {
	r := &recorder{hist: newHistogram(), inbound: newHistogram()}
	if members > 1 {
		r.members = make([]memberRec, members)
		for i := range r.members {
			r.members[i].hist = newHistogram()
		}
	}
	return r
}

// ack records the ack of a heartbeat sent to member (an index of the
// cluster's members; ignored against one coordinator), size bytes long.
func (r *recorder) ack(latency, inbound time.Duration, accepted bool, member, size int) {
	if !r.measuring.Load() {
		return
	}
	r.mu.Lock()
	r.hist.record(latency)
	r.inbound.record(inbound)
	r.acked++
	if !accepted {
		r.rejected++
	}
	if member < len(r.members) {
		m := &r.members[member]
		m.hist.record(latency)
		m.acked++
		m.bytesIn += uint64(size)
	}
	r.mu.Unlock()
}

// wrote records a frame of size bytes written to member, in a cluster.
func (r *recorder) wrote(member, size int) {
	if !r.measuring.Load() || member >= len(r.members) {
		return
	}
	r.mu.Lock()
	r.members[member].bytesOut += uint64(size)
	r.mu.Unlock()
}

// open starts a measurement window, forgetting earlier acks.
func (r *recorder) open() {
	r.mu.Lock()
	r.hist, r.inbound, r.acked, r.rejected = newHistogram(), newHistogram(), 0, 0
	for i := range r.members {
		r.members[i] = memberRec{hist: newHistogram()}
	}
	r.mu.Unlock()
	r.measuring.Store(true)
}

// close ends the window and returns what it measured.
func (r *recorder) close() windowResult {
	r.measuring.Store(false)
	r.mu.Lock()
	defer r.mu.Unlock()
	w := windowResult{Hist: r.hist.wire(), Inbound: r.inbound.wire(), Acked: r.acked, Rejected: r.rejected}
	for _, m := range r.members {
		w.Members = append(w.Members, memberWindow{Hist: m.hist.wire(), Acked: m.acked, BytesIn: m.bytesIn, BytesOut: m.bytesOut})
	}
	return w
}

// agent is one simulated host agent: a native /fleet WebSocket that reads
// the welcome, then heartbeats every interval (after a random initial
// phase, so that a fleet's heartbeats spread out) with small, valid metrics,
// asking for an ack of each.
//
// Against a cluster (reconnect set) it behaves as the real agent given a
// list of members: when its connection ends while it is meant to be
// running, it waits a random backoff and dials the next member in turn,
// then heartbeats at once after the welcome.
type agent struct {
	nodeKey
	rec       *recorder
	dialer    *websocket.Dialer
	urls      []string // the members' /fleet URLs; one against a single coordinator
	reconnect bool
	interval  time.Duration
	metrics   fleet.Metrics

	quit chan struct{} // closed to stop heartbeating
	done chan struct{} // closed when the connection loop has returned

	mu          sync.Mutex
	ws          *websocket.Conn // the current (or last) connection
	welcome     fleet.Welcome
	member      int           // index in urls of the current connection
	up          bool          // connected now
	connectedAt time.Time     // when the current connection's welcome came
	beating     chan struct{} // closed when the current connection's heartbeat loop has returned
	seq         uint64
	pending     map[uint64]time.Time // heartbeats awaiting their ack, by ack number
	lastSent    time.Time
	stopping    bool // stopped on purpose: a disconnect is expected
	// closeCode is how the first connection ended, when not on purpose: the
	// server's close code, or -1 for a connection lost without one.
	closeCode int
	closedAt  time.Time
	// Reconnecting agents only: every end of a connection, and the
	// reconnections.
	ends          []connEnd
	reconnects    int
	reconnectedAt time.Time // the last reconnection's welcome
}

// connEnd is one connection of a reconnecting agent ending.
type connEnd struct {
	At       time.Time
	Code     int  // the server's close code, -1 for none
	Member   int  // the member the connection was to
	Stopping bool // the agent was being stopped on purpose
}

func newAgent(k nodeKey, rec *recorder, d *websocket.Dialer, urls []string, reconnect bool, interval time.Duration) *agent {
	closed := make(chan struct{})
	close(closed)
	return &agent{nodeKey: k, rec: rec, dialer: d, urls: urls, reconnect: reconnect, interval: interval,
		pending: make(map[uint64]time.Time), beating: closed, metrics: sampleMetrics(),
		quit: make(chan struct{}), done: make(chan struct{})}
}

// dialWS opens a connection for key k and reads its welcome.
func dialWS(d *websocket.Dialer, wsURL string, k nodeKey) (*websocket.Conn, fleet.Welcome, error) {
	var w fleet.Welcome
	h := http.Header{"Authorization": {"Bearer " + k.Key}}
	ws, resp, err := d.Dial(wsURL, h)
	if err != nil {
		if resp != nil {
			return nil, w, fmt.Errorf("dial: %w (HTTP %d)", err, resp.StatusCode)
		}
		return nil, w, fmt.Errorf("dial: %w", err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(welcomeWait))
	var f fleet.Frame
	if err := ws.ReadJSON(&f); err != nil {
		ws.Close()
		return nil, w, fmt.Errorf("read welcome: %w", err)
	}
	if f.Event != fleet.EventWelcome || json.Unmarshal(f.Data, &w) != nil {
		ws.Close()
		return nil, w, fmt.Errorf("first frame is %q, not a welcome", f.Event)
	}
	_ = ws.SetReadDeadline(time.Time{})
	return ws, w, nil
}

// connect makes the agent's first connection, to member i of its URLs.
func (a *agent) connect(i int) error {
	ws, w, err := dialWS(a.dialer, a.urls[i], a.nodeKey)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.ws, a.welcome, a.member, a.up, a.connectedAt = ws, w, i, true, time.Now()
	a.mu.Unlock()
	return nil
}

// run starts the agent's connection loop.
func (a *agent) run() {
	go a.loop(rand.N(a.interval))
}

// Reconnection as the real agent does it (cmd/agent): the first retry after
// 1–2 s, the ceiling doubling per failed attempt up to 30 s, and the count
// starting over after a connection that lasted stableAfter.
const (
	backoffMin  = time.Second
	backoffMax  = 30 * time.Second
	stableAfter = 30 * time.Second
)

// backoffDelay is uniform in [backoffMin, min(backoffMax, backoffMin·2^(n+1))].
func backoffDelay(n int) time.Duration {
	ceil := backoffMin
	for i := 0; i <= n && ceil < backoffMax; i++ {
		ceil *= 2
	}
	ceil = min(ceil, backoffMax)
	return backoffMin + rand.N(ceil-backoffMin+1)
}

// loop runs the current connection (reader here, heartbeats on their own
// goroutine) until it ends; a reconnecting agent then connects again.
func (a *agent) loop(phase time.Duration) {
	defer close(a.done)
	failures := 0
	for {
		beating := make(chan struct{})
		a.mu.Lock()
		ws := a.ws
		a.beating = beating
		a.mu.Unlock()
		ended := make(chan struct{})
		go a.heartbeatLoop(ws, phase, ended, beating)
		a.readLoop(ws)
		close(ended)
		<-beating
		if !a.reconnect {
			return
		}
		a.mu.Lock()
		if time.Since(a.connectedAt) >= stableAfter {
			failures = 0
		}
		a.mu.Unlock()
		for connected := false; !connected; {
			a.mu.Lock()
			stopping, next := a.stopping, (a.member+1)%len(a.urls)
			a.mu.Unlock()
			if stopping {
				return
			}
			t := time.NewTimer(backoffDelay(failures))
			failures++
			select {
			case <-a.quit:
				t.Stop()
				return
			case <-t.C:
			}
			ws, w, err := dialWS(a.dialer, a.urls[next], a.nodeKey)
			a.mu.Lock()
			if a.stopping {
				a.mu.Unlock()
				if err == nil {
					ws.Close()
				}
				return
			}
			a.member = next // the next attempt goes on from here
			if err == nil {
				now := time.Now()
				a.ws, a.welcome, a.up, a.connectedAt = ws, w, true, now
				a.reconnects++
				a.reconnectedAt = now
				connected = true
			}
			a.mu.Unlock()
		}
		phase = 0 // the real agent heartbeats as soon as it is welcomed
	}
}

// sampleMetrics is a plausible small machine: one GPU, a few cores' load.
func sampleMetrics() fleet.Metrics {
	temp := 40 + rand.Float64()*30
	const gib = 1 << 30
	return fleet.Metrics{
		MemoryTotalBytes: 64 * gib, MemoryUsedBytes: uint64(8+rand.IntN(40)) * gib,
		DiskTotalBytes: 1000 * gib, DiskUsedBytes: uint64(100+rand.IntN(700)) * gib,
		GPUs: []fleet.GPU{{Index: 0, Model: "RTX 4090", MemoryTotalMiB: 24564,
			MemoryUsedMiB: uint64(rand.IntN(24564)), TemperatureC: &temp}},
	}
}

func (a *agent) heartbeatLoop(ws *websocket.Conn, phase time.Duration, ended <-chan struct{}, beating chan<- struct{}) {
	defer close(beating)
	t := time.NewTimer(phase)
	defer t.Stop()
	for {
		select {
		case <-a.quit:
			return
		case <-ended:
			return
		case <-t.C:
		}
		select {
		case <-a.quit: // a stop wins over a timer that fired together
			return
		default:
		}
		// Schedule from the intended time, not from when the write ended.
		t.Reset(a.interval)
		if err := a.heartbeat(ws); err != nil {
			return // the read loop sees the connection end
		}
	}
}

func (a *agent) heartbeat(ws *websocket.Conn) error {
	m := &a.metrics
	m.CPUPercent = rand.Float64() * 100
	m.Load1 = rand.Float64() * 8
	m.Load5, m.Load15 = m.Load1*0.9, m.Load1*0.8
	m.GPUs[0].UtilizationPercent = rand.Float64() * 100
	data, err := json.Marshal(m)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.seq++
	seq := a.seq
	now := time.Now()
	a.pending[seq] = now
	a.lastSent = now
	member := a.member
	a.mu.Unlock()
	a.rec.sent.Add(1)
	_ = ws.SetWriteDeadline(now.Add(writeWait))
	frame := fleet.Frame{Event: fleet.EventHeartbeat, Data: data, Ack: &seq}
	if a.rec.members == nil {
		return ws.WriteJSON(frame)
	}
	// The same bytes as WriteJSON (which ends them with a newline), counted.
	b, err := json.Marshal(frame)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	a.rec.wrote(member, len(b))
	return ws.WriteMessage(websocket.TextMessage, b)
}

func (a *agent) readLoop(ws *websocket.Conn) {
	for {
		_, data, err := ws.ReadMessage()
		now := time.Now()
		if err != nil {
			code := -1
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				code = ce.Code
			}
			a.mu.Lock()
			if a.closedAt.IsZero() {
				a.closedAt = now
				a.closeCode = code
			}
			a.up = false
			if a.reconnect {
				a.ends = append(a.ends, connEnd{At: now, Code: code, Member: a.member, Stopping: a.stopping})
				// Acks of this connection will not come.
				clear(a.pending)
			}
			a.mu.Unlock()
			return
		}
		var f fleet.Frame
		if json.Unmarshal(data, &f) != nil || f.Event != fleet.EventAck || f.Ack == nil {
			continue // rental events and the like: nothing to measure
		}
		var ack fleet.HeartbeatAck
		_ = json.Unmarshal(f.Data, &ack)
		a.mu.Lock()
		sent, ok := a.pending[*f.Ack]
		delete(a.pending, *f.Ack)
		member := a.member
		a.mu.Unlock()
		if ok {
			a.rec.ack(now.Sub(sent), ack.ReceivedAt.Sub(sent), ack.Accepted, member, len(data))
		}
	}
}

// stop ends the agent on purpose, the stopClose or the stopSilent way. It
// waits for the ack of the last heartbeat (so that the coordinator has
// seen it) and returns when that heartbeat was sent.
func (a *agent) stop(mode string) (lastHeartbeat time.Time) {
	a.mu.Lock()
	a.stopping = true
	a.mu.Unlock()
	close(a.quit)
	a.mu.Lock()
	beating := a.beating
	a.mu.Unlock()
	<-beating
	for deadline := time.Now().Add(ackDrainWait); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		a.mu.Lock()
		n := len(a.pending)
		a.mu.Unlock()
		if n == 0 {
			break
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if mode == stopClose && a.ws != nil {
		_ = a.ws.UnderlyingConn().Close()
	}
	return a.lastSent
}

// unexpectedClose returns how the connection ended if it ended while the
// agent was meant to be running: the close code (-1: none) and true.
func (a *agent) unexpectedClose() (int, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopping || a.closedAt.IsZero() {
		return 0, false
	}
	return a.closeCode, true
}

// serverClose returns the close code and time, if the server has closed the
// connection.
func (a *agent) serverClose() (int, time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closeCode, a.closedAt
}

// shutdown closes the connection politely at the end of a run.
func (a *agent) shutdown() {
	a.mu.Lock()
	a.stopping = true
	a.mu.Unlock()
	select {
	case <-a.quit:
	default:
		close(a.quit)
	}
	a.mu.Lock()
	beating, ws := a.beating, a.ws
	a.mu.Unlock()
	<-beating
	if ws != nil {
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "load test over"), time.Now().Add(time.Second))
		_ = ws.Close()
	}
	<-a.done
}
