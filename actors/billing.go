package actors

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asynkron/protoactor-go/actor"

	"github.com/distributedcompute/fleet"
	fleetpb "github.com/distributedcompute/fleet/proto"
)

// Requests to the billing actor, and its answer.
type startRental struct {
	renterID, nodeID string
	maxHours         *float64
	idemKey          string
	bodyHash         []byte
}

type stopRental struct{ userID, rentalID string }

type deleteNode struct{ userID, nodeID string }

type billingResult struct {
	rental   *fleet.Rental
	replayed bool
	err      error
}

// nodeOnline and nodeOffline are the registry's transitions, forwarded.
type nodeOnline struct {
	nodeID string
	at     time.Time
}

type nodeOffline struct {
	nodeID   string
	lastSeen time.Time
}

// rentalTimer fires a rental's lost or max-hours timer; gen discards timers
// that were superseded.
type rentalTimer struct {
	nodeID string
	gen    uint64
}

// deliver asks the fleet to pass an event to a node's actor.
type deliver struct {
	nodeID string
	event  string
	data   any
}

// billing is the actor that owns live rentals. Every change to a rental
// goes through it, so that two renters racing for one node, a stop racing a
// node going offline, and the timers are serialised. It follows the two
// timers of every fleet system: "unreachable" at the heartbeat deadline
// (billing pauses at the last heartbeat) and "lost" after LostAfter
// unreachable (the rental ends as interrupted). In a cluster, each member's
// billing tracks the rentals of the nodes it holds, the store's transactions
// arbitrate between members, and a sweep covers nodes no member holds.
type billing struct {
	cfg     *Config
	view    *view
	rented  *sync.Map // node ID -> rental ID, read by the REST layer
	live    map[string]*fleet.Rental
	timers  map[string]*time.Timer
	gens    map[string]uint64
	sys     *System
	pruner  *time.Timer
	sweeper *time.Timer
}

// pruneIdempotency drops idempotency records past their 24 hours, hourly.
type pruneIdempotency struct{}

func (b *billing) pruneIdempotency(ctx actor.Context) {
	cutoff := b.cfg.Now().Add(-fleet.IdempotencyTTL)
	go func() {
		c, cancel := b.ctx()
		defer cancel()
		if err := b.cfg.Rentals.PruneIdempotency(c, cutoff); err != nil {
			b.cfg.Logger.Warn("pruning idempotency records failed", "error", err)
		}
	}()
	self, root := ctx.Self(), ctx.ActorSystem().Root
	b.pruner = time.AfterFunc(time.Hour, func() { root.Send(self, pruneIdempotency{}) })
}

func (b *billing) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		b.recover(ctx)
		b.pruneIdempotency(ctx)
		if b.clustered() {
			b.sweepLater(ctx)
		}
	case sweep:
		b.sweep(ctx)
		b.sweepLater(ctx)
	case *fleetpb.SyncBilling:
		b.sync(ctx, m.NodeId)
	case pruneIdempotency:
		b.pruneIdempotency(ctx)
	case *actor.Stopping, *actor.Restarting:
		for _, t := range b.timers {
			t.Stop()
		}
		if b.pruner != nil {
			b.pruner.Stop()
		}
		if b.sweeper != nil {
			b.sweeper.Stop()
		}
	case startRental:
		r, replayed, err := b.start(ctx, m)
		ctx.Respond(billingResult{rental: r.Clone(), replayed: replayed, err: err})
	case stopRental:
		r, err := b.stop(ctx, m)
		ctx.Respond(billingResult{rental: r.Clone(), err: err})
	case deleteNode:
		ctx.Respond(billingResult{err: b.deleteNode(ctx, m)})
	case nodeOnline:
		b.online(ctx, m)
	case nodeOffline:
		b.offline(ctx, m)
	case reconcile:
		b.reconcile(ctx)
	case rentalTimer:
		b.timerFired(ctx, m)
	case panicNow:
		panic("billing: panic requested")
	}
}

func (b *billing) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

// recover loads the live rentals on start (or after a panic). A rental
// whose node is not online now is paused at the node's last known
// heartbeat, so the time a coordinator was down is never billed. In a
// cluster, a member tracks only the rentals of the nodes it holds, as they
// connect; the sweep looks after the others.
func (b *billing) recover(ctx actor.Context) {
	b.live, b.timers, b.gens = map[string]*fleet.Rental{}, map[string]*time.Timer{}, map[string]uint64{}
	b.rented.Clear()
	c, cancel := b.ctx()
	defer cancel()
	var rentals []*fleet.Rental
	if !b.clustered() {
		var err error
		if rentals, err = b.cfg.Rentals.LiveRentals(c); err != nil {
			// Without its rentals billing cannot run; a restart will try again.
			panic("billing: loading live rentals: " + err.Error())
		}
	} else {
		for _, id := range b.localOnline() {
			if r, err := b.cfg.Rentals.LiveRentalByNode(c, id); err == nil {
				rentals = append(rentals, r)
			}
		}
	}
	now := b.cfg.Now()
	for _, r := range rentals {
		b.live[r.NodeID] = r
		b.rented.Store(r.NodeID, r.ID)
		p, _ := b.view.get(r.NodeID)
		if p.Online {
			if r.Status == fleet.RentalPaused {
				b.save(r, func(x *fleet.Rental) { x.Resume(now) })
			}
			b.arm(ctx, r, now)
			continue
		}
		lastSeen := b.lastSeen(c, r.NodeID, p.LastSeenAt)
		if r.Status == fleet.RentalActive {
			b.save(r, func(x *fleet.Rental) { x.Pause(lastSeen) })
		}
		// The lost timer counts from now, not from the last checkpoint: the
		// time this coordinator was down is not the node's fault, and its
		// agent has had no chance to reconnect yet.
		b.armLost(ctx, r, now)
	}
	if len(rentals) > 0 {
		b.cfg.Logger.Info("billing resumed live rentals", "count", len(rentals))
	}
}

func (b *billing) clustered() bool { return b.cfg.Cluster != nil }

// localOnline lists the nodes held by this member.
func (b *billing) localOnline() []string {
	var ids []string
	for id, p := range b.view.all() {
		if p.Online {
			ids = append(ids, id)
		}
	}
	return ids
}

// lastSeen is the latest heartbeat known of a node: from the live views
// (this member's, or another's) or the store's checkpoint.
func (b *billing) lastSeen(c context.Context, nodeID string, known time.Time) time.Time {
	if p := b.sys.Presence(nodeID); p.LastSeenAt.After(known) {
		known = p.LastSeenAt
	}
	if n, err := b.cfg.Nodes.Node(c, nodeID); err == nil && n.LastSeenAt != nil && n.LastSeenAt.After(known) {
		known = *n.LastSeenAt
	}
	return known
}

// save applies fn to r in the store and keeps the stored result.
func (b *billing) save(r *fleet.Rental, fn func(*fleet.Rental)) bool {
	c, cancel := b.ctx()
	defer cancel()
	updated, err := b.cfg.Rentals.UpdateRental(c, r.ID, func(x *fleet.Rental) error { fn(x); return nil })
	if err != nil {
		b.cfg.Logger.LogAttrs(c, slog.LevelError, "saving rental failed", slog.String("rental_id", r.ID), slog.String("error", err.Error()))
		fn(r) // keep billing right in memory; the next save writes it
		return false
	}
	*r = *updated
	return true
}

func (b *billing) start(ctx actor.Context, m startRental) (*fleet.Rental, bool, error) {
	c, cancel := b.ctx()
	defer cancel()
	if m.idemKey != "" {
		rec, err := b.cfg.Rentals.Idempotency(c, m.renterID, m.idemKey)
		switch {
		case err == nil && !bytes.Equal(rec.BodyHash, m.bodyHash):
			return nil, false, fleet.Errorf(fleet.ECONFLICT, "Idempotency-Key was used with a different request body.")
		case err == nil:
			r, err := b.cfg.Rentals.Rental(c, rec.RentalID)
			return r, true, err
		case fleet.ErrorCode(err) != fleet.ENOTFOUND:
			return nil, false, err
		}
	}
	node, err := b.cfg.Nodes.Node(c, m.nodeID)
	if err != nil {
		return nil, false, err
	}
	switch p := b.sys.Presence(m.nodeID); {
	case node.OwnerID == m.renterID:
		return nil, false, fleet.Errorf(fleet.ECONFLICT, "You cannot rent your own node.")
	case b.live[m.nodeID] != nil:
		return nil, false, fleet.Errorf(fleet.ECONFLICT, "Node is already rented.")
	case !p.Online:
		return nil, false, fleet.Errorf(fleet.ECONFLICT, "Node is offline; only an online node can be rented.")
	}
	now := b.cfg.Now().UTC()
	r := &fleet.Rental{
		ID: fleet.NewID("rnt_"), NodeID: node.ID, RenterID: m.renterID, OwnerID: node.OwnerID,
		PricePerHourCents: node.PricePerHourCents, Status: fleet.RentalActive, StartedAt: now,
		MaxHours: m.maxHours, Intervals: []fleet.Interval{{Start: now}},
	}
	var idem *fleet.Idempotency
	if m.idemKey != "" {
		idem = &fleet.Idempotency{UserID: m.renterID, Key: m.idemKey, BodyHash: m.bodyHash, RentalID: r.ID, CreatedAt: now}
	}
	if err := b.cfg.Rentals.CreateRental(c, r, idem); err != nil {
		if fleet.ErrorCode(err) == fleet.ECONFLICT && idem == nil {
			return nil, false, fleet.Errorf(fleet.ECONFLICT, "Node is already rented.")
		}
		return nil, false, err
	}
	if p, _ := b.view.get(r.NodeID); !p.Online {
		// Another member holds the node: its billing takes the rental on.
		ctx.Send(ctx.Parent(), syncElsewhere{nodeID: r.NodeID})
		b.cfg.Logger.Info("rental started", "rental_id", r.ID, "node_id", r.NodeID, "renter_id", r.RenterID, "held_by", "another member")
		return r, false, nil
	}
	b.live[r.NodeID] = r
	b.rented.Store(r.NodeID, r.ID)
	b.arm(ctx, r, now)
	b.notify(ctx, r)
	b.cfg.Logger.Info("rental started", "rental_id", r.ID, "node_id", r.NodeID, "renter_id", r.RenterID)
	return r, false, nil
}

func (b *billing) stop(ctx actor.Context, m stopRental) (*fleet.Rental, error) {
	c, cancel := b.ctx()
	defer cancel()
	r, err := b.cfg.Rentals.Rental(c, m.rentalID)
	if err != nil {
		return nil, err
	}
	if m.userID != r.RenterID && m.userID != r.OwnerID {
		return nil, fleet.Errorf(fleet.ENOTFOUND, "Rental not found.")
	}
	live := b.live[r.NodeID]
	if (live == nil || live.ID != r.ID) && b.clustered() && r.Live() {
		return b.stopElsewhere(ctx, m, r)
	}
	if live == nil || live.ID != r.ID {
		return nil, fleet.Errorf(fleet.ECONFLICT, "Rental has already ended (%s).", r.Status)
	}
	reason := "stopped by renter"
	if m.userID == r.OwnerID {
		reason = "stopped by owner"
	}
	b.end(ctx, live, fleet.RentalStopped, reason, b.cfg.Now().UTC())
	return live, nil
}

// stopElsewhere stops a rental whose node this member does not hold: the
// store's transaction decides, and the holder is told.
func (b *billing) stopElsewhere(ctx actor.Context, m stopRental, r *fleet.Rental) (*fleet.Rental, error) {
	c, cancel := b.ctx()
	defer cancel()
	reason := "stopped by renter"
	if m.userID == r.OwnerID {
		reason = "stopped by owner"
	}
	now := b.cfg.Now().UTC()
	ended, err := b.cfg.Rentals.UpdateRental(c, r.ID, func(x *fleet.Rental) error {
		if !x.Live() {
			return fleet.Errorf(fleet.ECONFLICT, "Rental has already ended (%s).", x.Status)
		}
		x.End(fleet.RentalStopped, reason, now)
		return nil
	})
	if err != nil {
		return nil, err
	}
	ctx.Send(ctx.Parent(), syncElsewhere{nodeID: r.NodeID})
	return ended, nil
}

// heldElsewhere asks the node's grain, in a cluster, whether another
// member's actor holds the node now.
func (b *billing) heldElsewhere(nodeID string) bool {
	if !b.clustered() {
		return false
	}
	res, err := b.sys.cluster.Request(nodeID, nodeKind, &fleetpb.WhoHolds{NodeId: nodeID})
	h, ok := res.(*fleetpb.Holder)
	return err == nil && ok && h.Address != "" && h.Address != b.sys.sys.Address()
}

// sync re-reads a node's rental after another member changed it: started
// it, or ended it.
func (b *billing) sync(ctx actor.Context, nodeID string) {
	c, cancel := b.ctx()
	defer cancel()
	r, err := b.cfg.Rentals.LiveRentalByNode(c, nodeID)
	if err == nil {
		b.live[nodeID] = r
		b.rented.Store(nodeID, r.ID)
		now := b.cfg.Now()
		if p, _ := b.view.get(nodeID); p.Online && r.Status == fleet.RentalPaused {
			b.save(r, func(x *fleet.Rental) { x.Resume(now) })
		}
		b.arm(ctx, r, now)
		b.notify(ctx, r)
		return
	}
	if old := b.live[nodeID]; old != nil {
		delete(b.live, nodeID)
		b.rented.Delete(nodeID)
		b.disarm(nodeID)
		if ended, err := b.cfg.Rentals.Rental(c, old.ID); err == nil {
			b.notify(ctx, ended)
		}
	}
}

// sweep is the cluster's safety net for rentals whose node no member
// holds (its coordinator died, say): it pauses them at the last heartbeat
// known and ends them as interrupted after LostAfter. Every member sweeps;
// the store's transactions make it harmless that they overlap.
type sweep struct{}

func (b *billing) sweepLater(ctx actor.Context) {
	self, root := ctx.Self(), ctx.ActorSystem().Root
	b.sweeper = time.AfterFunc(b.cfg.HeartbeatDeadline, func() { root.Send(self, sweep{}) })
}

func (b *billing) sweep(ctx actor.Context) {
	c, cancel := b.ctx()
	defer cancel()
	rentals, err := b.cfg.Rentals.LiveRentals(c)
	if err != nil {
		b.cfg.Logger.Warn("sweeping rentals failed", "error", err)
		return
	}
	now := b.cfg.Now()
	for _, r := range rentals {
		if p, _ := b.view.get(r.NodeID); p.Online || b.sys.Presence(r.NodeID).Online {
			continue // held by this member, or by one that is alive
		}
		lastSeen := b.lastSeen(c, r.NodeID, time.Time{})
		_, err := b.cfg.Rentals.UpdateRental(c, r.ID, func(x *fleet.Rental) error {
			if x.Status == fleet.RentalActive {
				x.Pause(lastSeen)
			}
			if n := len(x.Intervals); x.Status == fleet.RentalPaused && n > 0 && !now.Before(x.Intervals[n-1].End.Add(b.cfg.LostAfter)) {
				x.End(fleet.RentalInterrupted, "node unreachable for "+b.cfg.LostAfter.String(), now.UTC())
			}
			return nil
		})
		if err != nil {
			b.cfg.Logger.Warn("sweeping a rental failed", "rental_id", r.ID, "error", err)
		}
	}
}

func (b *billing) deleteNode(ctx actor.Context, m deleteNode) error {
	c, cancel := b.ctx()
	defer cancel()
	n, err := b.cfg.Nodes.Node(c, m.nodeID)
	if err != nil {
		return err
	}
	if n.OwnerID != m.userID {
		return fleet.Errorf(fleet.EFORBIDDEN, "You do not own this node.")
	}
	if b.live[m.nodeID] != nil {
		return fleet.Errorf(fleet.ECONFLICT, "Node has an active rental; stop it before deleting the node.")
	}
	if err := b.cfg.Nodes.DeleteNode(c, m.nodeID); err != nil {
		return err
	}
	ctx.Send(ctx.Parent(), kick{nodeID: m.nodeID, code: fleet.CloseKeyRevoked})
	return nil
}

// end ends a live rental, frees its node and tells the agent if it can.
func (b *billing) end(ctx actor.Context, r *fleet.Rental, status, reason string, at time.Time) {
	b.save(r, func(x *fleet.Rental) { x.End(status, reason, at) })
	delete(b.live, r.NodeID)
	b.rented.Delete(r.NodeID)
	b.disarm(r.NodeID)
	b.notify(ctx, r)
	secs, cost := r.Figures(at)
	b.cfg.Logger.Info("rental ended", "rental_id", r.ID, "status", status, "reason", reason, "billable_seconds", secs, "cost_cents", cost)
}

func (b *billing) online(ctx actor.Context, m nodeOnline) {
	if b.clustered() {
		c, cancel := b.ctx()
		if r, err := b.cfg.Rentals.LiveRentalByNode(c, m.nodeID); err == nil {
			if r.Status == fleet.RentalActive {
				// Left open by a member that died holding the node: close it
				// at the last heartbeat anyone saw, then resume now.
				seen := b.lastSeen(c, m.nodeID, time.Time{})
				b.save(r, func(x *fleet.Rental) { x.Pause(seen) })
			}
			b.live[m.nodeID] = r
			b.rented.Store(m.nodeID, r.ID)
		}
		cancel()
	}
	if r := b.live[m.nodeID]; r != nil {
		if r.Status == fleet.RentalPaused {
			b.save(r, func(x *fleet.Rental) { x.Resume(m.at) })
			b.cfg.Logger.Info("rental resumed", "rental_id", r.ID)
		}
		b.arm(ctx, r, m.at)
		// A frame sent before the drop may never have arrived: a new
		// connection of a node rented before it hears rental.started again.
		// A rental started since the connection began was told on it already.
		if r.StartedAt.Before(m.at) {
			r.NotifiedStart = false
		}
		b.notify(ctx, r)
	}
	b.notifyEnded(ctx, m.nodeID)
}

// reconcile pauses active rentals whose node the view no longer shows
// online: after a registry restart, a nodeDown may have been lost.
type reconcile struct{}

func (b *billing) reconcile(ctx actor.Context) {
	for id, r := range b.live {
		if p, _ := b.view.get(id); r.Status == fleet.RentalActive && !p.Online {
			b.offline(ctx, nodeOffline{nodeID: id, lastSeen: p.LastSeenAt})
		}
	}
}

func (b *billing) offline(ctx actor.Context, m nodeOffline) {
	r := b.live[m.nodeID]
	if r == nil || r.Status != fleet.RentalActive {
		return
	}
	if b.heldElsewhere(m.nodeID) {
		// The agent moved to another member, whose billing carries on.
		delete(b.live, m.nodeID)
		b.rented.Delete(m.nodeID)
		b.disarm(m.nodeID)
		return
	}
	b.save(r, func(x *fleet.Rental) { x.Pause(m.lastSeen) })
	b.cfg.Logger.Info("rental paused: node unreachable", "rental_id", r.ID, "last_seen", m.lastSeen)
	b.armLost(ctx, r, m.lastSeen)
}

// arm sets the max-hours timer of an active rental.
func (b *billing) arm(ctx actor.Context, r *fleet.Rental, now time.Time) {
	b.disarm(r.NodeID)
	if at := r.CompletesAt(now); !at.IsZero() {
		b.setTimer(ctx, r.NodeID, at.Sub(b.cfg.Now()))
	}
}

// armLost sets the lost timer of a paused rental: LostAfter from its last
// heartbeat.
func (b *billing) armLost(ctx actor.Context, r *fleet.Rental, lastSeen time.Time) {
	b.disarm(r.NodeID)
	b.setTimer(ctx, r.NodeID, lastSeen.Add(b.cfg.LostAfter).Sub(b.cfg.Now()))
}

// timerGens numbers timers across restarts of the billing actor, so that a
// timer armed before a restart can never pass for one armed after it.
var timerGens atomic.Uint64

func (b *billing) setTimer(ctx actor.Context, nodeID string, d time.Duration) {
	b.gens[nodeID] = timerGens.Add(1)
	gen, self, root := b.gens[nodeID], ctx.Self(), ctx.ActorSystem().Root
	b.timers[nodeID] = time.AfterFunc(max(d, 0), func() { root.Send(self, rentalTimer{nodeID: nodeID, gen: gen}) })
}

func (b *billing) disarm(nodeID string) {
	if t := b.timers[nodeID]; t != nil {
		t.Stop()
		delete(b.timers, nodeID)
	}
	b.gens[nodeID] = timerGens.Add(1)
}

func (b *billing) timerFired(ctx actor.Context, m rentalTimer) {
	r := b.live[m.nodeID]
	if r == nil || m.gen != b.gens[m.nodeID] {
		return
	}
	delete(b.timers, m.nodeID)
	now := b.cfg.Now()
	if b.clustered() {
		c, cancel := b.ctx()
		fresh, err := b.cfg.Rentals.Rental(c, r.ID)
		cancel()
		p, _ := b.view.get(m.nodeID)
		if err != nil || !fresh.Live() || (!p.Online && b.sys.Presence(m.nodeID).Online) {
			// Ended, or taken over by the member that holds the node now.
			delete(b.live, m.nodeID)
			b.rented.Delete(m.nodeID)
			return
		}
		*r = *fresh
	}
	switch r.Status {
	case fleet.RentalActive:
		at := r.CompletesAt(now)
		if at.IsZero() {
			return
		}
		if at.After(now) { // woke early: sleep the rest
			b.arm(ctx, r, now)
			return
		}
		b.end(ctx, r, fleet.RentalCompleted, "max_hours reached", at.UTC())
	case fleet.RentalPaused:
		b.end(ctx, r, fleet.RentalInterrupted, "node unreachable for "+b.cfg.LostAfter.String(), now.UTC())
	}
}

// notify tells the node's agent about r if the node is online and has not
// been told yet; otherwise it waits for the node to come back.
func (b *billing) notify(ctx actor.Context, r *fleet.Rental) {
	if p, _ := b.view.get(r.NodeID); !p.Online {
		return
	}
	if !r.NotifiedStart && r.Live() {
		ctx.Send(ctx.Parent(), deliver{nodeID: r.NodeID, event: fleet.EventRentalStarted, data: fleet.RentalStartedEvent{
			RentalID: r.ID, RenterID: r.RenterID, StartedAt: r.StartedAt, MaxHours: r.MaxHours}})
		b.save(r, func(x *fleet.Rental) { x.NotifiedStart = true })
	}
	if !r.Live() && !r.NotifiedStop {
		ctx.Send(ctx.Parent(), deliver{nodeID: r.NodeID, event: fleet.EventRentalStopped, data: fleet.RentalStoppedEvent{
			RentalID: r.ID, Reason: r.EndReason}})
		b.save(r, func(x *fleet.Rental) { x.NotifiedStop = true })
	}
}

// notifyEnded tells a node that just connected about its rentals that
// ended while it could not hear it; the store remembers which those are, so
// restarts and other members' work are covered.
func (b *billing) notifyEnded(ctx actor.Context, nodeID string) {
	c, cancel := b.ctx()
	defer cancel()
	n, err := b.cfg.Nodes.Node(c, nodeID)
	if err != nil {
		return
	}
	rentals, err := b.cfg.Rentals.RentalsByOwner(c, n.OwnerID)
	if err != nil {
		b.cfg.Logger.Warn("listing rentals to notify failed", "node_id", nodeID, "error", err)
		return
	}
	for _, r := range rentals {
		if r.NodeID == nodeID && !r.Live() && !r.NotifiedStop {
			b.notify(ctx, r)
		}
	}
}
