package main

// The recent pushes in memory. Each push the bridge accepts is recorded
// with its key, its signed query and the reply it was given, so that
// WeChat's retry of it commits nothing new and its signed query carries no
// other push. PostgreSQL, shared by several instances, records them in
// seen_keys. On SQLite, which one instance owns, the push's own outbox row
// carries them (push_key, push_sig, push_reply), and the writer finds them
// again through a map of their digests to that row: a row written anyway,
// in place of a second statement and its four b-trees a push
// (docs/SPEED.md).
//
// The map remembers each push for at least the push window, and at most
// twice that: WeChat retries a push within 15 seconds, and a signed query
// stops being fresh (WECHAT_PUSH_MAX_SKEW) well within the window. It holds
// at most maxRecent digests. A push that does not fit (the map is full, or
// its digest is taken by another push's) is recorded in seen_keys, as on
// PostgreSQL, and for a window after it seen_keys is asked too.

import (
	"context"
	"database/sql"
	"errors"
	"time"
)

// maxRecent bounds the digests the writer keeps, two a push: 320,000 take
// about 9 MB, and up to twice that with the garbage collector's headroom.
const maxRecent = 320_000

// defaultPushWindow is the push window for WECHAT_PUSH_MAX_SKEW's default
// of 5 minutes (pushWindow).
const defaultPushWindow = 11 * time.Minute

// pushWindow returns how long a push must be remembered when its signed
// timestamp may be skew from the bridge's clock: a signed query from skew
// ahead stays fresh for twice skew, and a minute covers WeChat's retries.
func pushWindow(skew time.Duration) time.Duration {
	return 2*skew + time.Minute
}

// recentPushes is what SQLite's writer remembers of the pushes of the
// push window. The writer alone reads and changes it.
type recentPushes struct {
	window time.Duration
	limit  int                 // maxRecent, but in tests
	digest func(string) uint64 // fnv64a, but in tests
	// The digest of each push's key and signed query, to the id of the
	// outbox row that carries them: cur since since, prev the window
	// before.
	cur, prev map[uint64]int64
	since     time.Time
	added     []uint64  // digests the transaction running added
	dbUntil   time.Time // until then, seen_keys may hold a push of the window
}

// fnv64a returns the digest by which the writer finds a key or a signed
// query: 64-bit FNV-1a, as hash/fnv computes it, without its allocations.
// It is the same from run to run, so two pushes that found their digests
// free keep them after a restart.
func fnv64a(s string) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= prime
	}
	return h
}

// loadRecent reads the pushes of the push window back at open: the newest
// that half the memory holds, from the outbox rows that carry them, and
// when the last of the others was recorded in seen_keys. Those that do not
// fit are copied to seen_keys first.
func (s *Store) loadRecent(ctx context.Context, window time.Duration, limit int, now time.Time) error {
	r := &recentPushes{window: window, limit: limit, digest: fnv64a,
		cur: map[uint64]int64{}, prev: map[uint64]int64{}, since: now}
	s.recent = r
	from := now.Add(-window).UnixMilli()
	rows, err := s.db.QueryContext(ctx, `SELECT id, push_key, push_sig FROM outbox
		WHERE push_key != '' AND created_at >= ? ORDER BY id DESC`, from)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		var key, sig string
		if err := rows.Scan(&id, &key, &sig); err != nil {
			return err
		}
		if len(r.prev)+2 > r.limit/2 {
			// The rest go to seen_keys. They are the oldest, so the
			// memory keeps the pushes a retry is likeliest to repeat.
			rows.Close()
			if _, err := s.db.ExecContext(ctx, `INSERT INTO seen_keys (key, sig, value, received_at)
				SELECT push_key, NULLIF(push_sig, ''), push_reply, created_at FROM outbox
				WHERE push_key != '' AND created_at >= ? AND id <= ? ON CONFLICT DO NOTHING`, from, id); err != nil {
				return err
			}
			break
		}
		// Two rows of the window never share a digest: the second would
		// have been recorded in seen_keys. Loaded as the window before,
		// they are forgotten a window from now at the earliest.
		r.prev[r.digest(key)] = id
		if sig != "" {
			r.prev[r.digest(sig)] = id
		}
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var last sql.NullInt64
	if err := s.db.QueryRowContext(ctx, `SELECT MAX(received_at) FROM seen_keys WHERE sig IS NOT NULL`).Scan(&last); err != nil {
		return err
	}
	if last.Valid {
		r.dbUntil = time.UnixMilli(last.Int64).Add(window)
	}
	return nil
}

// errNoRecord is returned by recall for a digest that names no other push.
var errNoRecord = errors.New("no push of this digest")

// inSeenKeys, in the memory's place of an outbox row's id, says that the
// push of the digest is recorded in seen_keys: no outbox row carries it
// (an event, a message that waits for an agent).
const inSeenKeys = -1

// recall returns the record of the push whose key or signed query has
// digest d, if the memory holds one: the row of in's key, or else of its
// signed query, if the push is in seen_keys.
func (s *Store) recall(ctx context.Context, tx *sql.Tx, d uint64, in Inbound) (pushRecord, error) {
	id, ok := s.recent.cur[d]
	if !ok {
		if id, ok = s.recent.prev[d]; !ok {
			return pushRecord{}, errNoRecord
		}
	}
	var rec pushRecord
	var err error
	if id == inSeenKeys {
		err = s.queryRow(ctx, tx, `SELECT key, COALESCE(sig, ''), value FROM seen_keys WHERE key = ? OR sig = ?
			ORDER BY key = ? DESC LIMIT 1`, in.Key, in.SigKey, in.Key).Scan(&rec.key, &rec.sig, &rec.reply)
		if errors.Is(err, sql.ErrNoRows) {
			return pushRecord{}, nil // the digest is another push's
		}
		return rec, err
	}
	err = s.queryRow(ctx, tx, `SELECT push_key, push_sig, push_reply FROM outbox WHERE id = ?`, id).Scan(&rec.key, &rec.sig, &rec.reply)
	if errors.Is(err, sql.ErrNoRows) {
		return pushRecord{}, errNoRecord
	}
	return rec, err
}

// claimPush records in's key and signed query as claimKey does, or finds
// them: if the push was accepted before it returns the reply it was given
// and dup true; if its signed query carried another push it returns
// errReplay. On SQLite, while the push fits in memory, it writes nothing
// and returns a record for the push's outbox row to carry (enqueue).
func (s *Store) claimPush(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (rec *pushRecord, prev string, dup bool, err error) {
	if s.postgres {
		prev, dup, err = s.claimKey(ctx, tx, in.Key, in.SigKey, now)
		return nil, prev, dup, err
	}
	r := s.recent
	if now.Sub(r.since) > r.window {
		r.prev, r.cur = r.cur, r.prev
		clear(r.cur)
		r.since = now
	}
	rec = &pushRecord{key: in.Key, sig: in.SigKey}
	for _, v := range [2]string{in.Key, in.SigKey} {
		if v != "" {
			rec.digests[rec.ndigests] = r.digest(v)
			rec.ndigests++
		}
	}
	fits := len(r.cur)+len(r.prev)+rec.ndigests <= r.limit
	for _, d := range rec.digests[:rec.ndigests] {
		switch got, err := s.recall(ctx, tx, d, in); {
		case errors.Is(err, errNoRecord):
		case err != nil:
			return nil, "", false, err
		case got.key == in.Key:
			return nil, got.reply, true, nil
		case in.SigKey != "" && got.sig == in.SigKey:
			return nil, "", false, errReplay
		default:
			fits = false // the digest is another push's
		}
	}
	if !fits || !now.After(r.dbUntil) {
		if prev, dup, err = s.claimKey(ctx, tx, in.Key, in.SigKey, now); err == nil && !dup && !fits {
			r.dbUntil = now.Add(r.window)
		}
		return nil, prev, dup, err
	}
	return rec, "", false, nil
}

// remember records that outbox row id carries rec, or that seen_keys
// does (id inSeenKeys).
func (s *Store) remember(rec *pushRecord, id int64) {
	r := s.recent
	for _, d := range rec.digests[:rec.ndigests] {
		r.cur[d] = id
		r.added = append(r.added, d)
	}
}

// settleRecent forgets the pushes the transaction remembered unless it
// committed. The writer calls it after each transaction.
func (s *Store) settleRecent(committed bool) {
	r := s.recent
	if !committed {
		for _, d := range r.added {
			delete(r.cur, d)
			delete(r.prev, d)
		}
	}
	r.added = r.added[:0]
}
