package persistence

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/distributedcompute/fleet"
)

// rentalRecord is the stored form of a rental: fleet.Rental's fields under
// their JSON names but without its methods, so that a MarshalJSON added to
// fleet.Rental for the API (computed cost, hidden intervals) cannot change
// what is written to the file or how it is read back.
type rentalRecord fleet.Rental

// idempotencyRecord is the stored form of fleet.Idempotency, methods left
// behind for the same reason as rentalRecord's.
type idempotencyRecord fleet.Idempotency

// Messages of the conflicts CreateRental reports. They differ so that a
// caller can tell a retry of its own request (the key was used) from a
// node that someone else rented.
const (
	msgNodeRented   = "Node already has an active rental."
	msgRentalExists = "Rental already exists."
	msgKeyUsed      = "Idempotency-Key already used."
)

// maxStartedAt is the latest start time the rental indexes can hold: the
// last instant whose Unix nanoseconds fit an int64 (in the year 2262).
var maxStartedAt = time.Unix(0, math.MaxInt64)

func errRentalNotFound() error { return fleet.Errorf(fleet.ENOTFOUND, "Rental not found.") }

func errNoLiveRental() error { return fleet.Errorf(fleet.ENOTFOUND, "Node has no active rental.") }

func errIdempotencyNotFound() error {
	return fleet.Errorf(fleet.ENOTFOUND, "Idempotency record not found.")
}

// CreateRental stores r, which must be live (active or paused), with its
// index entries, and idem with it when not nil, in one transaction.
//
// It fails with an ECONFLICT error, storing nothing, if a record of idem's
// user and key younger than fleet.IdempotencyTTL exists, if a rental with
// r's ID exists, or if r's node already has a live rental; in that order, so
// that a retry racing its own first attempt learns that its key was used
// (and can answer with the recorded rental) rather than that the node is
// taken. An expired record of the same user and key is replaced.
//
// A rental that is not live, lacks an ID, node, renter or owner, or starts
// before 1970 or at a zero time is refused with an internal error, not a
// domain one: the billing actor builds rentals, so such a rental is a bug to
// log, not a client's mistake to report. idem.RentalID may be empty, and is
// then stored as r.ID; any other value than r.ID is refused likewise.
func (s *Store) CreateRental(ctx context.Context, r *fleet.Rental, idem *fleet.Idempotency) error {
	if err := checkNewRental(r); err != nil {
		return wrap(err, "create rental %q", r.ID)
	}
	// Encoded before the batch: the bytes are the copy that is written, so
	// a caller changing r or idem meanwhile cannot change the records, and
	// every retry of fn writes the same.
	val, err := json.Marshal((*rentalRecord)(r))
	if err != nil {
		return wrap(err, "create rental %q: encode", r.ID)
	}
	var idemKey, idemVal []byte
	if idem != nil {
		rec := idempotencyRecord(*idem)
		if rec.RentalID == "" {
			rec.RentalID = r.ID
		}
		if err := checkIdempotency(&rec, r.ID); err != nil {
			return wrap(err, "create rental %q", r.ID)
		}
		idemKey = idempotencyKey(rec.UserID, rec.Key)
		if idemVal, err = json.Marshal(&rec); err != nil {
			return wrap(err, "create rental %q: encode idempotency record", r.ID)
		}
	}
	id, nodeID := []byte(r.ID), []byte(r.NodeID)
	byRenter := rentalIndexKey(r.RenterID, r.StartedAt, r.ID)
	byOwner := rentalIndexKey(r.OwnerID, r.StartedAt, r.ID)
	err = s.update(ctx, func(tx *bolt.Tx) error {
		if idemKey != nil {
			if v := tx.Bucket(idempotencyBucket).Get(idemKey); v != nil {
				old, err := decodeIdempotency(idemKey, v)
				if err != nil {
					return err
				}
				if !expired(old, time.Now()) {
					return fleet.Errorf(fleet.ECONFLICT, msgKeyUsed)
				}
			}
		}
		if tx.Bucket(rentalsBucket).Get(id) != nil {
			return fleet.Errorf(fleet.ECONFLICT, msgRentalExists)
		}
		live := tx.Bucket(liveRentalsBucket)
		if live.Get(nodeID) != nil {
			return fleet.Errorf(fleet.ECONFLICT, msgNodeRented)
		}
		if err := tx.Bucket(rentalsBucket).Put(id, val); err != nil {
			return fmt.Errorf("put rental: %w", err)
		}
		if err := tx.Bucket(renterIndexBucket).Put(byRenter, nil); err != nil {
			return fmt.Errorf("index renter: %w", err)
		}
		if err := tx.Bucket(ownerRentalIndexBucket).Put(byOwner, nil); err != nil {
			return fmt.Errorf("index owner: %w", err)
		}
		if err := live.Put(nodeID, id); err != nil {
			return fmt.Errorf("index live rental of node: %w", err)
		}
		if idemKey != nil {
			if err := tx.Bucket(idempotencyBucket).Put(idemKey, idemVal); err != nil {
				return fmt.Errorf("put idempotency record: %w", err)
			}
		}
		return nil
	})
	return wrap(err, "create rental %q", r.ID)
}

// Rental returns the rental with this ID, or an ENOTFOUND error.
func (s *Store) Rental(ctx context.Context, id string) (*fleet.Rental, error) {
	var r *fleet.Rental
	err := s.view(ctx, func(tx *bolt.Tx) (err error) {
		r, err = getRental(tx, id)
		return err
	})
	if err != nil {
		return nil, wrap(err, "get rental %q", id)
	}
	return r, nil
}

// UpdateRental applies fn to a fresh copy of the stored rental and stores
// the result, atomically with respect to every other write.
//
// fn may be called more than once: bbolt retries a batched transaction when
// another write in the same batch fails. Each call gets a new copy decoded
// from the file, so fn must only change the rental it is given and must not
// depend on side effects of an earlier call. An error from fn aborts the
// update and is returned unchanged.
//
// A rental that stops being live leaves the node's live index, which frees
// the node for a new rental in the same transaction. fn must not change the
// ID, node, renter, owner or start time, which the indexes are keyed by, nor
// make an ended rental live again, nor set an unknown status: each is
// refused with an internal error, since only the billing actor's own logic
// could do it.
func (s *Store) UpdateRental(ctx context.Context, id string, fn func(*fleet.Rental) error) (*fleet.Rental, error) {
	var out *fleet.Rental
	var fnErr error
	err := s.update(ctx, func(tx *bolt.Tx) error {
		out, fnErr = nil, nil
		r, err := getRental(tx, id)
		if err != nil {
			return err
		}
		before := *r // the fields compared below are values, not shared
		if err := fn(r); err != nil {
			fnErr = err
			return err
		}
		if err := checkRentalChange(&before, r); err != nil {
			return err
		}
		if before.Live() && !r.Live() {
			live := tx.Bucket(liveRentalsBucket)
			// Only if the entry is this rental's: never free a node
			// for someone else's rental.
			if string(live.Get([]byte(r.NodeID))) == r.ID {
				if err := live.Delete([]byte(r.NodeID)); err != nil {
					return fmt.Errorf("unindex live rental of node: %w", err)
				}
			}
		}
		if err := putRental(tx, r); err != nil {
			return err
		}
		out = r
		return nil
	})
	if err != nil {
		if fnErr != nil && errors.Is(err, fnErr) {
			return nil, err
		}
		return nil, wrap(err, "update rental %q", id)
	}
	return out, nil
}

// RentalsByRenter returns the renter's rentals, live and ended, newest
// first; rentals started at the same instant come in ID order. It reads
// only the renter's contiguous range of the renter index.
func (s *Store) RentalsByRenter(ctx context.Context, renterID string) ([]*fleet.Rental, error) {
	out, err := s.rentalsBy(ctx, renterIndexBucket, renterID)
	return out, wrap(err, "rentals of renter %q", renterID)
}

// RentalsByOwner returns the rentals of the owner's nodes, live and ended,
// in the order of RentalsByRenter.
func (s *Store) RentalsByOwner(ctx context.Context, ownerID string) ([]*fleet.Rental, error) {
	out, err := s.rentalsBy(ctx, ownerRentalIndexBucket, ownerID)
	return out, wrap(err, "rentals of owner %q", ownerID)
}

func (s *Store) rentalsBy(ctx context.Context, index []byte, party string) ([]*fleet.Rental, error) {
	out := []*fleet.Rental{}
	// An ID with a NUL byte could reach into another party's range; no
	// rental is stored under one (CreateRental refuses them).
	if strings.IndexByte(party, 0) >= 0 {
		return out, nil
	}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		prefix := append([]byte(party), 0)
		c := tx.Bucket(index).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			if len(k) <= len(prefix)+8 {
				return fmt.Errorf("malformed rental index key %q", k)
			}
			id := string(k[len(prefix)+8:])
			r, err := getRental(tx, id)
			if err != nil {
				// Indexes and records are written in one transaction,
				// so a dangling entry is corruption.
				return fmt.Errorf("rental index names rental %q: %w", id, err)
			}
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// LiveRentals returns every active or paused rental, ordered by node ID.
// It reads the live index, not every rental ever made, so that restoring
// billing on start-up costs the number of live rentals.
func (s *Store) LiveRentals(ctx context.Context) ([]*fleet.Rental, error) {
	out := []*fleet.Rental{}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(liveRentalsBucket).ForEach(func(node, id []byte) error {
			r, err := liveRental(tx, node, id)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, wrap(err, "live rentals")
	}
	return out, nil
}

// LiveRentalByNode returns the node's active or paused rental, or an
// ENOTFOUND error if it has none.
func (s *Store) LiveRentalByNode(ctx context.Context, nodeID string) (*fleet.Rental, error) {
	var r *fleet.Rental
	err := s.view(ctx, func(tx *bolt.Tx) (err error) {
		id := tx.Bucket(liveRentalsBucket).Get([]byte(nodeID))
		if id == nil {
			return errNoLiveRental()
		}
		r, err = liveRental(tx, []byte(nodeID), id)
		return err
	})
	if err != nil {
		return nil, wrap(err, "live rental of node %q", nodeID)
	}
	return r, nil
}

// Idempotency returns the record of userID's key, or an ENOTFOUND error if
// there is none or it is older than fleet.IdempotencyTTL: an expired record
// may linger until PruneIdempotency runs, but never answers a request.
func (s *Store) Idempotency(ctx context.Context, userID, key string) (*fleet.Idempotency, error) {
	// A NUL in the user ID would make (user, key) pairs ambiguous; no
	// record is stored under one (CreateRental refuses them).
	if key == "" || strings.IndexByte(userID, 0) >= 0 {
		return nil, errIdempotencyNotFound()
	}
	var rec *idempotencyRecord
	err := s.view(ctx, func(tx *bolt.Tx) error {
		k := idempotencyKey(userID, key)
		v := tx.Bucket(idempotencyBucket).Get(k)
		if v == nil {
			return errIdempotencyNotFound()
		}
		var err error
		rec, err = decodeIdempotency(k, v)
		return err
	})
	if err != nil {
		return nil, wrap(err, "idempotency record of user %q", userID)
	}
	if expired(rec, time.Now()) {
		return nil, errIdempotencyNotFound()
	}
	return (*fleet.Idempotency)(rec), nil
}

// PruneIdempotency deletes the idempotency records created before cutoff.
//
// The records are found in a read transaction, which does not hold up
// writers however many there are, and deleted in a write transaction that
// reads each again: a record replaced since (an expired key used anew) is
// kept.
func (s *Store) PruneIdempotency(ctx context.Context, cutoff time.Time) error {
	var old [][]byte
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(idempotencyBucket).ForEach(func(k, v []byte) error {
			rec, err := decodeIdempotency(k, v)
			if err != nil {
				return err
			}
			if rec.CreatedAt.Before(cutoff) {
				old = append(old, bytes.Clone(k))
			}
			return nil
		})
	})
	if err != nil || len(old) == 0 {
		return wrap(err, "prune idempotency records")
	}
	err = s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(idempotencyBucket)
		for _, k := range old {
			v := b.Get(k)
			if v == nil {
				continue
			}
			rec, err := decodeIdempotency(k, v)
			if err != nil {
				return err
			}
			if !rec.CreatedAt.Before(cutoff) {
				continue
			}
			if err := b.Delete(k); err != nil {
				return fmt.Errorf("delete idempotency record: %w", err)
			}
		}
		return nil
	})
	return wrap(err, "prune idempotency records")
}

// checkNewRental refuses rentals that CreateRental must not store: the
// layout needs the IDs and a start time it can put in a key, and only a
// live rental can hold a node.
func checkNewRental(r *fleet.Rental) error {
	for _, f := range []struct{ what, id string }{
		{"rental id", r.ID}, {"node id", r.NodeID}, {"renter id", r.RenterID}, {"owner id", r.OwnerID},
	} {
		if err := checkID(f.what, f.id); err != nil {
			return err
		}
	}
	if !r.Live() {
		return fmt.Errorf("rental has status %q: only an active or paused rental can be created", r.Status)
	}
	// Index keys hold StartedAt as unsigned nanoseconds since 1970.
	if r.StartedAt.Before(time.Unix(0, 0)) || r.StartedAt.After(maxStartedAt) {
		return fmt.Errorf("rental start %v is outside 1970 to 2262", r.StartedAt)
	}
	return nil
}

// checkIdempotency refuses a record that could not be found again or does
// not name the rental stored with it.
func checkIdempotency(rec *idempotencyRecord, rentalID string) error {
	if err := checkID("idempotency user id", rec.UserID); err != nil {
		return err
	}
	if rec.Key == "" {
		return errors.New("idempotency key is empty")
	}
	if rec.RentalID != rentalID {
		return fmt.Errorf("idempotency record names rental %q, not the rental created with it", rec.RentalID)
	}
	// A zero creation time would be expired at once.
	if rec.CreatedAt.IsZero() {
		return errors.New("idempotency record has no creation time")
	}
	return nil
}

// checkRentalChange refuses what UpdateRental's fn must not do.
func checkRentalChange(before, after *fleet.Rental) error {
	switch {
	case after.ID != before.ID:
		return fmt.Errorf("update must not change the rental id (to %q)", after.ID)
	case after.NodeID != before.NodeID:
		return fmt.Errorf("update must not change the node id (to %q)", after.NodeID)
	case after.RenterID != before.RenterID:
		return fmt.Errorf("update must not change the renter id (to %q)", after.RenterID)
	case after.OwnerID != before.OwnerID:
		return fmt.Errorf("update must not change the owner id (to %q)", after.OwnerID)
	case !after.StartedAt.Equal(before.StartedAt):
		return fmt.Errorf("update must not change the start time (to %v)", after.StartedAt)
	}
	switch after.Status {
	case fleet.RentalActive, fleet.RentalPaused, fleet.RentalStopped, fleet.RentalCompleted, fleet.RentalInterrupted:
	default:
		return fmt.Errorf("update sets unknown status %q", after.Status)
	}
	if !before.Live() && after.Live() {
		// Its node may have been rented again since it ended.
		return fmt.Errorf("update makes ended rental (%s) %s again", before.Status, after.Status)
	}
	return nil
}

// expired reports whether rec no longer answers requests at now.
func expired(rec *idempotencyRecord, now time.Time) bool {
	return now.Sub(rec.CreatedAt) > fleet.IdempotencyTTL
}

// getRental reads and decodes a rental; the result shares no memory with
// the file, so it stays valid after the transaction.
func getRental(tx *bolt.Tx, id string) (*fleet.Rental, error) {
	v := tx.Bucket(rentalsBucket).Get([]byte(id))
	if v == nil {
		return nil, errRentalNotFound()
	}
	var rec rentalRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("decode rental %q: %w", id, err)
	}
	return (*fleet.Rental)(&rec), nil
}

// liveRental reads the rental the live index names for node, checking that
// the index is right about it.
func liveRental(tx *bolt.Tx, node, id []byte) (*fleet.Rental, error) {
	r, err := getRental(tx, string(id))
	if err != nil {
		return nil, fmt.Errorf("live index of node %q names rental %q: %w", node, id, err)
	}
	if r.NodeID != string(node) || !r.Live() {
		return nil, fmt.Errorf("live index of node %q names rental %q of node %q with status %q", node, id, r.NodeID, r.Status)
	}
	return r, nil
}

func putRental(tx *bolt.Tx, r *fleet.Rental) error {
	v, err := json.Marshal((*rentalRecord)(r))
	if err != nil {
		return fmt.Errorf("encode rental %q: %w", r.ID, err)
	}
	if err := tx.Bucket(rentalsBucket).Put([]byte(r.ID), v); err != nil {
		return fmt.Errorf("put rental %q: %w", r.ID, err)
	}
	return nil
}

func decodeIdempotency(k, v []byte) (*idempotencyRecord, error) {
	var rec idempotencyRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("decode idempotency record %q: %w", k, err)
	}
	return &rec, nil
}

// rentalIndexKey is a renter or owner index key: party ID, 0x00, the
// bitwise NOT of StartedAt's Unix nanoseconds (big-endian), rental ID. The
// separator keeps one party's entries contiguous (see ownerKey), and the
// inverted time sorts later starts first.
func rentalIndexKey(party string, startedAt time.Time, rentalID string) []byte {
	k := make([]byte, 0, len(party)+1+8+len(rentalID))
	k = append(k, party...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, ^uint64(startedAt.UnixNano()))
	return append(k, rentalID...)
}

// idempotencyKey is user ID, 0x00, key. User IDs hold no NUL byte, so the
// first NUL ends the user ID whatever the key holds.
func idempotencyKey(userID, key string) []byte {
	k := make([]byte, 0, len(userID)+1+len(key))
	k = append(k, userID...)
	k = append(k, 0)
	return append(k, key...)
}
