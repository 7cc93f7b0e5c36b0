package http

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/distributedcompute/fleet"
)

// Billing changes rentals; the fleet's billing actor implements it.
type Billing interface {
	StartRental(ctx context.Context, renterID, nodeID string, maxHours *float64, idemKey string, bodyHash []byte) (*fleet.Rental, bool, error)
	StopRental(ctx context.Context, userID, rentalID string) (*fleet.Rental, error)
	DeleteNode(ctx context.Context, userID, nodeID string) error
}

// MaxIdempotencyKeyLen bounds the Idempotency-Key header.
const MaxIdempotencyKeyLen = 255

// rentalView is a rental as the API shows it, with figures as of the
// request for live rentals.
type rentalView struct {
	ID                string     `json:"id"`
	NodeID            string     `json:"node_id"`
	RenterID          string     `json:"renter_id"`
	OwnerID           string     `json:"owner_id"`
	PricePerHourCents int64      `json:"price_per_hour_cents"`
	Status            string     `json:"status"`
	StartedAt         time.Time  `json:"started_at"`
	EndedAt           *time.Time `json:"ended_at"`
	EndReason         *string    `json:"end_reason"`
	MaxHours          *float64   `json:"max_hours"`
	BillableSeconds   int64      `json:"billable_seconds"`
	CostCents         int64      `json:"cost_cents"`
}

func (s *Server) rentalView(r *fleet.Rental) *rentalView {
	secs, cost := r.Figures(s.cfg.Now())
	v := &rentalView{ID: r.ID, NodeID: r.NodeID, RenterID: r.RenterID, OwnerID: r.OwnerID,
		PricePerHourCents: r.PricePerHourCents, Status: r.Status, StartedAt: r.StartedAt.UTC(),
		MaxHours: r.MaxHours, BillableSeconds: secs, CostCents: cost}
	if r.EndedAt != nil {
		v.EndedAt = utc(*r.EndedAt)
		reason := r.EndReason
		v.EndReason = &reason
	}
	return v
}

type rentalInput struct {
	NodeID   *string  `json:"node_id"`
	MaxHours *float64 `json:"max_hours"`
}

func (s *Server) createRental(c echo.Context) error {
	var in rentalInput
	if err := bind(c, &in); err != nil {
		return err
	}
	var v fleet.ValidationError
	if in.NodeID == nil || *in.NodeID == "" {
		v.Add("node_id", "is required")
	}
	if in.MaxHours != nil && (*in.MaxHours < 1.0/3600 || *in.MaxHours > fleet.MaxRentalHours) {
		v.Add("max_hours", "must be at least one second (0.000278) and at most 8760")
	}
	key := c.Request().Header.Get("Idempotency-Key")
	if len(key) > MaxIdempotencyKeyLen || strings.ContainsFunc(key, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		v.Add("Idempotency-Key", "must be at most 255 printable ASCII characters")
	}
	if err := v.Err(); err != nil {
		return err
	}
	// The hash covers the request as understood, so that a retry differing
	// only in whitespace or field order is the same request.
	canon, _ := json.Marshal(in)
	sum := sha256.Sum256(canon)
	r, replayed, err := s.cfg.Billing.StartRental(c.Request().Context(), userID(c), *in.NodeID, in.MaxHours, key, sum[:])
	if err != nil {
		return err
	}
	if r.RenterID != userID(c) { // cannot happen: keys are per user
		return fleet.Errorf(fleet.ENOTFOUND, "Rental not found.")
	}
	if replayed {
		c.Response().Header().Set("Idempotent-Replayed", "true")
	}
	c.Response().Header().Set(echo.HeaderLocation, "/api/billing/rentals/"+r.ID)
	return ok(c, http.StatusCreated, s.rentalView(r))
}

// visibleRental loads a rental the caller may see: its renter or its node's
// owner. Anyone else gets 404, so rental IDs reveal nothing.
func (s *Server) visibleRental(c echo.Context) (*fleet.Rental, error) {
	r, err := s.cfg.Rentals.Rental(c.Request().Context(), c.Param("id"))
	if err != nil {
		return nil, err
	}
	if u := userID(c); u != r.RenterID && u != r.OwnerID {
		return nil, fleet.Errorf(fleet.ENOTFOUND, "Rental not found.")
	}
	return r, nil
}

func (s *Server) getRental(c echo.Context) error {
	r, err := s.visibleRental(c)
	if err != nil {
		return err
	}
	return ok(c, http.StatusOK, s.rentalView(r))
}

func (s *Server) stopRental(c echo.Context) error {
	if _, err := s.visibleRental(c); err != nil {
		return err
	}
	r, err := s.cfg.Billing.StopRental(c.Request().Context(), userID(c), c.Param("id"))
	if err != nil {
		return err
	}
	return ok(c, http.StatusOK, s.rentalView(r))
}

type rentalCursor struct {
	T  int64  `json:"t"`
	ID string `json:"id"`
}

func (s *Server) listRentals(c echo.Context) error {
	var v fleet.ValidationError
	q := c.QueryParams()
	status, role := q.Get("status"), q.Get("role")
	switch status {
	case "", fleet.RentalActive, fleet.RentalPaused, fleet.RentalStopped, fleet.RentalCompleted, fleet.RentalInterrupted:
	default:
		v.Add("status", "must be active, paused, stopped, completed or interrupted")
	}
	if role != "" && role != "renter" && role != "owner" {
		v.Add("role", "must be renter or owner")
	}
	limit := s.cfg.DefaultPageSize
	if raw := q.Get("limit"); raw != "" {
		n, err := strconv.Atoi(raw)
		if err != nil || n < 1 || n > s.cfg.MaxPageSize {
			v.Add("limit", "must be an integer between 1 and "+strconv.Itoa(s.cfg.MaxPageSize))
		}
		limit = n
	}
	var after *rentalCursor
	if raw := q.Get("cursor"); raw != "" {
		var cur rentalCursor
		b, err := base64.RawURLEncoding.DecodeString(raw)
		if err == nil {
			err = json.Unmarshal(b, &cur)
		}
		if err != nil || cur.ID == "" {
			v.Add("cursor", "is not a cursor of this listing")
		}
		after = &cur
	}
	if err := v.Err(); err != nil {
		return err
	}
	ctx := c.Request().Context()
	var rentals []*fleet.Rental
	var err error
	if role == "owner" {
		rentals, err = s.cfg.Rentals.RentalsByOwner(ctx, userID(c))
	} else {
		rentals, err = s.cfg.Rentals.RentalsByRenter(ctx, userID(c))
	}
	if err != nil {
		return err
	}
	// Newest first; the cursor is the (started_at, id) of the last one shown.
	views := make([]*rentalView, 0, limit)
	var next *string
	for _, r := range rentals {
		if status != "" && r.Status != status {
			continue
		}
		if after != nil {
			t := r.StartedAt.UnixNano()
			// The store lists newest first, ties in ascending ID order.
			if t > after.T || (t == after.T && r.ID <= after.ID) {
				continue
			}
		}
		if len(views) == limit {
			last := views[len(views)-1]
			b, _ := json.Marshal(rentalCursor{T: last.StartedAt.UnixNano(), ID: last.ID})
			enc := base64.RawURLEncoding.EncodeToString(b)
			next = &enc
			break
		}
		views = append(views, s.rentalView(r))
	}
	return okList(c, views, map[string]any{"limit": limit, "next_cursor": next})
}

type nodeEarnings struct {
	NodeID          string `json:"node_id"`
	Rentals         int    `json:"rentals"`
	BillableSeconds int64  `json:"billable_seconds"`
	EarnedCents     int64  `json:"earned_cents"`   // ended rentals
	AccruingCents   int64  `json:"accruing_cents"` // live rentals, as of now
}

// earnings is the host side: what the caller's nodes earned.
func (s *Server) earnings(c echo.Context) error {
	rentals, err := s.cfg.Rentals.RentalsByOwner(c.Request().Context(), userID(c))
	if err != nil {
		return err
	}
	now := s.cfg.Now()
	byNode := map[string]*nodeEarnings{}
	nodes := []*nodeEarnings{}
	var total nodeEarnings
	for _, r := range rentals {
		e := byNode[r.NodeID]
		if e == nil {
			e = &nodeEarnings{NodeID: r.NodeID}
			byNode[r.NodeID] = e
			nodes = append(nodes, e)
		}
		secs, cost := r.Figures(now)
		for _, x := range []*nodeEarnings{e, &total} {
			x.Rentals++
			x.BillableSeconds += secs
			if r.Live() {
				x.AccruingCents += cost
			} else {
				x.EarnedCents += cost
			}
		}
	}
	return ok(c, http.StatusOK, map[string]any{
		"nodes": nodes,
		"total": map[string]any{"rentals": total.Rentals, "billable_seconds": total.BillableSeconds,
			"earned_cents": total.EarnedCents, "accruing_cents": total.AccruingCents,
			"total_cents": total.EarnedCents + total.AccruingCents},
	})
}

// summary is the renter side: live rentals with what they have accrued, and
// the total spend.
func (s *Server) summary(c echo.Context) error {
	rentals, err := s.cfg.Rentals.RentalsByRenter(c.Request().Context(), userID(c))
	if err != nil {
		return err
	}
	active := []*rentalView{}
	var accrued, total int64
	for _, r := range rentals {
		v := s.rentalView(r)
		total += v.CostCents
		if r.Live() {
			accrued += v.CostCents
			active = append(active, v)
		}
	}
	return ok(c, http.StatusOK, map[string]any{
		"active_rentals":    active,
		"accrued_cents":     accrued,
		"total_spend_cents": total,
		"rentals":           len(rentals),
	})
}
