package persistence_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

// This file is the contract of fleet.RentalStore as a test suite, in the
// manner of suite_test.go: it uses nothing but the interface, so that every
// implementation is held to the same behaviour.

// newRental returns a live rental of node, started at started, with one open
// billable interval.
func newRental(id, node, renter, owner string, started time.Time) *fleet.Rental {
	return &fleet.Rental{
		ID:                id,
		NodeID:            node,
		RenterID:          renter,
		OwnerID:           owner,
		PricePerHourCents: 150,
		Status:            fleet.RentalActive,
		StartedAt:         started,
		Intervals:         []fleet.Interval{{Start: started}},
	}
}

// newIdempotency returns a record of user's key for rental, created at t.
func newIdempotency(user, key, rental string, t time.Time) *fleet.Idempotency {
	return &fleet.Idempotency{
		UserID: user, Key: key, BodyHash: []byte("hash of " + rental), RentalID: rental, CreatedAt: t,
	}
}

func mustCreateRental(t *testing.T, s fleet.RentalStore, r *fleet.Rental, idem *fleet.Idempotency) {
	t.Helper()
	if err := s.CreateRental(context.Background(), r, idem); err != nil {
		t.Fatalf("CreateRental(%s): %v", r.ID, err)
	}
}

// stopRental ends a rental as the billing actor does when the renter stops it.
func stopRental(t *testing.T, s fleet.RentalStore, id string, at time.Time) *fleet.Rental {
	t.Helper()
	r, err := s.UpdateRental(context.Background(), id, func(r *fleet.Rental) error {
		r.Status, r.EndedAt, r.EndReason = fleet.RentalStopped, &at, "stopped by renter"
		if n := len(r.Intervals); n > 0 && r.Intervals[n-1].End.IsZero() {
			r.Intervals[n-1].End = at
		}
		return nil
	})
	if err != nil {
		t.Fatalf("stop rental %s: %v", id, err)
	}
	return r
}

func rentalIDs(rs []*fleet.Rental) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.ID
	}
	return out
}

// testRentalStore runs the fleet.RentalStore contract against stores made by
// newStore, a fresh empty store per subtest.
func testRentalStore(t *testing.T, newStore func(t *testing.T) fleet.RentalStore) {
	ctx := context.Background()
	hour := func(h int) time.Time { return t0.Add(time.Duration(h) * time.Hour) }

	t.Run("CreateAndGet", func(t *testing.T) {
		s := newStore(t)
		r := newRental("rental_1", "node_1", "user_2", "user_1", t0)
		maxHours := 2.5
		r.MaxHours = &maxHours
		r.NotifiedStart = true
		mustCreateRental(t, s, r, nil)
		want := *r
		want.Intervals = slices.Clone(r.Intervals)
		// The store keeps its own copy: the caller may reuse its value.
		r.Status, r.Intervals[0].Start = fleet.RentalPaused, hour(9)
		got, err := s.Rental(ctx, "rental_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "Rental", got, &want)
		// And returns copies.
		got.Intervals[0].End = hour(1)
		again, err := s.Rental(ctx, "rental_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "Rental after changing a returned one", again, &want)

		// A paused rental is live too, and may be created.
		p := newRental("rental_2", "node_2", "user_2", "user_1", t0)
		p.Status, p.Intervals = fleet.RentalPaused, nil
		mustCreateRental(t, s, p, nil)
		if got, err := s.LiveRentalByNode(ctx, "node_2"); err != nil || got.ID != "rental_2" {
			t.Errorf("LiveRentalByNode(node_2) = %v, %v", got, err)
		}
	})

	// Rentals are built by the billing actor, so a malformed one is a bug:
	// an internal error, and nothing stored.
	t.Run("CreateRefusesMalformed", func(t *testing.T) {
		s := newStore(t)
		for _, tc := range []struct {
			name   string
			change func(r *fleet.Rental, idem *fleet.Idempotency)
		}{
			{"stopped", func(r *fleet.Rental, _ *fleet.Idempotency) { r.Status = fleet.RentalStopped }},
			{"completed", func(r *fleet.Rental, _ *fleet.Idempotency) { r.Status = fleet.RentalCompleted }},
			{"interrupted", func(r *fleet.Rental, _ *fleet.Idempotency) { r.Status = fleet.RentalInterrupted }},
			{"no status", func(r *fleet.Rental, _ *fleet.Idempotency) { r.Status = "" }},
			{"no id", func(r *fleet.Rental, idem *fleet.Idempotency) { r.ID, idem.RentalID = "", "" }},
			{"no node", func(r *fleet.Rental, _ *fleet.Idempotency) { r.NodeID = "" }},
			{"no renter", func(r *fleet.Rental, _ *fleet.Idempotency) { r.RenterID = "" }},
			{"no owner", func(r *fleet.Rental, _ *fleet.Idempotency) { r.OwnerID = "" }},
			{"NUL in renter", func(r *fleet.Rental, _ *fleet.Idempotency) { r.RenterID = "user\x002" }},
			{"zero start", func(r *fleet.Rental, _ *fleet.Idempotency) { r.StartedAt = time.Time{} }},
			{"idempotency of another rental", func(_ *fleet.Rental, idem *fleet.Idempotency) { idem.RentalID = "rental_9" }},
			{"idempotency without key", func(_ *fleet.Rental, idem *fleet.Idempotency) { idem.Key = "" }},
			{"idempotency without user", func(_ *fleet.Rental, idem *fleet.Idempotency) { idem.UserID = "" }},
			{"idempotency without time", func(_ *fleet.Rental, idem *fleet.Idempotency) { idem.CreatedAt = time.Time{} }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				r := newRental("rental_1", "node_1", "user_2", "user_1", t0)
				idem := newIdempotency("user_2", "key_1", "rental_1", time.Now())
				tc.change(r, idem)
				wantCode(t, "CreateRental", s.CreateRental(ctx, r, idem), fleet.EINTERNAL)
			})
		}
		_, err := s.Rental(ctx, "rental_1")
		wantCode(t, "refused rental", err, fleet.ENOTFOUND)
		_, err = s.LiveRentalByNode(ctx, "node_1")
		wantCode(t, "node of refused rentals", err, fleet.ENOTFOUND)
		_, err = s.Idempotency(ctx, "user_2", "key_1")
		wantCode(t, "key of refused rentals", err, fleet.ENOTFOUND)
		for name, list := range map[string]func() ([]*fleet.Rental, error){
			"renter": func() ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, "user_2") },
			"owner":  func() ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, "user_1") },
			"live":   func() ([]*fleet.Rental, error) { return s.LiveRentals(ctx) },
		} {
			if rs, err := list(); err != nil || len(rs) != 0 {
				t.Errorf("%s rentals after refusals = %v, %v", name, rentalIDs(rs), err)
			}
		}
	})

	t.Run("NotFound", func(t *testing.T) {
		s := newStore(t)
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", t0), nil)
		for name, call := range map[string]func() error{
			"Rental": func() error { _, err := s.Rental(ctx, "nope"); return err },
			"UpdateRental": func() error {
				_, err := s.UpdateRental(ctx, "nope", func(*fleet.Rental) error { return nil })
				return err
			},
			"LiveRentalByNode": func() error { _, err := s.LiveRentalByNode(ctx, "node_2"); return err },
			"Idempotency":      func() error { _, err := s.Idempotency(ctx, "user_2", "key_1"); return err },
			"IdempotencyNoKey": func() error { _, err := s.Idempotency(ctx, "user_2", ""); return err },
		} {
			wantCode(t, name, call(), fleet.ENOTFOUND)
		}
		for name, list := range map[string]func() ([]*fleet.Rental, error){
			"renter":        func() ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, "nobody") },
			"owner":         func() ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, "nobody") },
			"renter prefix": func() ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, "user_") },
			"renter NUL":    func() ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, "user_2\x00") },
		} {
			if rs, err := list(); err != nil || rs == nil || len(rs) != 0 {
				t.Errorf("%s rentals = %#v, %v; want an empty list", name, rs, err)
			}
		}
	})

	t.Run("ListNewestFirst", func(t *testing.T) {
		s := newStore(t)
		// user_1 is a prefix of user_12: their index ranges must not mix.
		for _, r := range []*fleet.Rental{
			newRental("r_a", "node_a", "user_1", "host_1", hour(1)),
			newRental("r_b", "node_b", "user_1", "host_2", hour(3)),
			newRental("r_d", "node_d", "user_1", "host_1", hour(2)),
			newRental("r_c", "node_c", "user_1", "host_1", hour(2)), // same start as r_d: ID order
			newRental("r_e", "node_e", "user_12", "host_1", hour(5)),
			newRental("r_f", "node_f", "user_2", "host_12", hour(4)),
			newRental("r_g", "node_g", "user_2", "host_1", t0.Add(-30*24*time.Hour)),
		} {
			mustCreateRental(t, s, r, nil)
		}
		// Ended rentals stay listed.
		stopRental(t, s, "r_b", hour(6))
		for _, tc := range []struct {
			name string
			list func(string) ([]*fleet.Rental, error)
			id   string
			want []string
		}{
			{"renter", func(id string) ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, id) }, "user_1", []string{"r_b", "r_c", "r_d", "r_a"}},
			{"renter", func(id string) ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, id) }, "user_12", []string{"r_e"}},
			{"renter", func(id string) ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, id) }, "user_2", []string{"r_f", "r_g"}},
			{"renter", func(id string) ([]*fleet.Rental, error) { return s.RentalsByRenter(ctx, id) }, "host_1", nil},
			{"owner", func(id string) ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, id) }, "host_1", []string{"r_e", "r_c", "r_d", "r_a", "r_g"}},
			{"owner", func(id string) ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, id) }, "host_12", []string{"r_f"}},
			{"owner", func(id string) ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, id) }, "host_2", []string{"r_b"}},
			{"owner", func(id string) ([]*fleet.Rental, error) { return s.RentalsByOwner(ctx, id) }, "user_1", nil},
		} {
			rs, err := tc.list(tc.id)
			if err != nil {
				t.Fatalf("rentals of %s %s: %v", tc.name, tc.id, err)
			}
			if got := rentalIDs(rs); !slices.Equal(got, tc.want) {
				t.Errorf("rentals of %s %s = %v, want %v", tc.name, tc.id, got, tc.want)
			}
		}
		// Listed rentals are the current records, not the ones created.
		rs, err := s.RentalsByOwner(ctx, "host_2")
		if err != nil || len(rs) != 1 || rs[0].Status != fleet.RentalStopped {
			t.Errorf("RentalsByOwner(host_2) = %+v, %v; want r_b stopped", rs, err)
		}
	})

	t.Run("OneLiveRentalPerNode", func(t *testing.T) {
		s := newStore(t)
		r1 := newRental("rental_1", "node_1", "user_2", "user_1", hour(0))
		mustCreateRental(t, s, r1, nil)
		mustCreateRental(t, s, newRental("rental_2", "node_2", "user_2", "user_1", hour(0)), nil)
		got, err := s.LiveRentalByNode(ctx, "node_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "LiveRentalByNode", got, r1)

		second := newRental("rental_3", "node_1", "user_3", "user_1", hour(1))
		err = s.CreateRental(ctx, second, newIdempotency("user_3", "key_1", "rental_3", time.Now()))
		wantCode(t, "second rental of node_1", err, fleet.ECONFLICT)
		if msg := fleet.ErrorMessage(err); msg != "Node already has an active rental." {
			t.Errorf("conflict message %q", msg)
		}
		_, err = s.Rental(ctx, "rental_3")
		wantCode(t, "refused rental", err, fleet.ENOTFOUND)
		_, err = s.Idempotency(ctx, "user_3", "key_1")
		wantCode(t, "key of the refused rental", err, fleet.ENOTFOUND)
		if rs, err := s.RentalsByRenter(ctx, "user_3"); err != nil || len(rs) != 0 {
			t.Errorf("refused rental listed for its renter: %v, %v", rentalIDs(rs), err)
		}

		// Paused is still live: the node stays taken.
		if _, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
			r.Status = fleet.RentalPaused
			r.Intervals[0].End = hour(1)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		wantCode(t, "rental of a node whose rental is paused", s.CreateRental(ctx, second, nil), fleet.ECONFLICT)
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.Status != fleet.RentalPaused {
			t.Errorf("LiveRentalByNode of a paused rental = %+v, %v", got, err)
		}
		live, err := s.LiveRentals(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got1 := rentalIDs(live)
		slices.Sort(got1)
		if want := []string{"rental_1", "rental_2"}; !slices.Equal(got1, want) {
			t.Errorf("LiveRentals = %v, want %v", got1, want)
		}

		// Stopping frees the node.
		stopped := stopRental(t, s, "rental_1", hour(2))
		if stopped.Status != fleet.RentalStopped || stopped.EndedAt == nil {
			t.Errorf("UpdateRental result = %+v", stopped)
		}
		_, err = s.LiveRentalByNode(ctx, "node_1")
		wantCode(t, "LiveRentalByNode after stop", err, fleet.ENOTFOUND)
		if live, err := s.LiveRentals(ctx); err != nil || !slices.Equal(rentalIDs(live), []string{"rental_2"}) {
			t.Errorf("LiveRentals after stop = %v, %v", rentalIDs(live), err)
		}
		stored, err := s.Rental(ctx, "rental_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "stopped rental", stored, stopped)
		mustCreateRental(t, s, second, nil)
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.ID != "rental_3" {
			t.Errorf("LiveRentalByNode after a new rental = %v, %v", got, err)
		}
		// Updating the ended rental again (its agent was told it stopped)
		// leaves the node's new rental alone.
		if _, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
			r.NotifiedStop = true
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
			r.Status = fleet.RentalInterrupted
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.ID != "rental_3" {
			t.Errorf("LiveRentalByNode after updating an ended rental = %v, %v", got, err)
		}
	})

	// A node rented from many browsers at once is rented once.
	t.Run("ConcurrentRentalsOfOneNode", func(t *testing.T) {
		s := newStore(t)
		const n = 20
		var won atomic.Int32
		winner := make(chan string, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				id := fmt.Sprintf("rental_%02d", i)
				r := newRental(id, "node_1", fmt.Sprintf("user_%02d", i), "host_1", hour(i))
				err := s.CreateRental(ctx, r, newIdempotency(r.RenterID, "key", id, time.Now()))
				switch fleet.ErrorCode(err) {
				case "":
					won.Add(1)
					winner <- id
				case fleet.ECONFLICT:
				default:
					t.Errorf("CreateRental(%s): %v", id, err)
				}
			})
		}
		wg.Wait()
		if got := won.Load(); got != 1 {
			t.Fatalf("%d of %d concurrent rentals of one node succeeded, want 1", got, n)
		}
		id := <-winner
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.ID != id {
			t.Errorf("LiveRentalByNode = %v, %v; want %s", got, err, id)
		}
		if rs, err := s.RentalsByOwner(ctx, "host_1"); err != nil || !slices.Equal(rentalIDs(rs), []string{id}) {
			t.Errorf("RentalsByOwner = %v, %v; want only %s", rentalIDs(rs), err, id)
		}
		for i := range n {
			lost := fmt.Sprintf("rental_%02d", i)
			if lost == id {
				continue
			}
			_, err := s.Rental(ctx, lost)
			wantCode(t, "losing rental "+lost, err, fleet.ENOTFOUND)
			_, err = s.Idempotency(ctx, fmt.Sprintf("user_%02d", i), "key")
			wantCode(t, "key of losing rental "+lost, err, fleet.ENOTFOUND)
		}
	})

	t.Run("DuplicateID", func(t *testing.T) {
		s := newStore(t)
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", hour(0)), nil)
		stopRental(t, s, "rental_1", hour(1))
		dup := newRental("rental_1", "node_2", "user_3", "user_3", hour(2))
		wantCode(t, "CreateRental with a used ID", s.CreateRental(ctx, dup, nil), fleet.ECONFLICT)
		_, err := s.LiveRentalByNode(ctx, "node_2")
		wantCode(t, "node of the refused rental", err, fleet.ENOTFOUND)
		if rs, err := s.RentalsByRenter(ctx, "user_3"); err != nil || len(rs) != 0 {
			t.Errorf("refused rental listed: %v, %v", rentalIDs(rs), err)
		}
		if got, err := s.Rental(ctx, "rental_1"); err != nil || got.NodeID != "node_1" {
			t.Errorf("Rental(rental_1) = %+v, %v", got, err)
		}
	})

	t.Run("UpdateRefusesKeyFieldChanges", func(t *testing.T) {
		s := newStore(t)
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", hour(0)), nil)
		mustCreateRental(t, s, newRental("ended", "node_2", "user_2", "user_1", hour(0)), nil)
		stopRental(t, s, "ended", hour(1))
		before := map[string]*fleet.Rental{}
		for _, id := range []string{"rental_1", "ended"} {
			r, err := s.Rental(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			before[id] = r
		}
		for _, tc := range []struct {
			name, id string
			change   func(*fleet.Rental)
		}{
			{"id", "rental_1", func(r *fleet.Rental) { r.ID = "rental_2" }},
			{"node", "rental_1", func(r *fleet.Rental) { r.NodeID = "node_9" }},
			{"renter", "rental_1", func(r *fleet.Rental) { r.RenterID = "user_9" }},
			{"owner", "rental_1", func(r *fleet.Rental) { r.OwnerID = "user_9" }},
			{"start", "rental_1", func(r *fleet.Rental) { r.StartedAt = r.StartedAt.Add(time.Nanosecond) }},
			{"unknown status", "rental_1", func(r *fleet.Rental) { r.Status = "finished" }},
			{"ended made active", "ended", func(r *fleet.Rental) { r.Status = fleet.RentalActive }},
			{"ended made paused", "ended", func(r *fleet.Rental) { r.Status = fleet.RentalPaused }},
		} {
			_, err := s.UpdateRental(ctx, tc.id, func(r *fleet.Rental) error {
				tc.change(r)
				r.PricePerHourCents = 1 // must not be stored either
				return nil
			})
			wantCode(t, "UpdateRental changing "+tc.name, err, fleet.EINTERNAL)
		}
		for id, want := range before {
			got, err := s.Rental(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			sameJSON(t, id+" after refused updates", got, want)
		}
		_, err := s.Rental(ctx, "rental_2")
		wantCode(t, "rental under a refused new ID", err, fleet.ENOTFOUND)
		if got, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || got.ID != "rental_1" {
			t.Errorf("LiveRentalByNode(node_1) = %v, %v", got, err)
		}
		_, err = s.LiveRentalByNode(ctx, "node_2")
		wantCode(t, "node of the ended rental", err, fleet.ENOTFOUND)
		// The same instant in another zone is not a change.
		if _, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
			r.StartedAt = r.StartedAt.In(time.FixedZone("UTC+2", 2*60*60))
			return nil
		}); err != nil {
			t.Errorf("UpdateRental with the start time in another zone: %v", err)
		}
	})

	t.Run("UpdateErrorStoresNothing", func(t *testing.T) {
		s := newStore(t)
		r := newRental("rental_1", "node_1", "user_2", "user_1", hour(0))
		mustCreateRental(t, s, r, nil)
		refused := errors.New("refused by caller")
		_, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
			r.Status = fleet.RentalStopped
			return refused
		})
		if !errors.Is(err, refused) {
			t.Errorf("UpdateRental error = %v, want the callback's", err)
		}
		domain := fleet.Errorf(fleet.EFORBIDDEN, "Not your rental.")
		_, err = s.UpdateRental(ctx, "rental_1", func(*fleet.Rental) error { return domain })
		wantCode(t, "UpdateRental with a domain error", err, fleet.EFORBIDDEN)
		if fleet.ErrorMessage(err) != "Not your rental." {
			t.Errorf("domain error message became %q", fleet.ErrorMessage(err))
		}
		got, err := s.Rental(ctx, "rental_1")
		if err != nil {
			t.Fatal(err)
		}
		sameJSON(t, "stored after failed updates", got, r)
		if live, err := s.LiveRentalByNode(ctx, "node_1"); err != nil || live.ID != "rental_1" {
			t.Errorf("LiveRentalByNode after failed updates = %v, %v", live, err)
		}
	})

	// Updates may be coalesced and retried; each call of fn must see a fresh
	// rental so that no change is lost or applied twice.
	t.Run("ConcurrentUpdatesAreAtomic", func(t *testing.T) {
		s := newStore(t)
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", hour(0)), nil)
		const updates, failures = 100, 20
		var wg sync.WaitGroup
		for i := range updates {
			wg.Go(func() {
				if _, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
					r.Intervals = append(r.Intervals, fleet.Interval{Start: hour(i + 1), End: hour(i + 1)})
					return nil
				}); err != nil {
					t.Error(err)
				}
			})
		}
		for range failures {
			wg.Go(func() {
				_, err := s.UpdateRental(ctx, "rental_1", func(r *fleet.Rental) error {
					r.Intervals = append(r.Intervals, fleet.Interval{Start: hour(-1)})
					return fleet.Errorf(fleet.ECONFLICT, "no")
				})
				wantCode(t, "failing update", err, fleet.ECONFLICT)
			})
		}
		wg.Wait()
		r, err := s.Rental(ctx, "rental_1")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := len(r.Intervals), 1+updates; got != want {
			t.Errorf("%d intervals after %d appends, want %d", got, updates, want)
		}
	})

	t.Run("Idempotency", func(t *testing.T) {
		s := newStore(t)
		now := time.Now().UTC()
		idem := newIdempotency("user_2", "key_1", "", now) // RentalID is filled in
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", hour(0)), idem)
		got, err := s.Idempotency(ctx, "user_2", "key_1")
		if err != nil {
			t.Fatal(err)
		}
		want := *idem
		want.RentalID = "rental_1"
		sameJSON(t, "Idempotency", got, &want)
		if idem.RentalID != "" {
			t.Errorf("CreateRental changed the caller's record: RentalID %q", idem.RentalID)
		}

		// The same key of the same user is refused, whatever the node, and
		// nothing of the refused rental is kept.
		for _, node := range []string{"node_1", "node_2"} {
			r := newRental("rental_2", node, "user_2", "user_1", hour(1))
			err := s.CreateRental(ctx, r, newIdempotency("user_2", "key_1", "rental_2", now))
			wantCode(t, "key used again, rental of "+node, err, fleet.ECONFLICT)
			if msg := fleet.ErrorMessage(err); msg != "Idempotency-Key already used." {
				t.Errorf("key used again, rental of %s: message %q", node, msg)
			}
		}
		_, err = s.Rental(ctx, "rental_2")
		wantCode(t, "rental refused for its key", err, fleet.ENOTFOUND)
		_, err = s.LiveRentalByNode(ctx, "node_2")
		wantCode(t, "node of the rental refused for its key", err, fleet.ENOTFOUND)
		if got, err := s.Idempotency(ctx, "user_2", "key_1"); err != nil || got.RentalID != "rental_1" {
			t.Errorf("record after a refused reuse = %+v, %v", got, err)
		}

		// Keys belong to users: another user's identical key is free, and
		// a user ID that extends this one does not see its record.
		mustCreateRental(t, s, newRental("rental_3", "node_3", "user_3", "user_1", hour(1)),
			newIdempotency("user_3", "key_1", "rental_3", now))
		for user, want := range map[string]string{"user_2": "rental_1", "user_3": "rental_3"} {
			if got, err := s.Idempotency(ctx, user, "key_1"); err != nil || got.RentalID != want {
				t.Errorf("Idempotency(%s, key_1) = %+v, %v; want rental %s", user, got, err, want)
			}
		}
		for _, q := range [][2]string{{"user_", "2\x00key_1"}, {"user_2\x00key", "_1"}, {"user_2", "key_"}, {"user_2", "key_10"}} {
			_, err := s.Idempotency(ctx, q[0], q[1])
			wantCode(t, fmt.Sprintf("Idempotency(%q, %q)", q[0], q[1]), err, fleet.ENOTFOUND)
		}
	})

	t.Run("ExpiredIdempotencyIsMissing", func(t *testing.T) {
		s := newStore(t)
		old := time.Now().Add(-fleet.IdempotencyTTL - time.Minute)
		mustCreateRental(t, s, newRental("rental_1", "node_1", "user_2", "user_1", hour(0)),
			newIdempotency("user_2", "key_1", "rental_1", old))
		_, err := s.Idempotency(ctx, "user_2", "key_1")
		wantCode(t, "expired record", err, fleet.ENOTFOUND)
		// An expired key may be used anew; its record is replaced.
		now := time.Now()
		mustCreateRental(t, s, newRental("rental_2", "node_2", "user_2", "user_1", hour(1)),
			newIdempotency("user_2", "key_1", "rental_2", now))
		if got, err := s.Idempotency(ctx, "user_2", "key_1"); err != nil || got.RentalID != "rental_2" {
			t.Errorf("record of a reused expired key = %+v, %v; want rental_2", got, err)
		}
		// A record just inside the TTL still counts.
		recent := time.Now().Add(-fleet.IdempotencyTTL + time.Minute)
		mustCreateRental(t, s, newRental("rental_3", "node_3", "user_2", "user_1", hour(2)),
			newIdempotency("user_2", "key_3", "rental_3", recent))
		if _, err := s.Idempotency(ctx, "user_2", "key_3"); err != nil {
			t.Errorf("record inside the TTL: %v", err)
		}
	})

	t.Run("PruneIdempotency", func(t *testing.T) {
		s := newStore(t)
		now := time.Now()
		ago := func(h int) time.Time { return now.Add(-time.Duration(h) * time.Hour) }
		for i, h := range []int{3, 2, 1} {
			id := fmt.Sprintf("rental_%d", i)
			mustCreateRental(t, s, newRental(id, "node_"+id, "user_2", "user_1", hour(i)),
				newIdempotency("user_2", fmt.Sprintf("key_%dh", h), id, ago(h)))
		}
		if err := s.PruneIdempotency(ctx, ago(2)); err != nil { // created at the cutoff: kept
			t.Fatal(err)
		}
		if err := s.PruneIdempotency(ctx, ago(2).Add(-time.Hour)); err != nil { // nothing left to prune
			t.Fatal(err)
		}
		for key, kept := range map[string]bool{"key_3h": false, "key_2h": true, "key_1h": true} {
			_, err := s.Idempotency(ctx, "user_2", key)
			if kept && err != nil {
				t.Errorf("%s pruned: %v", key, err)
			} else if !kept {
				wantCode(t, key+" after prune", err, fleet.ENOTFOUND)
			}
		}
		if err := s.PruneIdempotency(ctx, now.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{"key_2h", "key_1h"} {
			_, err := s.Idempotency(ctx, "user_2", key)
			wantCode(t, key+" after pruning all", err, fleet.ENOTFOUND)
		}
		// Pruning touches records only: the rentals stay, and a pruned key
		// is free again.
		if rs, err := s.RentalsByRenter(ctx, "user_2"); err != nil || len(rs) != 3 {
			t.Errorf("rentals after prune = %v, %v", rentalIDs(rs), err)
		}
		mustCreateRental(t, s, newRental("rental_9", "node_9", "user_2", "user_1", hour(9)),
			newIdempotency("user_2", "key_1h", "rental_9", time.Now()))
		if got, err := s.Idempotency(ctx, "user_2", "key_1h"); err != nil || got.RentalID != "rental_9" {
			t.Errorf("pruned key used again = %+v, %v", got, err)
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		s := newStore(t)
		canceled, cancel := context.WithCancel(ctx)
		cancel()
		r := newRental("rental_1", "node_1", "user_2", "user_1", hour(0))
		if err := s.CreateRental(canceled, r, nil); !errors.Is(err, context.Canceled) {
			t.Errorf("CreateRental with a canceled context = %v", err)
		}
		_, err := s.Rental(ctx, "rental_1")
		wantCode(t, "rental of a canceled CreateRental", err, fleet.ENOTFOUND)
	})
}
