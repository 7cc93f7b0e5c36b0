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

	sent atomic.Uint64 // heartbeats sent, all the time
}

func newRecorder() *recorder { return &recorder{hist: newHistogram(), inbound: newHistogram()} }

func (r *recorder) ack(latency, inbound time.Duration, accepted bool) {
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
	r.mu.Unlock()
}

// open starts a measurement window, forgetting earlier acks.
func (r *recorder) open() {
	r.mu.Lock()
	r.hist, r.inbound, r.acked, r.rejected = newHistogram(), newHistogram(), 0, 0
	r.mu.Unlock()
	r.measuring.Store(true)
}

// close ends the window and returns what it measured.
func (r *recorder) close() windowResult {
	r.measuring.Store(false)
	r.mu.Lock()
	defer r.mu.Unlock()
	return windowResult{Hist: r.hist.wire(), Inbound: r.inbound.wire(), Acked: r.acked, Rejected: r.rejected}
}

// agent is one simulated host agent: a native /fleet WebSocket that reads
// the welcome, then heartbeats every interval (after a random initial
// phase, so that a fleet's heartbeats spread out) with small, valid metrics,
// asking for an ack of each.
type agent struct {
	nodeKey
	rec      *recorder
	ws       *websocket.Conn
	welcome  fleet.Welcome
	interval time.Duration
	metrics  fleet.Metrics

	quit    chan struct{} // closed to stop heartbeating
	beating chan struct{} // closed when the heartbeat loop has returned
	done    chan struct{} // closed when the read loop has returned

	mu       sync.Mutex
	seq      uint64
	pending  map[uint64]time.Time // heartbeats awaiting their ack, by ack number
	lastSent time.Time
	stopping bool // stopped on purpose: a disconnect is expected
	// closeCode is how the connection ended, when not on purpose: the
	// server's close code, or -1 for a connection lost without one.
	closeCode int
	closedAt  time.Time
}

// dial connects the agent and reads its welcome.
func dial(d *websocket.Dialer, wsURL string, k nodeKey, rec *recorder, interval time.Duration) (*agent, error) {
	h := http.Header{"Authorization": {"Bearer " + k.Key}}
	ws, resp, err := d.Dial(wsURL, h)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial: %w (HTTP %d)", err, resp.StatusCode)
		}
		return nil, fmt.Errorf("dial: %w", err)
	}
	a := &agent{nodeKey: k, rec: rec, ws: ws, interval: interval, pending: make(map[uint64]time.Time),
		quit: make(chan struct{}), beating: make(chan struct{}), done: make(chan struct{})}
	_ = ws.SetReadDeadline(time.Now().Add(welcomeWait))
	var f fleet.Frame
	if err := ws.ReadJSON(&f); err != nil {
		ws.Close()
		return nil, fmt.Errorf("read welcome: %w", err)
	}
	if f.Event != fleet.EventWelcome || json.Unmarshal(f.Data, &a.welcome) != nil {
		ws.Close()
		return nil, fmt.Errorf("first frame is %q, not a welcome", f.Event)
	}
	_ = ws.SetReadDeadline(time.Time{})
	a.metrics = sampleMetrics()
	return a, nil
}

// run starts the agent's read and heartbeat loops.
func (a *agent) run() {
	go a.readLoop()
	go a.heartbeatLoop(rand.N(a.interval))
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

func (a *agent) heartbeatLoop(phase time.Duration) {
	defer close(a.beating)
	t := time.NewTimer(phase)
	defer t.Stop()
	for {
		select {
		case <-a.quit:
			return
		case <-t.C:
		}
		// Schedule from the intended time, not from when the write ended.
		t.Reset(a.interval)
		if err := a.heartbeat(); err != nil {
			return // the read loop sees the connection end
		}
	}
}

func (a *agent) heartbeat() error {
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
	a.mu.Unlock()
	a.rec.sent.Add(1)
	_ = a.ws.SetWriteDeadline(now.Add(writeWait))
	return a.ws.WriteJSON(fleet.Frame{Event: fleet.EventHeartbeat, Data: data, Ack: &seq})
}

func (a *agent) readLoop() {
	defer close(a.done)
	for {
		_, data, err := a.ws.ReadMessage()
		now := time.Now()
		if err != nil {
			a.mu.Lock()
			if a.closedAt.IsZero() {
				a.closedAt = now
				a.closeCode = -1
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					a.closeCode = ce.Code
				}
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
		a.mu.Unlock()
		if ok {
			a.rec.ack(now.Sub(sent), ack.ReceivedAt.Sub(sent), ack.Accepted)
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
	<-a.beating
	for deadline := time.Now().Add(ackDrainWait); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		a.mu.Lock()
		n := len(a.pending)
		a.mu.Unlock()
		if n == 0 {
			break
		}
	}
	if mode == stopClose {
		_ = a.ws.UnderlyingConn().Close()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
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
	<-a.beating
	_ = a.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "load test over"), time.Now().Add(time.Second))
	_ = a.ws.Close()
	<-a.done
}
