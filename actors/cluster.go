package actors

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/asynkron/protoactor-go/actor"
	"github.com/asynkron/protoactor-go/cluster"
	"github.com/asynkron/protoactor-go/cluster/clusterproviders/etcd"
	"github.com/asynkron/protoactor-go/cluster/identitylookup/disthash"
	"github.com/asynkron/protoactor-go/remote"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/distributedcompute/fleet"
	fleetpb "github.com/distributedcompute/fleet/proto"
)

// ClusterConfig makes a coordinator one member of a protoactor cluster:
// membership through etcd, node grains placed by disthash.
type ClusterConfig struct {
	Name          string   // CLUSTER_NAME: members of one cluster share it
	EtcdEndpoints []string // ETCD_ENDPOINTS
	AdvertiseHost string   // CLUSTER_ADVERTISE_HOST: how other members reach this one
	Port          int      // CLUSTER_PORT: the remote (gRPC) port
	// StartTimeout bounds joining: upstream StartMember hangs while etcd is
	// unreachable, so start-up fails with a clear error instead (15 s).
	StartTimeout time.Duration
	// BroadcastInterval is how often a member sends the others what changed
	// in its live view (250 ms).
	BroadcastInterval time.Duration
}

// nodeKind is the grain kind of the per-node directory.
const nodeKind = "node"

// Membership is a coordinator's place in the cluster: its actor system,
// joined. Join it before opening anything else that speaks gRPC (the etcd
// store): upstream remoting swaps gRPC's global logger as it starts, which
// races with gRPC clients already running.
type Membership struct {
	sys     *actor.ActorSystem
	cluster *cluster.Cluster

	// The other members' addresses, from topology events: the upstream
	// member list may not be read from another goroutine.
	mu       sync.Mutex
	others   []string
	onChange func()
}

// topology records the members of a topology event.
func (m *Membership) topology(t *cluster.ClusterTopology) {
	self := m.sys.Address()
	var others []string
	for _, mem := range t.Members {
		if a := mem.Address(); a != self {
			others = append(others, a)
		}
	}
	m.mu.Lock()
	m.others = others
	onChange := m.onChange
	m.mu.Unlock()
	if onChange != nil {
		onChange()
	}
}

// leave takes this member out of the cluster: deregistered from etcd,
// remoting and the actor system stopped.
func (m *Membership) leave() {
	if p, ok := m.cluster.Config.ClusterProvider.(*lazyEtcd); ok {
		_ = p.Shutdown(true)
	}
	m.cluster.Shutdown(false)
}

// peers returns the other members' addresses.
func (m *Membership) peers() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.others
}

// notify sets what to do when the members change.
func (m *Membership) notify(fn func()) {
	m.mu.Lock()
	m.onChange = fn
	m.mu.Unlock()
}

// Join starts an actor system and makes it a member of the cluster, or
// fails within cfg.StartTimeout (upstream StartMember hangs while etcd is
// unreachable).
func Join(cc ClusterConfig, log *slog.Logger) (*Membership, error) {
	if cc.StartTimeout <= 0 {
		cc.StartTimeout = 15 * time.Second
	}
	sys := actor.NewActorSystem(actor.WithLoggerFactory(func(*actor.ActorSystem) *slog.Logger {
		return log.With("component", "protoactor")
	}))
	m := &Membership{sys: sys}
	// Subscribed before joining, so the first topology is not missed.
	sys.EventStream.Subscribe(func(ev any) {
		if t, ok := ev.(*cluster.ClusterTopology); ok {
			m.topology(t)
		}
	})
	c, err := startCluster(sys, &cc, log)
	if err != nil {
		sys.Shutdown()
		return nil, err
	}
	m.cluster = c
	return m, nil
}

// lazyEtcd is protoactor's etcd provider, created only when the member
// starts, after remoting has set gRPC up.
type lazyEtcd struct {
	cfg clientv3.Config
	p   *etcd.Provider
}

func (l *lazyEtcd) StartMember(c *cluster.Cluster) error {
	p, err := etcd.NewWithConfig("/distributedcompute/cluster", l.cfg)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	l.p = p
	return p.StartMember(c)
}

func (l *lazyEtcd) StartClient(c *cluster.Cluster) error {
	p, err := etcd.NewWithConfig("/distributedcompute/cluster", l.cfg)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	l.p = p
	return p.StartClient(c)
}

func (l *lazyEtcd) Shutdown(graceful bool) error {
	if l.p == nil {
		return nil
	}
	return l.p.Shutdown(graceful)
}

// startCluster joins the cluster, or fails within StartTimeout.
func startCluster(sys *actor.ActorSystem, cc *ClusterConfig, log *slog.Logger) (*cluster.Cluster, error) {
	provider := &lazyEtcd{cfg: clientv3.Config{Endpoints: cc.EtcdEndpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}}
	rc := remote.Configure("0.0.0.0", cc.Port, remote.WithAdvertisedHost(fmt.Sprintf("%s:%d", cc.AdvertiseHost, cc.Port)))
	kind := cluster.NewKind(nodeKind, actor.PropsFromProducer(func() actor.Actor {
		return &nodeGrain{log: log}
	}))
	c := cluster.New(sys, cluster.Configure(cc.Name, provider, disthash.New(), rc,
		cluster.WithKinds(kind), cluster.WithRequestTimeout(5*time.Second)))
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("%v", r)
			}
		}()
		c.StartMember()
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			return nil, fmt.Errorf("cluster: joining %q failed: %w", cc.Name, err)
		}
		return c, nil
	case <-time.After(cc.StartTimeout):
		return nil, fmt.Errorf("cluster: could not join %q within %s: is etcd reachable at %v?", cc.Name, cc.StartTimeout, cc.EtcdEndpoints)
	}
}

// nodeGrain is the cluster-wide directory entry of one node: which member's
// actor holds its socket. It keeps one connection per node across the
// cluster, and routes commands to the holder wherever it is. Its state is
// soft: after it re-activates elsewhere, holders attach again.
type nodeGrain struct {
	log    *slog.Logger
	holder *actor.PID
}

func (g *nodeGrain) Receive(ctx actor.Context) {
	switch m := ctx.Message().(type) {
	case *fleetpb.Attach:
		pid := actor.NewPID(m.Address, m.ActorId)
		if g.holder != nil && !g.holder.Equal(pid) {
			ctx.Send(g.holder, &fleetpb.Kick{CloseCode: fleet.CloseReplaced})
		}
		g.holder = pid
		ctx.Respond(&fleetpb.Ack{})
	case *fleetpb.Detach:
		if g.holder != nil && g.holder.Equal(actor.NewPID(m.Address, m.ActorId)) {
			g.holder = nil
		}
		ctx.Respond(&fleetpb.Ack{})
	case *fleetpb.WhoHolds:
		if g.holder == nil {
			ctx.Respond(&fleetpb.Holder{})
		} else {
			ctx.Respond(&fleetpb.Holder{Address: g.holder.Address, ActorId: g.holder.Id})
		}
	case *fleetpb.Command:
		if h := g.holder; h != nil {
			switch {
			case m.CloseCode != 0:
				ctx.Send(h, &fleetpb.Kick{CloseCode: m.CloseCode})
			case m.SyncBilling:
				ctx.Send(actor.NewPID(h.Address, "fleet/billing"), &fleetpb.SyncBilling{NodeId: m.NodeId})
			case m.Event != "":
				ctx.Send(h, &fleetpb.Deliver{Event: m.Event, Data: m.Data})
			}
		}
		ctx.Respond(&fleetpb.Ack{})
	}
}

// peers holds what the other members report of their nodes, and sends them
// what this member holds. A member not heard from for a heartbeat deadline
// counts as gone: its nodes stop showing online, as a dead coordinator's
// must within deadline + 1 s.
type peers struct {
	cfg     *Config
	cluster *cluster.Cluster
	local   *view
	rented  *sync.Map

	mu      sync.RWMutex
	members map[string]*peerView // member address -> what it reported

	sent       map[string]fleet.Presence // what we last told the others
	lastFull   time.Time
	membership *Membership
}

type peerView struct {
	heard time.Time
	nodes map[string]fleet.Presence
}

// alive reports whether a member's reports still count.
func (p *peers) alive(v *peerView, now time.Time) bool {
	return now.Sub(v.heard) < p.cfg.HeartbeatDeadline
}

// presence returns the freshest state of a node that other members report:
// online if an alive member holds it, else its latest last-seen.
func (p *peers) presence(nodeID string) (fleet.Presence, bool) {
	now := p.cfg.Now()
	p.mu.RLock()
	defer p.mu.RUnlock()
	var best fleet.Presence
	found := false
	for _, v := range p.members {
		e, ok := v.nodes[nodeID]
		if !ok {
			continue
		}
		if !p.alive(v, now) {
			e.Online = false
		}
		if e.Online && !best.Online || (e.Online == best.Online && e.LastSeenAt.After(best.LastSeenAt)) {
			best, found = e, true
		}
	}
	return best, found
}

// online adds the nodes alive members hold to out.
func (p *peers) online(out map[string]fleet.Presence) {
	now := p.cfg.Now()
	p.mu.RLock()
	defer p.mu.RUnlock()
	for _, v := range p.members {
		if !p.alive(v, now) {
			continue
		}
		for id, e := range v.nodes {
			if _, local := out[id]; e.Online && !local {
				out[id] = e
			}
		}
	}
}

// receive merges one member's report.
func (p *peers) receive(d *fleetpb.PresenceDelta) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.members[d.Member]
	if v == nil || d.Full {
		v = &peerView{nodes: make(map[string]fleet.Presence, len(d.Entries))}
		p.members[d.Member] = v
	}
	v.heard = p.cfg.Now()
	for _, e := range d.Entries {
		pr := fleet.Presence{Online: e.Online, Member: d.Member, Rented: e.Rented,
			ConnectedSince: unixNano(e.ConnectedSinceUnixNano), LastSeenAt: unixNano(e.LastSeenUnixNano)}
		if len(e.MetricsJson) > 0 {
			var m fleet.Metrics
			if json.Unmarshal(e.MetricsJson, &m) == nil {
				pr.Metrics = &m
			}
		}
		v.nodes[e.NodeId] = pr
	}
}

// broadcast sends the others what changed since last time (everything
// every few seconds, so that a member that joined or missed a report
// converges), and forgets members long gone.
func (p *peers) broadcast(root *actor.RootContext) {
	now := p.cfg.Now()
	full := now.Sub(p.lastFull) >= 5*time.Second
	cur := p.local.all()
	d := &fleetpb.PresenceDelta{Member: p.cluster.ActorSystem.Address(), Full: full}
	for id, pr := range cur {
		_, rented := p.rented.Load(id)
		pr.Rented = rented && pr.Online
		cur[id] = pr
		if old, ok := p.sent[id]; full || !ok || old.Online != pr.Online || !old.LastSeenAt.Equal(pr.LastSeenAt) || old.Rented != pr.Rented {
			d.Entries = append(d.Entries, toProto(id, pr))
		}
	}
	if full {
		p.lastFull = now
	}
	p.sent = cur
	for _, addr := range p.membership.peers() {
		root.Send(actor.NewPID(addr, "presence"), d)
	}
	p.mu.Lock()
	for addr, v := range p.members {
		if now.Sub(v.heard) > 10*p.cfg.HeartbeatDeadline {
			delete(p.members, addr)
		}
	}
	p.mu.Unlock()
}

func toProto(id string, pr fleet.Presence) *fleetpb.Presence {
	e := &fleetpb.Presence{NodeId: id, Online: pr.Online, Rented: pr.Rented,
		ConnectedSinceUnixNano: nano(pr.ConnectedSince), LastSeenUnixNano: nano(pr.LastSeenAt)}
	if pr.Metrics != nil {
		e.MetricsJson, _ = json.Marshal(pr.Metrics)
	}
	return e
}

func nano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func unixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// presenceActor receives the other members' reports.
type presenceActor struct{ peers *peers }

func (a *presenceActor) Receive(ctx actor.Context) {
	if d, ok := ctx.Message().(*fleetpb.PresenceDelta); ok {
		a.peers.receive(d)
	}
}
