// Package actors is the coordinator's actor system: a fleet supervisor, one
// actor per connected node that owns its socket, and a registry that holds
// the live view the REST layer reads.
package actors

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/asynkron/protoactor-go/actor"
	"github.com/asynkron/protoactor-go/cluster"

	"github.com/distributedcompute/fleet"
	fleetpb "github.com/distributedcompute/fleet/proto"
)

// Config is what the actor system needs. Zero durations and sizes take the
// defaults noted.
type Config struct {
	Nodes    fleet.NodeStore
	Sessions fleet.SessionStore
	Rentals  fleet.RentalStore
	// LostAfter ends a rental as interrupted when its node stays
	// unreachable that long (2 min).
	LostAfter time.Duration
	// HeartbeatDeadline closes a connection without a heartbeat for that
	// long (5 s); HeartbeatMinInterval drops heartbeats closer together (1 s).
	HeartbeatDeadline    time.Duration
	HeartbeatMinInterval time.Duration
	// CheckpointInterval is how often last-seen times of online nodes are
	// written to the store (30 s).
	CheckpointInterval time.Duration
	// OutboundQueue bounds the frames waiting to be written to one agent
	// (16): acks and rental events, a handful at a time.
	OutboundQueue int
	// MaxBadFrames malformed frames are tolerated per connection (3); the
	// next closes it with 1008.
	MaxBadFrames int
	// MaxEarlyHeartbeats is how far too-early heartbeats may outnumber
	// timely ones before the connection is closed with 1008 (10).
	MaxEarlyHeartbeats int
	// Member names this coordinator in the live view; in a cluster, its
	// address.
	Member string
	// Cluster, when set, makes this coordinator a cluster member, with the
	// membership Join returned for it.
	Cluster    *ClusterConfig
	Membership *Membership
	Logger     *slog.Logger
	Now        func() time.Time
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.HeartbeatDeadline, 5*time.Second)
	def(&c.HeartbeatMinInterval, time.Second)
	def(&c.CheckpointInterval, 30*time.Second)
	def(&c.LostAfter, 2*time.Minute)
	if c.OutboundQueue <= 0 {
		c.OutboundQueue = 16
	}
	if c.MaxBadFrames <= 0 {
		c.MaxBadFrames = 3
	}
	if c.MaxEarlyHeartbeats <= 0 {
		c.MaxEarlyHeartbeats = 10
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Member == "" {
		c.Member = "local"
	}
	if cc := c.Cluster; cc != nil {
		def(&cc.StartTimeout, 15*time.Second)
		def(&cc.BroadcastInterval, 250*time.Millisecond)
	}
}

// System is the running actor system of one coordinator.
type System struct {
	cfg      *Config
	sys      *actor.ActorSystem
	fleet    *actor.PID
	billing  *actor.PID
	view     *view
	rented   *sync.Map // node ID -> live rental ID, owned by the billing actor
	stopping atomic.Bool
	// In a cluster: the membership, and the other members' live views.
	cluster       *cluster.Cluster
	peers         *peers
	stopBroadcast chan struct{}
}

// New starts the actor system.
func New(cfg Config) (*System, error) {
	cfg.setDefaults()
	if cfg.Nodes == nil || cfg.Sessions == nil || cfg.Rentals == nil {
		return nil, errors.New("actors: Nodes, Sessions and Rentals are required")
	}
	log := cfg.Logger
	if cfg.Cluster != nil && cfg.Membership == nil {
		return nil, errors.New("actors: a cluster member needs the Membership from Join")
	}
	var sys *actor.ActorSystem
	if cfg.Membership != nil {
		sys = cfg.Membership.sys
	} else {
		sys = actor.NewActorSystem(actor.WithLoggerFactory(func(*actor.ActorSystem) *slog.Logger {
			return log.With("component", "protoactor")
		}))
	}
	s := &System{cfg: &cfg, sys: sys, view: newView(), rented: &sync.Map{}}
	if cfg.Cluster != nil {
		s.cluster = cfg.Membership.cluster
		cfg.Member = sys.Address()
		s.peers = &peers{cfg: s.cfg, cluster: s.cluster, membership: cfg.Membership, local: s.view, rented: s.rented, members: map[string]*peerView{}}
		if _, err := sys.Root.SpawnNamed(actor.PropsFromProducer(func() actor.Actor {
			return &presenceActor{peers: s.peers}
		}), "presence"); err != nil {
			return nil, err
		}
	}
	props := actor.PropsFromProducer(func() actor.Actor {
		return &fleetActor{cfg: s.cfg, view: s.view, rented: s.rented, sys: s}
	}, actor.WithSupervisor(supervision{log: log}))
	pid, err := sys.Root.SpawnNamed(props, "fleet")
	if err != nil {
		return nil, err
	}
	s.fleet, s.billing = pid, sys.NewLocalPID("fleet/billing")
	if s.cluster != nil {
		s.stopBroadcast = make(chan struct{})
		go s.broadcastLoop()
		// Grains re-activate elsewhere with no state when members come and
		// go: the node actors attach again.
		cfg.Membership.notify(func() { sys.Root.Send(pid, reattachAll{}) })
	}
	return s, nil
}

// Connect hands an authenticated agent connection to the fleet, which gives
// it to the node's actor; a connection the node already had is replaced.
func (s *System) Connect(n *fleet.Node, keyHash []byte, c fleet.Conn) {
	s.sys.Root.Send(s.fleet, accept{node: n, keyHash: keyHash, conn: c})
}

// Disconnect closes the node's live connection, if any, with code,
// whichever member holds it.
func (s *System) Disconnect(nodeID string, code int) {
	s.sys.Root.Send(s.fleet, kick{nodeID: nodeID, code: code})
	s.command(&fleetpb.Command{NodeId: nodeID, CloseCode: int32(code)})
}

// command passes a command to the node's grain, in a cluster.
func (s *System) command(c *fleetpb.Command) {
	if s.cluster == nil {
		return
	}
	go func() {
		if _, err := s.cluster.Request(c.NodeId, nodeKind, c); err != nil {
			s.cfg.Logger.Warn("cluster command failed", "node_id", c.NodeId, "error", err)
		}
	}()
}

// Presence returns the node's live state, wherever in the cluster it is.
func (s *System) Presence(nodeID string) fleet.Presence {
	p, _ := s.view.get(nodeID)
	if p.Online {
		_, p.Rented = s.rented.Load(nodeID)
		return p
	}
	if s.peers != nil {
		if rp, ok := s.peers.presence(nodeID); ok && (rp.Online || rp.LastSeenAt.After(p.LastSeenAt)) {
			return rp
		}
	}
	return p
}

// Online returns the live state of every connected node in the cluster.
func (s *System) Online() map[string]fleet.Presence {
	all := s.view.all()
	for id, p := range all {
		if !p.Online {
			delete(all, id)
			continue
		}
		_, p.Rented = s.rented.Load(id)
		all[id] = p
	}
	if s.peers != nil {
		s.peers.online(all)
	}
	return all
}

func (s *System) broadcastLoop() {
	t := time.NewTicker(s.cfg.Cluster.BroadcastInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stopBroadcast:
			return
		case <-t.C:
			s.peers.broadcast(s.sys.Root)
		}
	}
}

// Connected returns how many node actors are running.
func (s *System) Connected() int {
	res, err := s.sys.Root.RequestFuture(s.fleet, countNodes{}, 5*time.Second).Result()
	if err != nil {
		return -1
	}
	return res.(int)
}

type countNodes struct{}

// reattachAll makes every node actor attach to its grain again.
type reattachAll struct{}

// syncElsewhere asks the member holding a node to re-read its rental.
type syncElsewhere struct{ nodeID string }

// StartRental rents a node for renterID (see the billing actor for the
// rules). replayed is true when idemKey named an earlier identical request.
func (s *System) StartRental(ctx context.Context, renterID, nodeID string, maxHours *float64, idemKey string, bodyHash []byte) (r *fleet.Rental, replayed bool, err error) {
	res, err := s.ask(ctx, startRental{renterID: renterID, nodeID: nodeID, maxHours: maxHours, idemKey: idemKey, bodyHash: bodyHash})
	return res.rental, res.replayed, err
}

// StopRental stops a live rental on behalf of its renter or its node's owner.
func (s *System) StopRental(ctx context.Context, userID, rentalID string) (*fleet.Rental, error) {
	res, err := s.ask(ctx, stopRental{userID: userID, rentalID: rentalID})
	return res.rental, err
}

// DeleteNode deletes an owner's node unless it has a live rental, and
// closes its agent's connection.
func (s *System) DeleteNode(ctx context.Context, userID, nodeID string) error {
	_, err := s.ask(ctx, deleteNode{userID: userID, nodeID: nodeID})
	return err
}

func (s *System) ask(ctx context.Context, msg any) (billingResult, error) {
	timeout := 15 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	res, err := s.sys.Root.RequestFuture(s.billing, msg, timeout).Result()
	if err != nil {
		return billingResult{}, fmt.Errorf("billing: %w", err)
	}
	br := res.(billingResult)
	return br, br.err
}

// Shutdown closes every agent connection with 1001 ("server shutting down";
// agents reconnect, perhaps elsewhere), waits until their sessions are
// recorded or ctx ends, then stops the actor system.
func (s *System) Shutdown(ctx context.Context) error {
	if !s.stopping.CompareAndSwap(false, true) {
		return nil
	}
	s.sys.Root.Send(s.fleet, kickAll{code: fleet.CloseGoingAway})
	var err error
	for {
		if s.Connected() <= 0 {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(20 * time.Millisecond):
			continue
		}
		break
	}
	_ = s.sys.Root.StopFuture(s.fleet).Wait()
	if s.cluster != nil {
		close(s.stopBroadcast)
		// Leave by removing our etcd key ourselves rather than through the
		// upstream graceful shutdown, whose gossip of the leave races in
		// the members that stay (a data race inside protoactor's block
		// list at the pinned version). The agents are gone already.
		s.cfg.Membership.leave()
		return err
	}
	s.sys.Shutdown()
	return err
}

// fleetActor is the supervisor: it spawns one node actor per accepted
// connection, named by node ID, and the registry.
type fleetActor struct {
	cfg      *Config
	view     *view
	registry *actor.PID
	billing  *actor.PID
	rented   *sync.Map
	sys      *System
	nodes    map[string]*actor.PID // node ID -> its actor
	ids      map[*actor.PID]string
	pending  map[string]accept // a new connection waiting for the old actor to stop
	draining bool
}

func (f *fleetActor) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		f.nodes, f.ids, f.pending = map[string]*actor.PID{}, map[*actor.PID]string{}, map[string]accept{}
		// Names are only taken in a fleet that already ran, which cannot be.
		bill, err := ctx.SpawnNamed(actor.PropsFromProducer(func() actor.Actor {
			return &billing{cfg: f.cfg, view: f.view, rented: f.rented, sys: f.sys}
		}), "billing")
		if err != nil {
			panic(err)
		}
		reg, err := ctx.SpawnNamed(actor.PropsFromProducer(func() actor.Actor {
			return &registry{cfg: f.cfg, view: f.view, billing: bill}
		}), "registry")
		if err != nil {
			panic(err)
		}
		f.registry, f.billing = reg, bill
	case accept:
		f.accept(ctx, m)
	case kick:
		if pid, ok := f.nodes[m.nodeID]; ok {
			ctx.Send(pid, m)
		}
		if p, ok := f.pending[m.nodeID]; ok {
			delete(f.pending, m.nodeID)
			_ = p.conn.Close(m.code, fleet.CloseReason(m.code))
		}
	case kickAll:
		f.draining = true
		for _, pid := range f.nodes {
			ctx.Send(pid, kick{code: m.code})
		}
		for id, p := range f.pending {
			delete(f.pending, id)
			_ = p.conn.Close(m.code, fleet.CloseReason(m.code))
		}
	case rebuild:
		for _, pid := range f.nodes {
			ctx.Send(pid, reportPresence{})
		}
	case deliver:
		if pid, ok := f.nodes[m.nodeID]; ok {
			ctx.Send(pid, m)
		} else if data, err := json.Marshal(m.data); err == nil {
			f.sys.command(&fleetpb.Command{NodeId: m.nodeID, Event: m.event, Data: data})
		}
	case syncElsewhere:
		f.sys.command(&fleetpb.Command{NodeId: m.nodeID, SyncBilling: true})
	case reattachAll:
		for _, pid := range f.nodes {
			ctx.Send(pid, reattachAll{})
		}
	case countNodes:
		ctx.Respond(len(f.nodes))
	case *actor.Terminated:
		id, ok := f.ids[m.Who]
		if !ok {
			return
		}
		delete(f.ids, m.Who)
		delete(f.nodes, id)
		if p, ok := f.pending[id]; ok {
			delete(f.pending, id)
			f.spawn(ctx, p)
		}
	}
}

func (f *fleetActor) accept(ctx actor.Context, a accept) {
	if f.draining {
		_ = a.conn.Close(fleet.CloseGoingAway, fleet.CloseReason(fleet.CloseGoingAway))
		return
	}
	old, ok := f.nodes[a.node.ID]
	if !ok {
		f.spawn(ctx, a)
		return
	}
	// One actor per node: the old one closes with 4009 and the new
	// connection starts once its name is free.
	if p, ok := f.pending[a.node.ID]; ok {
		_ = p.conn.Close(fleet.CloseReplaced, fleet.CloseReason(fleet.CloseReplaced))
	}
	f.pending[a.node.ID] = a
	ctx.Send(old, kick{nodeID: a.node.ID, code: fleet.CloseReplaced})
}

func (f *fleetActor) spawn(ctx actor.Context, a accept) {
	props := actor.PropsFromProducer(func() actor.Actor {
		return &nodeActor{cfg: f.cfg, node: a.node, keyHash: a.keyHash, conn: a.conn, registry: f.registry, view: f.view, cluster: f.sys.cluster}
	})
	pid, err := ctx.SpawnNamed(props, a.node.ID)
	if err != nil {
		f.cfg.Logger.Error("spawning node actor failed", "node_id", a.node.ID, "error", err)
		_ = a.conn.Close(fleet.CloseInternalError, fleet.CloseReason(fleet.CloseInternalError))
		return
	}
	f.nodes[a.node.ID], f.ids[pid] = pid, a.node.ID
}

// supervision is the fleet's strategy: a node actor that fails is stopped
// (its socket is closed and the agent reconnects); the registry and billing
// are restarted and rebuild their state from the node actors and the store.
type supervision struct{ log *slog.Logger }

func (s supervision) HandleFailure(_ *actor.ActorSystem, sup actor.Supervisor, child *actor.PID, rs *actor.RestartStatistics, reason, _ any) {
	if strings.HasSuffix(child.Id, "/registry") || strings.HasSuffix(child.Id, "/billing") {
		// Back off when it keeps failing (a store that is down), so that a
		// restart loop cannot spin the CPU: 100 ms doubling to 10 s.
		rs.Fail()
		n := rs.NumberOfFailures(time.Minute)
		delay := min(100*time.Millisecond<<min(n-1, 7), 10*time.Second)
		s.log.Error("actor failed; restarting it", "actor", child.Id, "reason", reason, "after", delay)
		time.AfterFunc(delay, func() { sup.RestartChildren(child) })
		return
	}
	s.log.Error("node actor failed; closing its connection", "actor", child.Id, "reason", reason)
	sup.StopChildren(child)
}
