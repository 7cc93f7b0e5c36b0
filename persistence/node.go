package persistence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/distributedcompute/fleet"
)

// nodeRecord is the stored form of a node. The current key hash lives beside
// the node, not in it, so that rotation, revocation and deletion can find and
// remove the old index entry while fleet.Node never carries the hash to
// callers. The node is a named field rather than embedded so that a JSON
// method added to fleet.Node later cannot swallow the hash.
type nodeRecord struct {
	Node    fleet.Node `json:"node"`
	KeyHash []byte     `json:"key_hash,omitempty"`
}

func errNodeNotFound() error { return fleet.Errorf(fleet.ENOTFOUND, "Node not found.") }

// CreateNode stores n with the hash of its first API key. An existing node
// with the same ID, or an existing key with the same hash, is an ECONFLICT
// error.
func (s *Store) CreateNode(ctx context.Context, n *fleet.Node, keyHash []byte) error {
	if err := checkID("node id", n.ID); err != nil {
		return wrap(err, "create node")
	}
	if err := checkID("owner id", n.OwnerID); err != nil {
		return wrap(err, "create node %q", n.ID)
	}
	if err := checkKeyHash(keyHash); err != nil {
		return wrap(err, "create node %q", n.ID)
	}
	// Copies, so that a caller changing its values during the batch cannot
	// change what is written.
	rec := &nodeRecord{Node: *n, KeyHash: bytes.Clone(keyHash)}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		id := []byte(rec.Node.ID)
		if tx.Bucket(nodesBucket).Get(id) != nil {
			return fleet.Errorf(fleet.ECONFLICT, "Node already exists.")
		}
		if tx.Bucket(keyHashIndexBucket).Get(rec.KeyHash) != nil {
			return fleet.Errorf(fleet.ECONFLICT, "API key already in use.")
		}
		if err := putNode(tx, rec); err != nil {
			return err
		}
		if err := tx.Bucket(ownerIndexBucket).Put(ownerKey(rec.Node.OwnerID, rec.Node.ID), nil); err != nil {
			return fmt.Errorf("index owner: %w", err)
		}
		if err := tx.Bucket(keyHashIndexBucket).Put(rec.KeyHash, id); err != nil {
			return fmt.Errorf("index key hash: %w", err)
		}
		return nil
	})
	return wrap(err, "create node %q", n.ID)
}

// Node returns the node with this ID, or an ENOTFOUND error.
func (s *Store) Node(ctx context.Context, id string) (*fleet.Node, error) {
	var n *fleet.Node
	err := s.view(ctx, func(tx *bolt.Tx) error {
		rec, err := getNode(tx, id)
		if err != nil {
			return err
		}
		n = &rec.Node
		return nil
	})
	if err != nil {
		return nil, wrap(err, "get node %q", id)
	}
	return n, nil
}

// Nodes returns every node, ordered by ID (the key order of the nodes bucket).
func (s *Store) Nodes(ctx context.Context) ([]*fleet.Node, error) {
	nodes := []*fleet.Node{}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(nodesBucket).ForEach(func(k, v []byte) error {
			rec, err := decodeNode(k, v)
			if err != nil {
				return err
			}
			nodes = append(nodes, &rec.Node)
			return nil
		})
	})
	if err != nil {
		return nil, wrap(err, "list nodes")
	}
	return nodes, nil
}

// NodesByOwner returns the nodes of one owner, ordered by ID. It reads only
// the owner's contiguous range of the owner index.
func (s *Store) NodesByOwner(ctx context.Context, ownerID string) ([]*fleet.Node, error) {
	nodes := []*fleet.Node{}
	err := s.view(ctx, func(tx *bolt.Tx) error {
		prefix := ownerKey(ownerID, "")
		c := tx.Bucket(ownerIndexBucket).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			id := string(k[len(prefix):])
			rec, err := getNode(tx, id)
			if err != nil {
				// The index and the records are written in one
				// transaction, so a dangling entry is corruption.
				return fmt.Errorf("owner index names node %q: %w", id, err)
			}
			nodes = append(nodes, &rec.Node)
		}
		return nil
	})
	if err != nil {
		return nil, wrap(err, "nodes of owner %q", ownerID)
	}
	return nodes, nil
}

// UpdateNode applies fn to a fresh copy of the stored node and stores the
// result, atomically with respect to every other write.
//
// fn may be called more than once: bbolt retries a batched transaction when
// another write in the same batch fails. Each call gets a new copy decoded
// from the file, so fn must only change the node it is given and must not
// depend on side effects of an earlier call. An error from fn aborts the
// update and is returned unchanged. fn must not change the ID; a change of
// owner moves the node in the owner index. The API key and its prefix belong
// to SetAPIKey.
func (s *Store) UpdateNode(ctx context.Context, id string, fn func(*fleet.Node) error) (*fleet.Node, error) {
	var out *fleet.Node
	var fnErr error
	err := s.update(ctx, func(tx *bolt.Tx) error {
		out, fnErr = nil, nil
		rec, err := getNode(tx, id)
		if err != nil {
			return err
		}
		oldOwner := rec.Node.OwnerID
		if err := fn(&rec.Node); err != nil {
			fnErr = err
			return err
		}
		if rec.Node.ID != id {
			return fmt.Errorf("update must not change the node id (to %q)", rec.Node.ID)
		}
		if rec.Node.OwnerID != oldOwner {
			if err := checkID("owner id", rec.Node.OwnerID); err != nil {
				return err
			}
			idx := tx.Bucket(ownerIndexBucket)
			if err := idx.Delete(ownerKey(oldOwner, id)); err != nil {
				return fmt.Errorf("unindex owner: %w", err)
			}
			if err := idx.Put(ownerKey(rec.Node.OwnerID, id), nil); err != nil {
				return fmt.Errorf("index owner: %w", err)
			}
		}
		if err := putNode(tx, rec); err != nil {
			return err
		}
		out = &rec.Node
		return nil
	})
	if err != nil {
		if fnErr != nil && errors.Is(err, fnErr) {
			return nil, err
		}
		return nil, wrap(err, "update node %q", id)
	}
	return out, nil
}

// DeleteNode removes the node, its owner and key hash index entries, and all
// its sessions, or returns an ENOTFOUND error.
func (s *Store) DeleteNode(ctx context.Context, id string) error {
	err := s.update(ctx, func(tx *bolt.Tx) error {
		rec, err := getNode(tx, id)
		if err != nil {
			return err
		}
		if err := tx.Bucket(nodesBucket).Delete([]byte(id)); err != nil {
			return fmt.Errorf("delete record: %w", err)
		}
		if err := tx.Bucket(ownerIndexBucket).Delete(ownerKey(rec.Node.OwnerID, id)); err != nil {
			return fmt.Errorf("unindex owner: %w", err)
		}
		if err := unindexKeyHash(tx, rec); err != nil {
			return err
		}
		return deleteSessions(tx, id)
	})
	return wrap(err, "delete node %q", id)
}

// SetAPIKey makes keyHash the node's only valid key hash and prefix its
// shown prefix; the previous hash stops resolving in the same transaction.
// A nil keyHash revokes the key without replacement and clears the prefix.
// UpdatedAt is left alone: it tracks the owner's edits of the listing.
func (s *Store) SetAPIKey(ctx context.Context, id string, keyHash []byte, prefix string) (*fleet.Node, error) {
	if keyHash != nil {
		if err := checkKeyHash(keyHash); err != nil {
			return nil, wrap(err, "set api key of node %q", id)
		}
		keyHash = bytes.Clone(keyHash)
	} else {
		prefix = ""
	}
	var out *fleet.Node
	err := s.update(ctx, func(tx *bolt.Tx) error {
		out = nil
		rec, err := getNode(tx, id)
		if err != nil {
			return err
		}
		idx := tx.Bucket(keyHashIndexBucket)
		if keyHash != nil {
			if owner := idx.Get(keyHash); owner != nil && string(owner) != id {
				return fleet.Errorf(fleet.ECONFLICT, "API key already in use.")
			}
		}
		if err := unindexKeyHash(tx, rec); err != nil {
			return err
		}
		if keyHash != nil {
			if err := idx.Put(keyHash, []byte(id)); err != nil {
				return fmt.Errorf("index key hash: %w", err)
			}
		}
		rec.KeyHash = keyHash
		rec.Node.APIKeyPrefix = prefix
		if err := putNode(tx, rec); err != nil {
			return err
		}
		out = &rec.Node
		return nil
	})
	if err != nil {
		return nil, wrap(err, "set api key of node %q", id)
	}
	return out, nil
}

// NodeByKeyHash returns the node whose current key has this hash, or an
// ENOTFOUND error for an unknown, rotated or revoked key.
func (s *Store) NodeByKeyHash(ctx context.Context, keyHash []byte) (*fleet.Node, error) {
	if len(keyHash) != sha256.Size {
		return nil, errNodeNotFound()
	}
	var n *fleet.Node
	err := s.view(ctx, func(tx *bolt.Tx) error {
		id := tx.Bucket(keyHashIndexBucket).Get(keyHash)
		if id == nil {
			return errNodeNotFound()
		}
		rec, err := getNode(tx, string(id))
		if err != nil {
			return fmt.Errorf("key hash index names node %q: %w", id, err)
		}
		n = &rec.Node
		return nil
	})
	if err != nil {
		return nil, wrap(err, "node by key hash")
	}
	return n, nil
}

// getNode reads and decodes a node record; the result shares no memory with
// the file, so it stays valid after the transaction.
func getNode(tx *bolt.Tx, id string) (*nodeRecord, error) {
	v := tx.Bucket(nodesBucket).Get([]byte(id))
	if v == nil {
		return nil, errNodeNotFound()
	}
	return decodeNode([]byte(id), v)
}

func decodeNode(k, v []byte) (*nodeRecord, error) {
	var rec nodeRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("decode node %q: %w", k, err)
	}
	return &rec, nil
}

func putNode(tx *bolt.Tx, rec *nodeRecord) error {
	v, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode node %q: %w", rec.Node.ID, err)
	}
	if err := tx.Bucket(nodesBucket).Put([]byte(rec.Node.ID), v); err != nil {
		return fmt.Errorf("put node %q: %w", rec.Node.ID, err)
	}
	return nil
}

// unindexKeyHash removes the index entry of the record's current key, if it
// still names this node.
func unindexKeyHash(tx *bolt.Tx, rec *nodeRecord) error {
	if rec.KeyHash == nil {
		return nil
	}
	idx := tx.Bucket(keyHashIndexBucket)
	if string(idx.Get(rec.KeyHash)) != rec.Node.ID {
		return nil
	}
	if err := idx.Delete(rec.KeyHash); err != nil {
		return fmt.Errorf("unindex key hash: %w", err)
	}
	return nil
}

// ownerKey is the owner index key: owner ID, a 0x00 separator, node ID. The
// separator sorts below every other byte, so one owner's entries are
// contiguous and never interleave with those of an owner whose ID extends
// this one ("user_1" and "user_12").
func ownerKey(ownerID, nodeID string) []byte {
	k := make([]byte, 0, len(ownerID)+1+len(nodeID))
	k = append(k, ownerID...)
	k = append(k, 0)
	return append(k, nodeID...)
}

// checkID refuses IDs that would break the key layout: bbolt refuses empty
// keys, and a NUL byte would be read as the separator of composite keys.
func checkID(what, id string) error {
	if id == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if strings.IndexByte(id, 0) >= 0 {
		return fmt.Errorf("%s %q contains a NUL byte", what, id)
	}
	return nil
}

// checkKeyHash refuses anything but a SHA-256, which also keeps a raw key
// passed by mistake out of the file.
func checkKeyHash(h []byte) error {
	if len(h) != sha256.Size {
		return fmt.Errorf("key hash is %d bytes, want a %d-byte SHA-256", len(h), sha256.Size)
	}
	return nil
}
