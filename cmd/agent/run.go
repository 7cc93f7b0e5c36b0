package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/gorilla/websocket"
)

// Errors that end the agent: reconnecting cannot help.
var (
	errKeyRefused = errors.New("host API key was refused (401): check HOST_API_KEY, or get a new key from the marketplace")
	errKeyRevoked = errors.New("host API key was revoked or rotated; get a new key from the marketplace")
)

// Limits of one connection.
const (
	handshakeTimeout = 10 * time.Second
	writeWait        = 10 * time.Second
	// welcomeWait bounds the wait for the welcome after the upgrade.
	welcomeWait = 10 * time.Second
	// closeWait bounds the wait for the server's answer to our close on
	// shutdown, so that a signal stops the agent promptly.
	closeWait = 2 * time.Second
	// fallbackReadWait is the read deadline when the welcome names no
	// heartbeat deadline.
	fallbackReadWait = 60 * time.Second
	maxFrameBytes    = 1 << 20
	// acksKept bounds the heartbeats awaiting an ack; older ones are forgotten.
	acksKept = 32
)

// backoff computes reconnect delays: exponential with full jitter between Min
// and a ceiling that doubles per failed attempt up to Max.
type backoff struct {
	Min, Max time.Duration
}

// delay returns the wait before reconnect attempt n (0 for the first retry):
// uniform in [Min, min(Max, Min·2^(n+1))].
func (b backoff) delay(n int) time.Duration {
	ceil := b.Min
	for i := 0; i <= n && ceil < b.Max; i++ {
		ceil *= 2
	}
	if ceil > b.Max {
		ceil = b.Max
	}
	if ceil <= b.Min {
		return b.Min
	}
	return b.Min + rand.N(ceil-b.Min+1)
}

// heartbeatInterval is the interval to use given the configured one and the
// server's welcome, and a warning when the configured one does not fit.
func heartbeatInterval(configured time.Duration, w fleet.Welcome) (time.Duration, string) {
	iv := configured
	deadline := time.Duration(w.HeartbeatDeadlineMS) * time.Millisecond
	minIv := time.Duration(w.HeartbeatMinIntervalMS) * time.Millisecond
	var warn string
	if deadline > 0 && iv >= deadline {
		iv = deadline * 2 / 5
		warn = "HEARTBEAT_INTERVAL is not below the server's heartbeat deadline; using deadline/2.5"
	}
	if minIv > 0 && iv < minIv {
		iv = minIv
		if warn == "" {
			warn = "HEARTBEAT_INTERVAL is below the server's minimum interval; using the minimum"
		}
	}
	if deadline > 0 && iv >= deadline {
		warn = "the server's minimum heartbeat interval is not below its deadline; heartbeats may time out"
	}
	return iv, warn
}

// agent is the state that outlives one connection.
type agent struct {
	cfg     config
	log     *slog.Logger
	hooks   *hookRunner
	metrics atomic.Pointer[fleet.Metrics]
	ackSeq  uint64 // last ack id asked for; used by the session loop only
}

// run connects to the coordinator and keeps connecting until ctx is done
// (it returns nil) or the key is refused or revoked (errKeyRefused,
// errKeyRevoked).
func run(ctx context.Context, cfg config, log *slog.Logger) error {
	a := &agent{cfg: cfg, log: log}
	log.Info("starting", "urls", cfg.URLs, "key", cfg.keyPrefix(), "heartbeat_interval", cfg.HeartbeatInterval, "rental_hook", cfg.RentalHook)
	for _, u := range cfg.plaintextRemote() {
		log.Warn("BACKEND_WS_URL sends the host API key unencrypted to another machine; use wss://", "url", u)
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	bg, stopBG := context.WithCancel(ctx)
	defer stopBG()

	a.hooks = newHookRunner(cfg.RentalHook, cfg.HookTimeout, log)
	wg.Go(func() { a.hooks.run(bg) })

	// Metrics are sampled on their own clock so that a slow nvidia-smi never
	// delays a heartbeat: a heartbeat sends the latest sample.
	c := newCollector(log)
	m := c.collect(ctx)
	a.metrics.Store(&m)
	wg.Go(func() {
		t := time.NewTicker(cfg.HeartbeatInterval)
		defer t.Stop()
		for {
			select {
			case <-bg.Done():
				return
			case <-t.C:
				m := c.collect(bg)
				a.metrics.Store(&m)
			}
		}
	})

	bo := backoff{Min: cfg.BackoffMin, Max: cfg.BackoffMax}
	failures := 0
	for attempt := 0; ; attempt++ {
		u := cfg.URLs[attempt%len(cfg.URLs)]
		up, err := a.session(ctx, u)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errKeyRefused) || errors.Is(err, errKeyRevoked) {
			return err
		}
		if up >= cfg.StableAfter {
			failures = 0
		}
		d := bo.delay(failures)
		failures++
		var ce *websocket.CloseError
		if errors.As(err, &ce) && ce.Code == fleet.CloseReplaced {
			log.Warn("replaced by another connection: another agent with the same key is running; reconnecting", "url", u, "retry_in", d.Round(time.Millisecond))
		} else {
			log.Warn("disconnected; reconnecting", "url", u, "err", err, "up", up.Round(time.Millisecond), "retry_in", d.Round(time.Millisecond))
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// session runs one connection to u until it ends. It returns how long the
// connection was up after the welcome (zero without one) and why it ended.
func (a *agent) session(ctx context.Context, u string) (time.Duration, error) {
	d := websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment,
		HandshakeTimeout: handshakeTimeout,
		TLSClientConfig:  a.cfg.TLS,
	}
	hdr := http.Header{"Authorization": {"Bearer " + a.cfg.APIKey}}
	conn, resp, err := d.DialContext(ctx, u, hdr)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		if errors.Is(err, websocket.ErrBadHandshake) && resp != nil {
			if resp.StatusCode == http.StatusUnauthorized {
				return 0, errKeyRefused
			}
			return 0, fmt.Errorf("handshake refused with HTTP %d", resp.StatusCode)
		}
		return 0, fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	conn.SetReadLimit(maxFrameBytes)
	log := a.log.With("url", u)

	// The welcome comes first.
	conn.SetReadDeadline(time.Now().Add(welcomeWait))
	f, err := readFrame(conn)
	if err != nil {
		return 0, err
	}
	if f.Event != fleet.EventWelcome {
		return 0, fmt.Errorf("expected %q, got %q", fleet.EventWelcome, f.Event)
	}
	var w fleet.Welcome
	if err := json.Unmarshal(f.Data, &w); err != nil {
		return 0, fmt.Errorf("malformed welcome: %w", err)
	}
	welcomed := time.Now()
	interval, warn := heartbeatInterval(a.cfg.HeartbeatInterval, w)
	if warn != "" {
		log.Warn(warn, "configured", a.cfg.HeartbeatInterval, "deadline_ms", w.HeartbeatDeadlineMS, "min_interval_ms", w.HeartbeatMinIntervalMS, "using", interval)
	}
	readWait := fallbackReadWait
	if w.HeartbeatDeadlineMS > 0 {
		readWait = 2 * time.Duration(w.HeartbeatDeadlineMS) * time.Millisecond
	}
	log.Info("connected", "node_id", w.NodeID, "name", w.Name, "heartbeat_interval", interval, "heartbeat_deadline_ms", w.HeartbeatDeadlineMS)
	upSince := func() time.Duration { return time.Since(welcomed) }

	// One reader goroutine; every data write happens on this goroutine.
	// Close and control writes are safe alongside it (gorilla's contract).
	conn.SetReadDeadline(time.Now().Add(readWait))
	conn.SetPingHandler(func(data string) error {
		conn.SetReadDeadline(time.Now().Add(readWait))
		err := conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(writeWait))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		return err
	})
	frames := make(chan fleet.Frame)
	readErr := make(chan error, 1)
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(done)
	defer conn.Close() // unblocks the reader before wg.Wait
	wg.Go(func() {
		for {
			f, err := readFrame(conn)
			if errors.Is(err, fleet.ErrBadFrame) {
				log.Warn("ignoring malformed frame", "err", err)
				conn.SetReadDeadline(time.Now().Add(readWait))
				continue
			} else if err != nil {
				readErr <- err
				return
			}
			conn.SetReadDeadline(time.Now().Add(readWait))
			select {
			case frames <- f:
			case <-done:
				return
			}
		}
	})

	sent := make(map[uint64]time.Time, acksKept)
	heartbeat := func() error {
		a.ackSeq++
		seq := a.ackSeq
		m := a.metrics.Load()
		data, err := json.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode metrics: %w", err)
		}
		sent[seq] = time.Now()
		delete(sent, seq-acksKept)
		conn.SetWriteDeadline(time.Now().Add(writeWait))
		if err := conn.WriteJSON(fleet.Frame{Event: fleet.EventHeartbeat, Data: data, Ack: &seq}); err != nil {
			return fmt.Errorf("write heartbeat: %w", err)
		}
		return nil
	}
	if err := heartbeat(); err != nil {
		return upSince(), err
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			log.Info("closing connection")
			msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "agent stopping")
			if err := conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(closeWait)); err == nil {
				// Wait for the server's close so that it sees a clean
				// closure, but not long.
				t := time.NewTimer(closeWait)
				defer t.Stop()
			wait:
				for {
					select {
					case <-frames:
					case <-readErr:
						break wait
					case <-t.C:
						break wait
					}
				}
			}
			return upSince(), ctx.Err()
		case err := <-readErr:
			return upSince(), err
		case <-tick.C:
			if err := heartbeat(); err != nil {
				return upSince(), err
			}
		case f := <-frames:
			if err := a.handle(log, f, sent); err != nil {
				return upSince(), err
			}
		}
	}
}

// handle acts on one frame from the server.
func (a *agent) handle(log *slog.Logger, f fleet.Frame, sent map[uint64]time.Time) error {
	switch f.Event {
	case fleet.EventAck:
		if f.Ack == nil {
			return nil
		}
		t, ok := sent[*f.Ack]
		if !ok {
			return nil
		}
		delete(sent, *f.Ack)
		var ack fleet.HeartbeatAck
		_ = json.Unmarshal(f.Data, &ack) // only logged
		log.Debug("heartbeat acknowledged", "ack", *f.Ack, "latency", time.Since(t), "accepted", ack.Accepted)
	case fleet.EventRentalStarted:
		var r fleet.RentalStartedEvent
		if err := json.Unmarshal(f.Data, &r); err != nil {
			log.Warn("malformed rental.started", "err", err)
			return nil
		}
		attrs := []any{"rental_id", r.RentalID, "renter_id", r.RenterID, "started_at", r.StartedAt}
		if r.MaxHours != nil {
			attrs = append(attrs, "max_hours", *r.MaxHours)
		}
		log.Info("rental started", attrs...)
		a.hooks.enqueue(f)
	case fleet.EventRentalStopped:
		var r fleet.RentalStoppedEvent
		if err := json.Unmarshal(f.Data, &r); err != nil {
			log.Warn("malformed rental.stopped", "err", err)
			return nil
		}
		log.Info("rental stopped", "rental_id", r.RentalID, "reason", r.Reason)
		a.hooks.enqueue(f)
	case fleet.EventWelcome:
		log.Debug("ignoring repeated welcome")
	default:
		log.Debug("ignoring unknown event", "event", f.Event)
	}
	return nil
}

// readFrame reads one frame. A frame that is not JSON text yields an error
// wrapping fleet.ErrBadFrame, after which the connection is still usable.
func readFrame(conn *websocket.Conn) (fleet.Frame, error) {
	var f fleet.Frame
	typ, data, err := conn.ReadMessage()
	if err != nil {
		return f, closeErr(err)
	}
	if typ != websocket.TextMessage {
		return f, fmt.Errorf("%w: binary frame", fleet.ErrBadFrame)
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return f, fmt.Errorf("%w: %v", fleet.ErrBadFrame, err)
	}
	return f, nil
}

// closeErr turns a read error into the error a session ends with: the
// revocation close code becomes errKeyRevoked.
func closeErr(err error) error {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		if ce.Code == fleet.CloseKeyRevoked {
			return errKeyRevoked
		}
		return ce
	}
	return fmt.Errorf("read: %w", err)
}
