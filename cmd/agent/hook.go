package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/distributedcompute/fleet"
)

// Limits of the rental hook.
const (
	// hookQueueLen bounds the events waiting for the hook; when the hook
	// is slower than the rentals, newer events are dropped and logged.
	hookQueueLen = 16
	// hookOutputMax bounds the hook output kept for the log.
	hookOutputMax = 4 << 10
	// hookWaitDelay bounds the wait for the hook's output pipes after it
	// exits or is killed (a child it left behind may hold them).
	hookWaitDelay = 2 * time.Second
)

// hookEvent is what the hook reads on stdin.
type hookEvent struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}

// hookRunner runs the rental hook once per rental event, one at a time and
// in order, off the heartbeat loop.
type hookRunner struct {
	path    string
	timeout time.Duration
	log     *slog.Logger
	queue   chan hookEvent
}

func newHookRunner(path string, timeout time.Duration, log *slog.Logger) *hookRunner {
	return &hookRunner{path: path, timeout: timeout, log: log, queue: make(chan hookEvent, hookQueueLen)}
}

// enqueue schedules the hook for f without blocking. It does nothing when no
// hook is configured.
func (h *hookRunner) enqueue(f fleet.Frame) {
	if h.path == "" {
		return
	}
	data := f.Data
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	select {
	case h.queue <- hookEvent{Event: f.Event, Data: data}:
	default:
		h.log.Warn("rental hook is behind; event not passed to it", "event", f.Event, "queued", hookQueueLen)
	}
}

// run runs queued events until ctx is done; a hook running then is killed.
func (h *hookRunner) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			if n := len(h.queue); n > 0 {
				h.log.Warn("stopping with rental events not passed to the hook", "count", n)
			}
			return
		case ev := <-h.queue:
			h.runOne(ctx, ev)
		}
	}
}

func (h *hookRunner) runOne(ctx context.Context, ev hookEvent) {
	in, err := json.Marshal(ev)
	if err != nil { // cannot happen: Data is valid JSON
		h.log.Error("encoding rental hook input", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.path)
	cmd.Stdin = bytes.NewReader(in)
	out := &limitedBuffer{max: hookOutputMax}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = hookEnv(os.Environ(), ev.Event)
	cmd.WaitDelay = hookWaitDelay
	start := time.Now()
	err = cmd.Run()
	log := h.log.With("event", ev.Event, "hook", h.path, "took", time.Since(start).Round(time.Millisecond))
	switch {
	case ctx.Err() == context.DeadlineExceeded:
		log.Warn("rental hook timed out and was killed", "timeout", h.timeout, "output", out.String())
	case err != nil:
		log.Warn("rental hook failed", "err", err, "output", out.String())
	default:
		log.Info("rental hook ran", "output", out.String())
	}
}

// hookEnv is the agent's environment without the host API key, which the
// hook has no need of, plus FLEET_EVENT naming the event.
func hookEnv(environ []string, event string) []string {
	env := make([]string, 0, len(environ)+1)
	for _, kv := range environ {
		if strings.HasPrefix(kv, "HOST_API_KEY=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "FLEET_EVENT="+event)
}

// limitedBuffer keeps the first max bytes written to it and discards the
// rest. It needs no lock as the hook's Stdout and Stderr: os/exec calls
// Write from one goroutine at a time when both are the same writer.
type limitedBuffer struct {
	buf bytes.Buffer
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *limitedBuffer) String() string { return strings.TrimSpace(b.buf.String()) }
