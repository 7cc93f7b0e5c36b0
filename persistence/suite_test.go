package persistence_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/persistence"
)

// This file is the contract of fleet.NodeStore and fleet.SessionStore as a
// test suite. It uses nothing but the interfaces, so that every
// implementation (the embedded bbolt store, a store shared by a cluster) is
// held to the same behaviour by running it against its own newStore.

// storeUnderTest is what the suite exercises.
type storeUnderTest interface {
	fleet.NodeStore
	fleet.SessionStore
}

// t0 is a fixed, UTC, nanosecond-precise time: stored times must come back
// exactly.
var t0 = time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC)

// newNode returns a valid node and the key it is registered with.
func newNode(id, owner string) (*fleet.Node, fleet.APIKey) {
	key := fleet.NewAPIKey()
	return &fleet.Node{
		ID:                id,
		OwnerID:           owner,
		Name:              "node " + id,
		Region:            "us-east-1",
		PricePerHourCents: 150,
		Specs: fleet.Specs{
			GPUModel: "RTX 4090", GPUCount: 2, GPUVRAMGB: 24,
			CPUCores: 32, RAMGB: 128, DiskGB: 2000,
		},
		APIKeyPrefix: key.Prefix,
		CreatedAt:    t0,
		UpdatedAt:    t0,
	}, key
}

// mustCreate stores a new node and returns it with its key.
func mustCreate(t *testing.T, s storeUnderTest, id, owner string) (*fleet.Node, fleet.APIKey) {
	t.Helper()
	n, key := newNode(id, owner)
	if err := s.CreateNode(context.Background(), n, key.Hash); err != nil {
		t.Fatalf("CreateNode(%s): %v", id, err)
	}
	return n, key
}

// sameJSON compares values by their JSON form, the form the API shows, so
// that times compare by instant and representation details do not matter.
func sameJSON(t *testing.T, what string, got, want any) {
	t.Helper()
	g, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	w, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	if string(g) != string(w) {
		t.Errorf("%s:\n got %s\nwant %s", what, g, w)
	}
}

func wantCode(t *testing.T, what string, err error, code string) {
	t.Helper()
	if got := fleet.ErrorCode(err); got != code {
		t.Errorf("%s: error %v has code %q, want %q", what, err, got, code)
	}
}

func ids(nodes []*fleet.Node) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.ID
	}
	return out
}

// testNodeStore runs the fleet.NodeStore contract against stores made by
// newStore, a fresh empty store per subtest.
func testNodeStore(t *testing.T, newStore func(t *testing.T) storeUnderTest) {
	ctx := context.Background()

	t.Run("CreateAndGet", func(t *testing.T) {
		s := newStore(t)
		n, key := mustCreate(t, s, "node_1", "user_1")
		got, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "Node", got, n)
		got, err = s.NodeByKeyHash(ctx, key.Hash)
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "NodeByKeyHash", got, n)
	})

	t.Run("ReturnedNodesAreCopies", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		got, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		got.Name = "changed by a caller"
		again, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		if again.Name != "node node_1" {
			t.Errorf("changing a returned node changed the store: name %q", again.Name)
		}
	})

	t.Run("NodesOrderedByID", func(t *testing.T) {
		s := newStore(t)
		if nodes, err := s.Nodes(ctx); err != nil || len(nodes) != 0 {
			t.Fatalf("Nodes of an empty store = %v, %v; want none", ids(nodes), err)
		}
		for _, id := range []string{"n2", "n10", "n1", "m", "n"} {
			mustCreate(t, s, id, "user_1")
		}
		nodes, err := s.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"m", "n", "n1", "n10", "n2"}; !slices.Equal(ids(nodes), want) {
			t.Errorf("Nodes = %v, want %v", ids(nodes), want)
		}
	})

	t.Run("NodesByOwner", func(t *testing.T) {
		s := newStore(t)
		// user_1 is a prefix of user_12: their index ranges must not mix.
		mustCreate(t, s, "c", "user_1")
		mustCreate(t, s, "a", "user_12")
		mustCreate(t, s, "b", "user_1")
		mustCreate(t, s, "d", "user_2")
		for _, tc := range []struct {
			owner string
			want  []string
		}{
			{"user_1", []string{"b", "c"}},
			{"user_12", []string{"a"}},
			{"user_2", []string{"d"}},
			{"user_", nil},
			{"nobody", nil},
		} {
			nodes, err := s.NodesByOwner(ctx, tc.owner)
			if err != nil {
				t.Fatalf("NodesByOwner(%q): %v", tc.owner, err)
			}
			if !slices.Equal(ids(nodes), tc.want) {
				t.Errorf("NodesByOwner(%q) = %v, want %v", tc.owner, ids(nodes), tc.want)
			}
		}
	})

	t.Run("Update", func(t *testing.T) {
		s := newStore(t)
		n, key := mustCreate(t, s, "node_1", "user_1")
		later := t0.Add(time.Hour)
		got, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
			n.Name, n.PricePerHourCents, n.UpdatedAt = "renamed", 999, later
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		want := *n
		want.Name, want.PricePerHourCents, want.UpdatedAt = "renamed", 999, later
		sameJSON(t, "UpdateNode result", got, &want)
		stored, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "stored after UpdateNode", stored, &want)
		if byKey, err := s.NodeByKeyHash(ctx, key.Hash); err != nil || byKey.Name != "renamed" {
			t.Errorf("NodeByKeyHash after update = %v, %v", byKey, err)
		}
	})

	t.Run("UpdateErrorStoresNothing", func(t *testing.T) {
		s := newStore(t)
		n, _ := mustCreate(t, s, "node_1", "user_1")
		refused := errors.New("refused by caller")
		_, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
			n.Name = "half-done"
			return refused
		})
		if !errors.Is(err, refused) {
			t.Errorf("UpdateNode error = %v, want the callback's", err)
		}
		domain := fleet.Errorf(fleet.ECONFLICT, "Node is rented.")
		_, err = s.UpdateNode(ctx, "node_1", func(*fleet.Node) error { return domain })
		wantCode(t, "UpdateNode with a domain error", err, fleet.ECONFLICT)
		if fleet.ErrorMessage(err) != "Node is rented." {
			t.Errorf("domain error message became %q", fleet.ErrorMessage(err))
		}
		stored, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "stored after failed updates", stored, n)
	})

	t.Run("UpdateOwnerMovesIndex", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if _, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
			n.OwnerID = "user_2"
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		for owner, want := range map[string][]string{"user_1": nil, "user_2": {"node_1"}} {
			nodes, err := s.NodesByOwner(ctx, owner)
			if err != nil || !slices.Equal(ids(nodes), want) {
				t.Errorf("NodesByOwner(%q) = %v, %v; want %v", owner, ids(nodes), err, want)
			}
		}
	})

	t.Run("UpdateCannotChangeID", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		_, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
			n.ID = "node_2"
			return nil
		})
		if err == nil {
			t.Fatal("UpdateNode changed the ID")
		}
		if _, err := s.Node(ctx, "node_2"); fleet.ErrorCode(err) != fleet.ENOTFOUND {
			t.Errorf("node_2 exists after a refused ID change: %v", err)
		}
	})

	// Writes may be coalesced and retried (bbolt's Batch retries a batch when
	// one of its writes fails); the callback must see a fresh node each time
	// so that no increment is lost or applied twice.
	t.Run("ConcurrentUpdatesAreAtomic", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		const incs, failures = 100, 20
		var wg sync.WaitGroup
		for range incs {
			wg.Go(func() {
				if _, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
					n.PricePerHourCents++
					return nil
				}); err != nil {
					t.Error(err)
				}
			})
		}
		for range failures {
			wg.Go(func() {
				_, err := s.UpdateNode(ctx, "node_1", func(n *fleet.Node) error {
					n.PricePerHourCents += 1000
					return fleet.Errorf(fleet.ECONFLICT, "no")
				})
				wantCode(t, "failing update", err, fleet.ECONFLICT)
			})
		}
		wg.Wait()
		n, err := s.Node(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		if want := int64(150 + incs); n.PricePerHourCents != want {
			t.Errorf("price after %d increments = %d, want %d", incs, n.PricePerHourCents, want)
		}
	})

	t.Run("Delete", func(t *testing.T) {
		s := newStore(t)
		n, key := mustCreate(t, s, "node_1", "user_1")
		mustCreate(t, s, "node_2", "user_1")
		if err := s.OpenSession(ctx, "node_1", t0); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteNode(ctx, "node_1"); err != nil {
			t.Fatal(err)
		}
		_, err := s.Node(ctx, "node_1")
		wantCode(t, "Node after delete", err, fleet.ENOTFOUND)
		_, err = s.NodeByKeyHash(ctx, key.Hash)
		wantCode(t, "NodeByKeyHash after delete", err, fleet.ENOTFOUND)
		if nodes, err := s.NodesByOwner(ctx, "user_1"); err != nil || !slices.Equal(ids(nodes), []string{"node_2"}) {
			t.Errorf("NodesByOwner after delete = %v, %v", ids(nodes), err)
		}
		if nodes, err := s.Nodes(ctx); err != nil || !slices.Equal(ids(nodes), []string{"node_2"}) {
			t.Errorf("Nodes after delete = %v, %v", ids(nodes), err)
		}
		wantCode(t, "second delete", s.DeleteNode(ctx, "node_1"), fleet.ENOTFOUND)

		// Everything the node had is gone: the same ID and key register
		// again from scratch, without sessions.
		if err := s.CreateNode(ctx, n, key.Hash); err != nil {
			t.Fatalf("re-create after delete: %v", err)
		}
		if sessions, err := s.Sessions(ctx, "node_1", time.Time{}); err != nil || len(sessions) != 0 {
			t.Errorf("Sessions of a re-created node = %v, %v; want none", sessions, err)
		}
	})

	t.Run("Conflicts", func(t *testing.T) {
		for _, tc := range []struct {
			name     string
			id       string
			reuseKey bool
		}{
			{"same id", "node_1", false},
			{"same key hash", "node_2", true},
			{"same id and key hash", "node_1", true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				s := newStore(t)
				first, firstKey := mustCreate(t, s, "node_1", "user_1")
				n, key := newNode(tc.id, "user_2")
				if tc.reuseKey {
					key = firstKey
				}
				wantCode(t, "CreateNode", s.CreateNode(ctx, n, key.Hash), fleet.ECONFLICT)
				// Nothing of the refused node was stored.
				got, err := s.Node(ctx, "node_1")
				if err != nil {
					t.Fatal(err)
				}
				sameJSON(t, "first node", got, first)
				if byKey, err := s.NodeByKeyHash(ctx, firstKey.Hash); err != nil || byKey.ID != "node_1" {
					t.Errorf("first key resolves to %v, %v", byKey, err)
				}
				if nodes, err := s.NodesByOwner(ctx, "user_2"); err != nil || len(nodes) != 0 {
					t.Errorf("refused node indexed under its owner: %v, %v", ids(nodes), err)
				}
				if nodes, err := s.Nodes(ctx); err != nil || len(nodes) != 1 {
					t.Errorf("Nodes = %v, %v; want only node_1", ids(nodes), err)
				}
			})
		}
	})

	t.Run("RotateAndRevokeKey", func(t *testing.T) {
		s := newStore(t)
		n, oldKey := mustCreate(t, s, "node_1", "user_1")
		newKey := fleet.NewAPIKey()
		got, err := s.SetAPIKey(ctx, "node_1", newKey.Hash, newKey.Prefix)
		if err != nil {
			t.Fatal(err)
		}
		want := *n
		want.APIKeyPrefix = newKey.Prefix // UpdatedAt stays: a key is not a listing edit
		sameJSON(t, "SetAPIKey result", got, &want)
		_, err = s.NodeByKeyHash(ctx, oldKey.Hash)
		wantCode(t, "old key after rotation", err, fleet.ENOTFOUND)
		if got, err := s.NodeByKeyHash(ctx, newKey.Hash); err != nil || got.ID != "node_1" {
			t.Errorf("new key resolves to %v, %v", got, err)
		}
		// Setting the current key again is harmless.
		if _, err := s.SetAPIKey(ctx, "node_1", newKey.Hash, newKey.Prefix); err != nil {
			t.Errorf("setting the same key again: %v", err)
		}

		got, err = s.SetAPIKey(ctx, "node_1", nil, "ignored")
		if err != nil {
			t.Fatal(err)
		}
		if got.APIKeyPrefix != "" {
			t.Errorf("prefix after revocation = %q, want empty", got.APIKeyPrefix)
		}
		for name, h := range map[string][]byte{"old": oldKey.Hash, "revoked": newKey.Hash} {
			_, err := s.NodeByKeyHash(ctx, h)
			wantCode(t, name+" key after revocation", err, fleet.ENOTFOUND)
		}
		if stored, err := s.Node(ctx, "node_1"); err != nil || stored.APIKeyPrefix != "" {
			t.Errorf("node after revocation = %v, %v", stored, err)
		}
		// Revoking twice is harmless, and a revoked node can get a new key.
		if _, err := s.SetAPIKey(ctx, "node_1", nil, ""); err != nil {
			t.Errorf("second revocation: %v", err)
		}
		third := fleet.NewAPIKey()
		if _, err := s.SetAPIKey(ctx, "node_1", third.Hash, third.Prefix); err != nil {
			t.Fatal(err)
		}
		if got, err := s.NodeByKeyHash(ctx, third.Hash); err != nil || got.APIKeyPrefix != third.Prefix {
			t.Errorf("key after revocation resolves to %v, %v", got, err)
		}
		// A revoked key's hash is free again: another node may not have
		// it by accident, but the index must not still name node_1.
		other, _ := newNode("node_2", "user_2")
		if err := s.CreateNode(ctx, other, oldKey.Hash); err != nil {
			t.Fatalf("create with a rotated-out hash: %v", err)
		}
		if got, err := s.NodeByKeyHash(ctx, oldKey.Hash); err != nil || got.ID != "node_2" {
			t.Errorf("rotated-out hash now resolves to %v, %v; want node_2", got, err)
		}
	})

	t.Run("SetAPIKeyOfAnotherNodeConflicts", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		_, key2 := mustCreate(t, s, "node_2", "user_1")
		_, err := s.SetAPIKey(ctx, "node_1", key2.Hash, key2.Prefix)
		wantCode(t, "SetAPIKey with node_2's hash", err, fleet.ECONFLICT)
		if got, err := s.NodeByKeyHash(ctx, key2.Hash); err != nil || got.ID != "node_2" {
			t.Errorf("node_2's key resolves to %v, %v", got, err)
		}
	})

	t.Run("NotFound", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		key := fleet.NewAPIKey()
		for name, call := range map[string]func() error{
			"Node":   func() error { _, err := s.Node(ctx, "nope"); return err },
			"Delete": func() error { return s.DeleteNode(ctx, "nope") },
			"Update": func() error {
				_, err := s.UpdateNode(ctx, "nope", func(*fleet.Node) error { return nil })
				return err
			},
			"SetAPIKey":     func() error { _, err := s.SetAPIKey(ctx, "nope", key.Hash, key.Prefix); return err },
			"RevokeAPIKey":  func() error { _, err := s.SetAPIKey(ctx, "nope", nil, ""); return err },
			"NodeByKeyHash": func() error { _, err := s.NodeByKeyHash(ctx, key.Hash); return err },
			"NodeByBadHash": func() error { _, err := s.NodeByKeyHash(ctx, []byte("short")); return err },
		} {
			err := call()
			wantCode(t, name, err, fleet.ENOTFOUND)
			if msg := fleet.ErrorMessage(err); msg != "Node not found." {
				t.Errorf("%s: message %q", name, msg)
			}
		}
		// The failed SetAPIKey did not index the key.
		_, err := s.NodeByKeyHash(ctx, key.Hash)
		wantCode(t, "key of a missing node", err, fleet.ENOTFOUND)
	})

	t.Run("CanceledContext", func(t *testing.T) {
		s := newStore(t)
		canceled, cancel := context.WithCancel(ctx)
		cancel()
		n, key := newNode("node_1", "user_1")
		if err := s.CreateNode(canceled, n, key.Hash); !errors.Is(err, context.Canceled) {
			t.Errorf("CreateNode with a canceled context = %v", err)
		}
		if _, err := s.Node(ctx, "node_1"); fleet.ErrorCode(err) != fleet.ENOTFOUND {
			t.Errorf("a canceled CreateNode stored the node: %v", err)
		}
	})

	// A reconnect storm registers or touches many nodes at once; every
	// write must land.
	t.Run("ConcurrentCreates", func(t *testing.T) {
		s := newStore(t)
		const n = 200
		keys := make([]fleet.APIKey, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				node, key := newNode(fmt.Sprintf("node_%03d", i), fmt.Sprintf("user_%d", i%7))
				keys[i] = key
				if err := s.CreateNode(ctx, node, key.Hash); err != nil {
					t.Errorf("CreateNode(%s): %v", node.ID, err)
				}
			})
		}
		wg.Wait()
		nodes, err := s.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(nodes) != n {
			t.Fatalf("%d nodes stored, want %d", len(nodes), n)
		}
		for i, node := range nodes {
			if want := fmt.Sprintf("node_%03d", i); node.ID != want {
				t.Fatalf("nodes[%d] = %s, want %s", i, node.ID, want)
			}
			got, err := s.NodeByKeyHash(ctx, keys[i].Hash)
			if err != nil || got.ID != node.ID {
				t.Fatalf("key of %s resolves to %v, %v", node.ID, got, err)
			}
		}
		total := 0
		for o := range 7 {
			owned, err := s.NodesByOwner(ctx, fmt.Sprintf("user_%d", o))
			if err != nil {
				t.Fatal(err)
			}
			total += len(owned)
		}
		if total != n {
			t.Errorf("owner index holds %d nodes, want %d", total, n)
		}
	})
}

// testSessionStore runs the fleet.SessionStore contract against stores made
// by newStore, a fresh empty store per subtest.
func testSessionStore(t *testing.T, newStore func(t *testing.T) storeUnderTest) {
	ctx := context.Background()
	minute := func(m int) time.Time { return t0.Add(time.Duration(m) * time.Minute) }
	sessions := func(t *testing.T, s storeUnderTest, id string, since time.Time) []fleet.Session {
		t.Helper()
		out, err := s.Sessions(ctx, id, since)
		if err != nil {
			t.Fatalf("Sessions(%s): %v", id, err)
		}
		return out
	}
	lastSeen := func(t *testing.T, s storeUnderTest, id string) *time.Time {
		t.Helper()
		n, err := s.Node(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return n.LastSeenAt
	}

	t.Run("OpenAndClose", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "open session", sessions(t, s, "node_1", time.Time{}),
			[]fleet.Session{{NodeID: "node_1", ConnectedAt: minute(0), LastSeenAt: minute(0)}})
		if err := s.CloseSession(ctx, "node_1", minute(10), "heartbeat timeout"); err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "closed session", sessions(t, s, "node_1", time.Time{}),
			[]fleet.Session{{NodeID: "node_1", ConnectedAt: minute(0), LastSeenAt: minute(10), EndedAt: minute(10), Reason: "heartbeat timeout"}})
		sameJSON(t, "node last seen", lastSeen(t, s, "node_1"), minute(10))
		// Closing again (no open session) only records last seen.
		if err := s.CloseSession(ctx, "node_1", minute(11), "replaced"); err != nil {
			t.Fatal(err)
		}
		if got := sessions(t, s, "node_1", time.Time{}); len(got) != 1 || got[0].Reason != "heartbeat timeout" {
			t.Errorf("a close without an open session changed sessions: %+v", got)
		}
		sameJSON(t, "node last seen", lastSeen(t, s, "node_1"), minute(11))
	})

	t.Run("OpenUnknownNode", func(t *testing.T) {
		s := newStore(t)
		wantCode(t, "OpenSession", s.OpenSession(ctx, "nope", minute(0)), fleet.ENOTFOUND)
		if got := sessions(t, s, "nope", time.Time{}); len(got) != 0 {
			t.Errorf("sessions of an unknown node: %+v", got)
		}
	})

	t.Run("CloseDeletedNodeIsNoop", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteNode(ctx, "node_1"); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseSession(ctx, "node_1", minute(5), "key revoked"); err != nil {
			t.Errorf("CloseSession of a deleted node: %v", err)
		}
		if got := sessions(t, s, "node_1", time.Time{}); len(got) != 0 {
			t.Errorf("sessions of a deleted node: %+v", got)
		}
	})

	// A late close from a replaced connection names a last heartbeat before
	// the new connection began; it must not end the new session.
	t.Run("LateCloseKeepsNewerSession", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
			t.Fatal(err)
		}
		if err := s.OpenSession(ctx, "node_1", minute(10)); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseSession(ctx, "node_1", minute(9), "replaced"); err != nil {
			t.Fatal(err)
		}
		got := sessions(t, s, "node_1", time.Time{})
		if len(got) != 2 || !got[1].EndedAt.IsZero() {
			t.Errorf("sessions after a late close = %+v; want the second still open", got)
		}
		sameJSON(t, "node last seen", lastSeen(t, s, "node_1"), minute(9))
	})

	t.Run("Checkpoint", func(t *testing.T) {
		s := newStore(t)
		for _, id := range []string{"a", "b", "c"} {
			mustCreate(t, s, id, "user_1")
		}
		for _, id := range []string{"a", "b"} {
			if err := s.OpenSession(ctx, id, minute(0)); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Checkpoint(ctx, map[string]time.Time{
			"a": minute(1), "b": minute(2), "c": minute(3),
			"deleted": minute(4), // skipped, not an error
		}); err != nil {
			t.Fatal(err)
		}
		if err := s.Checkpoint(ctx, nil); err != nil {
			t.Errorf("empty checkpoint: %v", err)
		}
		for id, want := range map[string]time.Time{"a": minute(1), "b": minute(2)} {
			got := sessions(t, s, id, time.Time{})
			if len(got) != 1 || !got[0].LastSeenAt.Equal(want) || !got[0].EndedAt.IsZero() {
				t.Errorf("sessions of %s after checkpoint = %+v; want open, last seen %v", id, got, want)
			}
			sameJSON(t, id+" node last seen", lastSeen(t, s, id), want)
		}
		if got := sessions(t, s, "c", time.Time{}); len(got) != 0 {
			t.Errorf("checkpoint opened a session: %+v", got)
		}
		sameJSON(t, "c node last seen", lastSeen(t, s, "c"), minute(3))
		// A stale checkpoint does not move anything backwards.
		if err := s.Checkpoint(ctx, map[string]time.Time{"a": minute(0)}); err != nil {
			t.Fatal(err)
		}
		if got := sessions(t, s, "a", time.Time{}); !got[0].LastSeenAt.Equal(minute(1)) {
			t.Errorf("stale checkpoint moved a's session back to %v", got[0].LastSeenAt)
		}
		sameJSON(t, "a node last seen after a stale checkpoint", lastSeen(t, s, "a"), minute(1))
	})

	// A crash leaves a session open; when the node connects again it is
	// closed at the last checkpoint, the best end known.
	t.Run("ReopenAfterCrash", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
			t.Fatal(err)
		}
		if err := s.Checkpoint(ctx, map[string]time.Time{"node_1": minute(5)}); err != nil {
			t.Fatal(err)
		}
		if err := s.OpenSession(ctx, "node_1", minute(60)); err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "sessions", sessions(t, s, "node_1", time.Time{}), []fleet.Session{
			{NodeID: "node_1", ConnectedAt: minute(0), LastSeenAt: minute(5), EndedAt: minute(5), Reason: persistence.ReasonAbandoned},
			{NodeID: "node_1", ConnectedAt: minute(60), LastSeenAt: minute(60)},
		})
	})

	t.Run("OpenTwiceAtOneInstant", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		for range 2 {
			if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
				t.Fatal(err)
			}
		}
		got := sessions(t, s, "node_1", time.Time{})
		if len(got) != 2 || got[0].EndedAt.IsZero() || !got[1].EndedAt.IsZero() {
			t.Errorf("sessions = %+v; want one closed, then one open", got)
		}
	})

	t.Run("CloseOpenSessions", func(t *testing.T) {
		s := newStore(t)
		for _, id := range []string{"a", "b", "c"} {
			mustCreate(t, s, id, "user_1")
		}
		for _, id := range []string{"a", "b", "c"} {
			if err := s.OpenSession(ctx, id, minute(0)); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CloseSession(ctx, "c", minute(1), "heartbeat timeout"); err != nil {
			t.Fatal(err)
		}
		if err := s.Checkpoint(ctx, map[string]time.Time{"a": minute(7)}); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseOpenSessions(ctx, "coordinator restarted"); err != nil {
			t.Fatal(err)
		}
		for id, want := range map[string]fleet.Session{
			"a": {NodeID: "a", ConnectedAt: minute(0), LastSeenAt: minute(7), EndedAt: minute(7), Reason: "coordinator restarted"},
			"b": {NodeID: "b", ConnectedAt: minute(0), LastSeenAt: minute(0), EndedAt: minute(0), Reason: "coordinator restarted"},
			"c": {NodeID: "c", ConnectedAt: minute(0), LastSeenAt: minute(1), EndedAt: minute(1), Reason: "heartbeat timeout"},
		} {
			sameJSON(t, "sessions of "+id, sessions(t, s, id, time.Time{}), []fleet.Session{want})
		}
		// Nothing is open any more: a second call changes nothing, and a
		// new connection opens without abandoning anything.
		if err := s.CloseOpenSessions(ctx, "again"); err != nil {
			t.Fatal(err)
		}
		if err := s.OpenSession(ctx, "a", minute(30)); err != nil {
			t.Fatal(err)
		}
		got := sessions(t, s, "a", time.Time{})
		if len(got) != 2 || got[0].Reason != "coordinator restarted" || !got[1].EndedAt.IsZero() {
			t.Errorf("sessions of a = %+v", got)
		}
	})

	t.Run("SessionsSince", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		mustCreate(t, s, "node_10", "user_1") // its sessions must not leak into node_1's
		for _, span := range [][2]int{{0, 60}, {120, 180}} {
			if err := s.OpenSession(ctx, "node_1", minute(span[0])); err != nil {
				t.Fatal(err)
			}
			if err := s.CloseSession(ctx, "node_1", minute(span[1]), "heartbeat timeout"); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.OpenSession(ctx, "node_1", minute(240)); err != nil {
			t.Fatal(err)
		}
		if err := s.OpenSession(ctx, "node_10", minute(30)); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			since time.Time
			want  []time.Time // ConnectedAt of the sessions returned
		}{
			{time.Time{}, []time.Time{minute(0), minute(120), minute(240)}},
			{minute(59), []time.Time{minute(0), minute(120), minute(240)}},
			{minute(60), []time.Time{minute(120), minute(240)}}, // ended at since: not after it
			{minute(90), []time.Time{minute(120), minute(240)}},
			{minute(180), []time.Time{minute(240)}},
			{minute(100000), []time.Time{minute(240)}}, // open sessions always count
		} {
			var got []time.Time
			for _, sess := range sessions(t, s, "node_1", tc.since) {
				got = append(got, sess.ConnectedAt)
			}
			sameJSON(t, fmt.Sprintf("Sessions since %v", tc.since), got, tc.want)
		}
	})

	// The sessions returned are what fleet.Reliability needs.
	t.Run("Reliability", func(t *testing.T) {
		s := newStore(t)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", minute(0)); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseSession(ctx, "node_1", minute(30), "heartbeat timeout"); err != nil {
			t.Fatal(err)
		}
		if err := s.OpenSession(ctx, "node_1", minute(90)); err != nil {
			t.Fatal(err)
		}
		now := minute(120)
		got := fleet.Reliability(t0, sessions(t, s, "node_1", now.Add(-fleet.ReliabilityWindow)), now)
		if want := 0.5; got != want {
			t.Errorf("reliability = %v, want %v", got, want)
		}
	})
}
