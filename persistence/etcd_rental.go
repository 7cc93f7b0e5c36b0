package persistence

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/distributedcompute/fleet"
)

// CreateRental stores r with its index entries, and idem with it when not
// nil, in one transaction, with the checks and errors of
// Store.CreateRental. The transaction compares the node's live-rental entry,
// the rental's key and the idempotency record as they were read, so of two
// coordinators renting one node at once exactly one succeeds and the other
// gets the ECONFLICT it would get one after the other.
func (s *EtcdStore) CreateRental(ctx context.Context, r *fleet.Rental, idem *fleet.Idempotency) error {
	if err := checkNewRental(r); err != nil {
		return wrap(err, "create rental %q", r.ID)
	}
	val, err := json.Marshal((*rentalRecord)(r))
	if err != nil {
		return wrap(err, "create rental %q: encode", r.ID)
	}
	var idemKey string
	var idemVal []byte
	if idem != nil {
		rec := idempotencyRecord(*idem)
		if rec.RentalID == "" {
			rec.RentalID = r.ID
		}
		if err := checkIdempotency(&rec, r.ID); err != nil {
			return wrap(err, "create rental %q", r.ID)
		}
		idemKey = etcdIdempotencyKey(rec.UserID, rec.Key)
		if idemVal, err = json.Marshal(&rec); err != nil {
			return wrap(err, "create rental %q: encode idempotency record", r.ID)
		}
	}
	rentalKey, liveKey := etcdRentalKey(r.ID), etcdLiveRentalKey(r.NodeID)
	byRenter := etcdRentalIndexKey(etcdRenterIndex, r.RenterID, r.StartedAt, r.ID)
	byOwner := etcdRentalIndexKey(etcdOwnerRentalIndex, r.OwnerID, r.StartedAt, r.ID)
	err = s.update(ctx, func(tx *etcdTx) error {
		keys := []string{rentalKey, liveKey}
		if idemKey != "" {
			keys = append(keys, idemKey)
		}
		vs, err := tx.getMany(keys)
		if err != nil {
			return err
		}
		if idemKey != "" && vs[2] != nil {
			old, err := decodeIdempotency([]byte(idemKey), vs[2])
			if err != nil {
				return err
			}
			if !expired(old, time.Now()) {
				return fleet.Errorf(fleet.ECONFLICT, msgKeyUsed)
			}
		}
		if vs[0] != nil {
			return fleet.Errorf(fleet.ECONFLICT, msgRentalExists)
		}
		if vs[1] != nil {
			return fleet.Errorf(fleet.ECONFLICT, msgNodeRented)
		}
		tx.put(rentalKey, val)
		tx.put(byRenter, []byte{})
		tx.put(byOwner, []byte{})
		tx.put(liveKey, []byte(r.ID))
		if idemKey != "" {
			tx.put(idemKey, idemVal)
		}
		return nil
	})
	return wrap(err, "create rental %q", r.ID)
}

// Rental returns the rental with this ID, or an ENOTFOUND error.
func (s *EtcdStore) Rental(ctx context.Context, id string) (*fleet.Rental, error) {
	var r *fleet.Rental
	err := s.view(ctx, func(tx *etcdTx) (err error) {
		r, err = tx.rental(id)
		return err
	})
	if err != nil {
		return nil, wrap(err, "get rental %q", id)
	}
	return r, nil
}

// UpdateRental applies fn to a fresh copy of the stored rental and stores
// the result, with the rules of Store.UpdateRental. When another write
// changed the rental (or the node's live entry) meanwhile, fn runs again on
// the newer rental, so no update is lost; fn may therefore be called more
// than once, and must only change the rental it is given.
func (s *EtcdStore) UpdateRental(ctx context.Context, id string, fn func(*fleet.Rental) error) (*fleet.Rental, error) {
	var out *fleet.Rental
	var fnErr error
	err := s.update(ctx, func(tx *etcdTx) error {
		out, fnErr = nil, nil
		r, err := tx.rental(id)
		if err != nil {
			return err
		}
		before := *r
		if err := fn(r); err != nil {
			fnErr = err
			return err
		}
		if err := checkRentalChange(&before, r); err != nil {
			return err
		}
		if before.Live() && !r.Live() {
			// Only if the entry is this rental's: never free a node
			// for someone else's rental.
			k := etcdLiveRentalKey(r.NodeID)
			live, err := tx.get(k)
			if err != nil {
				return err
			}
			if string(live) == r.ID {
				tx.del(k)
			}
		}
		v, err := json.Marshal((*rentalRecord)(r))
		if err != nil {
			return fmt.Errorf("encode rental %q: %w", r.ID, err)
		}
		tx.put(etcdRentalKey(r.ID), v)
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
// first; rentals started at the same instant come in ID order.
func (s *EtcdStore) RentalsByRenter(ctx context.Context, renterID string) ([]*fleet.Rental, error) {
	out, err := s.rentalsBy(ctx, etcdRenterIndex, renterID)
	return out, wrap(err, "rentals of renter %q", renterID)
}

// RentalsByOwner returns the rentals of the owner's nodes, live and ended,
// in the order of RentalsByRenter.
func (s *EtcdStore) RentalsByOwner(ctx context.Context, ownerID string) ([]*fleet.Rental, error) {
	out, err := s.rentalsBy(ctx, etcdOwnerRentalIndex, ownerID)
	return out, wrap(err, "rentals of owner %q", ownerID)
}

func (s *EtcdStore) rentalsBy(ctx context.Context, index, party string) ([]*fleet.Rental, error) {
	// An ID with a NUL byte could reach into another party's range; no
	// rental is stored under one (CreateRental refuses them).
	if strings.IndexByte(party, 0) >= 0 {
		return []*fleet.Rental{}, nil
	}
	var out []*fleet.Rental
	err := s.view(ctx, func(tx *etcdTx) error {
		out = []*fleet.Rental{}
		prefix := index + party + "\x00"
		var ids []string
		if err := tx.each(prefix, "", true, func(k string, _ []byte) (bool, error) {
			if len(k) <= len(prefix)+16 {
				return false, fmt.Errorf("malformed rental index key %q", k)
			}
			ids = append(ids, k[len(prefix)+16:])
			return true, nil
		}); err != nil {
			return err
		}
		rs, err := tx.rentals(ids)
		if err != nil {
			// Indexes and records are written in one transaction, so
			// a dangling entry is corruption.
			return fmt.Errorf("rental index: %w", err)
		}
		out = rs
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// LiveRentals returns every active or paused rental, ordered by node ID,
// reading the live index rather than every rental ever made.
func (s *EtcdStore) LiveRentals(ctx context.Context) ([]*fleet.Rental, error) {
	var out []*fleet.Rental
	err := s.view(ctx, func(tx *etcdTx) error {
		var nodes, ids []string
		if err := tx.each(etcdLiveRentals, "", false, func(k string, v []byte) (bool, error) {
			nodes = append(nodes, k[len(etcdLiveRentals):])
			ids = append(ids, string(v))
			return true, nil
		}); err != nil {
			return err
		}
		out = make([]*fleet.Rental, 0, len(ids))
		keys := make([]string, len(ids))
		for i, id := range ids {
			keys[i] = etcdRentalKey(id)
		}
		if _, err := tx.getMany(keys); err != nil {
			return err
		}
		for i, id := range ids {
			r, err := tx.liveRental(nodes[i], id)
			if err != nil {
				return err
			}
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		return nil, wrap(err, "live rentals")
	}
	return out, nil
}

// LiveRentalByNode returns the node's active or paused rental, or an
// ENOTFOUND error if it has none.
func (s *EtcdStore) LiveRentalByNode(ctx context.Context, nodeID string) (*fleet.Rental, error) {
	var r *fleet.Rental
	err := s.view(ctx, func(tx *etcdTx) error {
		id, err := tx.get(etcdLiveRentalKey(nodeID))
		if err != nil {
			return err
		}
		if id == nil {
			return errNoLiveRental()
		}
		r, err = tx.liveRental(nodeID, string(id))
		return err
	})
	if err != nil {
		return nil, wrap(err, "live rental of node %q", nodeID)
	}
	return r, nil
}

// Idempotency returns the record of userID's key, or an ENOTFOUND error if
// there is none or it is older than fleet.IdempotencyTTL.
func (s *EtcdStore) Idempotency(ctx context.Context, userID, key string) (*fleet.Idempotency, error) {
	if key == "" || strings.IndexByte(userID, 0) >= 0 {
		return nil, errIdempotencyNotFound()
	}
	var rec *idempotencyRecord
	err := s.view(ctx, func(tx *etcdTx) error {
		k := etcdIdempotencyKey(userID, key)
		v, err := tx.get(k)
		if err != nil {
			return err
		}
		if v == nil {
			return errIdempotencyNotFound()
		}
		rec, err = decodeIdempotency([]byte(k), v)
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
// They are found by a paged read, and deleted etcdPruneBatch at a time by
// transactions that read each again: a record replaced since (an expired
// key used anew) is kept.
func (s *EtcdStore) PruneIdempotency(ctx context.Context, cutoff time.Time) error {
	var old []string
	err := s.view(ctx, func(tx *etcdTx) error {
		old = nil
		return tx.each(etcdIdempotency, "", false, func(k string, v []byte) (bool, error) {
			rec, err := decodeIdempotency([]byte(k), v)
			if err != nil {
				return false, err
			}
			if rec.CreatedAt.Before(cutoff) {
				old = append(old, k)
			}
			return true, nil
		})
	})
	if err != nil {
		return wrap(err, "prune idempotency records")
	}
	for batch := range slices.Chunk(old, etcdPruneBatch) {
		err := s.update(ctx, func(tx *etcdTx) error {
			vs, err := tx.getMany(batch)
			if err != nil {
				return err
			}
			for i, k := range batch {
				if vs[i] == nil {
					continue
				}
				rec, err := decodeIdempotency([]byte(k), vs[i])
				if err != nil {
					return err
				}
				if rec.CreatedAt.Before(cutoff) {
					tx.del(k)
				}
			}
			return nil
		})
		if err != nil {
			return wrap(err, "prune idempotency records")
		}
	}
	return nil
}

// rental reads and decodes a rental; the result is a copy of its own.
func (tx *etcdTx) rental(id string) (*fleet.Rental, error) {
	v, err := tx.get(etcdRentalKey(id))
	if err != nil {
		return nil, err
	}
	if v == nil {
		return nil, errRentalNotFound()
	}
	return decodeRental(id, v)
}

// rentals reads the rentals with these IDs in a few round trips; a missing
// one is an error naming it.
func (tx *etcdTx) rentals(ids []string) ([]*fleet.Rental, error) {
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = etcdRentalKey(id)
	}
	vs, err := tx.getMany(keys)
	if err != nil {
		return nil, err
	}
	out := make([]*fleet.Rental, 0, len(ids))
	for i, v := range vs {
		if v == nil {
			return nil, fmt.Errorf("rental %q: %w", ids[i], errRentalNotFound())
		}
		r, err := decodeRental(ids[i], v)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// liveRental reads the rental the live index names for node, checking that
// the index is right about it.
func (tx *etcdTx) liveRental(node, id string) (*fleet.Rental, error) {
	r, err := tx.rental(id)
	if err != nil {
		return nil, fmt.Errorf("live index of node %q names rental %q: %w", node, id, err)
	}
	if r.NodeID != node || !r.Live() {
		return nil, fmt.Errorf("live index of node %q names rental %q of node %q with status %q", node, id, r.NodeID, r.Status)
	}
	return r, nil
}

func decodeRental(id string, v []byte) (*fleet.Rental, error) {
	var rec rentalRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("decode rental %q: %w", id, err)
	}
	return (*fleet.Rental)(&rec), nil
}

func etcdRentalKey(id string) string { return etcdRentals + id }

func etcdLiveRentalKey(nodeID string) string { return etcdLiveRentals + nodeID }

// etcdRentalIndexKey is a renter or owner index key: index, party ID, NUL,
// the bitwise NOT of StartedAt's Unix nanoseconds in 16 hex digits, rental
// ID; the inverted time sorts later starts first (see rentalIndexKey).
func etcdRentalIndexKey(index, party string, startedAt time.Time, rentalID string) string {
	return index + party + "\x00" + hex16(^uint64(startedAt.UnixNano())) + rentalID
}

// etcdIdempotencyKey is idempotency/, user ID, NUL, key (see
// idempotencyKey).
func etcdIdempotencyKey(userID, key string) string { return etcdIdempotency + userID + "\x00" + key }
