package actors

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/asynkron/protoactor-go/actor"

	"github.com/distributedcompute/fleet"
)

// registry is the actor that holds the live view of the fleet. Node actors
// report to it; it writes the view the REST layer reads, and checkpoints
// last-seen times to the store so that a crash loses little.
type registry struct {
	cfg     *Config
	view    *view
	billing *actor.PID
	pids    map[string]*actor.PID // node ID -> the node actor that owns it now
	timer   *time.Timer
	busy    atomic.Bool // a checkpoint write is in flight
}

func (r *registry) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		// A fresh registry (first start or after a panic) knows nothing: it
		// rebuilds its view from the node actors, which are the truth.
		r.pids = make(map[string]*actor.PID)
		r.view.clear()
		ctx.Send(ctx.Parent(), rebuild{})
		// Once the node actors have reported, billing checks that no rental
		// bills a node whose disconnect the failed registry swallowed.
		bill, self, root := r.billing, ctx.Self(), ctx.ActorSystem().Root
		time.AfterFunc(time.Second, func() { root.Send(bill, reconcile{}) })
		r.timer = time.AfterFunc(r.cfg.CheckpointInterval, func() { root.Send(self, checkpoint{}) })
	case *actor.Stopping, *actor.Restarting:
		if r.timer != nil {
			r.timer.Stop()
		}
	case nodeUp:
		fresh := r.pids[m.nodeID] != m.pid
		r.pids[m.nodeID] = m.pid
		// The node actor wrote its entry when it started and updates it on
		// heartbeats; only a missing or offline entry (a rebuild, or a late
		// nodeDown of the connection it replaced) is written here.
		if p, ok := r.view.get(m.nodeID); !ok || !p.Online {
			r.view.set(m.nodeID, fleet.Presence{Online: true, ConnectedSince: m.connectedSince,
				LastSeenAt: m.lastSeen, Metrics: m.metrics, Member: r.cfg.Member})
		}
		if fresh { // billing resumes once the view shows the node online
			ctx.Send(r.billing, nodeOnline{nodeID: m.nodeID, at: m.lastSeen})
		}
		connectedNodes.Set(float64(len(r.pids)))
	case nodeDown:
		if pid, ok := r.pids[m.nodeID]; !ok || pid != m.pid {
			return
		}
		delete(r.pids, m.nodeID)
		// The offline entry keeps last_seen_at exact until the store has it.
		r.view.set(m.nodeID, fleet.Presence{LastSeenAt: m.lastSeen})
		ctx.Send(r.billing, nodeOffline{nodeID: m.nodeID, lastSeen: m.lastSeen})
		connectedNodes.Set(float64(len(r.pids)))
	case forget:
		if _, online := r.pids[m.nodeID]; !online {
			r.view.delete(m.nodeID)
		}
	case checkpoint:
		r.checkpoint()
	case panicNow:
		panic("registry: panic requested")
	}
}

// forget drops a node's offline entry once the store holds its last-seen.
type forget struct{ nodeID string }

func (r *registry) checkpoint() {
	defer r.timer.Reset(r.cfg.CheckpointInterval)
	if len(r.pids) == 0 || !r.busy.CompareAndSwap(false, true) {
		return
	}
	seen := make(map[string]time.Time, len(r.pids))
	for id := range r.pids {
		if p, ok := r.view.get(id); ok {
			seen[id] = p.LastSeenAt
		}
	}
	go func() {
		defer r.busy.Store(false)
		c, cancel := context.WithTimeout(context.Background(), r.cfg.CheckpointInterval)
		defer cancel()
		if err := r.cfg.Sessions.Checkpoint(c, seen); err != nil {
			r.cfg.Logger.LogAttrs(c, slog.LevelWarn, "checkpoint of last-seen times failed", slog.String("error", err.Error()))
		}
	}()
}
