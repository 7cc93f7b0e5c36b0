package persistence_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/internal/etcdtest"
	"github.com/distributedcompute/fleet/persistence"
)

// The tests of the etcd store share one etcd server, started by the first
// of them; each store gets a key prefix of its own.
func TestMain(m *testing.M) { etcdtest.Main(m) }

// etcdPageSize is far below the default so that the suites' listings of a
// few nodes or rentals span several range requests.
const etcdPageSize = 3

func openEtcdStore(t testing.TB, endpoint, prefix string) *persistence.EtcdStore {
	t.Helper()
	s, err := persistence.OpenEtcd(context.Background(), persistence.EtcdConfig{
		Endpoints:   []string{endpoint},
		Prefix:      prefix,
		DialTimeout: 10 * time.Second,
		PageSize:    etcdPageSize,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func newEtcdStore(t *testing.T) *persistence.EtcdStore {
	return openEtcdStore(t, etcdtest.Start(t), etcdtest.Prefix(t))
}

func TestEtcdNodeStore(t *testing.T) {
	testNodeStore(t, func(t *testing.T) storeUnderTest { return newEtcdStore(t) })
}

func TestEtcdSessionStore(t *testing.T) {
	testSessionStore(t, func(t *testing.T) storeUnderTest { return newEtcdStore(t) })
}

func TestEtcdRentalStore(t *testing.T) {
	testRentalStore(t, func(t *testing.T) fleet.RentalStore { return newEtcdStore(t) })
}

func TestEtcdClosePrunesOldSessions(t *testing.T) {
	testClosePrunesOldSessions(t, newEtcdStore(t))
}

// twoCoordinators opens two stores on one prefix through two clients, as
// two coordinators of a cluster do.
func twoCoordinators(t *testing.T) [2]*persistence.EtcdStore {
	endpoint, prefix := etcdtest.Start(t), etcdtest.Prefix(t)
	return [2]*persistence.EtcdStore{openEtcdStore(t, endpoint, prefix), openEtcdStore(t, endpoint, prefix)}
}

// Two coordinators changing one node at once lose no update: each change
// runs on the latest record.
func TestEtcdConcurrentUpdatesAcrossClients(t *testing.T) {
	ctx := context.Background()
	stores := twoCoordinators(t)
	mustCreate(t, stores[0], "node_1", "user_1")
	const each = 50
	var wg sync.WaitGroup
	for _, s := range stores {
		for range each {
			wg.Go(func() {
				if _, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
					n.PricePerHourCents++
					var count int
					if _, err := fmt.Sscanf(n.Name, "updated %d times", &count); err != nil {
						count = 0
					}
					n.Name = fmt.Sprintf("updated %d times", count+1)
					return nil
				}); err != nil {
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
	for i, s := range stores {
		n, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		if want := int64(150 + 2*each); n.PricePerHourCents != want {
			t.Errorf("store %d: price after %d increments = %d, want %d", i, 2*each, n.PricePerHourCents, want)
		}
		if want := fmt.Sprintf("updated %d times", 2*each); n.Name != want {
			t.Errorf("store %d: name %q, want %q", i, n.Name, want)
		}
	}
}

// Two coordinators renting one node at once rent it once.
func TestEtcdConcurrentRentalsAcrossClients(t *testing.T) {
	ctx := context.Background()
	stores := twoCoordinators(t)
	const each = 10
	var (
		mu      sync.Mutex
		winners []string
		wg      sync.WaitGroup
	)
	for c, s := range stores {
		for i := range each {
			wg.Go(func() {
				id := fmt.Sprintf("rental_%d_%02d", c, i)
				r := newRental(id, "node_1", "user_"+id, "host_1", t0.Add(time.Duration(i)*time.Minute))
				err := s.CreateRental(ctx, r, newIdempotency(r.RenterID, "key", id, time.Now()))
				switch fleet.ErrorCode(err) {
				case "":
					mu.Lock()
					winners = append(winners, id)
					mu.Unlock()
				case fleet.ECONFLICT:
					if msg := fleet.ErrorMessage(err); msg != "Node already has an active rental." {
						t.Errorf("CreateRental(%s): conflict %q", id, msg)
					}
				default:
					t.Errorf("CreateRental(%s): %v", id, err)
				}
			})
		}
	}
	wg.Wait()
	if len(winners) != 1 {
		t.Fatalf("%d rentals of one node created: %v", len(winners), winners)
	}
	for _, s := range stores {
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.ID != winners[0] {
			t.Errorf("LiveRentalByNode = %v, %v; want %s", got, err, winners[0])
		}
		if live, err := s.LiveRentals(ctx); err != nil || len(live) != 1 {
			t.Errorf("LiveRentals = %v, %v; want only %s", rentalIDs(live), err, winners[0])
		}
	}
	// Nothing of the losers was kept.
	for c := range stores {
		for i := range each {
			id := fmt.Sprintf("rental_%d_%02d", c, i)
			if id == winners[0] {
				continue
			}
			_, err := stores[0].Rental(ctx, id)
			wantCode(t, "losing rental "+id, err, fleet.ENOTFOUND)
			_, err = stores[1].Idempotency(ctx, "user_"+id, "key")
			wantCode(t, "key of losing rental "+id, err, fleet.ENOTFOUND)
		}
	}
}

// Two coordinators giving two nodes one API key hash at once: one wins, and
// the hash names it.
func TestEtcdConcurrentKeyHashAcrossClients(t *testing.T) {
	ctx := context.Background()
	stores := twoCoordinators(t)
	for round := range 10 {
		a, b := fmt.Sprintf("a_%d", round), fmt.Sprintf("b_%d", round)
		mustCreate(t, stores[0], a, "user_1")
		mustCreate(t, stores[1], b, "user_1")
		key := fleet.NewAPIKey()
		errs := make([]error, 2)
		var wg sync.WaitGroup
		for i, id := range []string{a, b} {
			wg.Go(func() { _, errs[i] = stores[i].SetAPIKey(ctx, id, key.Hash, key.Prefix) })
		}
		wg.Wait()
		var winner string
		for i, id := range []string{a, b} {
			switch fleet.ErrorCode(errs[i]) {
			case "":
				if winner != "" {
					t.Fatalf("round %d: both %s and %s got one key hash", round, winner, id)
				}
				winner = id
			case fleet.ECONFLICT:
			default:
				t.Fatalf("round %d: SetAPIKey(%s): %v", round, id, errs[i])
			}
		}
		if winner == "" {
			t.Fatalf("round %d: neither node got the key", round)
		}
		if got, err := stores[0].NodeByKeyHash(ctx, key.Hash); err != nil || got.ID != winner {
			t.Errorf("round %d: key resolves to %v, %v; want %s", round, got, err, winner)
		}
	}
}

// etcd's client connects lazily; OpenEtcd must still fail at once, within
// its dial timeout, when nothing answers, and say what it tried.
func TestOpenEtcdUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	endpoint := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	const timeout = 500 * time.Millisecond
	start := time.Now()
	s, err := persistence.OpenEtcd(context.Background(), persistence.EtcdConfig{
		Endpoints: []string{endpoint}, Prefix: "/fleet/unreachable/", DialTimeout: timeout,
	})
	elapsed := time.Since(start)
	if err == nil {
		s.Close()
		t.Fatal("OpenEtcd of a dead endpoint succeeded")
	}
	if !strings.Contains(err.Error(), endpoint) || !strings.Contains(err.Error(), "no answer within 500ms") {
		t.Errorf("error %q does not name the endpoint and the timeout", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v is not a deadline", err)
	}
	// A generous bound: the point is that it does not hang.
	if elapsed > timeout+5*time.Second {
		t.Errorf("OpenEtcd took %v with a dial timeout of %v", elapsed, timeout)
	}
}

func TestOpenEtcdConfig(t *testing.T) {
	for name, cfg := range map[string]persistence.EtcdConfig{
		"no endpoints": {Prefix: "/fleet/x/"},
		"no prefix":    {Endpoints: []string{"http://127.0.0.1:1"}},
	} {
		if _, err := persistence.OpenEtcd(context.Background(), cfg); err == nil {
			t.Errorf("%s: OpenEtcd succeeded", name)
		}
	}
}

// The prefix carries a schema version: a new prefix gets this build's, a
// newer one is refused, and keys without a version are not taken over.
func TestEtcdSchema(t *testing.T) {
	ctx := context.Background()
	endpoint := etcdtest.Start(t)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	open := func(prefix string) error {
		s, err := persistence.OpenEtcd(ctx, persistence.EtcdConfig{Endpoints: []string{endpoint}, Prefix: prefix})
		if err == nil {
			s.Close()
		}
		return err
	}
	get := func(key string) string {
		t.Helper()
		resp, err := cli.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			return ""
		}
		return string(resp.Kvs[0].Value)
	}

	t.Run("new", func(t *testing.T) {
		prefix := etcdtest.Prefix(t)
		// Without the trailing slash, which is added.
		if err := open(strings.TrimSuffix(prefix, "/")); err != nil {
			t.Fatal(err)
		}
		if got, want := get(prefix+"meta/schema_version"), fmt.Sprint(persistence.EtcdSchemaVersion); got != want {
			t.Errorf("schema version %q, want %q", got, want)
		}
		if err := open(prefix); err != nil {
			t.Errorf("reopen: %v", err)
		}
	})
	t.Run("newer", func(t *testing.T) {
		prefix := etcdtest.Prefix(t)
		if _, err := cli.Put(ctx, prefix+"meta/schema_version", fmt.Sprint(persistence.EtcdSchemaVersion+1)); err != nil {
			t.Fatal(err)
		}
		if err := open(prefix); err == nil || !strings.Contains(err.Error(), "newer") {
			t.Errorf("open of a newer schema = %v", err)
		}
	})
	t.Run("foreign", func(t *testing.T) {
		prefix := etcdtest.Prefix(t)
		if _, err := cli.Put(ctx, prefix+"something/else", "x"); err != nil {
			t.Fatal(err)
		}
		if err := open(prefix); err == nil || !strings.Contains(err.Error(), "not a fleet store") {
			t.Errorf("open of a prefix with foreign keys = %v", err)
		}
		if got := get(prefix + "meta/schema_version"); got != "" {
			t.Errorf("foreign prefix stamped with version %q", got)
		}
	})
}

// Records are laid out under the prefix in the documented key ranges, so
// that an operator can find them with etcdctl.
func TestEtcdKeyLayout(t *testing.T) {
	ctx := context.Background()
	endpoint, prefix := etcdtest.Start(t), etcdtest.Prefix(t)
	s := openEtcdStore(t, endpoint, prefix)
	_, key := mustCreate(t, s, "node_1", "user_1")
	if err := s.OpenSession(ctx, "node_1", t0); err != nil {
		t.Fatal(err)
	}
	mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", t0),
		newIdempotency("user_2", "key_1", "rental_1", time.Now()))
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, kv := range resp.Kvs {
		got = append(got, strings.TrimPrefix(string(kv.Key), prefix))
	}
	stamp := fmt.Sprintf("%016x", t0.UnixNano())
	inverted := fmt.Sprintf("%016x", ^uint64(t0.UnixNano()))
	want := []string{
		"idempotency/user_2\x00key_1",
		fmt.Sprintf("keyhash/%x", key.Hash),
		"live_rentals/node_1",
		"meta/schema_version",
		"nodes/node_1",
		"open_sessions/node_1",
		"owners/user_1\x00node_1",
		"rentals/rental_1",
		"rentals_by_owner/user_1\x00" + inverted + "rental_1",
		"rentals_by_renter/user_2\x00" + inverted + "rental_1",
		"sessions/node_1\x00" + stamp,
	}
	sameJSON(t, "keys", got, want)
}
