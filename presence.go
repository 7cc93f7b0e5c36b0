package fleet

import (
	"crypto/rand"
	"time"
)

// Presence is a node's live state as the fleet sees it: whether an agent is
// connected, since when, and what it last reported. The fleet's registry
// owns it; the REST layer only reads it.
type Presence struct {
	Online         bool
	ConnectedSince time.Time
	LastSeenAt     time.Time
	Metrics        *Metrics
	// Member names the coordinator holding the node's socket.
	Member string
	// Rented is set when the node has a live rental.
	Rented bool
}

// NewID returns an opaque identifier: prefix, then 20 random base62
// characters (119 bits).
func NewID(prefix string) string {
	const n = 20
	b := make([]byte, len(prefix), len(prefix)+n)
	copy(b, prefix)
	buf := make([]byte, 32)
	for len(b) < cap(b) {
		_, _ = rand.Read(buf)
		for _, c := range buf {
			if c < 248 && len(b) < cap(b) {
				b = append(b, base62[c%62])
			}
		}
	}
	return string(b)
}
