package persistence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/distributedcompute/fleet"
)

// CreateNode stores n with the hash of its first API key, as Store's does:
// an existing node with the same ID, or a key with the same hash, is an
// ECONFLICT error. The transaction compares both keys as missing, so of two
// coordinators registering the same ID or hash at once, one wins.
func (s *EtcdStore) CreateNode(ctx context.Context, n *fleet.Node, keyHash []byte) error {
	if err := checkID("node id", n.ID); err != nil {
		return wrap(err, "create node")
	}
	if err := checkID("owner id", n.OwnerID); err != nil {
		return wrap(err, "create node %q", n.ID)
	}
	if err := checkKeyHash(keyHash); err != nil {
		return wrap(err, "create node %q", n.ID)
	}
	rec := &nodeRecord{Node: *n, KeyHash: bytes.Clone(keyHash)}
	val, err := json.Marshal(rec)
	if err != nil {
		return wrap(err, "create node %q: encode", n.ID)
	}
	id := rec.Node.ID
	err = s.update(ctx, func(tx *etcdTx) error {
		vs, err := tx.getMany([]string{etcdNodeKey(id), etcdKeyHashKey(rec.KeyHash)})
		if err != nil {
			return err
		}
		if vs[0] != nil {
			return fleet.Errorf(fleet.ECONFLICT, "Node already exists.")
		}
		if vs[1] != nil {
			return fleet.Errorf(fleet.ECONFLICT, "API key already in use.")
		}
		tx.put(etcdNodeKey(id), val)
		tx.put(etcdOwnerKey(rec.Node.OwnerID, id), []byte{})
		tx.put(etcdKeyHashKey(rec.KeyHash), []byte(id))
		return nil
	})
	return wrap(err, "create node %q", n.ID)
}

// Node returns the node with this ID, or an ENOTFOUND error.
func (s *EtcdStore) Node(ctx context.Context, id string) (*fleet.Node, error) {
	var n *fleet.Node
	err := s.view(ctx, func(tx *etcdTx) error {
		rec, err := tx.node(id)
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

// Nodes returns every node, ordered by ID. It reads the nodes a page at a
// time, every page at the revision of the first.
func (s *EtcdStore) Nodes(ctx context.Context) ([]*fleet.Node, error) {
	var nodes []*fleet.Node
	err := s.view(ctx, func(tx *etcdTx) error {
		nodes = []*fleet.Node{}
		return tx.each(etcdNodes, "", false, func(k string, v []byte) (bool, error) {
			rec, err := decodeNode([]byte(k[len(etcdNodes):]), v)
			if err != nil {
				return false, err
			}
			nodes = append(nodes, &rec.Node)
			return true, nil
		})
	})
	if err != nil {
		return nil, wrap(err, "list nodes")
	}
	return nodes, nil
}

// NodesByOwner returns the nodes of one owner, ordered by ID. It reads only
// the owner's range of the owner index, then the nodes it names.
func (s *EtcdStore) NodesByOwner(ctx context.Context, ownerID string) ([]*fleet.Node, error) {
	var nodes []*fleet.Node
	err := s.view(ctx, func(tx *etcdTx) error {
		nodes = []*fleet.Node{}
		prefix := etcdOwnerKey(ownerID, "")
		var ids, keys []string
		if err := tx.each(prefix, "", true, func(k string, _ []byte) (bool, error) {
			ids = append(ids, k[len(prefix):])
			keys = append(keys, etcdNodeKey(k[len(prefix):]))
			return true, nil
		}); err != nil {
			return err
		}
		vs, err := tx.getMany(keys)
		if err != nil {
			return err
		}
		for i, v := range vs {
			if v == nil {
				// The index and the records are written in one
				// transaction, so a dangling entry is corruption.
				return fmt.Errorf("owner index names node %q: %w", ids[i], errNodeNotFound())
			}
			rec, err := decodeNode([]byte(ids[i]), v)
			if err != nil {
				return err
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
// result, unless another write changed the node meanwhile: then fn runs
// again on the newer node, so no update is lost. fn may therefore be called
// more than once, and must only change the node it is given. The rest is as
// Store.UpdateNode: an error from fn aborts the update and is returned
// unchanged, fn must not change the ID, a change of owner moves the node in
// the owner index, and the API key belongs to SetAPIKey.
func (s *EtcdStore) UpdateNode(ctx context.Context, id string, fn func(*fleet.Node) error) (*fleet.Node, error) {
	var out *fleet.Node
	var fnErr error
	err := s.update(ctx, func(tx *etcdTx) error {
		out, fnErr = nil, nil
		rec, err := tx.node(id)
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
			tx.del(etcdOwnerKey(oldOwner, id))
			tx.put(etcdOwnerKey(rec.Node.OwnerID, id), []byte{})
		}
		if err := tx.putNode(rec); err != nil {
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
// its sessions, or returns an ENOTFOUND error. A session opened concurrently
// read the node, so it either lands before the delete (and goes with it) or
// fails to find the node.
func (s *EtcdStore) DeleteNode(ctx context.Context, id string) error {
	err := s.update(ctx, func(tx *etcdTx) error {
		rec, err := tx.node(id)
		if err != nil {
			return err
		}
		tx.del(etcdNodeKey(id))
		tx.del(etcdOwnerKey(rec.Node.OwnerID, id))
		if err := tx.unindexKeyHash(rec); err != nil {
			return err
		}
		tx.delPrefix(etcdSessionPrefix(id))
		tx.del(etcdOpenSessionKey(id))
		return nil
	})
	return wrap(err, "delete node %q", id)
}

// SetAPIKey makes keyHash the node's only valid key hash and prefix its
// shown prefix, as Store's does; a nil keyHash revokes the key. The new
// hash's index entry is compared at commit, so two nodes never end up with
// one hash.
func (s *EtcdStore) SetAPIKey(ctx context.Context, id string, keyHash []byte, prefix string) (*fleet.Node, error) {
	if keyHash != nil {
		if err := checkKeyHash(keyHash); err != nil {
			return nil, wrap(err, "set api key of node %q", id)
		}
		keyHash = bytes.Clone(keyHash)
	} else {
		prefix = ""
	}
	var out *fleet.Node
	err := s.update(ctx, func(tx *etcdTx) error {
		out = nil
		rec, err := tx.node(id)
		if err != nil {
			return err
		}
		if keyHash != nil {
			owner, err := tx.get(etcdKeyHashKey(keyHash))
			if err != nil {
				return err
			}
			if owner != nil && string(owner) != id {
				return fleet.Errorf(fleet.ECONFLICT, "API key already in use.")
			}
		}
		if err := tx.unindexKeyHash(rec); err != nil {
			return err
		}
		if keyHash != nil {
			tx.put(etcdKeyHashKey(keyHash), []byte(id))
		}
		rec.KeyHash = keyHash
		rec.Node.APIKeyPrefix = prefix
		if err := tx.putNode(rec); err != nil {
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
func (s *EtcdStore) NodeByKeyHash(ctx context.Context, keyHash []byte) (*fleet.Node, error) {
	if len(keyHash) != sha256.Size {
		return nil, errNodeNotFound()
	}
	var n *fleet.Node
	err := s.view(ctx, func(tx *etcdTx) error {
		id, err := tx.get(etcdKeyHashKey(keyHash))
		if err != nil {
			return err
		}
		if id == nil {
			return errNodeNotFound()
		}
		rec, err := tx.node(string(id))
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

// node reads and decodes a node record; the result is a copy of its own.
func (tx *etcdTx) node(id string) (*nodeRecord, error) {
	v, err := tx.get(etcdNodeKey(id))
	if err != nil {
		return nil, err
	}
	if v == nil {
		return nil, errNodeNotFound()
	}
	return decodeNode([]byte(id), v)
}

func (tx *etcdTx) putNode(rec *nodeRecord) error {
	v, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode node %q: %w", rec.Node.ID, err)
	}
	tx.put(etcdNodeKey(rec.Node.ID), v)
	return nil
}

// unindexKeyHash removes the index entry of the record's current key, if it
// still names this node.
func (tx *etcdTx) unindexKeyHash(rec *nodeRecord) error {
	if rec.KeyHash == nil {
		return nil
	}
	k := etcdKeyHashKey(rec.KeyHash)
	owner, err := tx.get(k)
	if err != nil {
		return err
	}
	if string(owner) == rec.Node.ID {
		tx.del(k)
	}
	return nil
}

func etcdNodeKey(id string) string { return etcdNodes + id }

// etcdOwnerKey is owners/, owner ID, NUL, node ID: NUL sorts below every
// other byte, so one owner's entries are contiguous and never interleave
// with those of an owner whose ID extends this one (see ownerKey).
func etcdOwnerKey(ownerID, nodeID string) string { return etcdOwners + ownerID + "\x00" + nodeID }

func etcdKeyHashKey(h []byte) string { return etcdKeyHashes + hex.EncodeToString(h) }
