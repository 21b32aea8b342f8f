package main

// The worker's writes on PostgreSQL, each transaction's statements sent as
// pipelines, as the pushes' batch sends its own (pgbatch.go): a claim in
// two round trips, a delivered item's outcome in two or three. COMMIT goes
// alone, once the statements before it have answered, so that a caller
// who gives up while a statement waits for a lock leaves nothing written.
// A statement a round trip, eleven round trips an item, the worker cannot
// keep IM's 200 a second during a burst (docs/SPEED.md).

import (
	"cmp"
	"context"
	"database/sql"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// claimPG is Claim on PostgreSQL. The due heads are chosen and locked
// first, skipping those another transaction holds: a row another instance
// changed since the statement began is checked again as that instance left
// it (FOR UPDATE). The UPDATE finds them by primary key as an index
// condition (= ANY): joined on the key alone, a plan cached while the
// outbox was young (statistics taken when it held a few due heads) would
// hash them and scan the whole outbox, every claim, as it grows. tried_at is
// recorded before the attempt, and returned as it was. A claim whose
// instance is dead (heartbeat.go) is free too. The limit is written into
// the statement, which pgx prepares once for each limit.
func (s *Store) claimPG(ctx context.Context, owner string, ms, until int64, limit int) ([]OutboxItem, error) {
	query := s.q(`
		WITH due AS MATERIALIZED (SELECT id, tried_at FROM outbox
			WHERE state = ` + sqlPending + ` AND head = 1 AND next_at <= ?
			AND (claimed_until <= ? OR claimed_by IN (` + deadOwners + `))
			ORDER BY next_at, id LIMIT ` + strconv.Itoa(max(limit, 0)) + ` FOR UPDATE SKIP LOCKED)
		UPDATE outbox SET claimed_by = ?, claimed_until = ?,
			tried_at = CASE WHEN outbox.tried_at = 0 THEN ? ELSE outbox.tried_at END FROM due
		WHERE outbox.id = due.id AND outbox.id = ANY (ARRAY(SELECT id FROM due))
		RETURNING outbox.id, lane, delivery, attempts, next_at, created_at, due.tried_at, history_owed`)
	var items []OutboxItem
	err := retried(func() error {
		items = nil
		return onPgConn(ctx, s.db, func(c *pgx.Conn) error {
			var q pgx.Batch
			q.Queue(`BEGIN`)
			q.Queue(query, ms, ms, owner, owner, until, ms)
			if err := sendBatch(ctx, c, &q, skip, rowsOf(func(r pgx.Rows) error {
				it, err := scanItem(r)
				items = append(items, it)
				return err
			})); err != nil {
				return err
			}
			_, err := c.Exec(ctx, `COMMIT`)
			return err
		})
	})
	// RETURNING gives no order; deliver the oldest first.
	slices.SortFunc(items, func(a, b OutboxItem) int { return cmp.Compare(a.ID, b.ID) })
	return items, err
}

// finishDone records an item done if the claim that took it still holds it
// (fenced) and makes its lane's next pending item the head, in one
// statement, which returns 1 if it did and 0 otherwise. Its arguments:
// now, the item's tried_at, its id, the claim's owner and claimed_until,
// and its lane. The statement sees the lane as it was before its own
// change, the item pending still: the next is the first pending but it.
const finishDone = `WITH done AS (UPDATE outbox SET state = ` + sqlDone + `, attempts = attempts + 1, last_error = '',
		next_at = $1, tried_at = $2, claimed_until = 0, updated_at = $1
		WHERE id = $3 AND state = ` + sqlPending + ` AND claimed_by = $4 AND claimed_until = $5 RETURNING id),
	next AS (UPDATE outbox SET head = 1
		WHERE id = (SELECT MIN(id) FROM outbox WHERE lane = $6 AND state = ` + sqlPending + ` AND id <> $3)
		AND head = 0 AND EXISTS (SELECT 1 FROM done) RETURNING id)
	SELECT COUNT(*) FROM done`

// deliveredPG records it done, as finish does, in a transaction of its
// own, and reports whether the claim that took it still held it.
func (s *Store) deliveredPG(ctx context.Context, it OutboxItem, now time.Time) (bool, error) {
	var held bool
	err := retried(func() error {
		return onPgConn(ctx, s.db, func(c *pgx.Conn) error {
			var err error
			held, err = s.finishOn(ctx, c, it, now)
			return err
		})
	})
	return held, err
}

// finishOn is deliveredPG's transaction on c.
func (s *Store) finishOn(ctx context.Context, c *pgx.Conn, it OutboxItem, now time.Time) (bool, error) {
	var q pgx.Batch
	q.Queue(`BEGIN`)
	var owed []OutboxItem
	openid := strings.TrimPrefix(it.Lane, "im:")
	if it.owesHistory { // settleItem's reads
		known := false
		q.Queue(`SELECT 1 FROM customers WHERE openid = $1 FOR UPDATE`, openid)
		q.Queue(s.q(pgOwed), it.Lane, it.ID, openid)
		err := sendBatch(ctx, c, &q, skip, rowsOf(func(pgx.Rows) error {
			known = true
			return nil
		}), rowsOf(func(r pgx.Rows) error {
			o, err := scanOwed(r)
			owed = append(owed, o)
			return err
		}))
		if err != nil {
			return false, err
		}
		if !known {
			return false, errUnknownCustomer
		}
		q = pgx.Batch{}
	}
	for _, o := range owed {
		if h, ok := owedRow(openid, o); ok {
			q.Queue(s.q(insertHistory), h.args(o.CreatedAt)...)
		}
	}
	if len(owed) > 0 {
		q.Queue(`UPDATE customers SET history_settled = $1 WHERE openid = $2`, owed[len(owed)-1].ID, openid)
	}
	if o, ok := strings.CutPrefix(it.Lane, "wx:"); ok {
		q.Queue(`SELECT pg_advisory_xact_lock(hashtext($1))`, "im:"+o) // as lockLane
	}
	q.Queue(`SELECT pg_advisory_xact_lock(hashtext($1))`, it.Lane)
	q.Queue(finishDone, now.UnixMilli(), it.triedNow, it.ID, it.claimedBy, it.claimedUntil, it.Lane)
	reads := make([]func(pgx.BatchResults) error, q.Len())
	for i := range reads {
		reads[i] = skip
	}
	var n int
	reads[len(reads)-1] = func(br pgx.BatchResults) error { return br.QueryRow().Scan(&n) }
	if err := sendBatch(ctx, c, &q, reads...); err != nil {
		return false, err
	}
	_, err := c.Exec(ctx, `COMMIT`)
	return n == 1, err
}

// onPgConn runs fn on a connection of db's pool, as pgx's own, and rolls
// back the transaction fn leaves open if it fails. A connection is taken
// for each call, not kept: DATABASE_MAX_CONNS may be 1.
func onPgConn(ctx context.Context, db *sql.DB, fn func(*pgx.Conn) error) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		c := dc.(*stdlib.Conn).Conn()
		err := fn(c)
		if err != nil && c.PgConn().TxStatus() != 'I' {
			if _, rerr := c.Exec(ctx, "ROLLBACK"); rerr != nil {
				c.Close(ctx) // the pool drops it
			}
		}
		return err
	})
}
