package persistence

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/distributedcompute/fleet"
)

// ReasonAbandoned ends a session that was still open when its node connected
// again: the coordinator stopped without closing it, so the session is
// closed at the last heartbeat the store knew of.
const ReasonAbandoned = "abandoned"

// OpenSession records that nodeID connected at t, closing first (with
// ReasonAbandoned, at its last seen time) a session of the node that a crash
// left open. An unknown node is an ENOTFOUND error, so that a node deleted
// while its agent connected leaves no sessions behind.
func (s *Store) OpenSession(ctx context.Context, nodeID string, t time.Time) error {
	// Session keys hold ConnectedAt as unsigned nanoseconds since 1970.
	if t.Before(time.Unix(0, 0)) {
		return fmt.Errorf("persistence: open session of node %q: connection time %v is before 1970", nodeID, t)
	}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		rec, err := getNode(tx, nodeID)
		if err != nil {
			return err
		}
		key, old, err := openSession(tx, nodeID)
		if err != nil {
			return err
		}
		if old != nil {
			if err := endSession(tx, nodeID, key, old, old.LastSeenAt, ReasonAbandoned); err != nil {
				return err
			}
			if err := touchNode(tx, rec, old.LastSeenAt); err != nil {
				return err
			}
		}
		// Two connections in the same nanosecond would share a key; the
		// later one moves up a nanosecond in the key only, keeping order.
		key = sessionKey(nodeID, t)
		for tx.Bucket(sessionsBucket).Get(key) != nil {
			binary.BigEndian.PutUint64(key[len(key)-8:], binary.BigEndian.Uint64(key[len(key)-8:])+1)
		}
		sess := &fleet.Session{NodeID: nodeID, ConnectedAt: t, LastSeenAt: t}
		if err := putSession(tx, key, sess); err != nil {
			return err
		}
		if err := tx.Bucket(openSessionsBucket).Put([]byte(nodeID), key); err != nil {
			return fmt.Errorf("index open session: %w", err)
		}
		return nil
	})
	return wrap(err, "open session of node %q", nodeID)
}

// CloseSession ends the open session of nodeID at lastSeen with reason, and
// records lastSeen on the node. Without an open session only the node is
// updated; a node deleted meanwhile is not an error, since its sessions went
// with it. A lastSeen before the open session connected cannot belong to it
// (it is a late close of a connection that was replaced), so that session
// stays open. The node's LastSeenAt never moves backwards.
//
// Closing also prunes the node's sessions that ended more than
// fleet.ReliabilityWindow before lastSeen, which no reliability figure can
// use any more, so that the file does not grow with a node's age.
func (s *Store) CloseSession(ctx context.Context, nodeID string, lastSeen time.Time, reason string) error {
	err := s.update(ctx, func(tx *bolt.Tx) error {
		rec, err := getNode(tx, nodeID)
		if fleet.ErrorCode(err) == fleet.ENOTFOUND {
			return nil
		} else if err != nil {
			return err
		}
		key, sess, err := openSession(tx, nodeID)
		if err != nil {
			return err
		}
		if sess != nil && !lastSeen.Before(sess.ConnectedAt) {
			if err := endSession(tx, nodeID, key, sess, lastSeen, reason); err != nil {
				return err
			}
		}
		return touchNode(tx, rec, lastSeen)
	})
	return wrap(err, "close session of node %q", nodeID)
}

// Checkpoint records the last seen times of many nodes in one transaction:
// each node's open session and its record move forward to the given time.
// Unknown nodes are skipped (they may have been deleted since the caller
// looked), and times never move backwards.
func (s *Store) Checkpoint(ctx context.Context, lastSeen map[string]time.Time) error {
	if len(lastSeen) == 0 {
		return nil
	}
	// A sorted copy: the caller may reuse its map once we return, and writing
	// in key order touches each page of the B+tree once.
	ids := make([]string, 0, len(lastSeen))
	for id := range lastSeen {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	times := make([]time.Time, len(ids))
	for i, id := range ids {
		times[i] = lastSeen[id]
	}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		for i, id := range ids {
			rec, err := getNode(tx, id)
			if fleet.ErrorCode(err) == fleet.ENOTFOUND {
				continue
			} else if err != nil {
				return err
			}
			key, sess, err := openSession(tx, id)
			if err != nil {
				return err
			}
			if sess != nil && times[i].After(sess.LastSeenAt) {
				sess.LastSeenAt = times[i]
				if err := putSession(tx, key, sess); err != nil {
					return err
				}
			}
			if err := touchNode(tx, rec, times[i]); err != nil {
				return err
			}
		}
		return nil
	})
	return wrap(err, "checkpoint %d nodes", len(ids))
}

// Sessions returns the sessions of nodeID that are open or ended after
// since, oldest first. An unknown node has none.
func (s *Store) Sessions(ctx context.Context, nodeID string, since time.Time) ([]fleet.Session, error) {
	out := []fleet.Session{}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		prefix := sessionPrefix(nodeID)
		c := tx.Bucket(sessionsBucket).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			sess, err := decodeSession(k, v)
			if err != nil {
				return err
			}
			if sess.EndedAt.IsZero() || sess.EndedAt.After(since) {
				out = append(out, *sess)
			}
		}
		return nil
	})
	if err != nil {
		return nil, wrap(err, "sessions of node %q", nodeID)
	}
	return out, nil
}

// CloseOpenSessions closes every open session at its last seen time with
// reason. A coordinator calls it on start-up: sessions still open then were
// left so by a crash, and the last checkpoint is the best end time known.
func (s *Store) CloseOpenSessions(ctx context.Context, reason string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// One transaction on its own rather than a batch: it runs once, before
	// any other writer, and may touch every node.
	err := s.db.Update(func(tx *bolt.Tx) error {
		var ids []string
		if err := tx.Bucket(openSessionsBucket).ForEach(func(k, _ []byte) error {
			ids = append(ids, string(k))
			return nil
		}); err != nil {
			return err
		}
		for _, id := range ids {
			key, sess, err := openSession(tx, id)
			if err != nil {
				return err
			}
			if err := endSession(tx, id, key, sess, sess.LastSeenAt, reason); err != nil {
				return err
			}
			rec, err := getNode(tx, id)
			if err != nil {
				return fmt.Errorf("open session of node %q: %w", id, err)
			}
			if err := touchNode(tx, rec, sess.LastSeenAt); err != nil {
				return err
			}
		}
		return nil
	})
	return wrap(err, "close open sessions")
}

// openSession returns the open session of nodeID and its key, or nils.
func openSession(tx *bolt.Tx, nodeID string) ([]byte, *fleet.Session, error) {
	key := tx.Bucket(openSessionsBucket).Get([]byte(nodeID))
	if key == nil {
		return nil, nil, nil
	}
	// A copy: the key is kept across writes, which may move the page
	// it points into.
	key = bytes.Clone(key)
	v := tx.Bucket(sessionsBucket).Get(key)
	if v == nil {
		return nil, nil, fmt.Errorf("open session index of node %q names a missing session", nodeID)
	}
	sess, err := decodeSession(key, v)
	if err != nil {
		return nil, nil, err
	}
	return key, sess, nil
}

// endSession closes the session stored at key at end, forgets it as the
// node's open session and prunes the node's sessions that the reliability
// window no longer reaches as seen from end. end is at most the current
// time, so nothing a reliability figure computed now could use is pruned.
func endSession(tx *bolt.Tx, nodeID string, key []byte, sess *fleet.Session, end time.Time, reason string) error {
	sess.EndedAt, sess.LastSeenAt, sess.Reason = end, end, reason
	if err := putSession(tx, key, sess); err != nil {
		return err
	}
	if err := tx.Bucket(openSessionsBucket).Delete([]byte(nodeID)); err != nil {
		return fmt.Errorf("unindex open session of node %q: %w", nodeID, err)
	}
	return pruneSessions(tx, nodeID, end.Add(-fleet.ReliabilityWindow))
}

// pruneSessions deletes the node's closed sessions that ended before cutoff.
// Keys are ordered by connection time and a session ends after it connects,
// so the scan stops at the first session that connected at or after cutoff.
func pruneSessions(tx *bolt.Tx, nodeID string, cutoff time.Time) error {
	prefix := sessionPrefix(nodeID)
	b := tx.Bucket(sessionsBucket)
	var old [][]byte
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if len(k) != len(prefix)+8 || int64(binary.BigEndian.Uint64(k[len(prefix):])) >= cutoff.UnixNano() {
			break
		}
		sess, err := decodeSession(k, v)
		if err != nil {
			return err
		}
		if !sess.EndedAt.IsZero() && sess.EndedAt.Before(cutoff) {
			old = append(old, bytes.Clone(k))
		}
	}
	// Deleted after the scan: deleting under a bbolt cursor can skip keys.
	for _, k := range old {
		if err := b.Delete(k); err != nil {
			return fmt.Errorf("prune session of node %q: %w", nodeID, err)
		}
	}
	return nil
}

// deleteSessions removes every session of the node and its open-session
// entry.
func deleteSessions(tx *bolt.Tx, nodeID string) error {
	prefix := sessionPrefix(nodeID)
	b := tx.Bucket(sessionsBucket)
	var keys [][]byte
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		keys = append(keys, bytes.Clone(k))
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return fmt.Errorf("delete session: %w", err)
		}
	}
	if err := tx.Bucket(openSessionsBucket).Delete([]byte(nodeID)); err != nil {
		return fmt.Errorf("unindex open session: %w", err)
	}
	return nil
}

// touchNode moves the node's LastSeenAt forward to t; an earlier t (a late
// or replayed write) leaves it alone.
func touchNode(tx *bolt.Tx, rec *nodeRecord, t time.Time) error {
	if rec.Node.LastSeenAt != nil && !t.After(*rec.Node.LastSeenAt) {
		return nil
	}
	rec.Node.LastSeenAt = &t
	return putNode(tx, rec)
}

func putSession(tx *bolt.Tx, key []byte, sess *fleet.Session) error {
	v, err := json.Marshal(sess)
	if err != nil {
		return fmt.Errorf("encode session of node %q: %w", sess.NodeID, err)
	}
	if err := tx.Bucket(sessionsBucket).Put(key, v); err != nil {
		return fmt.Errorf("put session of node %q: %w", sess.NodeID, err)
	}
	return nil
}

func decodeSession(k, v []byte) (*fleet.Session, error) {
	var sess fleet.Session
	if err := json.Unmarshal(v, &sess); err != nil {
		return nil, fmt.Errorf("decode session %q: %w", k, err)
	}
	return &sess, nil
}

// sessionPrefix is the common start of a node's session keys. Node IDs hold
// no NUL byte (CreateNode refuses them), so no other node's keys share it.
func sessionPrefix(nodeID string) []byte {
	return append([]byte(nodeID), 0)
}

// sessionKey is node ID, 0x00, then ConnectedAt as big-endian nanoseconds,
// so that a node's sessions are contiguous and in connection order.
func sessionKey(nodeID string, connectedAt time.Time) []byte {
	k := make([]byte, len(nodeID)+1+8)
	copy(k, nodeID)
	binary.BigEndian.PutUint64(k[len(nodeID)+1:], uint64(connectedAt.UnixNano()))
	return k
}
