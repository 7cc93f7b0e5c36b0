package persistence

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/distributedcompute/fleet"
)

// EtcdSchemaVersion is the key layout under an etcd prefix that this build
// reads and writes. OpenEtcd refuses a prefix written with a newer one, as
// Open does a newer bbolt file.
const EtcdSchemaVersion = 1

// Defaults of EtcdConfig.
const (
	DefaultEtcdDialTimeout = 5 * time.Second
	DefaultEtcdPageSize    = 500
)

// etcd refuses a transaction with more than --max-txn-ops (128 by default)
// compares or operations. A write touches a handful of keys; these bound the
// ones that touch a number of keys chosen by the caller (see also the
// session batches in etcd_session.go).
const (
	// etcdReadBatch is how many keys one read-only transaction fetches.
	etcdReadBatch = 100
	// etcdPruneBatch is how many idempotency records one transaction of
	// PruneIdempotency deletes: a compare and a deletion each.
	etcdPruneBatch = 64
)

// Backoff between attempts of a transaction that lost a race: the first
// retry is immediate, later ones wait a random time below a bound that
// doubles, so that many writers of one record stop colliding.
const (
	etcdRetryBase = time.Millisecond
	etcdRetryMax  = 64 * time.Millisecond
)

// Key layout under EtcdConfig.Prefix. It mirrors the bbolt buckets, one key
// range per bucket, and keeps their byte order, so that a range read returns
// records in the order they are listed. Composite keys separate their parts
// with a NUL byte, as the bbolt keys do: IDs may hold '/', never NUL.
const (
	// etcdSchemaKey holds EtcdSchemaVersion in decimal.
	etcdSchemaKey = "meta/schema_version"
	// nodes/<node id> -> JSON nodeRecord.
	etcdNodes = "nodes/"
	// owners/<owner id>\x00<node id> -> empty.
	etcdOwners = "owners/"
	// keyhash/<hex SHA-256 of the current API key> -> node ID.
	etcdKeyHashes = "keyhash/"
	// sessions/<node id>\x00<16 hex digits of ConnectedAt's Unix
	// nanoseconds> -> JSON fleet.Session.
	etcdSessions = "sessions/"
	// open_sessions/<node id> -> the 16 hex digits of the key of the
	// node's open session.
	etcdOpenSessions = "open_sessions/"
	// rentals/<rental id> -> JSON rentalRecord.
	etcdRentals = "rentals/"
	// rentals_by_renter/<renter id>\x00<16 hex digits of the bitwise NOT
	// of StartedAt's Unix nanoseconds><rental id> -> empty: newest first.
	etcdRenterIndex = "rentals_by_renter/"
	// rentals_by_owner/: the same, by owner ID.
	etcdOwnerRentalIndex = "rentals_by_owner/"
	// live_rentals/<node id> -> ID of the node's active or paused rental.
	etcdLiveRentals = "live_rentals/"
	// idempotency/<user id>\x00<Idempotency-Key> -> JSON idempotencyRecord.
	etcdIdempotency = "idempotency/"
)

// EtcdConfig says where an EtcdStore keeps its records.
type EtcdConfig struct {
	// Endpoints are the client URLs of the etcd members, such as
	// "http://10.0.0.1:2379".
	Endpoints []string
	// Prefix is the key prefix of the cluster's records, such as
	// "/distributedcompute/<cluster name>/"; a missing trailing '/' is
	// added so that one cluster's prefix never extends another's. Every
	// coordinator of one cluster uses the same prefix.
	Prefix string
	// DialTimeout bounds how long OpenEtcd waits for etcd to answer;
	// DefaultEtcdDialTimeout when zero.
	DialTimeout time.Duration
	// PageSize is how many keys one range request returns when listing;
	// DefaultEtcdPageSize when zero. Listing 100,000 nodes takes many small
	// responses rather than one that holds them all.
	PageSize int
	// TLS, when not nil, secures the connections to etcd.
	TLS *tls.Config
	// Username and Password authenticate to an etcd with auth enabled.
	Username, Password string
}

// EtcdStore keeps nodes, sessions, rentals and idempotency records in etcd,
// where every coordinator of a cluster sees the same records. It implements
// fleet.NodeStore, fleet.SessionStore and fleet.RentalStore with the
// behaviour and errors of Store, and is safe for concurrent use, also by
// several processes at once.
//
// Each write that Store makes in one bbolt transaction is one etcd
// transaction that compares the revision of every key it read with the
// revision it saw: a write that raced another one changing the same keys
// fails the compare and starts again from a fresh read, so no update is lost
// and the indexes (key hashes, live rentals, idempotency keys) stay unique.
// A write is durable in etcd's raft log when it returns.
type EtcdStore struct {
	client   *clientv3.Client
	kv       clientv3.KV
	prefix   string
	pageSize int64
}

var (
	_ fleet.NodeStore    = (*EtcdStore)(nil)
	_ fleet.SessionStore = (*EtcdStore)(nil)
	_ fleet.RentalStore  = (*EtcdStore)(nil)
)

// OpenEtcd connects to etcd and checks the schema under cfg.Prefix: an empty
// prefix gets the current schema version, a newer one is refused, and keys
// without a version are refused as not ours. It fails within
// cfg.DialTimeout when etcd does not answer, since the client connects
// lazily and would otherwise only fail at the first write.
func OpenEtcd(ctx context.Context, cfg EtcdConfig) (*EtcdStore, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("persistence: open etcd store: no endpoints")
	}
	if cfg.Prefix == "" {
		return nil, errors.New("persistence: open etcd store: empty key prefix (use one per cluster, such as /distributedcompute/<cluster name>/)")
	}
	prefix := cfg.Prefix
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultEtcdDialTimeout
	}
	if cfg.PageSize <= 0 {
		cfg.PageSize = DefaultEtcdPageSize
	}
	where := strings.Join(cfg.Endpoints, ",")
	client, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         cfg.TLS,
		Username:    cfg.Username,
		Password:    cfg.Password,
		// Every error reaches the caller, which logs it in the
		// coordinator's format; the client's own log would repeat it.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("persistence: open etcd store at %s: %w", where, err)
	}
	s := &EtcdStore{client: client, kv: client.KV, prefix: prefix, pageSize: int64(cfg.PageSize)}
	checkCtx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if err := s.migrate(checkCtx); err != nil {
		_ = client.Close()
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return nil, fmt.Errorf("persistence: open etcd store at %s: no answer within %v (is etcd running and reachable?): %w", where, cfg.DialTimeout, err)
		}
		return nil, fmt.Errorf("persistence: open etcd store at %s, prefix %q: %w", where, prefix, err)
	}
	return s, nil
}

// Close closes the connections to etcd. Calls in flight fail.
func (s *EtcdStore) Close() error {
	if err := s.client.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("persistence: close etcd store: %w", err)
	}
	return nil
}

// migrate brings the prefix to EtcdSchemaVersion. There is one version so
// far: an empty prefix is stamped with it, in a transaction that only
// succeeds if no other coordinator stamped it first.
func (s *EtcdStore) migrate(ctx context.Context) error {
	key := s.prefix + etcdSchemaKey
	for {
		resp, err := s.kv.Get(ctx, key)
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 1 {
			v, err := strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64)
			if err != nil {
				return fmt.Errorf("malformed schema version %q", resp.Kvs[0].Value)
			}
			if v > EtcdSchemaVersion {
				return fmt.Errorf("schema version %d is newer than version %d that this build understands: run a newer coordinator", v, EtcdSchemaVersion)
			}
			return nil
		}
		existing, err := s.kv.Get(ctx, s.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if existing.Count > 0 {
			return fmt.Errorf("%d keys but no schema version under the prefix: not a fleet store", existing.Count)
		}
		txn, err := s.kv.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, strconv.Itoa(EtcdSchemaVersion))).
			Commit()
		if err != nil {
			return err
		}
		if txn.Succeeded {
			return nil
		}
		// Another coordinator stamped it meanwhile: read its version.
	}
}

// etcdTx is one attempt of a transaction: reads at one revision, writes
// buffered until commit, which succeeds only if no key read has changed.
type etcdTx struct {
	ctx context.Context
	s   *EtcdStore
	// rev is the revision every read sees, that of the first read.
	rev int64
	// seen is the ModRevision of each key read, 0 for a missing one, and
	// read its value (nil when missing): a key is fetched once.
	seen map[string]int64
	read map[string][]byte
	// writes holds the value of each key written, nil for a deletion; order
	// keeps the commit's operations in the order they were made.
	writes map[string][]byte
	order  []string
	// deletePrefixes are whole ranges deleted at commit.
	deletePrefixes []string
}

func (s *EtcdStore) newTx(ctx context.Context) *etcdTx {
	return &etcdTx{ctx: ctx, s: s, seen: map[string]int64{}, read: map[string][]byte{}, writes: map[string][]byte{}}
}

// errTxRetry makes update start a transaction again.
var errTxRetry = errors.New("persistence: etcd transaction must be retried")

// get returns the value of key (relative to the store's prefix) as of the
// transaction's revision, nil when missing; after a write of key in this
// transaction, the value written. Its revision is compared at commit.
func (tx *etcdTx) get(key string) ([]byte, error) {
	vs, err := tx.getMany([]string{key})
	if err != nil {
		return nil, err
	}
	return vs[0], nil
}

// getMany is get of many keys, fetching those not read yet in batches of
// read-only operations, one round trip each.
func (tx *etcdTx) getMany(keys []string) ([][]byte, error) {
	var missing []string
	for _, k := range keys {
		if _, ok := tx.writes[k]; ok {
			continue
		}
		if _, ok := tx.seen[k]; !ok {
			tx.seen[k] = -1 // asked for: fetched below
			missing = append(missing, k)
		}
	}
	for len(missing) > 0 {
		n := min(len(missing), etcdReadBatch)
		ops := make([]clientv3.Op, n)
		for i, k := range missing[:n] {
			ops[i] = clientv3.OpGet(tx.s.prefix+k, tx.revOpts()...)
		}
		resp, err := tx.s.kv.Txn(tx.ctx).Then(ops...).Commit()
		if err != nil {
			return nil, tx.readErr(err)
		}
		if tx.rev == 0 {
			tx.rev = resp.Header.Revision
		}
		for i, r := range resp.Responses {
			k := missing[i]
			tx.seen[k], tx.read[k] = 0, nil
			if kvs := r.GetResponseRange().Kvs; len(kvs) == 1 {
				v := kvs[0].Value
				if v == nil {
					v = []byte{} // present but empty, unlike missing
				}
				tx.seen[k], tx.read[k] = kvs[0].ModRevision, v
			}
		}
		missing = missing[n:]
	}
	out := make([][]byte, len(keys))
	for i, k := range keys {
		if v, ok := tx.writes[k]; ok {
			out[i] = v
		} else {
			out[i] = tx.read[k]
		}
	}
	return out, nil
}

// each calls fn on the keys (relative) and values in [from, to), or under
// from when to is "", in key order, as of the transaction's revision. The
// keys are not compared at commit: each is for reads that a concurrent
// write cannot make wrong, or for transactions that write nothing. Writes
// of this transaction are not seen.
func (tx *etcdTx) each(from, to string, keysOnly bool, fn func(k string, v []byte) (bool, error)) error {
	return tx.readErr(tx.s.rangeKeys(tx.ctx, from, to, &tx.rev, keysOnly, fn))
}

// put writes v, which must not be nil, to key at commit.
func (tx *etcdTx) put(key string, v []byte) {
	if _, ok := tx.writes[key]; !ok {
		tx.order = append(tx.order, key)
	}
	tx.writes[key] = v
}

// del deletes key at commit.
func (tx *etcdTx) del(key string) {
	if _, ok := tx.writes[key]; !ok {
		tx.order = append(tx.order, key)
	}
	tx.writes[key] = nil
}

// delPrefix deletes every key under prefix at commit. The transaction must
// not also write a key under it: etcd refuses overlapping operations.
func (tx *etcdTx) delPrefix(prefix string) {
	tx.deletePrefixes = append(tx.deletePrefixes, prefix)
}

func (tx *etcdTx) revOpts() []clientv3.OpOption {
	if tx.rev == 0 {
		return nil
	}
	return []clientv3.OpOption{clientv3.WithRev(tx.rev)}
}

// readErr turns a compacted snapshot into a retry at a new revision.
func (tx *etcdTx) readErr(err error) error {
	if errors.Is(err, rpctypes.ErrCompacted) {
		return errTxRetry
	}
	return err
}

// commit applies the writes if no key read has changed since; false means
// another writer got there first. A transaction that writes nothing read
// one consistent revision, and has nothing to commit.
func (tx *etcdTx) commit() (bool, error) {
	if len(tx.order) == 0 && len(tx.deletePrefixes) == 0 {
		return true, nil
	}
	cmps := make([]clientv3.Cmp, 0, len(tx.seen))
	for k, rev := range tx.seen {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(tx.s.prefix+k), "=", rev))
	}
	ops := make([]clientv3.Op, 0, len(tx.order)+len(tx.deletePrefixes))
	for _, k := range tx.order {
		if v := tx.writes[k]; v != nil {
			ops = append(ops, clientv3.OpPut(tx.s.prefix+k, string(v)))
		} else {
			ops = append(ops, clientv3.OpDelete(tx.s.prefix+k))
		}
	}
	for _, p := range tx.deletePrefixes {
		ops = append(ops, clientv3.OpDelete(tx.s.prefix+p, clientv3.WithPrefix()))
	}
	resp, err := tx.s.kv.Txn(tx.ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return false, err
	}
	return resp.Succeeded, nil
}

// update runs fn in a transaction until it commits: fn runs again, on fresh
// reads, whenever a concurrent write changed what it read, so fn must reset
// anything it reports to its caller. An error from fn aborts the
// transaction and is returned as it is.
func (s *EtcdStore) update(ctx context.Context, fn func(tx *etcdTx) error) error {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		tx := s.newTx(ctx)
		err := fn(tx)
		if err == nil {
			var ok bool
			if ok, err = tx.commit(); err == nil && ok {
				return nil
			} else if err == nil {
				err = errTxRetry
			}
		}
		if !errors.Is(err, errTxRetry) {
			return err
		}
		if err := retryWait(ctx, attempt); err != nil {
			return err
		}
	}
}

// view runs fn on reads at one revision; it writes nothing.
func (s *EtcdStore) view(ctx context.Context, fn func(tx *etcdTx) error) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		tx := s.newTx(ctx)
		if err := fn(tx); !errors.Is(err, errTxRetry) {
			return err
		}
	}
}

func retryWait(ctx context.Context, attempt int) error {
	if attempt == 0 {
		return nil
	}
	bound := min(etcdRetryBase<<min(attempt, 16), etcdRetryMax)
	t := time.NewTimer(rand.N(bound))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// rangeKeys calls fn on each key in [prefix, end) (relative keys; end ""
// means every key starting with prefix), in key order, a page at a time so
// that no response holds the whole range. Every page is read at *rev, which
// is set from the first response when 0, so that the pages add up to one
// snapshot. fn returns false to stop.
func (s *EtcdStore) rangeKeys(ctx context.Context, prefix, end string, rev *int64, keysOnly bool, fn func(k string, v []byte) (bool, error)) error {
	from := s.prefix + prefix
	to := clientv3.GetPrefixRangeEnd(from)
	if end != "" {
		to = s.prefix + end
	}
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(to), clientv3.WithLimit(s.pageSize)}
		if *rev != 0 {
			opts = append(opts, clientv3.WithRev(*rev))
		}
		if keysOnly {
			opts = append(opts, clientv3.WithKeysOnly())
		}
		resp, err := s.kv.Get(ctx, from, opts...)
		if err != nil {
			return err
		}
		if *rev == 0 {
			*rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			more, err := fn(string(kv.Key[len(s.prefix):]), kv.Value)
			if err != nil || !more {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		// The next page starts just after the last key of this one.
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}
