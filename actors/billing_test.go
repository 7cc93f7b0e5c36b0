package actors

import (
	"context"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

// A coordinator that was down longer than LOST_AFTER does not interrupt the
// rentals it finds: the lost timer counts from its start, so agents get the
// chance to come back.
func TestRecoveryDoesNotCountDowntimeAsLost(t *testing.T) {
	f := newTestFleet(t, Config{LostAfter: 2 * time.Minute})
	n, h := f.node(t, "node_a")
	ctx := context.Background()
	longAgo := time.Now().Add(-10 * time.Minute)
	if _, err := f.store.UpdateNode(ctx, n.ID, func(x *fleet.Node) error { x.LastSeenAt = &longAgo; return nil }); err != nil {
		t.Fatal(err)
	}
	r := &fleet.Rental{ID: "rnt_1", NodeID: n.ID, RenterID: "user_r", OwnerID: n.OwnerID, PricePerHourCents: 3600,
		Status: fleet.RentalActive, StartedAt: longAgo.Add(-time.Minute), Intervals: []fleet.Interval{{Start: longAgo.Add(-time.Minute)}}}
	if err := f.store.CreateRental(ctx, r, nil); err != nil {
		t.Fatal(err)
	}
	// Restart billing, as a coordinator start would find it.
	f.sys.Root.Send(f.billing, panicNow{})
	waitFor(t, "rental paused at the node's last heartbeat", func() bool {
		got, err := f.store.Rental(ctx, r.ID)
		return err == nil && got.Status == fleet.RentalPaused
	})
	got, _ := f.store.Rental(ctx, r.ID)
	if secs, _ := got.Figures(time.Now()); secs != 60 {
		t.Fatalf("billable %d s, want the 60 s before the last heartbeat", secs)
	}
	c := f.connect(t, n, h)
	waitFor(t, "rental resumed", func() bool {
		got, err := f.store.Rental(ctx, r.ID)
		return err == nil && got.Status == fleet.RentalActive
	})
	// Each new connection of a rented node hears rental.started.
	select {
	case fr := <-c.out:
		if fr.Event != fleet.EventRentalStarted {
			t.Fatalf("got %+v, want rental.started", fr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no rental.started on reconnect")
	}
}
