package persistence_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/distributedcompute/fleet"
	"github.com/distributedcompute/fleet/persistence"
)

// The tests below that open the file with bbolt directly name its buckets
// and keys as literals on purpose: they pin the on-disk format, which files
// written by released builds depend on.

func openStore(t testing.TB, path string) *persistence.Store {
	t.Helper()
	s, err := persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newBoltStore(t *testing.T) storeUnderTest {
	return openStore(t, filepath.Join(t.TempDir(), "fleet.db"))
}

func TestNodeStore(t *testing.T)    { testNodeStore(t, newBoltStore) }
func TestSessionStore(t *testing.T) { testSessionStore(t, newBoltStore) }

func TestOpenCreatesPrivateDirAndFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data", "nested")
	path := filepath.Join(dir, "fleet.db")
	openStore(t, path)
	for _, tc := range []struct {
		path string
		dir  bool
	}{{dir, true}, {path, false}} {
		fi, err := os.Stat(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.IsDir() != tc.dir {
			t.Errorf("%s: IsDir = %v", tc.path, fi.IsDir())
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			t.Errorf("%s: mode %v is readable by others", tc.path, perm)
		}
	}
}

// Closing and opening again (a restart) keeps every record, and a crash
// that left sessions open is repaired by CloseOpenSessions.
func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	n, key := mustCreate(t, s, "node_1", "user_1")
	if err := s.OpenSession(ctx, "node_1", t0); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(ctx, map[string]time.Time{"node_1": t0.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // the coordinator dies; the session stays open
		t.Fatal(err)
	}

	s = openStore(t, path)
	got, err := s.NodeByKeyHash(ctx, key.Hash)
	if err != nil {
		t.Fatal(err)
	}
	n.LastSeenAt = &[]time.Time{t0.Add(time.Minute)}[0]
	sameJSON(t, "node after reopen", got, n)
	if nodes, err := s.NodesByOwner(ctx, "user_1"); err != nil || len(nodes) != 1 {
		t.Errorf("NodesByOwner after reopen = %v, %v", ids(nodes), err)
	}
	if err := s.CloseOpenSessions(ctx, "coordinator restarted"); err != nil {
		t.Fatal(err)
	}
	sessions, err := s.Sessions(ctx, "node_1", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "sessions after restart", sessions, []fleet.Session{{
		NodeID: "node_1", ConnectedAt: t0,
		LastSeenAt: t0.Add(time.Minute), EndedAt: t0.Add(time.Minute), Reason: "coordinator restarted",
	}})
}

func readSchemaVersion(t *testing.T, path string) uint64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v uint64
	if err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("meta"))
		if b == nil {
			return errors.New("no meta bucket")
		}
		v = binary.BigEndian.Uint64(b.Get([]byte("schema_version")))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return v
}

// rawUpdate changes the file with bbolt directly, as an older or newer build
// (or another program) would have left it.
func rawUpdate(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func TestSchema(t *testing.T) {
	ctx := context.Background()

	t.Run("NewFileGetsCurrentVersion", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		s, err := persistence.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Close()
		if v := readSchemaVersion(t, path); v != persistence.SchemaVersion {
			t.Errorf("schema version %d, want %d", v, persistence.SchemaVersion)
		}
	})

	// An empty bbolt file is version 0; opening runs every migration.
	t.Run("EmptyFileIsMigrated", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		rawUpdate(t, path, func(*bolt.Tx) error { return nil })
		s := openStore(t, path)
		mustCreate(t, s, "node_1", "user_1")
		if err := s.OpenSession(ctx, "node_1", t0); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("NewerVersionRefused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		s, err := persistence.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Close()
		newer := uint64(persistence.SchemaVersion + 1)
		rawUpdate(t, path, func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, newer))
		})
		s, err = persistence.Open(path)
		if err == nil {
			_ = s.Close()
			t.Fatal("Open accepted a file of a newer schema version")
		}
		if msg := err.Error(); !strings.Contains(msg, "newer") || !strings.Contains(msg, fmt.Sprint(newer)) {
			t.Errorf("error %q does not say the file is newer", msg)
		}
		if v := readSchemaVersion(t, path); v != newer {
			t.Errorf("refused file was rewritten to version %d", v)
		}
	})

	t.Run("ForeignFileRefused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "other.db")
		rawUpdate(t, path, func(tx *bolt.Tx) error {
			_, err := tx.CreateBucket([]byte("something_else"))
			return err
		})
		if s, err := persistence.Open(path); err == nil {
			_ = s.Close()
			t.Fatal("Open accepted a bbolt file it did not write")
		} else if !strings.Contains(err.Error(), "not a fleet data file") {
			t.Errorf("error %q", err)
		}
	})

	t.Run("NotABoltFile", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "fleet.db")
		if err := os.WriteFile(path, bytes.Repeat([]byte("not a database "), 1000), 0o600); err != nil {
			t.Fatal(err)
		}
		if s, err := persistence.Open(path); err == nil {
			_ = s.Close()
			t.Fatal("Open accepted garbage")
		}
	})
}

// A second coordinator on the same data directory must fail with a reason
// instead of waiting forever for bbolt's file lock.
func TestOpenLockedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fleet.db")
	openStore(t, path)
	done := make(chan error, 1)
	go func() {
		s, err := persistence.Open(path) // the default lock timeout
		if err == nil {
			_ = s.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a second Open of a locked file succeeded")
		}
		if !strings.Contains(err.Error(), "data file is locked by another process") {
			t.Errorf("error %q does not say the file is locked", err)
		}
		if !errors.Is(err, berrors.ErrTimeout) {
			t.Errorf("error %q does not wrap the bbolt timeout error", err)
		}
	case <-time.After(30 * time.Second): // a guard against hanging, far above the timeout
		t.Fatal("Open of a locked file is still waiting")
	}
}

// Only hashes of host API keys reach the store; the file must not hold a
// key in clear, even after rotation.
func TestRawAPIKeyNeverStored(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "fleet.db")
	s, err := persistence.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	n, first := mustCreate(t, s, "node_1", "user_1")
	second := fleet.NewAPIKey()
	if _, err := s.SetAPIKey(ctx, n.ID, second.Hash, second.Prefix); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The hash is stored as raw bytes (the index key): finding it shows the
	// file is searchable as read.
	if !bytes.Contains(data, second.Hash) {
		t.Fatal("current key hash not found in the file: the search below proves nothing")
	}
	for _, key := range []fleet.APIKey{first, second} {
		secret := key.Raw[len(key.Prefix):] // what the shown prefix does not reveal
		if bytes.Contains(data, []byte(key.Raw)) || bytes.Contains(data, []byte(secret)) {
			t.Errorf("the file contains the raw API key %s...", key.Prefix)
		}
	}
}

// Sessions that ended a reliability window before the latest close are
// removed when the node's session closes, so the file stays bounded.
func TestClosePrunesOldSessions(t *testing.T) {
	testClosePrunesOldSessions(t, openStore(t, filepath.Join(t.TempDir(), "fleet.db")))
}

func testClosePrunesOldSessions(t *testing.T, s storeUnderTest) {
	ctx := context.Background()
	mustCreate(t, s, "node_1", "user_1")
	mustCreate(t, s, "node_2", "user_1")
	day := func(d int) time.Time { return t0.Add(time.Duration(d) * 24 * time.Hour) }
	for _, id := range []string{"node_1", "node_2"} {
		for _, span := range [][2]int{{0, 1}, {2, 5}} {
			if err := s.OpenSession(ctx, id, day(span[0])); err != nil {
				t.Fatal(err)
			}
			if err := s.CloseSession(ctx, id, day(span[1]), "heartbeat timeout"); err != nil {
				t.Fatal(err)
			}
		}
	}
	// 33 days after the first session ended: that one is out of reach,
	// the second (ended day 5) is not.
	if err := s.OpenSession(ctx, "node_1", day(33)); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseSession(ctx, "node_1", day(34), "heartbeat timeout"); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string][]time.Time{
		"node_1": {day(2), day(33)},
		"node_2": {day(0), day(2)}, // another node's close prunes nothing of it
	} {
		sessions, err := s.Sessions(ctx, id, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		var got []time.Time
		for _, sess := range sessions {
			got = append(got, sess.ConnectedAt)
		}
		sameJSON(t, "sessions of "+id, got, want)
	}
}

// Concurrent registrations share transactions and fsyncs through bbolt's
// Batch; compare with BenchmarkCreateNodeSerial to see the coalescing.
func BenchmarkCreateNodeParallel(b *testing.B) {
	benchmarkCreateNode(b, true)
}

// BenchmarkCreateNodeSerial pays one transaction and one fsync per node.
func BenchmarkCreateNodeSerial(b *testing.B) {
	benchmarkCreateNode(b, false)
}

func benchmarkCreateNode(b *testing.B, parallel bool) {
	ctx := context.Background()
	s := openStore(b, filepath.Join(b.TempDir(), "fleet.db"))
	var seq atomic.Int64
	create := func() {
		i := seq.Add(1)
		id := fmt.Sprintf("node_%09d", i)
		h := sha256.Sum256([]byte(id))
		n, _ := newNode(id, fmt.Sprintf("user_%d", i%100))
		if err := s.CreateNode(ctx, n, h[:]); err != nil {
			b.Error(err)
		}
	}
	b.ReportAllocs()
	if parallel {
		// Many more writers than CPUs, as in a reconnect storm.
		b.SetParallelism(64)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				create()
			}
		})
		return
	}
	for b.Loop() {
		create()
	}
}
