package main

// Taking the outbox's items and recording their outcomes. Only a lane's
// first pending item, its head, can be taken, and only by one claim at a
// time (it holds the item until claimed_until), so each lane leaves in order
// even with several instances on one PostgreSQL database. An outcome is
// written only while the claim that took the item still holds it (fenced).
// A claim records, before the attempt, that one may be made (tried_at): an
// attempt whose outcome is not known, even one cut short by a kill, is known
// to the next (worker.go).

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
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
	// triedAt is when an earlier attempt whose outcome is not known was
	// first made (Unix ms), 0 if none: the vendor may have acted on it.
	// triedNow is the same after this claim: this attempt's claim time if
	// there was none, since its outcome is not known until recorded.
	triedAt, triedNow int64
	// owesHistory is set if, when claimed, the item owed the history row
	// of the customer's message it carries (history.go).
	owesHistory bool
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
const fenced = `state = ` + sqlPending + ` AND claimed_by = ? AND claimed_until = ?`

// Claim takes up to limit lane heads that are due at now and held by no
// claim, and holds them for owner until now+lease, oldest first.
func (s *Store) Claim(ctx context.Context, owner string, now time.Time, lease time.Duration, limit int) ([]OutboxItem, error) {
	ms, until := now.UnixMilli(), now.Add(lease).UnixMilli()
	var items []OutboxItem
	var err error
	if s.postgres {
		items, err = s.claimPG(ctx, owner, ms, until, limit)
	} else {
		// The heads and their claims are in the writer's memory
		// (heads.go): a claim reads the items it takes, and writes
		// nothing but their tried_at.
		items, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) ([]OutboxItem, error) {
			var items []OutboxItem
			for _, id := range s.takeDue(ms, owner, until, limit) {
				it, err := scanItem(s.queryRow(ctx, tx, `SELECT id, lane, delivery, attempts, next_at, created_at, tried_at,
					history_owed FROM outbox WHERE id = ?`, id))
				if err != nil {
					return nil, fmt.Errorf("read head %d: %w", id, err)
				}
				if it.triedAt == 0 {
					// Recorded before the attempt: if this instance dies
					// during it, the next attempt knows.
					if _, err := s.exec(ctx, tx, `UPDATE outbox SET tried_at = ? WHERE id = ?`, ms, id); err != nil {
						return nil, err
					}
				}
				items = append(items, it)
			}
			return items, nil
		})
	}
	if err != nil {
		return nil, fmt.Errorf("claim: %w", err)
	}
	// Decoded here rather than in the write, which others wait on.
	for i := range items {
		it := &items[i]
		it.claimedBy, it.claimedUntil = owner, until
		it.triedNow = cmp.Or(it.triedAt, ms)
		if err := json.Unmarshal([]byte(it.raw), &it.Delivery); err != nil {
			it.Delivery = Delivery{}
			it.Unreadable = permanentError{fmt.Errorf("decode delivery %d: %w", it.ID, err)}
		}
		if it.Delivery.MsgSeq == 0 {
			it.Delivery.MsgSeq = uint32(it.ID)
		}
		it.raw = ""
	}
	return items, nil
}

// Delivered marks items done, on SQLite all in one write, and makes the
// next pending item of each of their lanes its head. An item another claim
// has taken since is left to it: then Delivered returns errNotHeld, having
// recorded the others.
func (s *Store) Delivered(ctx context.Context, items []OutboxItem, now time.Time) error {
	if s.postgres {
		finished := 0
		// One item a transaction, which then holds one customer's lanes
		// at most (the lock order, db.go).
		for _, it := range items {
			held, err := s.deliveredPG(ctx, it, now) // pgworker.go
			if err != nil {
				return fmt.Errorf("outbox set done: %w", err)
			}
			finished += boolInt(held)
		}
		return notHeld(finished, len(items))
	}
	finished, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (int, error) {
		n := 0
		for _, it := range items {
			ended, err := s.finish(ctx, tx, it, itemDone, "", now)
			if err != nil {
				return 0, err
			}
			n += boolInt(ended)
		}
		return n, nil
	})
	if err != nil {
		return fmt.Errorf("outbox set done: %w", err)
	}
	return notHeld(finished, len(items))
}

// notHeld is Delivered's outcome when it recorded finished of n items.
func notHeld(finished, n int) error {
	if finished < n {
		return fmt.Errorf("%w: %d of %d items delivered", errNotHeld, n-finished, n)
	}
	return nil
}

// RetryLater records a failed attempt and makes the item due again at next;
// uncertain says the vendor may have acted on it (no answer). If another
// claim has taken the item since, it returns errNotHeld.
func (s *Store) RetryLater(ctx context.Context, it OutboxItem, reason string, uncertain bool, next, now time.Time) error {
	tried := it.triedAt // the vendor refused this attempt: it did not act on it
	if uncertain {
		tried = it.triedNow
	}
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		held, err := s.setState(ctx, tx, it, itemPending, reason, next.UnixMilli(), tried, now)
		if err == nil && !held {
			err = errNotHeld
		}
		return err
	})
}

// Rewrite replaces the delivery of an item its claim still holds, so that
// the attempts after this one make the call this one makes (a message
// whose media could not be had goes as its text every time). It returns
// errNotHeld if another claim has taken the item since.
func (s *Store) Rewrite(ctx context.Context, it OutboxItem, d Delivery) error {
	b, err := json.Marshal(d)
	if err != nil {
		return fmt.Errorf("outbox rewrite: %w", err)
	}
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if err := s.settleItem(ctx, tx, it); err != nil { // the history keeps what the customer sent
			return err
		}
		if !s.postgres {
			if !s.holds(it) {
				return errNotHeld
			}
			_, err := s.exec(ctx, tx, `UPDATE outbox SET delivery = ? WHERE id = ?`, string(b), it.ID)
			return err
		}
		res, err := s.exec(ctx, tx, `UPDATE outbox SET delivery = ? WHERE id = ? AND `+fenced, string(b), it.ID, it.claimedBy, it.claimedUntil)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return cmp.Or(err, errNotHeld)
		}
		return nil
	})
}

// GiveUp makes an item a dead letter, keeping the reason, and queues
// notice (if not nil) in the same transaction, so whoever must be told is.
// If another claim has taken the item since, it returns errNotHeld, and no
// one is told.
func (s *Store) GiveUp(ctx context.Context, it OutboxItem, reason string, notice *Delivery, now time.Time) error {
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		// The customer first, then the lanes: the order of every
		// transaction that locks both (db.go).
		if err := s.lockCustomer(ctx, tx, it.Delivery.OpenID); err != nil && !errors.Is(err, errUnknownCustomer) {
			return err
		}
		switch ended, err := s.finish(ctx, tx, it, itemFailed, reason, now); {
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

// finish ends an item, done or failed, and makes the next pending item of
// its lane the head. It reports false, and changes nothing but the history
// rows owed, if another claim has taken the item since.
func (s *Store) finish(ctx context.Context, tx *sql.Tx, it OutboxItem, state ItemState, reason string, now time.Time) (bool, error) {
	if err := s.settleItem(ctx, tx, it); err != nil {
		return false, err
	}
	if err := s.lockLane(ctx, tx, it.Lane); err != nil {
		return false, err
	}
	if ok, err := s.setState(ctx, tx, it, state, reason, now.UnixMilli(), it.triedNow, now); !ok || err != nil || !s.postgres {
		return ok, err // on SQLite setState moved the head
	}
	// The lane's next pending item, if any, heads it now.
	_, err := s.exec(ctx, tx, `UPDATE outbox SET head = 1
		WHERE id = (SELECT MIN(id) FROM outbox WHERE lane = ? AND state = `+sqlPending+`) AND head = 0`, it.Lane)
	return err == nil, err
}

// settleItem writes the history row it owes, if it owed one when claimed,
// and those before it, under the customer's row; those after it stay owed
// (history.go). An item's row is written before the item ends or its
// delivery is rewritten.
func (s *Store) settleItem(ctx context.Context, tx *sql.Tx, it OutboxItem) error {
	if !it.owesHistory {
		return nil
	}
	openid := strings.TrimPrefix(it.Lane, "im:")
	if err := s.lockCustomer(ctx, tx, openid); err != nil {
		return err
	}
	return s.settleHistory(ctx, tx, openid, it.ID)
}

// setState writes an attempt's outcome if the claim that took the item
// still holds it, and reports whether it did.
func (s *Store) setState(ctx context.Context, tx *sql.Tx, it OutboxItem, state ItemState, reason string, next, tried int64, now time.Time) (bool, error) {
	if !s.postgres {
		// In the writer's memory (heads.go): the head is let go (pending:
		// due at next), or finished and its lane's next item heads it.
		if !s.holds(it) {
			return false, nil
		}
		if _, err := s.exec(ctx, tx, `UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?,
			tried_at = ?, updated_at = ? WHERE id = ?`, state, reason, next, tried, now.UnixMilli(), it.ID); err != nil {
			return false, fmt.Errorf("outbox set %s: %w", state, err)
		}
		if state == itemPending {
			s.setHead(it.ID, headState{at: next})
			return true, nil
		}
		next, ok := s.laneFinish(it.Lane, it.ID) // lanes.go
		return true, s.finishHead(ctx, tx, it, next, ok)
	}
	res, err := s.exec(ctx, tx, `UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?,
		tried_at = ?, claimed_until = 0, updated_at = ? WHERE id = ? AND `+fenced, state, reason, next, tried, now.UnixMilli(), it.ID, it.claimedBy, it.claimedUntil)
	if err != nil {
		return false, fmt.Errorf("outbox set %s: %w", state, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("outbox set %s: %w", state, err)
	}
	return n == 1, nil
}

// Release lets go of the pending items owner holds, so another instance (or
// the next start) takes them at once.
func (s *Store) Release(ctx context.Context, owner string) error {
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if !s.postgres {
			s.releaseHeads(owner)
			return nil
		}
		_, err := s.exec(ctx, tx, `UPDATE outbox SET claimed_until = 0 WHERE claimed_by = ? AND state = `+sqlPending+``, owner)
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
		FROM outbox WHERE state = `+sqlPending+` AND head = 1`).Scan(&next); err != nil {
		return time.Time{}, false, fmt.Errorf("next due: %w", err)
	}
	return time.UnixMilli(next.Int64), next.Valid, nil
}

// scanItem reads an item's id, lane, delivery, attempts, next_at,
// created_at, tried_at and history_owed.
func scanItem(row interface{ Scan(...any) error }) (OutboxItem, error) {
	var it OutboxItem
	var next, created, owes int64
	if err := row.Scan(&it.ID, &it.Lane, &it.raw, &it.Attempts, &next, &created, &it.triedAt, &owes); err != nil {
		return OutboxItem{}, err
	}
	it.NextAt, it.CreatedAt, it.owesHistory = time.UnixMilli(next), time.UnixMilli(created), owes == 1
	return it, nil
}
