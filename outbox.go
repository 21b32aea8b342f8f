package main

// The outbox: the calls the bridge owes the vendors. Only a lane's first
// pending item can be taken, and only by one instance at a time (it holds it
// until claimed_until), so each lane leaves in order even with several
// instances on one PostgreSQL database.
//
// PostgreSQL claims and records many items in one round trip, with joins on
// a JSON list, RETURNING and MATERIALIZED. On SQLite, where the writer alone
// writes, the heads and their claims are in its memory (heads.go): a claim
// reads the items it takes, and an outcome is one plain statement an item
// (the joins cost SQLite a temporary table and a statement journal at every
// call, twice the CPU a delivery: BenchmarkDelivery).

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// OutboxItem is one pending delivery.
type OutboxItem struct {
	ID        int64
	Lane      string
	Delivery  Delivery
	Attempts  int
	NextAt    time.Time
	CreatedAt time.Time
	// Unreadable is set, as a permanent error, if the stored delivery could
	// not be decoded: the item can only become a dead letter.
	Unreadable error
	raw        string // the stored delivery, until decoded
	// The claim that took the item: its owner and claimed_until. An
	// outcome is written only while the item is held by that same claim,
	// so a claimant whose lease ran out, and whose item another claim took
	// since, changes nothing (see fenced).
	claimedBy    string
	claimedUntil int64
}

// errNotHeld is the outcome of an attempt at an item that the claim which
// took it no longer holds (a newer claim took it, or it was finished):
// nothing was written for it.
var errNotHeld = errors.New("outcome not recorded: the item is no longer held by the claim that took it")

// fenced is the condition under which an outcome is written on PostgreSQL
// (on SQLite, holds): the item is still pending and held by the claim that
// took it. Its arguments are the claim's owner and claimed_until.
const fenced = `state = 'pending' AND claimed_by = ? AND claimed_until = ?`

// Claim takes up to limit lane heads that are due at now and held by no
// instance, and holds them for owner until now+lease.
func (s *Store) Claim(ctx context.Context, owner string, now time.Time, lease time.Duration, limit int) ([]OutboxItem, error) {
	ms, until := now.UnixMilli(), now.Add(lease).UnixMilli()
	// The limit is written into PostgreSQL's statement, which is
	// prepared once for each limit.
	var items []OutboxItem
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if !s.postgres {
			// The heads and their claims are in the writer's memory
			// (heads.go): a claim reads the items it takes, and writes
			// nothing.
			items = nil // the writer may run a write again, alone
			for _, id := range s.takeDue(ms, owner, until, limit) {
				it, err := scanItem(s.queryRow(ctx, tx, `SELECT id, lane, delivery, attempts, next_at, created_at
					FROM outbox WHERE id = ?`, id))
				if err != nil {
					return fmt.Errorf("read head %d: %w", id, err)
				}
				items = append(items, it)
			}
			return nil
		}
		// The due heads are chosen first (MATERIALIZED: PostgreSQL must
		// not fold them into a join, which plans badly on a table that
		// grew since its statistics were taken). The conditions stand on
		// the UPDATE too: an instance that waited for another's claim to
		// commit re-checks them on the row as the other left it, and
		// skips it.
		rows, err := s.query(ctx, tx, `
		WITH due AS MATERIALIZED (SELECT id FROM outbox
			WHERE state = 'pending' AND head = 1 AND next_at <= ? AND claimed_until <= ?
			ORDER BY next_at, id LIMIT `+strconv.Itoa(max(limit, 0))+`)
		UPDATE outbox SET claimed_by = ?, claimed_until = ? FROM due
		WHERE outbox.id = due.id AND state = 'pending' AND head = 1 AND next_at <= ? AND claimed_until <= ?
		RETURNING outbox.id, lane, delivery, attempts, next_at, created_at`, ms, ms, owner, until, ms, ms)
		if err != nil {
			return err
		}
		items, err = scanItems(rows)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("claim: %w", err)
	}
	// Decoded here rather than in the write, which others wait on.
	for i := range items {
		it := &items[i]
		it.claimedBy, it.claimedUntil = owner, until
		if err := json.Unmarshal([]byte(it.raw), &it.Delivery); err != nil {
			it.Delivery = Delivery{}
			it.Unreadable = permanentError{fmt.Errorf("decode delivery %d: %w", it.ID, err)}
		}
		it.raw = ""
	}
	return items, nil
}

// Delivered marks items done, all in one write, and makes the next pending
// item of each of their lanes its head. An item another claim has taken
// since is left to it: then Delivered returns errNotHeld, having recorded
// the others.
func (s *Store) Delivered(ctx context.Context, items []OutboxItem, now time.Time) error {
	var finished int
	var err error
	if s.postgres {
		finished, err = s.deliveredPG(ctx, items, now)
	} else {
		finished, err = s.deliveredSQLite(ctx, items, now)
	}
	if err != nil {
		return fmt.Errorf("outbox set done: %w", err)
	}
	if finished < len(items) {
		return fmt.Errorf("%w: %d of %d items delivered", errNotHeld, len(items)-finished, len(items))
	}
	return nil
}

// deliveredSQLite is Delivered on SQLite: a statement an item, and the
// heads in memory. It returns how many items it marked done.
func (s *Store) deliveredSQLite(ctx context.Context, items []OutboxItem, now time.Time) (int, error) {
	finished := 0
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		finished = 0 // the writer may run a write again, alone
		for _, it := range slices.SortedFunc(slices.Values(items), func(a, b OutboxItem) int { return cmp.Compare(a.ID, b.ID) }) {
			held, err := s.setState(ctx, tx, it, "done", "", it.NextAt.UnixMilli(), now)
			if err != nil {
				return err
			}
			if held {
				finished++
			}
		}
		return nil
	})
	return finished, err
}

// deliveredPG is Delivered on PostgreSQL, in three round trips however
// many the items. It returns how many items it marked done.
func (s *Store) deliveredPG(ctx context.Context, items []OutboxItem, now time.Time) (int, error) {
	claims := make([][3]any, len(items)) // id, owner, claimed_until
	var lanes []string
	for i, it := range items {
		claims[i] = [3]any{it.ID, it.claimedBy, it.claimedUntil}
		lanes = append(lanes, it.Lane)
	}
	slices.Sort(lanes) // locked in one order, so that two writes cannot deadlock
	lanes = slices.Compact(lanes)
	claimList, err := json.Marshal(claims)
	if err != nil {
		return 0, err
	}
	laneList, err := json.Marshal(lanes)
	if err != nil {
		return 0, err
	}
	finished := 0
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		// lockLane for every lane, in one round trip
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext(value))
			FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY ORDER BY ordinality`, string(laneList)); err != nil {
			return err
		}
		rows, err := s.query(ctx, tx, `UPDATE outbox SET state = 'done', attempts = attempts + 1, last_error = '', claimed_until = 0,
			updated_at = ? FROM (SELECT `+s.jsonElem(0, "BIGINT")+` AS id, `+s.jsonElem(1, "TEXT")+` AS claimed_by,
				`+s.jsonElem(2, "BIGINT")+` AS claimed_until FROM `+s.jsonList()+`) claim
			WHERE outbox.id = claim.id AND outbox.state = 'pending' AND outbox.claimed_by = claim.claimed_by
				AND outbox.claimed_until = claim.claimed_until
			RETURNING outbox.id`, now.UnixMilli(), string(claimList))
		if err != nil {
			return err
		}
		done, err := scanIDs(rows)
		if err != nil {
			return err
		}
		finished = len(done)
		return s.promoteHeads(ctx, tx, string(laneList))
	})
	return finished, err
}

// promoteHeads makes the first pending item of each lane in laneList, a
// JSON array, its head (PostgreSQL).
func (s *Store) promoteHeads(ctx context.Context, tx *sql.Tx, laneList string) error {
	// MATERIALIZED keeps PostgreSQL from folding the heads into a join that
	// reads the whole outbox.
	_, err := s.exec(ctx, tx, `WITH heads AS MATERIALIZED (SELECT
		(SELECT MIN(o.id) FROM outbox o WHERE o.lane = l.value AND o.state = 'pending') AS id FROM `+s.jsonList()+` l)
		UPDATE outbox SET head = 1 FROM heads WHERE outbox.id = heads.id`, laneList)
	return err
}

// jsonList is a table of the values of a JSON array passed as one
// argument, in a column named value: many ids or lanes in one statement.
func (s *Store) jsonList() string {
	if s.postgres {
		return "jsonb_array_elements_text(?::jsonb)"
	}
	return "json_each(?)"
}

// jsonElem is element i of jsonList's value when that is itself an array,
// as the type given.
func (s *Store) jsonElem(i int, typ string) string {
	if s.postgres {
		return fmt.Sprintf("CAST(value::jsonb->>%d AS %s)", i, typ)
	}
	return fmt.Sprintf("CAST(value->>%d AS %s)", i, typ)
}

// Release lets go of the pending items owner holds, so another instance (or
// the next start) takes them at once.
func (s *Store) Release(ctx context.Context, owner string) error {
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if !s.postgres {
			s.releaseHeads(owner)
			return nil
		}
		_, err := s.exec(ctx, tx, `UPDATE outbox SET claimed_until = 0 WHERE claimed_by = ? AND state = 'pending'`, owner)
		return err
	})
	if err != nil {
		return fmt.Errorf("release: %w", err)
	}
	return nil
}

// NextDue returns when the earliest lane head can next be claimed (due, and
// not held), and false if nothing is pending.
func (s *Store) NextDue(ctx context.Context) (time.Time, bool, error) {
	if !s.postgres {
		// As the writer last committed (heads.go).
		if first := s.firstReady.Load(); first != math.MaxInt64 {
			return time.UnixMilli(first), true, nil
		}
		return time.Time{}, false, nil
	}
	var next sql.NullInt64
	if err := s.rdb.QueryRowContext(ctx, `SELECT MIN(CASE WHEN claimed_until > next_at THEN claimed_until ELSE next_at END)
		FROM outbox WHERE state = 'pending' AND head = 1`).Scan(&next); err != nil {
		return time.Time{}, false, fmt.Errorf("next due: %w", err)
	}
	return time.UnixMilli(next.Int64), next.Valid, nil
}

// finish ends an item, done or failed, and makes the next pending item of
// its lane the head. It reports false, and changes nothing, if another
// claim has taken the item since it.
func (s *Store) finish(ctx context.Context, tx *sql.Tx, it OutboxItem, state, reason string, now time.Time) (bool, error) {
	if err := s.lockLane(ctx, tx, it.Lane); err != nil {
		return false, err
	}
	if ok, err := s.setState(ctx, tx, it, state, reason, now.UnixMilli(), now); !ok || err != nil || !s.postgres {
		return ok, err // on SQLite setState moved the head
	}
	laneList, err := json.Marshal([]string{it.Lane})
	if err != nil {
		return false, err
	}
	return true, s.promoteHeads(ctx, tx, string(laneList))
}

// RetryLater records a failed attempt and makes the item due again at next.
// If another claim has taken the item since, it returns errNotHeld.
func (s *Store) RetryLater(ctx context.Context, it OutboxItem, reason string, next, now time.Time) error {
	return s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		held, err := s.setState(ctx, tx, it, "pending", reason, next.UnixMilli(), now)
		if err == nil && !held {
			err = errNotHeld
		}
		return err
	})
}

// GiveUp makes an item a dead letter, keeping the reason, and queues
// notice (if not nil) in the same transaction, so whoever must be told is.
// If another claim has taken the item since, it returns errNotHeld, and no
// one is told.
func (s *Store) GiveUp(ctx context.Context, it OutboxItem, reason string, notice *Delivery, now time.Time) error {
	return s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		switch ended, err := s.finish(ctx, tx, it, "failed", reason, now); {
		case err != nil:
			return err
		case !ended:
			return errNotHeld
		case notice == nil:
			return nil
		}
		return s.enqueue(ctx, tx, *notice, now)
	})
}

// setState writes an attempt's outcome if the claim that took it still
// holds the item, and reports whether it did. On SQLite it also lets the
// head go (pending: due at next) or finishes it (done or failed), in the
// writer's memory.
func (s *Store) setState(ctx context.Context, tx *sql.Tx, it OutboxItem, state, reason string, next int64, now time.Time) (bool, error) {
	if !s.postgres {
		if !s.holds(it) {
			return false, nil
		}
		if _, err := s.exec(ctx, tx, `UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?,
			updated_at = ? WHERE id = ?`, state, reason, next, now.UnixMilli(), it.ID); err != nil {
			return false, fmt.Errorf("outbox set %s: %w", state, err)
		}
		if state == "pending" {
			s.setHead(it.ID, headState{lane: it.Lane, at: next})
			return true, nil
		}
		return true, s.finishHead(ctx, tx, it)
	}
	res, err := s.exec(ctx, tx, `UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?,
		claimed_until = 0, updated_at = ? WHERE id = ? AND `+fenced, state, reason, next, now.UnixMilli(), it.ID, it.claimedBy, it.claimedUntil)
	if err != nil {
		return false, fmt.Errorf("outbox set %s: %w", state, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("outbox set %s: %w", state, err)
	}
	return n == 1, nil
}

// OutboxStats are the outbox's figures for /metrics.
type OutboxStats struct {
	Pending     int
	Failed      int
	OldestSince time.Time // when the oldest pending item was accepted; zero if none
}

// Stats returns the outbox's figures. The dead letters are counted through
// their index. On SQLite the pending items are counted in the writer's
// lanes, and the oldest is the smallest id among them: the outbox holds the
// day's delivered items too, which a count by state would read at every
// scrape.
func (s *Store) Stats(ctx context.Context) (OutboxStats, error) {
	var st OutboxStats
	var oldest sql.NullInt64
	var err error
	if s.postgres {
		err = s.rdb.QueryRowContext(ctx, `SELECT
			(SELECT COUNT(*) FROM outbox WHERE state = 'pending'),
			(SELECT COUNT(*) FROM outbox WHERE state = 'failed'),
			(SELECT MIN(created_at) FROM outbox WHERE state = 'pending')`).Scan(&st.Pending, &st.Failed, &oldest)
	} else {
		var id int64
		st.Pending, id = s.pendingSnapshot()
		err = s.rdb.QueryRowContext(ctx, `SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'failed'),
			(SELECT created_at FROM outbox WHERE id = ?)`, id).Scan(&st.Failed, &oldest)
	}
	if err != nil {
		return OutboxStats{}, fmt.Errorf("outbox stats: %w", err)
	}
	if oldest.Valid && st.Pending > 0 {
		st.OldestSince = time.UnixMilli(oldest.Int64)
	}
	return st, nil
}

// scanIDs reads a column of ids.
func scanIDs(rows *sql.Rows) ([]int64, error) {
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// scanItem reads an item's id, lane, delivery, attempts, next_at and
// created_at.
func scanItem(row interface{ Scan(...any) error }) (OutboxItem, error) {
	var it OutboxItem
	var next, created int64
	if err := row.Scan(&it.ID, &it.Lane, &it.raw, &it.Attempts, &next, &created); err != nil {
		return OutboxItem{}, err
	}
	it.NextAt, it.CreatedAt = time.UnixMilli(next), time.UnixMilli(created)
	return it, nil
}

func scanItems(rows *sql.Rows) ([]OutboxItem, error) {
	defer rows.Close()
	var items []OutboxItem
	for rows.Next() {
		it, err := scanItem(rows)
		if err != nil {
			return nil, err
		}
		items = append(items, it)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	// RETURNING gives no order; deliver the oldest first.
	slices.SortFunc(items, func(a, b OutboxItem) int { return cmp.Compare(a.ID, b.ID) })
	return items, nil
}
