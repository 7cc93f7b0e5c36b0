package persistence_test

import (
	"context"
	"encoding/binary"
	"path/filepath"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/persistence"
)

func TestRentalStore(t *testing.T) {
	testRentalStore(t, func(t *testing.T) fleet.RentalStore {
		return openStore(t, filepath.Join(t.TempDir(), "fleet.db"))
	})
}

// Bucket names as literals, as in store_test.go: they pin the on-disk format.
var (
	version1Buckets = []string{"meta", "nodes", "nodes_by_key_hash", "nodes_by_owner", "open_sessions", "sessions"}
	version2Buckets = []string{"idempotency", "live_rentals_by_node", "rentals", "rentals_by_owner", "rentals_by_renter"}
)

func bucketNames(t *testing.T, path string) []string {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var names []string
	if err := db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
			names = append(names, string(name))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return names
}

// A file written by a version 1 build (nodes and sessions, no rentals) is
// upgraded in place on Open: its records stay and rentals work.
func TestUpgradeFromVersion1(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	n, key := mustCreate(t, s, "node_1", "user_1")
	if err := s.OpenSession(ctx, "node_1", t0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Take the file back to what a version 1 build leaves: its buckets and
	// version, nothing of version 2.
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		for _, name := range version2Buckets {
			if err := tx.DeleteBucket([]byte(name)); err != nil {
				return err
			}
		}
		return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, 1))
	})
	if got := bucketNames(t, path); !slices.Equal(got, version1Buckets) {
		t.Fatalf("version 1 file has buckets %v, want %v", got, version1Buckets)
	}

	s, err = persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.NodeByKeyHash(ctx, key.Hash)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "node after upgrade", got, n)
	if sessions, err := s.Sessions(ctx, "node_1", time.Time{}); err != nil || len(sessions) != 1 {
		t.Errorf("sessions after upgrade = %+v, %v", sessions, err)
	}
	r := newRental("rental_1", "node_1", "user_2", "user_1", t0)
	mustCreateRental(t, s, r, newIdempotency("user_2", "key_1", "rental_1", time.Now()))
	if live, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || live.ID != "rental_1" {
		t.Errorf("LiveRentalByNode after upgrade = %v, %v", live, err)
	}
	if rs, err := s.RentalsByOwner(ctx, "user_1"); err != nil || !slices.Equal(rentalIDs(rs), []string{"rental_1"}) {
		t.Errorf("RentalsByOwner after upgrade = %v, %v", rentalIDs(rs), err)
	}
	if idem, err := s.Idempotency(ctx, "user_2", "key_1"); err != nil || idem.RentalID != "rental_1" {
		t.Errorf("Idempotency after upgrade = %+v, %v", idem, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if v := readSchemaVersion(t, path); v != 2 {
		t.Errorf("schema version after upgrade %d, want 2", v)
	}
	want := slices.Sorted(slices.Values(append(slices.Clone(version1Buckets), version2Buckets...)))
	if got := bucketNames(t, path); !slices.Equal(got, want) {
		t.Errorf("buckets after upgrade %v, want %v", got, want)
	}
}

// Closing and opening again keeps rentals, their indexes and idempotency
// records.
func TestRentalsSurviveReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", t0), nil)
	mustCreateRental(t, s, newRental("rental_2", "node_2", "user_2", "user_1", t0.Add(time.Hour)),
		newIdempotency("user_2", "key_2", "rental_2", time.Now()))
	stopped := stopRental(t, s, "rental_1", t0.Add(2*time.Hour))
	live, err := s.Rental(ctx, "rental_2")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, path)
	for _, want := range []*fleet.Rental{stopped, live} {
		got, err := s.Rental(ctx, want.ID)
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, want.ID+" after reopen", got, want)
	}
	if rs, err := s.RentalsByRenter(ctx, "user_2"); err != nil || !slices.Equal(rentalIDs(rs), []string{"rental_2", "rental_1"}) {
		t.Errorf("RentalsByRenter after reopen = %v, %v", rentalIDs(rs), err)
	}
	if rs, err := s.LiveRentals(ctx); err != nil || !slices.Equal(rentalIDs(rs), []string{"rental_2"}) {
		t.Errorf("LiveRentals after reopen = %v, %v", rentalIDs(rs), err)
	}
	wantCode(t, "second rental of node_2 after reopen",
		s.CreateRental(ctx, newRental("rental_3", "node_2", "user_3", "user_1", t0), nil), fleet.ECONFLICT)
	mustCreateRental(t, s, newRental("rental_4", "node_1", "user_3", "user_1", t0), nil)
	if idem, err := s.Idempotency(ctx, "user_2", "key_2"); err != nil || idem.RentalID != "rental_2" {
		t.Errorf("Idempotency after reopen = %+v, %v", idem, err)
	}
}
