package actors

import (
	"hash/maphash"
	"sync"
	"time"

	"github.com/distributedcompute/fleet"
)

const viewShards = 64

// view is the live state of connected nodes. The registry actor is its only
// writer; the REST layer reads it directly. It is sharded so that a listing
// that walks every node never holds up heartbeats for long.
type view struct {
	seed   maphash.Seed
	shards [viewShards]viewShard
}

type viewShard struct {
	mu    sync.RWMutex
	nodes map[string]fleet.Presence
}

func newView() *view {
	v := &view{seed: maphash.MakeSeed()}
	for i := range v.shards {
		v.shards[i].nodes = make(map[string]fleet.Presence)
	}
	return v
}

func (v *view) shard(id string) *viewShard {
	return &v.shards[maphash.String(v.seed, id)%viewShards]
}

func (v *view) get(id string) (fleet.Presence, bool) {
	s := v.shard(id)
	s.mu.RLock()
	p, ok := s.nodes[id]
	s.mu.RUnlock()
	return p, ok
}

func (v *view) set(id string, p fleet.Presence) {
	s := v.shard(id)
	s.mu.Lock()
	s.nodes[id] = p
	s.mu.Unlock()
}

// seen records a heartbeat on an existing entry, under one lock.
func (v *view) seen(id string, at time.Time, m *fleet.Metrics) {
	s := v.shard(id)
	s.mu.Lock()
	if p, ok := s.nodes[id]; ok {
		p.LastSeenAt, p.Metrics = at, m
		s.nodes[id] = p
	}
	s.mu.Unlock()
}

func (v *view) delete(id string) {
	s := v.shard(id)
	s.mu.Lock()
	delete(s.nodes, id)
	s.mu.Unlock()
}

func (v *view) clear() {
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.Lock()
		clear(s.nodes)
		s.mu.Unlock()
	}
}

// all copies the live state of every node, one shard at a time.
func (v *view) all() map[string]fleet.Presence {
	out := make(map[string]fleet.Presence, v.len())
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.RLock()
		for id, p := range s.nodes {
			out[id] = p
		}
		s.mu.RUnlock()
	}
	return out
}

func (v *view) len() int {
	n := 0
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.RLock()
		n += len(s.nodes)
		s.mu.RUnlock()
	}
	return n
}
