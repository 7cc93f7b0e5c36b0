package fleet_test

import (
	"math"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

func TestCost(t *testing.T) {
	cases := []struct {
		price, seconds, want int64
	}{
		{100, 0, 0},
		{100, 1, 1},                       // 100/3600 rounds up to a cent
		{100, 36, 1},                      // exactly 1 cent
		{100, 37, 2},                      // just over
		{3600, 1, 1},                      // exactly a cent a second
		{3600, 3600, 3600},                // one hour
		{150, 3600, 150},                  // one hour at $1.50
		{150, 5400, 225},                  // 1.5 h
		{199, 7199, 398},                  // 199*7199/3600 = 397.94 -> 398
		{1, 3599, 1},                      // a fraction of a cent
		{0, 100, 0},                       // free
		{math.MaxInt64, 2, math.MaxInt64}, // saturates rather than overflows
	}
	for _, c := range cases {
		if got := fleet.Cost(c.price, c.seconds); got != c.want {
			t.Errorf("Cost(%d, %d) = %d, want %d", c.price, c.seconds, got, c.want)
		}
	}
}

// The life of a rental with an injected clock: every figure at each step.
func TestRentalAccrual(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	hours := func(h float64) *float64 { return &h }

	type step struct {
		do          func(r *fleet.Rental)
		now         float64
		wantStatus  string
		wantSeconds int64
		wantCost    int64
	}
	cases := []struct {
		name     string
		price    int64
		maxHours *float64
		steps    []step
	}{
		{"runs and stops", 360, nil, []step{
			{nil, 10, fleet.RentalActive, 10, 1},
			{nil, 3600, fleet.RentalActive, 3600, 360},
			{func(r *fleet.Rental) { r.End(fleet.RentalStopped, "stopped by renter", at(3601.5)) }, 9999, fleet.RentalStopped, 3601, 361},
		}},
		{"pause at last heartbeat, resume, stop", 3600, nil, []step{
			{func(r *fleet.Rental) { r.Pause(at(100)) }, 105, fleet.RentalPaused, 100, 100},
			{nil, 200, fleet.RentalPaused, 100, 100}, // no accrual while unreachable
			{func(r *fleet.Rental) { r.Resume(at(200)) }, 250, fleet.RentalActive, 150, 150},
			{func(r *fleet.Rental) { r.End(fleet.RentalStopped, "stopped by owner", at(300)) }, 400, fleet.RentalStopped, 200, 200},
		}},
		{"lost after pause", 100, nil, []step{
			{func(r *fleet.Rental) { r.Pause(at(50)) }, 60, fleet.RentalPaused, 50, 2},
			{func(r *fleet.Rental) { r.End(fleet.RentalInterrupted, "node unreachable", at(170)) }, 500, fleet.RentalInterrupted, 50, 2},
		}},
		{"last heartbeat before the interval opened", 3600, nil, []step{
			{func(r *fleet.Rental) { r.Pause(at(100)); r.Resume(at(200)); r.Pause(at(150)) }, 300, fleet.RentalPaused, 100, 100},
		}},
		{"max hours", 3600, hours(0.5), []step{
			{nil, 600, fleet.RentalActive, 600, 600},
			{func(r *fleet.Rental) {
				if c := r.CompletesAt(at(600)); !c.Equal(at(1800)) {
					t.Errorf("CompletesAt = %v, want %v", c, at(1800))
				}
				r.Pause(at(1000))
				r.Resume(at(2000))
				if c := r.CompletesAt(at(2000)); !c.Equal(at(2800)) {
					t.Errorf("CompletesAt after a pause = %v, want %v", c, at(2800))
				}
				r.End(fleet.RentalCompleted, "max_hours reached", r.CompletesAt(at(2000)))
			}, 5000, fleet.RentalCompleted, 1800, 1800},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &fleet.Rental{PricePerHourCents: c.price, Status: fleet.RentalActive, StartedAt: t0,
				MaxHours: c.maxHours, Intervals: []fleet.Interval{{Start: t0}}}
			for i, s := range c.steps {
				if s.do != nil {
					s.do(r)
				}
				secs, cost := r.Figures(at(s.now))
				if r.Status != s.wantStatus || secs != s.wantSeconds || cost != s.wantCost {
					t.Fatalf("step %d: status %s, %d s, %d cents; want %s, %d s, %d cents",
						i, r.Status, secs, cost, s.wantStatus, s.wantSeconds, s.wantCost)
				}
			}
			if !r.Live() && r.EndedAt == nil {
				t.Fatal("ended rental without ended_at")
			}
		})
	}
}
