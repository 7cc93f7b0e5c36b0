package fleet

import (
	"context"
	"time"
)

// ReliabilityWindow is how far back reliability looks.
const ReliabilityWindow = 30 * 24 * time.Hour

// Session is one period during which a node's agent was connected. The fleet
// opens it on connect and closes it on disconnect; the store keeps it.
type Session struct {
	NodeID      string    `json:"node_id"`
	ConnectedAt time.Time `json:"connected_at"`
	// LastSeenAt is the last heartbeat known to the store: written on
	// disconnect and at checkpoints, not on every heartbeat.
	LastSeenAt time.Time `json:"last_seen_at"`
	// EndedAt is zero while the session is open.
	EndedAt time.Time `json:"ended_at,omitzero"`
	Reason  string    `json:"reason,omitempty"`
}

// End is when the session stopped counting as online: EndedAt for a closed
// session, now for an open one.
func (s *Session) End(now time.Time) time.Time {
	if !s.EndedAt.IsZero() {
		return s.EndedAt
	}
	return now
}

// SessionStore persists node sessions.
type SessionStore interface {
	// OpenSession records that nodeID connected at t. A session of the node
	// still open (a crash left it so) is closed at its last seen time first.
	OpenSession(ctx context.Context, nodeID string, t time.Time) error
	// CloseSession ends the open session of nodeID at lastSeen with reason
	// and records lastSeen on the node.
	CloseSession(ctx context.Context, nodeID string, lastSeen time.Time, reason string) error
	// Checkpoint records the last seen time of many open sessions in one
	// write, so that a crash loses at most one checkpoint interval.
	Checkpoint(ctx context.Context, lastSeen map[string]time.Time) error
	// Sessions returns the sessions of nodeID that ended after since (open
	// ones included), oldest first.
	Sessions(ctx context.Context, nodeID string, since time.Time) ([]Session, error)
	// CloseOpenSessions closes every open session at its last seen time with
	// reason; a coordinator calls it on start-up after a crash.
	CloseOpenSessions(ctx context.Context, reason string) error
}

// Reliability is the fraction of the last 30 days, or of the time since the
// node was registered if shorter, that the node was online.
func Reliability(created time.Time, sessions []Session, now time.Time) float64 {
	from := now.Add(-ReliabilityWindow)
	if created.After(from) {
		from = created
	}
	window := now.Sub(from)
	if window <= 0 {
		return 0
	}
	var online time.Duration
	for i := range sessions {
		s, e := sessions[i].ConnectedAt, sessions[i].End(now)
		if s.Before(from) {
			s = from
		}
		if e.After(now) {
			e = now
		}
		if e.After(s) {
			online += e.Sub(s)
		}
	}
	r := float64(online) / float64(window)
	if r > 1 {
		r = 1
	}
	return r
}
