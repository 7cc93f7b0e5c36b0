package persistence

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/distributedcompute/fleet"
)

// Bounds of the session writes that touch many nodes or sessions, kept well
// inside etcd's 128 operations per transaction.
const (
	// etcdSessionPruneBatch is how many old sessions one close deletes.
	// Each close adds at most one session, so a node's sessions stay
	// bounded even though a long-unpruned node sheds them over several
	// closes.
	etcdSessionPruneBatch = 8
	// etcdCheckpointBatch is how many nodes one Checkpoint transaction
	// updates: each costs three compares (node, open-session entry,
	// session) and two writes.
	etcdCheckpointBatch = 32
	// etcdCloseBatch is how many nodes one transaction of
	// CloseOpenSessions closes: each costs three compares and up to three
	// writes plus the pruned sessions.
	etcdCloseBatch = 8
	// etcdSessionWorkers is how many of the transactions of Checkpoint and
	// CloseOpenSessions run at once; they touch disjoint nodes.
	etcdSessionWorkers = 4
)

// OpenSession records that nodeID connected at t, closing first (with
// ReasonAbandoned, at its last seen time) a session of the node that a crash
// left open, as Store's does. An unknown node is an ENOTFOUND error.
func (s *EtcdStore) OpenSession(ctx context.Context, nodeID string, t time.Time) error {
	if t.Before(time.Unix(0, 0)) {
		return fmt.Errorf("persistence: open session of node %q: connection time %v is before 1970", nodeID, t)
	}
	err := s.update(ctx, func(tx *etcdTx) error {
		if _, err := tx.getMany([]string{etcdNodeKey(nodeID), etcdOpenSessionKey(nodeID)}); err != nil {
			return err
		}
		rec, err := tx.node(nodeID)
		if err != nil {
			return err
		}
		key, old, err := tx.openSession(nodeID)
		if err != nil {
			return err
		}
		if old != nil {
			if err := tx.endSession(nodeID, key, old, old.LastSeenAt, ReasonAbandoned); err != nil {
				return err
			}
			if err := tx.touchNode(rec, old.LastSeenAt); err != nil {
				return err
			}
		}
		// Two connections in the same nanosecond would share a key; the
		// later one moves up a nanosecond in the key only, keeping order.
		ns := uint64(t.UnixNano())
		for {
			v, err := tx.get(etcdSessionKey(nodeID, ns))
			if err != nil {
				return err
			}
			if v == nil {
				break
			}
			ns++
		}
		sess := &fleet.Session{NodeID: nodeID, ConnectedAt: t, LastSeenAt: t}
		if err := tx.putSession(etcdSessionKey(nodeID, ns), sess); err != nil {
			return err
		}
		tx.put(etcdOpenSessionKey(nodeID), []byte(hex16(ns)))
		return nil
	})
	return wrap(err, "open session of node %q", nodeID)
}

// CloseSession ends the open session of nodeID at lastSeen with reason, and
// records lastSeen on the node, as Store's does: without an open session
// only the node moves, a deleted node is not an error, a lastSeen before the
// open session connected leaves it open, and LastSeenAt never moves back.
// Closing prunes the node's sessions that the reliability window no longer
// reaches, at most etcdSessionPruneBatch of them.
func (s *EtcdStore) CloseSession(ctx context.Context, nodeID string, lastSeen time.Time, reason string) error {
	err := s.update(ctx, func(tx *etcdTx) error {
		if _, err := tx.getMany([]string{etcdNodeKey(nodeID), etcdOpenSessionKey(nodeID)}); err != nil {
			return err
		}
		rec, err := tx.node(nodeID)
		if fleet.ErrorCode(err) == fleet.ENOTFOUND {
			return nil
		} else if err != nil {
			return err
		}
		key, sess, err := tx.openSession(nodeID)
		if err != nil {
			return err
		}
		if sess != nil && !lastSeen.Before(sess.ConnectedAt) {
			if err := tx.endSession(nodeID, key, sess, lastSeen, reason); err != nil {
				return err
			}
		}
		return tx.touchNode(rec, lastSeen)
	})
	return wrap(err, "close session of node %q", nodeID)
}

// Checkpoint moves the open session and the record of each node forward to
// its last seen time, as Store's does: unknown nodes are skipped and times
// never move backwards. Unlike Store's, it is not one transaction: etcd
// bounds the size of one, so nodes are written etcdCheckpointBatch at a
// time, each batch atomically. A checkpoint only moves times forward, so a
// batch that fails leaves no node inconsistent, only behind.
func (s *EtcdStore) Checkpoint(ctx context.Context, lastSeen map[string]time.Time) error {
	if len(lastSeen) == 0 {
		return nil
	}
	// A sorted copy: the caller may reuse its map once we return.
	ids := make([]string, 0, len(lastSeen))
	for id := range lastSeen {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	times := make(map[string]time.Time, len(ids))
	for _, id := range ids {
		times[id] = lastSeen[id]
	}
	err := s.inBatches(ctx, ids, etcdCheckpointBatch, func(tx *etcdTx, batch []string) error {
		if err := tx.prefetchSessions(batch); err != nil {
			return err
		}
		for _, id := range batch {
			rec, err := tx.node(id)
			if fleet.ErrorCode(err) == fleet.ENOTFOUND {
				continue
			} else if err != nil {
				return err
			}
			key, sess, err := tx.openSession(id)
			if err != nil {
				return err
			}
			t := times[id]
			if sess != nil && t.After(sess.LastSeenAt) {
				sess.LastSeenAt = t
				if err := tx.putSession(key, sess); err != nil {
					return err
				}
			}
			if err := tx.touchNode(rec, t); err != nil {
				return err
			}
		}
		return nil
	})
	return wrap(err, "checkpoint %d nodes", len(ids))
}

// Sessions returns the sessions of nodeID that are open or ended after
// since, oldest first. An unknown node has none.
func (s *EtcdStore) Sessions(ctx context.Context, nodeID string, since time.Time) ([]fleet.Session, error) {
	var out []fleet.Session
	err := s.view(ctx, func(tx *etcdTx) error {
		out = []fleet.Session{}
		return tx.each(etcdSessionPrefix(nodeID), "", false, func(k string, v []byte) (bool, error) {
			sess, err := decodeSession([]byte(k), v)
			if err != nil {
				return false, err
			}
			if sess.EndedAt.IsZero() || sess.EndedAt.After(since) {
				out = append(out, *sess)
			}
			return true, nil
		})
	})
	if err != nil {
		return nil, wrap(err, "sessions of node %q", nodeID)
	}
	return out, nil
}

// CloseOpenSessions closes every open session at its last seen time with
// reason, as Store's does. The store is shared, so this closes the
// sessions of every coordinator of the cluster: call it only when none of
// them is serving (the whole cluster restarts). Nodes are closed
// etcdCloseBatch at a time, each batch atomically, reading each node's open
// session again: one closed since the listing is skipped.
func (s *EtcdStore) CloseOpenSessions(ctx context.Context, reason string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var ids []string
	err := s.view(ctx, func(tx *etcdTx) error {
		ids = nil
		return tx.each(etcdOpenSessions, "", true, func(k string, _ []byte) (bool, error) {
			ids = append(ids, k[len(etcdOpenSessions):])
			return true, nil
		})
	})
	if err != nil {
		return wrap(err, "close open sessions")
	}
	err = s.inBatches(ctx, ids, etcdCloseBatch, func(tx *etcdTx, batch []string) error {
		if err := tx.prefetchSessions(batch); err != nil {
			return err
		}
		for _, id := range batch {
			key, sess, err := tx.openSession(id)
			if err != nil {
				return err
			}
			if sess == nil {
				continue // closed since the listing
			}
			if err := tx.endSession(id, key, sess, sess.LastSeenAt, reason); err != nil {
				return err
			}
			rec, err := tx.node(id)
			if err != nil {
				return fmt.Errorf("open session of node %q: %w", id, err)
			}
			if err := tx.touchNode(rec, sess.LastSeenAt); err != nil {
				return err
			}
		}
		return nil
	})
	return wrap(err, "close open sessions")
}

// inBatches runs fn in one transaction per batch of ids, up to
// etcdSessionWorkers transactions at once, and returns the first error.
func (s *EtcdStore) inBatches(ctx context.Context, ids []string, size int, fn func(tx *etcdTx, batch []string) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	sem := make(chan struct{}, etcdSessionWorkers)
	for batch := range slices.Chunk(ids, size) {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := s.update(ctx, func(tx *etcdTx) error { return fn(tx, batch) }); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				cancel()
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// prefetchSessions reads the records, open-session entries and open
// sessions of ids in two round trips, for the loops that then read them one
// by one.
func (tx *etcdTx) prefetchSessions(ids []string) error {
	keys := make([]string, 0, 2*len(ids))
	for _, id := range ids {
		keys = append(keys, etcdNodeKey(id), etcdOpenSessionKey(id))
	}
	vs, err := tx.getMany(keys)
	if err != nil {
		return err
	}
	var sessions []string
	for i, id := range ids {
		if stamp := vs[2*i+1]; stamp != nil {
			sessions = append(sessions, etcdSessionPrefix(id)+string(stamp))
		}
	}
	_, err = tx.getMany(sessions)
	return err
}

// openSession returns the open session of nodeID and its key, or nils.
func (tx *etcdTx) openSession(nodeID string) (string, *fleet.Session, error) {
	stamp, err := tx.get(etcdOpenSessionKey(nodeID))
	if err != nil || stamp == nil {
		return "", nil, err
	}
	key := etcdSessionPrefix(nodeID) + string(stamp)
	v, err := tx.get(key)
	if err != nil {
		return "", nil, err
	}
	if v == nil {
		return "", nil, fmt.Errorf("open session index of node %q names a missing session", nodeID)
	}
	sess, err := decodeSession([]byte(key), v)
	if err != nil {
		return "", nil, err
	}
	return key, sess, nil
}

// endSession closes the session stored at key at end, forgets it as the
// node's open session and prunes the node's sessions that the reliability
// window no longer reaches as seen from end (see Store's endSession).
func (tx *etcdTx) endSession(nodeID, key string, sess *fleet.Session, end time.Time, reason string) error {
	sess.EndedAt, sess.LastSeenAt, sess.Reason = end, end, reason
	if err := tx.putSession(key, sess); err != nil {
		return err
	}
	tx.del(etcdOpenSessionKey(nodeID))
	return tx.pruneSessions(nodeID, end.Add(-fleet.ReliabilityWindow))
}

// pruneSessions deletes up to etcdSessionPruneBatch of the node's closed
// sessions that ended before cutoff. Only sessions that connected before
// cutoff can qualify, and keys are ordered by connection time, so the scan
// ends at cutoff's key. The sessions scanned are not compared at commit: a
// closed session never changes again, so deleting one needs no guard.
func (tx *etcdTx) pruneSessions(nodeID string, cutoff time.Time) error {
	if cutoff.UnixNano() <= 0 {
		return nil
	}
	var old []string
	err := tx.each(etcdSessionPrefix(nodeID), etcdSessionKey(nodeID, uint64(cutoff.UnixNano())), false, func(k string, v []byte) (bool, error) {
		sess, err := decodeSession([]byte(k), v)
		if err != nil {
			return false, err
		}
		if !sess.EndedAt.IsZero() && sess.EndedAt.Before(cutoff) {
			old = append(old, k)
		}
		return len(old) < etcdSessionPruneBatch, nil
	})
	if err != nil {
		return err
	}
	for _, k := range old {
		if _, written := tx.writes[k]; !written {
			tx.del(k)
		}
	}
	return nil
}

// touchNode moves the node's LastSeenAt forward to t; an earlier t (a late
// or replayed write) leaves it alone.
func (tx *etcdTx) touchNode(rec *nodeRecord, t time.Time) error {
	if rec.Node.LastSeenAt != nil && !t.After(*rec.Node.LastSeenAt) {
		return nil
	}
	rec.Node.LastSeenAt = &t
	return tx.putNode(rec)
}

func (tx *etcdTx) putSession(key string, sess *fleet.Session) error {
	v, err := json.Marshal(sess)
	if err != nil {
		return fmt.Errorf("encode session of node %q: %w", sess.NodeID, err)
	}
	tx.put(key, v)
	return nil
}

func etcdOpenSessionKey(nodeID string) string { return etcdOpenSessions + nodeID }

// etcdSessionPrefix is the common start of a node's session keys; node IDs
// hold no NUL byte, so no other node's keys share it.
func etcdSessionPrefix(nodeID string) string { return etcdSessions + nodeID + "\x00" }

// etcdSessionKey is the key of the node's session that connected at ns
// nanoseconds since 1970.
func etcdSessionKey(nodeID string, ns uint64) string { return etcdSessionPrefix(nodeID) + hex16(ns) }

// hex16 is n as 16 hex digits, whose byte order is numeric order.
func hex16(n uint64) string {
	s := strconv.FormatUint(n, 16)
	return "0000000000000000"[len(s):] + s
}
