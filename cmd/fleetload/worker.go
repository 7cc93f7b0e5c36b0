package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// A run's agents live in pools: one in this process when they fit under
// -per-process, else one per worker process (this binary re-executed with
// -worker), because every process is capped in open files. The parent
// drives every pool through the same steps and merges their results.
type pool interface {
	// connect dials every agent of the pool, concurrency at a time.
	connect(concurrency int) (connectResult, error)
	// open starts the measurement window; close ends it.
	open() error
	close() (windowResult, error)
	// stop stops the named agents of this pool on purpose, each the way
	// named (stopClose or stopSilent).
	stop(modes map[string]string) ([]stopResult, error)
	// status counts the pool's agents now: how many are connected, where,
	// and how many reconnected after since.
	status(since time.Time) (statusResult, error)
	// finish reports how every agent fared, then disconnects them all.
	// Against a cluster, connection ends after since (when member killed
	// was killed) are counted apart from earlier ones.
	finish(since time.Time, killed int) (finalResult, error)
	// pid is the process holding the agents.
	pid() int
}

type connectResult struct {
	Connected  int    `json:"connected"`
	Failed     int    `json:"failed"`
	Retries    int    `json:"retries"`
	FirstError string `json:"first_error,omitempty"`
	DeadlineMS int64  `json:"deadline_ms"` // the coordinator's heartbeat deadline, from a welcome
	// Latency is the time from dialing to the welcome, of each agent that
	// connected (its last attempt).
	Latency histogramJSON `json:"latency"`
}

type windowResult struct {
	Hist     histogramJSON `json:"hist"`
	Inbound  histogramJSON `json:"inbound"`
	Acked    uint64        `json:"acked"`
	Rejected uint64        `json:"rejected"`
	// Members is per cluster member (by index); empty against one
	// coordinator.
	Members []memberWindow `json:"members,omitempty"`
}

type memberWindow struct {
	Hist     histogramJSON `json:"hist"`
	Acked    uint64        `json:"acked"`
	BytesIn  uint64        `json:"bytes_in"`  // WebSocket payload read from the member
	BytesOut uint64        `json:"bytes_out"` // WebSocket payload written to it
}

// mergeMembers adds o's figures to w's, member by member.
func (w *windowResult) mergeMembers(o []memberWindow) {
	for i, m := range o {
		if i >= len(w.Members) {
			w.Members = append(w.Members, memberWindow{})
		}
		d := &w.Members[i]
		h := d.Hist.histogram()
		h.merge(m.Hist.histogram())
		d.Hist = h.wire()
		d.Acked += m.Acked
		d.BytesIn += m.BytesIn
		d.BytesOut += m.BytesOut
	}
}

type statusResult struct {
	Up        int   `json:"up"`         // connected now
	Down      int   `json:"down"`       // meant to run but not connected now
	PerMember []int `json:"per_member"` // connected now, by member
	// Reconnected counts agents whose last reconnection came after since;
	// ReconnectAfter is how long after since it came, for each.
	Reconnected    int           `json:"reconnected"`
	ReconnectAfter histogramJSON `json:"reconnect_after"`
}

type stopResult struct {
	NodeID        string    `json:"node_id"`
	Mode          string    `json:"mode"`
	LastHeartbeat time.Time `json:"last_heartbeat"` // when the last (acked) heartbeat was sent
	StoppedAt     time.Time `json:"stopped_at"`
}

type finalResult struct {
	Sent uint64 `json:"sent"`
	// Unexpected counts agents that were not stopped on purpose but whose
	// connection ended anyway, by close code (-1: no close frame).
	Unexpected map[int]int `json:"unexpected"`
	// UnackedOld counts heartbeats still without an ack a second after
	// they were sent.
	UnackedOld int `json:"unacked_old"`
	// ServerClosed is, for each agent stopped on purpose, how and when the
	// server closed its connection, if it did.
	ServerClosed map[string]serverClose `json:"server_closed"`
	// Reconnecting agents (a cluster) only: connection ends after the
	// member was killed, of connections to it and to the others, by close
	// code, and the reconnections made all run long.
	KilledEnds map[int]int `json:"killed_ends,omitempty"`
	OtherEnds  map[int]int `json:"other_ends,omitempty"`
	Reconnects int         `json:"reconnects,omitempty"`
}

type serverClose struct {
	Code int       `json:"code"`
	At   time.Time `json:"at"`
}

// localPool holds agents in this process.
type localPool struct {
	urls      []string // the /fleet URL of each member (one without a cluster)
	reconnect bool
	interval  time.Duration
	keys      []nodeKey
	rec       *recorder

	mu     sync.Mutex
	agents map[string]*agent // connected agents by node ID
}

func newLocalPool(urls []string, reconnect bool, interval time.Duration, keys []nodeKey) *localPool {
	return &localPool{urls: urls, reconnect: reconnect, interval: interval, keys: keys,
		rec: newRecorder(len(urls)), agents: make(map[string]*agent)}
}

func (p *localPool) pid() int { return os.Getpid() }

const connectAttempts = 3

func (p *localPool) connect(concurrency int) (connectResult, error) {
	d := &websocket.Dialer{
		HandshakeTimeout: handshakeTimeout,
		NetDialContext:   (&net.Dialer{Timeout: handshakeTimeout}).DialContext,
		ReadBufferSize:   1024,
		WriteBufferSize:  1024,
		WriteBufferPool:  &wsWriteBuffers,
	}
	var res connectResult
	latency := newHistogram()
	var mu sync.Mutex
	var next atomic.Int64
	var wg sync.WaitGroup
	for range max(1, min(concurrency, len(p.keys))) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(p.keys) {
					return
				}
				a := newAgent(p.keys[i], p.rec, d, p.urls, p.reconnect, p.interval)
				var err error
				var took time.Duration
				for attempt := range connectAttempts {
					if attempt > 0 {
						mu.Lock()
						res.Retries++
						mu.Unlock()
						time.Sleep(time.Duration(attempt) * 500 * time.Millisecond)
					}
					t0 := time.Now()
					if err = a.connect(p.keys[i].Home % len(p.urls)); err == nil {
						took = time.Since(t0)
						break
					}
				}
				mu.Lock()
				if err != nil {
					res.Failed++
					if res.FirstError == "" {
						res.FirstError = err.Error()
					}
				} else {
					res.Connected++
					res.DeadlineMS = a.welcome.HeartbeatDeadlineMS
					latency.record(took)
				}
				mu.Unlock()
				if err == nil {
					p.mu.Lock()
					p.agents[a.NodeID] = a
					p.mu.Unlock()
					a.run()
				}
			}
		})
	}
	wg.Wait()
	res.Latency = latency.wire()
	return res, nil
}

func (p *localPool) open() error { p.rec.open(); return nil }

func (p *localPool) close() (windowResult, error) {
	return p.rec.close(), nil
}

func (p *localPool) stop(modes map[string]string) ([]stopResult, error) {
	var out []stopResult
	var mu sync.Mutex
	var wg sync.WaitGroup
	for id, mode := range modes {
		p.mu.Lock()
		a := p.agents[id]
		p.mu.Unlock()
		if a == nil {
			continue
		}
		wg.Go(func() {
			last := a.stop(mode)
			r := stopResult{NodeID: id, Mode: mode, LastHeartbeat: last, StoppedAt: time.Now()}
			mu.Lock()
			out = append(out, r)
			mu.Unlock()
		})
	}
	wg.Wait()
	return out, nil
}

func (p *localPool) all() []*agent {
	p.mu.Lock()
	defer p.mu.Unlock()
	agents := make([]*agent, 0, len(p.agents))
	for _, a := range p.agents {
		agents = append(agents, a)
	}
	return agents
}

func (p *localPool) status(since time.Time) (statusResult, error) {
	res := statusResult{PerMember: make([]int, len(p.urls))}
	after := newHistogram()
	for _, a := range p.all() {
		a.mu.Lock()
		switch {
		case a.up:
			res.Up++
			res.PerMember[a.member]++
		case !a.stopping:
			res.Down++
		}
		if !since.IsZero() && a.reconnectedAt.After(since) {
			res.Reconnected++
			after.record(a.reconnectedAt.Sub(since))
		}
		a.mu.Unlock()
	}
	res.ReconnectAfter = after.wire()
	return res, nil
}

func (p *localPool) finish(since time.Time, killed int) (finalResult, error) {
	res := finalResult{Sent: p.rec.sent.Load(), Unexpected: map[int]int{}, ServerClosed: map[string]serverClose{}}
	if p.reconnect {
		res.KilledEnds, res.OtherEnds = map[int]int{}, map[int]int{}
	}
	agents := p.all()
	old := time.Now().Add(-time.Second)
	for _, a := range agents {
		if !p.reconnect {
			if code, ok := a.unexpectedClose(); ok {
				res.Unexpected[code]++
			}
		} else {
			a.mu.Lock()
			for _, e := range a.ends {
				switch {
				case e.Stopping:
				case since.IsZero() || e.At.Before(since):
					res.Unexpected[e.Code]++
				case e.Member == killed:
					res.KilledEnds[e.Code]++
				default:
					res.OtherEnds[e.Code]++
				}
			}
			res.Reconnects += a.reconnects
			a.mu.Unlock()
		}
		a.mu.Lock()
		for _, sent := range a.pending {
			if sent.Before(old) {
				res.UnackedOld++
			}
		}
		stopping := a.stopping
		a.mu.Unlock()
		if stopping {
			if code, at := a.serverClose(); !at.IsZero() {
				res.ServerClosed[a.NodeID] = serverClose{Code: code, At: at}
			}
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for _, a := range agents {
		sem <- struct{}{}
		wg.Go(func() { defer func() { <-sem }(); a.shutdown() })
	}
	wg.Wait()
	return res, nil
}

// The protocol between the parent and a worker: the parent writes a
// workerSetup and then requests, as JSON values on the worker's stdin; the
// worker answers each request with one response on its stdout. Its stderr
// is the parent's.
type workerSetup struct {
	WSURLs    []string      `json:"ws_urls"`
	Reconnect bool          `json:"reconnect,omitempty"`
	Interval  time.Duration `json:"interval"`
	Keys      []nodeKey     `json:"keys"`
}

type request struct {
	Op          string            `json:"op"` // connect, open, close, stop, status, finish
	Concurrency int               `json:"concurrency,omitempty"`
	Stop        map[string]string `json:"stop,omitempty"`
	Since       time.Time         `json:"since,omitzero"`
	Killed      int               `json:"killed,omitempty"`
}

type response struct {
	Error   string         `json:"error,omitempty"`
	Connect *connectResult `json:"connect,omitempty"`
	Window  *windowResult  `json:"window,omitempty"`
	Stopped []stopResult   `json:"stopped,omitempty"`
	Status  *statusResult  `json:"status,omitempty"`
	Final   *finalResult   `json:"final,omitempty"`
}

// runWorker is the -worker mode: a localPool driven over stdin and stdout.
func runWorker(in io.Reader, out io.Writer) error {
	dec, enc := json.NewDecoder(in), json.NewEncoder(out)
	var setup workerSetup
	if err := dec.Decode(&setup); err != nil {
		return fmt.Errorf("worker setup: %w", err)
	}
	p := newLocalPool(setup.WSURLs, setup.Reconnect, setup.Interval, setup.Keys)
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("worker request: %w", err)
		}
		var resp response
		var err error
		switch req.Op {
		case "connect":
			var r connectResult
			r, err = p.connect(req.Concurrency)
			resp.Connect = &r
		case "open":
			err = p.open()
		case "close":
			var r windowResult
			r, err = p.close()
			resp.Window = &r
		case "stop":
			resp.Stopped, err = p.stop(req.Stop)
		case "status":
			var r statusResult
			r, err = p.status(req.Since)
			resp.Status = &r
		case "finish":
			var r finalResult
			r, err = p.finish(req.Since, req.Killed)
			resp.Final = &r
		default:
			err = fmt.Errorf("unknown op %q", req.Op)
		}
		if err != nil {
			resp.Error = err.Error()
		}
		if err := enc.Encode(resp); err != nil {
			return err
		}
		if req.Op == "finish" {
			return nil
		}
	}
}

// remotePool is a worker process.
type remotePool struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	enc   *json.Encoder
	dec   *json.Decoder
}

// startWorker re-executes this binary with -worker for keys.
func startWorker(setup workerSetup) (*remotePool, error) {
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	cmd := exec.Command(self, "-worker")
	cmd.Stderr = os.Stderr
	// A worker blocked in a connect storm would not notice its stdin close.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start worker: %w", err)
	}
	w := &remotePool{cmd: cmd, stdin: stdin, enc: json.NewEncoder(stdin), dec: json.NewDecoder(stdout)}
	if err := w.enc.Encode(setup); err != nil {
		w.kill()
		return nil, fmt.Errorf("worker setup: %w", err)
	}
	return w, nil
}

func (w *remotePool) pid() int { return w.cmd.Process.Pid }

func (w *remotePool) do(req request) (response, error) {
	var resp response
	if err := w.enc.Encode(req); err != nil {
		return resp, fmt.Errorf("worker %d: %s: %w", w.pid(), req.Op, err)
	}
	if err := w.dec.Decode(&resp); err != nil {
		return resp, fmt.Errorf("worker %d: %s: %w", w.pid(), req.Op, err)
	}
	if resp.Error != "" {
		return resp, fmt.Errorf("worker %d: %s: %s", w.pid(), req.Op, resp.Error)
	}
	return resp, nil
}

func (w *remotePool) connect(concurrency int) (connectResult, error) {
	resp, err := w.do(request{Op: "connect", Concurrency: concurrency})
	if err != nil || resp.Connect == nil {
		return connectResult{}, errors.Join(err, errors.New("no connect result"))
	}
	return *resp.Connect, nil
}

func (w *remotePool) open() error { _, err := w.do(request{Op: "open"}); return err }

func (w *remotePool) close() (windowResult, error) {
	resp, err := w.do(request{Op: "close"})
	if err != nil || resp.Window == nil {
		return windowResult{}, errors.Join(err, errors.New("no window result"))
	}
	return *resp.Window, nil
}

func (w *remotePool) stop(modes map[string]string) ([]stopResult, error) {
	resp, err := w.do(request{Op: "stop", Stop: modes})
	return resp.Stopped, err
}

func (w *remotePool) status(since time.Time) (statusResult, error) {
	resp, err := w.do(request{Op: "status", Since: since})
	if err != nil || resp.Status == nil {
		return statusResult{}, errors.Join(err, errors.New("no status"))
	}
	return *resp.Status, nil
}

func (w *remotePool) finish(since time.Time, killed int) (finalResult, error) {
	resp, err := w.do(request{Op: "finish", Since: since, Killed: killed})
	_ = w.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- w.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = w.cmd.Process.Kill()
		<-done
	}
	if err != nil || resp.Final == nil {
		return finalResult{}, errors.Join(err, errors.New("no final result"))
	}
	return *resp.Final, nil
}

// kill ends a worker that went wrong.
func (w *remotePool) kill() {
	_ = w.stdin.Close()
	_ = w.cmd.Process.Kill()
	_, _ = w.cmd.Process.Wait()
}
