// Package persistence keeps the coordinator's records in one bbolt file:
// nodes, the indexes that find them by owner and by API key hash, the
// sessions of their agents, rentals with their indexes, and idempotency
// records. It is the only package that knows the file's buckets and key
// layout; everything else goes through fleet.NodeStore, fleet.SessionStore
// and fleet.RentalStore.
//
// The layout follows etcd's use of bbolt: one bucket per kind of record, keys
// built so that byte order is the order they are read in, and writes batched
// so that many concurrent writers share one fsync.
package persistence

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/distributedcompute/fleet"
)

// SchemaVersion is the layout version this build reads and writes. Open
// upgrades files of older versions and refuses newer ones, so that a
// downgraded binary cannot misread data it does not understand.
const SchemaVersion = 2

// DefaultLockTimeout is how long Open waits for the file lock. bbolt holds an
// exclusive lock for as long as a file is open, and without a timeout a second
// process would block forever instead of saying why it cannot start.
const DefaultLockTimeout = time.Second

// Buckets and keys. Keys within a bucket sort the way they are read:
// byte order of node IDs is ID order, an owner's index entries are contiguous,
// and a node's sessions are contiguous and ordered by connection time.
var (
	// metaBucket holds schemaVersionKey, an 8-byte big-endian version.
	metaBucket       = []byte("meta")
	schemaVersionKey = []byte("schema_version")

	// nodesBucket: node ID -> JSON nodeRecord.
	nodesBucket = []byte("nodes")
	// ownerIndexBucket: owner ID, 0x00, node ID -> empty.
	ownerIndexBucket = []byte("nodes_by_owner")
	// keyHashIndexBucket: 32-byte SHA-256 of the node's current API key -> node ID.
	keyHashIndexBucket = []byte("nodes_by_key_hash")
	// sessionsBucket: node ID, 0x00, 8-byte big-endian Unix nanoseconds of
	// ConnectedAt -> JSON fleet.Session.
	sessionsBucket = []byte("sessions")
	// openSessionsBucket: node ID -> key in sessionsBucket of the node's open
	// session, so that open sessions are found without a scan.
	openSessionsBucket = []byte("open_sessions")

	// Schema version 2.

	// rentalsBucket: rental ID -> JSON rentalRecord.
	rentalsBucket = []byte("rentals")
	// renterIndexBucket: renter ID, 0x00, 8-byte big-endian bitwise NOT of
	// StartedAt's Unix nanoseconds, rental ID -> empty. The inverted time
	// makes a forward scan of one renter's range list the newest first.
	renterIndexBucket = []byte("rentals_by_renter")
	// ownerRentalIndexBucket: the same as renterIndexBucket, by owner ID.
	ownerRentalIndexBucket = []byte("rentals_by_owner")
	// liveRentalsBucket: node ID -> ID of the node's active or paused
	// rental. At most one entry per node is what keeps a node from being
	// rented twice.
	liveRentalsBucket = []byte("live_rentals_by_node")
	// idempotencyBucket: user ID, 0x00, Idempotency-Key -> JSON
	// idempotencyRecord.
	idempotencyBucket = []byte("idempotency")
)

// migrations[v] upgrades a file from schema version v to v+1 inside the
// transaction that then records the new version. Version 0 is a new, empty
// file. A later layout appends a step here (creating its buckets, rewriting
// records) and raises SchemaVersion; files written by earlier builds are then
// upgraded step by step on Open, and never rewritten by steps they already
// went through.
var migrations = []func(tx *bolt.Tx) error{
	0: func(tx *bolt.Tx) error {
		return createBuckets(tx, nodesBucket, ownerIndexBucket, keyHashIndexBucket,
			sessionsBucket, openSessionsBucket)
	},
	1: func(tx *bolt.Tx) error {
		// Nothing of version 1 changes: rentals only add buckets.
		return createBuckets(tx, rentalsBucket, renterIndexBucket, ownerRentalIndexBucket,
			liveRentalsBucket, idempotencyBucket)
	},
}

// Store is a bbolt file holding nodes, sessions, rentals and idempotency
// records. It implements fleet.NodeStore, fleet.SessionStore and
// fleet.RentalStore and is safe for concurrent use.
// Every write is durable (fsynced) when it returns; concurrent writes are
// coalesced into shared transactions by bbolt's Batch.
type Store struct {
	db *bolt.DB
}

var (
	_ fleet.NodeStore    = (*Store)(nil)
	_ fleet.SessionStore = (*Store)(nil)
	_ fleet.RentalStore  = (*Store)(nil)
)

// Option configures Open.
type Option func(*options)

type options struct {
	lockTimeout time.Duration
}

// WithLockTimeout sets how long Open waits for another process to release
// the file before failing; the default is DefaultLockTimeout. Zero waits
// forever.
func WithLockTimeout(d time.Duration) Option {
	return func(o *options) { o.lockTimeout = d }
}

// Open opens the data file at path, creating it (mode 0600) and its parent
// directory (mode 0700) when missing, since it holds key hashes and owner
// IDs that other local users have no business reading. A new file gets the
// current schema; an older one is upgraded; a newer one is refused. If
// another process has the file open, Open fails after the lock timeout.
func Open(path string, opts ...Option) (*Store, error) {
	o := options{lockTimeout: DefaultLockTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("persistence: create data directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.lockTimeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("persistence: open %s: data file is locked by another process (is another coordinator running with the same data directory?): %w", path, err)
	} else if err != nil {
		return nil, fmt.Errorf("persistence: open %s: %w", path, err)
	}
	if err := migrate(db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("persistence: open %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close releases the file and its lock. It waits for transactions in flight.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("persistence: close: %w", err)
	}
	return nil
}

// migrate brings the file to SchemaVersion. A file already there is only
// read, so that opening it costs no write.
func migrate(db *bolt.DB) error {
	var v uint64
	if err := db.View(func(tx *bolt.Tx) (err error) {
		v, err = schemaVersion(tx)
		return err
	}); err != nil {
		return err
	}
	if v == SchemaVersion {
		return nil
	}
	if v > SchemaVersion {
		return fmt.Errorf("data file has schema version %d, newer than version %d that this build understands: run a newer coordinator", v, SchemaVersion)
	}
	return db.Update(func(tx *bolt.Tx) error {
		v, err := schemaVersion(tx)
		if err != nil {
			return err
		}
		for ; v < SchemaVersion; v++ {
			if err := migrations[v](tx); err != nil {
				return fmt.Errorf("upgrade schema from version %d to %d: %w", v, v+1, err)
			}
		}
		meta, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return fmt.Errorf("create meta bucket: %w", err)
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], SchemaVersion)
		if err := meta.Put(schemaVersionKey, b[:]); err != nil {
			return fmt.Errorf("write schema version: %w", err)
		}
		return nil
	})
}

// schemaVersion reads the file's version: 0 for an empty file. A file with
// buckets but no version was not written by this package, and is refused
// rather than mixed with our records.
func schemaVersion(tx *bolt.Tx) (uint64, error) {
	meta := tx.Bucket(metaBucket)
	if meta == nil {
		empty := true
		_ = tx.ForEach(func([]byte, *bolt.Bucket) error {
			empty = false
			return errors.New("stop")
		})
		if !empty {
			return 0, errors.New("data file has buckets but no schema version: not a fleet data file")
		}
		return 0, nil
	}
	b := meta.Get(schemaVersionKey)
	if len(b) != 8 {
		return 0, fmt.Errorf("data file has a malformed schema version (%d bytes)", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

func createBuckets(tx *bolt.Tx, names ...[]byte) error {
	for _, name := range names {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return fmt.Errorf("create bucket %s: %w", name, err)
		}
	}
	return nil
}

// update runs fn in a write transaction shared with concurrent callers.
// bbolt may run fn more than once (when a batch is retried after another
// caller's fn failed), so fn must reset anything it reports to its caller.
func (s *Store) update(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	// bbolt cannot cancel a transaction; a caller that has already given up
	// at least does not start one.
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.Batch(fn)
}

// view runs fn in a read transaction.
func (s *Store) view(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(fn)
}

// wrap adds context to internal errors. Domain errors pass unchanged so that
// their code and message reach the client as written.
func wrap(err error, format string, args ...any) error {
	var e *fleet.Error
	if err == nil || errors.As(err, &e) {
		return err
	}
	return fmt.Errorf("persistence: "+format+": %w", append(args, err)...)
}
