package actors

import (
	"sync"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	fleetpb "github.com/distributedcompute/fleet/proto"
)

// The other members' reports: merged, read concurrently, and dropped when a
// member falls silent for a heartbeat deadline.
func TestPeersMergeAndExpire(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	cfg := &Config{HeartbeatDeadline: 5 * time.Second, Now: clock}
	p := &peers{cfg: cfg, members: map[string]*peerView{}}
	seen := now.Add(-time.Second)
	p.receive(&fleetpb.PresenceDelta{Member: "m1", Full: true, Entries: []*fleetpb.Presence{
		{NodeId: "node_a", Online: true, LastSeenUnixNano: seen.UnixNano(), MetricsJson: []byte(`{"cpu_percent":7}`), Rented: true},
		{NodeId: "node_b", Online: false, LastSeenUnixNano: seen.UnixNano()},
	}})
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ { // readers while a member reports
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				p.presence("node_a")
				p.online(map[string]fleet.Presence{})
			}
		}()
	}
	for j := 0; j < 200; j++ {
		p.receive(&fleetpb.PresenceDelta{Member: "m2"})
	}
	wg.Wait()

	a, ok := p.presence("node_a")
	if !ok || !a.Online || !a.Rented || a.Member != "m1" || a.Metrics == nil || a.Metrics.CPUPercent != 7 || !a.LastSeenAt.Equal(seen) {
		t.Fatalf("node_a %+v", a)
	}
	out := map[string]fleet.Presence{}
	p.online(out)
	if len(out) != 1 {
		t.Fatalf("online %v", out)
	}
	// m1 falls silent: past the deadline its nodes are no longer online,
	// but their last heartbeat is still known.
	mu.Lock()
	now = now.Add(6 * time.Second)
	mu.Unlock()
	if a, _ := p.presence("node_a"); a.Online || !a.LastSeenAt.Equal(seen) {
		t.Fatalf("node_a of a silent member %+v", a)
	}
	out = map[string]fleet.Presence{}
	p.online(out)
	if len(out) != 0 {
		t.Fatalf("silent member's nodes online: %v", out)
	}
}
