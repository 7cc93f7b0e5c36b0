package fleet_test

import (
	"testing"
	"time"

	"github.com/distributedcompute/fleet"
)

func TestReliability(t *testing.T) {
	now := time.Date(2026, 6, 30, 0, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	s := func(from, to time.Duration) fleet.Session {
		sess := fleet.Session{ConnectedAt: now.Add(-from)}
		if to > 0 {
			sess.EndedAt = now.Add(-to)
		}
		return sess
	}
	cases := []struct {
		name     string
		created  time.Time
		sessions []fleet.Session
		want     float64
	}{
		{"never connected", now.Add(-10 * day), nil, 0},
		{"online since registration", now.Add(-10 * day), []fleet.Session{s(10*day, 0)}, 1},
		{"half of its life", now.Add(-10 * day), []fleet.Session{s(10*day, 5*day)}, 0.5},
		{"only the last 30 days count", now.Add(-90 * day), []fleet.Session{s(90*day, 45*day), s(15*day, 0)}, 0.5},
		{"a session across the window edge", now.Add(-90 * day), []fleet.Session{s(40*day, 20*day)}, 10.0 / 30},
		{"registered just now", now, nil, 0},
	}
	for _, c := range cases {
		got := fleet.Reliability(c.created, c.sessions, now)
		if d := got - c.want; d > 1e-9 || d < -1e-9 {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
