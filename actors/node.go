package actors

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/asynkron/protoactor-go/actor"
	"github.com/asynkron/protoactor-go/cluster"

	"github.com/distributedcompute/fleet"
	fleetpb "github.com/distributedcompute/fleet/proto"
)

// Reasons recorded when a session ends.
const (
	reasonDisconnected = "disconnected"
	reasonFailed       = "actor failed"
)

// nodeActor owns one agent connection. A reader goroutine turns frames into
// messages; every write goes through the actor into a bounded queue drained
// by a writer goroutine with a write deadline. The heartbeat deadline is a
// timer of the actor's own that only sends it a message, so all state
// changes happen inside Receive and nothing races.
//
// Its state machine: connected (Started) -> closing (close code chosen) ->
// stopped. A panic stops it (the fleet's strategy), which closes the socket
// with 1011 so that the agent reconnects.
type nodeActor struct {
	cfg      *Config
	node     *fleet.Node
	keyHash  []byte
	conn     fleet.Conn
	registry *actor.PID
	view     *view
	cluster  *cluster.Cluster // nil for a lone coordinator

	out            chan fleet.Frame
	closed         atomic.Bool // the reader stops forwarding once set
	writing        atomic.Bool // a writer goroutine is draining out
	closeCode      int
	closeReason    string
	connectedSince time.Time
	lastSeen       time.Time // last accepted heartbeat, or the connect time
	lastAccepted   time.Time
	metrics        *fleet.Metrics
	timer          *time.Timer
	badFrames      int
	strikes        int // heartbeats that came too early, less those on time
}

func (n *nodeActor) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *actor.Started:
		n.start(ctx)
	case inbound:
		n.handleFrame(ctx, m.frame)
	case inboundRaw:
		f, err := fleet.DecodeFrame(m)
		if err != nil {
			n.badFrame(ctx, err)
			return
		}
		n.handleFrame(ctx, f)
	case readFailed:
		if errors.Is(m.err, fleet.ErrBadFrame) {
			n.badFrame(ctx, m.err)
			return
		}
		n.stop(ctx, 0, reasonDisconnected, m.err)
	case writeFailed:
		n.stop(ctx, 0, "write failed", m.err)
	case deadlineTick:
		n.checkDeadline(ctx)
	case kick:
		n.stop(ctx, m.code, fleet.CloseReason(m.code), nil)
	case deliver:
		n.send(ctx, m.event, nil, m.data)
	case *fleetpb.Deliver:
		n.send(ctx, m.Event, nil, json.RawMessage(m.Data))
	case *fleetpb.Kick:
		n.stop(ctx, int(m.CloseCode), fleet.CloseReason(int(m.CloseCode)), nil)
	case reattachAll:
		n.grain(&fleetpb.Attach{NodeId: n.node.ID, Address: ctx.Self().Address, ActorId: ctx.Self().Id})
	case reportPresence:
		ctx.Send(n.registry, nodeUp{nodeID: n.node.ID, pid: ctx.Self(), connectedSince: n.connectedSince,
			lastSeen: n.lastSeen, metrics: n.metrics})
	case panicNow:
		panic("node actor: panic requested")
	case *actor.Stopped:
		n.finish(ctx)
	}
}

func (n *nodeActor) start(ctx actor.Context) {
	now := n.cfg.Now()
	n.connectedSince, n.lastSeen = now, now
	n.out = make(chan fleet.Frame, n.cfg.OutboundQueue)
	self, root := ctx.Self(), ctx.ActorSystem().Root

	// The key may have been rotated between the handshake's lookup and now;
	// Disconnect can only reach actors that exist, so check again.
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if cur, err := n.cfg.Nodes.NodeByKeyHash(c, n.keyHash); err != nil || cur.ID != n.node.ID {
		n.stop(ctx, fleet.CloseKeyRevoked, fleet.CloseReason(fleet.CloseKeyRevoked), err)
		return
	}
	if err := n.cfg.Sessions.OpenSession(c, n.node.ID, now); err != nil {
		n.cfg.Logger.Warn("recording session start failed", "node_id", n.node.ID, "error", err)
	}

	go n.readLoop(root, self)
	n.timer = time.AfterFunc(n.cfg.HeartbeatDeadline, func() { root.Send(self, deadlineTick{}) })
	n.send(ctx, fleet.EventWelcome, nil, fleet.Welcome{
		NodeID: n.node.ID, Name: n.node.Name,
		HeartbeatDeadlineMS:    n.cfg.HeartbeatDeadline.Milliseconds(),
		HeartbeatMinIntervalMS: n.cfg.HeartbeatMinInterval.Milliseconds(),
		ServerTime:             now.UTC(),
	})
	// The node is online in the view before its first heartbeat can be
	// handled; the registry records the transition.
	n.view.set(n.node.ID, fleet.Presence{Online: true, ConnectedSince: now, LastSeenAt: now, Member: n.cfg.Member})
	ctx.Send(n.registry, nodeUp{nodeID: n.node.ID, pid: self, connectedSince: now, lastSeen: now})
	// One connection per node in the whole cluster: the grain closes any
	// other member's with 4009.
	n.grain(&fleetpb.Attach{NodeId: n.node.ID, Address: self.Address, ActorId: self.Id})
	n.cfg.Logger.Info("agent connected", "node_id", n.node.ID, "remote", n.conn.RemoteAddr())
}

// grain sends msg to the node's grain, in a cluster, without blocking the
// actor.
func (n *nodeActor) grain(msg any) {
	if n.cluster == nil {
		return
	}
	c, id, log := n.cluster, n.node.ID, n.cfg.Logger
	go func() {
		if _, err := c.Request(id, nodeKind, msg); err != nil {
			log.Warn("node grain request failed", "node_id", id, "error", err)
		}
	}()
}

func (n *nodeActor) readLoop(root *actor.RootContext, self *actor.PID) {
	raw, _ := n.conn.(fleet.RawConn)
	for {
		var msg any
		var err error
		if raw != nil {
			var b []byte
			b, err = raw.ReadRaw()
			msg = inboundRaw(b)
		} else {
			var f fleet.Frame
			f, err = n.conn.ReadFrame()
			msg = inbound{f}
		}
		if n.closed.Load() {
			return
		}
		if err != nil {
			root.Send(self, readFailed{err})
			if !errors.Is(err, fleet.ErrBadFrame) {
				return
			}
			continue
		}
		root.Send(self, msg)
	}
}

// writeLoop drains the queue and exits when it is empty: a connection has a
// writer goroutine (and its stack) only while it has something to write.
// After a failed write, writing stays set so that no writer starts again.
func (n *nodeActor) writeLoop(root *actor.RootContext, self *actor.PID) {
	for {
		select {
		case f, ok := <-n.out:
			if !ok {
				return
			}
			if err := n.conn.WriteFrame(f); err != nil {
				if !n.closed.Load() {
					root.Send(self, writeFailed{err})
				}
				return
			}
		default:
			n.writing.Store(false)
			// A frame queued between the empty check and the store would
			// otherwise wait for the next one.
			if len(n.out) == 0 || !n.writing.CompareAndSwap(false, true) {
				return
			}
		}
	}
}

// send queues a frame. A full queue means the agent does not read: it is
// closed rather than buffered without bound.
func (n *nodeActor) send(ctx actor.Context, event string, ack *uint64, data any) {
	if n.closeCode != 0 || n.out == nil {
		return
	}
	raw, err := json.Marshal(data)
	if err != nil {
		n.cfg.Logger.Error("encoding frame failed", "event", event, "error", err)
		return
	}
	select {
	case n.out <- fleet.Frame{Event: event, Data: raw, Ack: ack}:
	default:
		n.stop(ctx, fleet.ClosePolicyViolation, "outbound queue full", nil)
		return
	}
	if n.writing.CompareAndSwap(false, true) {
		go n.writeLoop(ctx.ActorSystem().Root, ctx.Self())
	}
}

func (n *nodeActor) handleFrame(ctx actor.Context, f fleet.Frame) {
	if n.closeCode != 0 {
		return
	}
	if f.Event != fleet.EventHeartbeat {
		n.badFrame(ctx, errors.New("unknown event"))
		return
	}
	heartbeatsReceived.Inc()
	now := n.cfg.Now()
	// Spacing first: a flood is dropped without the cost of decoding it.
	if !n.lastAccepted.IsZero() && now.Sub(n.lastAccepted) < n.cfg.HeartbeatMinInterval {
		heartbeatsDropped.Inc()
		if n.strikes++; n.strikes > n.cfg.MaxEarlyHeartbeats {
			n.stop(ctx, fleet.ClosePolicyViolation, "heartbeat flooding", nil)
			return
		}
		n.ack(ctx, f.Ack, now, false)
		return
	}
	m := &fleet.Metrics{}
	if len(f.Data) > 0 && !bytes.Equal(f.Data, []byte("null")) {
		if err := json.Unmarshal(f.Data, m); err != nil {
			n.badFrame(ctx, err)
			return
		}
		if err := m.Validate(); err != nil {
			n.badFrame(ctx, err)
			return
		}
	}
	n.lastAccepted, n.lastSeen, n.metrics = now, now, m
	if n.strikes > 0 {
		n.strikes--
	}
	// The live view is updated in place: a message to the registry per
	// heartbeat would put every heartbeat of the fleet through one mailbox.
	// Transitions still go through the registry.
	n.view.seen(n.node.ID, now, m)
	n.timer.Reset(n.cfg.HeartbeatDeadline)
	n.ack(ctx, f.Ack, now, true)
}

// ack answers a heartbeat that asked for it.
func (n *nodeActor) ack(ctx actor.Context, id *uint64, now time.Time, accepted bool) {
	if id != nil {
		n.send(ctx, fleet.EventAck, id, fleet.HeartbeatAck{ReceivedAt: now.UTC(), Accepted: accepted})
	}
}

func (n *nodeActor) badFrame(ctx actor.Context, err error) {
	badFrames.Inc()
	n.badFrames++
	n.cfg.Logger.Debug("bad frame from agent", "node_id", n.node.ID, "error", err)
	if n.badFrames > n.cfg.MaxBadFrames {
		n.stop(ctx, fleet.ClosePolicyViolation, "malformed frames", err)
	}
}

// checkDeadline runs when the timer fires. The timer was set for the last
// heartbeat known when it was armed; if one came since, re-arm for the rest.
func (n *nodeActor) checkDeadline(ctx actor.Context) {
	if n.closeCode != 0 {
		return
	}
	left := n.cfg.HeartbeatDeadline - n.cfg.Now().Sub(n.lastSeen)
	if left > 0 {
		n.timer.Reset(left)
		return
	}
	deadlineMisses.Inc()
	n.stop(ctx, fleet.CloseHeartbeatTimeout, fleet.CloseReason(fleet.CloseHeartbeatTimeout), nil)
}

// stop closes the connection with code (0: the peer is already gone) and
// stops the actor; finish does the rest once it has stopped.
func (n *nodeActor) stop(ctx actor.Context, code int, reason string, err error) {
	if n.closeCode != 0 {
		return
	}
	if code == 0 {
		n.closeCode = -1
	} else {
		n.closeCode = code
	}
	n.closeReason = reason
	attrs := []any{"node_id", n.node.ID, "reason", reason, "code", code}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	n.cfg.Logger.Info("agent disconnected", attrs...)
	ctx.Stop(ctx.Self())
}

// finish runs in Stopped, also after a panic: it closes the socket, tells
// the registry and records the end of the session.
func (n *nodeActor) finish(ctx actor.Context) {
	if n.closeCode == 0 { // stopped without a reason: a panic or the fleet stopping
		n.closeCode, n.closeReason = fleet.CloseInternalError, reasonFailed
	}
	n.closed.Store(true)
	if n.timer != nil {
		n.timer.Stop()
	}
	code := n.closeCode
	if code < 0 {
		code = 1000
	}
	_ = n.conn.Close(code, n.closeReason)
	if n.out != nil {
		close(n.out)
	}
	if n.timer == nil {
		return // never fully started: no session, nothing to report
	}
	ctx.Send(n.registry, nodeDown{nodeID: n.node.ID, pid: ctx.Self(), lastSeen: n.lastSeen})
	n.grain(&fleetpb.Detach{NodeId: n.node.ID, Address: ctx.Self().Address, ActorId: ctx.Self().Id})
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.cfg.Sessions.CloseSession(c, n.node.ID, n.lastSeen, n.closeReason); err != nil {
		n.cfg.Logger.LogAttrs(c, slog.LevelWarn, "recording session end failed", slog.String("node_id", n.node.ID), slog.String("error", err.Error()))
	}
	ctx.Send(n.registry, forget{nodeID: n.node.ID})
}
