package http_test

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/actors"
)

type rentalJSON struct {
	ID              string     `json:"id"`
	NodeID          string     `json:"node_id"`
	RenterID        string     `json:"renter_id"`
	OwnerID         string     `json:"owner_id"`
	Price           int64      `json:"price_per_hour_cents"`
	Status          string     `json:"status"`
	EndedAt         *time.Time `json:"ended_at"`
	EndReason       *string    `json:"end_reason"`
	BillableSeconds int64      `json:"billable_seconds"`
	CostCents       int64      `json:"cost_cents"`
}

// onlineNode registers a node for owner and connects an agent for it.
func (e *testEnv) onlineNode(t *testing.T, owner string, price int64) (keyJSON, *agent) {
	t.Helper()
	k := e.register(t, owner, validNode("rig", price, "A100", 1))
	a := e.dial(t, k.APIKey)
	eventually(t, 2*time.Second, "online", func() bool { return e.status(t, k.Node.ID) == "online" })
	return k, a
}

func (e *testEnv) rent(t *testing.T, user string, body any, idemKey string) *response {
	t.Helper()
	req := map[string]string{}
	if idemKey != "" {
		req["Idempotency-Key"] = idemKey
	}
	return e.doH(t, "POST", "/api/billing/rentals", e.as(t, user), body, req)
}

func TestRentalConflicts(t *testing.T) {
	env := fleetEnv(t, actors.Config{})
	offline := env.register(t, "user_host", validNode("off", 100, "A100", 1))
	k, a := env.onlineNode(t, "user_host", 360)

	env.rent(t, "user_renter", map[string]any{"node_id": offline.Node.ID}, "").wantError(t, 409, "CONFLICT")
	e := env.rent(t, "user_host", map[string]any{"node_id": k.Node.ID}, "").wantError(t, 409, "CONFLICT")
	if e.Error.Message != "You cannot rent your own node." {
		t.Fatalf("own node: %q", e.Error.Message)
	}
	env.rent(t, "user_renter", map[string]any{"node_id": "node_missing"}, "").wantError(t, 404, "NOT_FOUND")
	env.rent(t, "user_renter", map[string]any{}, "").wantError(t, 400, "VALIDATION_ERROR")
	env.rent(t, "user_renter", map[string]any{"node_id": k.Node.ID, "max_hours": -1}, "").wantError(t, 400, "VALIDATION_ERROR")
	env.rent(t, "user_renter", map[string]any{"node_id": k.Node.ID, "max_hours": 1e-13}, "").wantError(t, 400, "VALIDATION_ERROR")
	env.rent(t, "user_renter", map[string]any{"node_id": k.Node.ID}, strings.Repeat("k", 300)).wantError(t, 400, "VALIDATION_ERROR")
	if res := env.do(t, "DELETE", "/api/billing/rentals", env.as(t, "user_renter"), nil); res.status != 405 || res.header.Get("Allow") == "" {
		t.Fatalf("wrong method under /api/billing: %d %v", res.status, res.header)
	}

	// Two renters race for one node: one wins, the other gets 409.
	var wg sync.WaitGroup
	codes := make(chan int, 2)
	for _, u := range []string{"user_r1", "user_r2"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes <- env.rent(t, u, map[string]any{"node_id": k.Node.ID}, "").status
		}()
	}
	wg.Wait()
	close(codes)
	got := map[int]int{}
	for c := range codes {
		got[c]++
	}
	if got[201] != 1 || got[409] != 1 {
		t.Fatalf("racing renters got %v, want one 201 and one 409", got)
	}
	if env.status(t, k.Node.ID) != "rented" {
		t.Fatal("rented node not shown as rented")
	}
	// The agent is told.
	f := a.read()
	var ev fleet.RentalStartedEvent
	if f.Event != fleet.EventRentalStarted || json.Unmarshal(f.Data, &ev) != nil || ev.RentalID == "" {
		t.Fatalf("agent got %+v", f)
	}
	env.rent(t, "user_r3", map[string]any{"node_id": k.Node.ID}, "").wantError(t, 409, "CONFLICT")
	// A rented node cannot be deleted.
	env.do(t, "DELETE", "/api/marketplace/nodes/"+k.Node.ID, env.as(t, "user_host"), nil).wantError(t, 409, "CONFLICT")
}

func TestIdempotentRental(t *testing.T) {
	env := fleetEnv(t, actors.Config{})
	k, _ := env.onlineNode(t, "user_host", 360)
	k2, _ := env.onlineNode(t, "user_host", 360)
	body := map[string]any{"node_id": k.Node.ID, "max_hours": 2}

	// A double click: the same key twice at once creates one rental.
	var wg sync.WaitGroup
	ids := make(chan string, 2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var r rentalJSON
			env.rent(t, "user_renter", body, "click-1").want(t, 201).data(t, &r)
			ids <- r.ID
		}()
	}
	wg.Wait()
	close(ids)
	a, b := <-ids, <-ids
	if a != b || a == "" {
		t.Fatalf("double submit created %q and %q", a, b)
	}
	var list []rentalJSON
	env.do(t, "GET", "/api/billing/rentals", env.as(t, "user_renter"), nil).want(t, 200).data(t, &list)
	if len(list) != 1 {
		t.Fatalf("%d rentals after a double submit", len(list))
	}
	res := env.rent(t, "user_renter", map[string]any{"max_hours": 2, "node_id": k.Node.ID}, "click-1").want(t, 201)
	if res.header.Get("Idempotent-Replayed") != "true" {
		t.Fatal("replay not marked")
	}
	// Same key, different body: 409.
	env.rent(t, "user_renter", map[string]any{"node_id": k2.Node.ID}, "click-1").wantError(t, 409, "CONFLICT")
	// Keys are per user.
	env.rent(t, "user_other", map[string]any{"node_id": k2.Node.ID}, "click-1").want(t, 201)
}

func TestRentalsArePrivate(t *testing.T) {
	env := fleetEnv(t, actors.Config{})
	k, a := env.onlineNode(t, "user_host", 360)
	var r rentalJSON
	env.rent(t, "user_renter", map[string]any{"node_id": k.Node.ID}, "").want(t, 201).data(t, &r)
	path := "/api/billing/rentals/" + r.ID

	env.do(t, "GET", path, env.as(t, "user_mallory"), nil).wantError(t, 404, "NOT_FOUND")
	env.do(t, "POST", path+"/stop", env.as(t, "user_mallory"), nil).wantError(t, 404, "NOT_FOUND")
	var list []rentalJSON
	env.do(t, "GET", "/api/billing/rentals", env.as(t, "user_mallory"), nil).want(t, 200).data(t, &list)
	if len(list) != 0 {
		t.Fatal("someone else's rentals listed")
	}
	env.do(t, "GET", "/api/billing/rentals?role=owner", env.as(t, "user_mallory"), nil).want(t, 200).data(t, &list)
	if len(list) != 0 {
		t.Fatal("someone else's rentals listed as owner")
	}
	env.do(t, "GET", "/api/billing/rentals", "", nil).wantError(t, 401, "UNAUTHORIZED")
	// The owner sees it and may stop it.
	env.do(t, "GET", path, env.as(t, "user_host"), nil).want(t, 200)
	env.do(t, "GET", "/api/billing/rentals?role=owner", env.as(t, "user_host"), nil).want(t, 200).data(t, &list)
	if len(list) != 1 {
		t.Fatalf("owner lists %d rentals", len(list))
	}
	a.read() // rental.started
	env.do(t, "POST", path+"/stop", env.as(t, "user_host"), nil).want(t, 200).data(t, &r)
	if r.Status != "stopped" || r.EndReason == nil || *r.EndReason != "stopped by owner" || r.EndedAt == nil {
		t.Fatalf("stopped rental %+v", r)
	}
	if f := a.read(); f.Event != fleet.EventRentalStopped {
		t.Fatalf("agent got %+v", f)
	}
	env.do(t, "POST", path+"/stop", env.as(t, "user_renter"), nil).wantError(t, 409, "CONFLICT")
	if env.status(t, k.Node.ID) != "online" {
		t.Fatal("node still rented after stop")
	}
	var sum map[string]any
	env.do(t, "GET", "/api/billing/summary", env.as(t, "user_renter"), nil).want(t, 200).data(t, &sum)
	if sum["total_spend_cents"].(float64) != float64(r.CostCents) {
		t.Fatalf("summary %v, rental cost %d", sum, r.CostCents)
	}
	var earn struct {
		Total map[string]float64 `json:"total"`
	}
	env.do(t, "GET", "/api/billing/earnings", env.as(t, "user_host"), nil).want(t, 200).data(t, &earn)
	if earn.Total["earned_cents"] != float64(r.CostCents) || earn.Total["rentals"] != 1 {
		t.Fatalf("earnings %v", earn)
	}
}

// Billing pauses at the last heartbeat when the node misses its deadline,
// and the rental ends as interrupted after LOST_AFTER.
func TestRentalPausesAndIsLost(t *testing.T) {
	env := fleetEnv(t, actors.Config{HeartbeatDeadline: 300 * time.Millisecond, HeartbeatMinInterval: 10 * time.Millisecond, LostAfter: time.Second})
	k, a := env.onlineNode(t, "user_host", 3600)
	var r rentalJSON
	env.rent(t, "user_renter", map[string]any{"node_id": k.Node.ID}, "").want(t, 201).data(t, &r)
	a.ws.Close() // the agent vanishes
	get := func() rentalJSON {
		var r2 rentalJSON
		env.do(t, "GET", "/api/billing/rentals/"+r.ID, env.as(t, "user_renter"), nil).want(t, 200).data(t, &r2)
		return r2
	}
	eventually(t, 5*time.Second, "paused", func() bool { return get().Status == "paused" })
	paused := get()
	eventually(t, 5*time.Second, "interrupted", func() bool { return get().Status == "interrupted" })
	final := get()
	if final.BillableSeconds != paused.BillableSeconds || final.CostCents != paused.CostCents || final.BillableSeconds > 1 {
		t.Fatalf("billed while unreachable: paused %+v, final %+v", paused, final)
	}
}
