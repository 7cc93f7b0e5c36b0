package fleet

import (
	"context"
	"math"
	"time"
)

// Rental statuses. Active and paused rentals are live: one of them per node
// at most. The other three are ended.
const (
	RentalActive      = "active"      // the node is reachable and the renter is being charged
	RentalPaused      = "paused"      // the node is unreachable: billing has paused at its last heartbeat
	RentalStopped     = "stopped"     // stopped by the renter or the owner
	RentalCompleted   = "completed"   // reached max_hours of billable time
	RentalInterrupted = "interrupted" // the node stayed unreachable for LOST_AFTER
)

// MaxRentalHours bounds max_hours.
const MaxRentalHours = 24 * 365

// Interval is a stretch of billable time; End is zero while it is open.
type Interval struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end,omitzero"`
}

// Rental is a renter's use of one node, charged per second of the node's
// reachable time at the price fixed when it started. The billing actor is
// its only writer.
type Rental struct {
	ID                string     `json:"id"`
	NodeID            string     `json:"node_id"`
	RenterID          string     `json:"renter_id"`
	OwnerID           string     `json:"owner_id"`
	PricePerHourCents int64      `json:"price_per_hour_cents"`
	Status            string     `json:"status"`
	StartedAt         time.Time  `json:"started_at"`
	EndedAt           *time.Time `json:"ended_at"`
	EndReason         string     `json:"end_reason,omitempty"`
	MaxHours          *float64   `json:"max_hours"`
	Intervals         []Interval `json:"intervals"`
	// NotifiedStart and NotifiedStop record that the node's agent was told,
	// so that an event missed while it was offline is sent when it returns.
	NotifiedStart bool `json:"notified_start"`
	NotifiedStop  bool `json:"notified_stop"`
}

// Live reports whether the rental has not ended.
func (r *Rental) Live() bool { return r.Status == RentalActive || r.Status == RentalPaused }

// Billable is the billable time as of now: the sum of the intervals, the
// open one counted up to now.
func (r *Rental) Billable(now time.Time) time.Duration {
	var d time.Duration
	for _, iv := range r.Intervals {
		end := iv.End
		if end.IsZero() {
			end = now
		}
		if end.After(iv.Start) {
			d += end.Sub(iv.Start)
		}
	}
	return d
}

// MaxBillable is the billable time after which the rental completes, or 0
// without max_hours.
func (r *Rental) MaxBillable() time.Duration {
	if r.MaxHours == nil {
		return 0
	}
	return time.Duration(*r.MaxHours * float64(time.Hour))
}

// Cost is ceil(price_per_hour_cents * billable_seconds / 3600) in cents,
// computed in integers so that no rounding error creeps in.
func Cost(pricePerHourCents, billableSeconds int64) int64 {
	if billableSeconds <= 0 || pricePerHourCents <= 0 {
		return 0
	}
	hi, lo := mul64(pricePerHourCents, billableSeconds)
	if hi != 0 {
		return math.MaxInt64
	}
	return int64((lo + 3599) / 3600)
}

func mul64(a, b int64) (hi, lo uint64) {
	ua, ub := uint64(a), uint64(b)
	lo = ua * ub
	if ua != 0 && lo/ua != ub {
		return 1, 0
	}
	if lo > math.MaxUint64-3599 {
		return 1, 0
	}
	return 0, lo
}

// Figures returns billable whole seconds and their cost as of now.
func (r *Rental) Figures(now time.Time) (billableSeconds, costCents int64) {
	s := int64(r.Billable(now) / time.Second)
	return s, Cost(r.PricePerHourCents, s)
}

// Idempotency records the rental a POST with an Idempotency-Key created, so
// that a retry gets the same rental and a different body gets a conflict.
type Idempotency struct {
	UserID    string    `json:"user_id"`
	Key       string    `json:"key"`
	BodyHash  []byte    `json:"body_hash"`
	RentalID  string    `json:"rental_id"`
	CreatedAt time.Time `json:"created_at"`
}

// IdempotencyTTL is how long idempotency records are kept.
const IdempotencyTTL = 24 * time.Hour

// RentalStore persists rentals and idempotency records.
type RentalStore interface {
	// CreateRental stores a new live rental, and idem with it when not nil,
	// in one transaction. It fails with ECONFLICT if the node already has a
	// live rental.
	CreateRental(ctx context.Context, r *Rental, idem *Idempotency) error
	// Rental returns one rental (ENOTFOUND if missing).
	Rental(ctx context.Context, id string) (*Rental, error)
	// UpdateRental applies fn to the stored rental atomically; fn may run more
	// than once. A rental that stops being live leaves the node's index.
	UpdateRental(ctx context.Context, id string, fn func(*Rental) error) (*Rental, error)
	// RentalsByRenter and RentalsByOwner return rentals newest first.
	RentalsByRenter(ctx context.Context, renterID string) ([]*Rental, error)
	RentalsByOwner(ctx context.Context, ownerID string) ([]*Rental, error)
	// LiveRentals returns every active or paused rental.
	LiveRentals(ctx context.Context) ([]*Rental, error)
	// LiveRentalByNode returns the node's live rental, or ENOTFOUND.
	LiveRentalByNode(ctx context.Context, nodeID string) (*Rental, error)
	// Idempotency returns the record of (userID, key), or ENOTFOUND; records
	// older than IdempotencyTTL are treated as missing.
	Idempotency(ctx context.Context, userID, key string) (*Idempotency, error)
	// PruneIdempotency deletes records created before cutoff.
	PruneIdempotency(ctx context.Context, cutoff time.Time) error
}

// Pause closes the open interval at lastSeen (never before it opened): the
// node stopped answering, and its last heartbeat is the last billable
// instant.
func (r *Rental) Pause(lastSeen time.Time) {
	if r.Status != RentalActive {
		return
	}
	r.closeInterval(lastSeen)
	r.Status = RentalPaused
}

// Resume opens a new interval at t: the node is reachable again.
func (r *Rental) Resume(t time.Time) {
	if r.Status != RentalPaused {
		return
	}
	r.Intervals = append(r.Intervals, Interval{Start: t})
	r.Status = RentalActive
}

// End ends a live rental at t with status and reason; an open interval
// closes at t.
func (r *Rental) End(status, reason string, t time.Time) {
	if !r.Live() {
		return
	}
	r.closeInterval(t)
	r.Status, r.EndReason = status, reason
	end := t
	r.EndedAt = &end
}

// CompletesAt is when an active rental reaches max_hours of billable time,
// or zero if it never does (no max_hours, or not active).
func (r *Rental) CompletesAt(now time.Time) time.Time {
	max := r.MaxBillable()
	if max <= 0 || r.Status != RentalActive {
		return time.Time{}
	}
	return now.Add(max - r.Billable(now))
}

func (r *Rental) closeInterval(t time.Time) {
	if n := len(r.Intervals); n > 0 && r.Intervals[n-1].End.IsZero() {
		iv := &r.Intervals[n-1]
		if t.Before(iv.Start) {
			t = iv.Start
		}
		iv.End = t
	}
}

// Clone returns a deep copy, so that a rental can leave its owner's hands.
func (r *Rental) Clone() *Rental {
	if r == nil {
		return nil
	}
	c := *r
	c.Intervals = append([]Interval(nil), r.Intervals...)
	if r.EndedAt != nil {
		t := *r.EndedAt
		c.EndedAt = &t
	}
	if r.MaxHours != nil {
		h := *r.MaxHours
		c.MaxHours = &h
	}
	return &c
}
