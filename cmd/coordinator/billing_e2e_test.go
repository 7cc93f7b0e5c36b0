package main_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

type rentalState struct {
	ID              string     `json:"id"`
	Status          string     `json:"status"`
	Price           int64      `json:"price_per_hour_cents"`
	BillableSeconds int64      `json:"billable_seconds"`
	CostCents       int64      `json:"cost_cents"`
	EndedAt         *time.Time `json:"ended_at"`
	EndReason       *string    `json:"end_reason"`
}

func ceilCost(price, secs int64) int64 { return (price*secs + 3599) / 3600 }

// The billing story with the real binaries: rent, heartbeat, kill the
// agent, restart the coordinator while the node is away, restart the agent,
// stop, and check every figure.
func TestRentalStoryEndToEnd(t *testing.T) {
	const price = 7200 // two cents a second, so every second shows in the cost
	c := startCoordinator(t, t.TempDir(), "HEARTBEAT_DEADLINE=1s", "HEARTBEAT_MIN_INTERVAL=100ms", "LOST_AFTER=1m")
	host, renter := c.token("user_host"), c.token("user_renter")
	body := map[string]any{}
	for k, v := range rigBody {
		body[k] = v
	}
	body["price_per_hour_cents"] = price
	var reg registered
	if code := c.call("POST", "/api/marketplace/nodes", host, body, &reg); code != 201 {
		t.Fatalf("register: %d", code)
	}
	hookDir := t.TempDir()
	hook := filepath.Join(hookDir, "hook.sh")
	events := filepath.Join(hookDir, "events.jsonl")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\ncat >> "+events+"\necho >> "+events+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	agentEnv := []string{"HEARTBEAT_INTERVAL=300ms", "RENTAL_HOOK=" + hook}
	agent := startAgent(t, c, reg.APIKey, agentEnv...)
	eventually(t, 5*time.Second, "online", func() bool { return c.node(reg.Node.ID).Status == "online" })

	var r rentalState
	rentedAt := time.Now()
	if code := c.call("POST", "/api/billing/rentals", renter, map[string]any{"node_id": reg.Node.ID}, &r); code != 201 || r.Status != "active" || r.Price != price {
		t.Fatalf("rent: %d %+v", code, r)
	}
	get := func() rentalState {
		var s rentalState
		if code := c.call("GET", "/api/billing/rentals/"+r.ID, renter, nil, &s); code != 200 {
			t.Fatalf("get rental: %d", code)
		}
		return s
	}
	hookSaw := func(event string) func() bool {
		return func() bool {
			b, _ := os.ReadFile(events)
			return strings.Contains(string(b), `"event":"`+event+`"`) && strings.Contains(string(b), r.ID)
		}
	}
	eventually(t, 10*time.Second, "the hook got rental.started", hookSaw("rental.started"))
	if c.node(reg.Node.ID).Status != "rented" {
		t.Fatal("node not shown as rented")
	}
	eventually(t, 10*time.Second, "two billable seconds", func() bool { return get().BillableSeconds >= 2 })

	_ = agent.cmd.Process.Signal(syscall.SIGKILL)
	killedAt := time.Now()
	<-agent.exited
	eventually(t, 5*time.Second, "billing paused", func() bool { return get().Status == "paused" })
	paused := get()
	if paused.BillableSeconds > int64(killedAt.Sub(rentedAt)/time.Second)+1 || paused.CostCents != ceilCost(price, paused.BillableSeconds) {
		t.Fatalf("paused figures %+v for %s of reachable time", paused, killedAt.Sub(rentedAt))
	}

	// A coordinator restart while the node is away loses nothing and bills
	// none of the time it was down.
	c.restart()
	if after := get(); after.Status != "paused" || after.BillableSeconds != paused.BillableSeconds || after.CostCents != paused.CostCents {
		t.Fatalf("after restart %+v, before %+v", after, paused)
	}

	startAgent(t, c, reg.APIKey, agentEnv...)
	back := time.Now()
	eventually(t, 10*time.Second, "billing resumed", func() bool { return get().Status == "active" })
	eventually(t, 10*time.Second, "a billable second after resuming", func() bool { return get().BillableSeconds >= paused.BillableSeconds+1 })

	var stopped rentalState
	if code := c.call("POST", "/api/billing/rentals/"+r.ID+"/stop", renter, nil, &stopped); code != 200 {
		t.Fatalf("stop: %d", code)
	}
	stoppedAt := time.Now()
	resumed := stopped.BillableSeconds - paused.BillableSeconds
	if stopped.Status != "stopped" || stopped.EndedAt == nil || stopped.EndReason == nil || *stopped.EndReason != "stopped by renter" ||
		resumed < 1 || resumed > int64(stoppedAt.Sub(back)/time.Second)+1 ||
		stopped.CostCents != ceilCost(price, stopped.BillableSeconds) {
		t.Fatalf("stopped %+v (paused at %d s, %s after the agent came back)", stopped, paused.BillableSeconds, stoppedAt.Sub(back))
	}
	// Figures of an ended rental do not move.
	if final := get(); final.BillableSeconds != stopped.BillableSeconds || final.CostCents != stopped.CostCents {
		t.Fatalf("ended rental changed: %+v then %+v", stopped, final)
	}
	eventually(t, 10*time.Second, "the hook got rental.stopped", hookSaw("rental.stopped"))
	var earnings struct {
		Total struct {
			EarnedCents int64 `json:"earned_cents"`
		} `json:"total"`
	}
	if code := c.call("GET", "/api/billing/earnings", host, nil, &earnings); code != 200 || earnings.Total.EarnedCents != stopped.CostCents {
		t.Fatalf("earnings %d %+v, want %d", code, earnings, stopped.CostCents)
	}
}
