package main

// Pruning: what the bridge keeps only for a while, done by the worker once
// an hour. Delivered outbox items go after 49 hours (the quota reads when
// a reply arrived, quota.go), the history (messages and closed
// conversations) after HISTORY_RETENTION, media after MEDIA_RETENTION
// (media.go), seen keys after a day (keys.go). Each is deleted a batch at a time, each batch a
// write of its own, so SQLite's single writer is never held long: pushes
// commit between two batches (docs/SPEED.md measures the longest wait).

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"time"
)

// pruneBatch is how many rows one write of a prune reads and deletes at
// most: a few milliseconds of SQLite's writer, so the pushes that arrive
// meanwhile wait for one batch, not the whole prune
// (BenchmarkPushDuringPrune). A variable, for tests.
var pruneBatch = 500

// PruneOutbox deletes the items delivered (or dead letters queued again)
// before cutoff; dead letters and pending items stay. On PostgreSQL it then
// marks any lane's first pending item its head that is not (a safety net:
// such a lane would never be taken; SQLite's writer keeps the heads in
// memory).
func (s *Store) PruneOutbox(ctx context.Context, cutoff time.Time) (int, error) {
	n, err := s.pruneWalk(ctx, "outbox", "created_at", `state IN (`+sqlDone+`, `+sqlRetried+`) AND updated_at < ?`, cutoff)
	if err != nil || !s.postgres {
		return n, err
	}
	if err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, markHeads)
		return err
	}); err != nil {
		return n, fmt.Errorf("prune outbox: %w", err)
	}
	return n, nil
}

// PruneHistory deletes the messages made before cutoff, but those still to
// be sent (waiting with their conversation, or held for the quota), and the
// conversations closed before it. A rating armed for a conversation pruned
// since is no rating (queue.go).
func (s *Store) PruneHistory(ctx context.Context, cutoff time.Time) (messages, conversations int, err error) {
	messages, err = s.pruneWalk(ctx, "messages", "created_at", `created_at < ? AND state NOT IN (`+sqlWaiting+`, `+sqlHeld+`)`, cutoff)
	if err != nil {
		return messages, 0, err
	}
	conversations, err = s.pruneWalk(ctx, "conversations", "opened_at", `closed_at IS NOT NULL AND closed_at < ?`, cutoff)
	return messages, conversations, err
}

// pruneWalk deletes table's rows where cond holds (its one argument is
// cutoff), reading the table in id order pruneBatch rows a write. Ids grow
// with made (the time a row was made), so it stops at the first batch made
// entirely at cutoff or later: the primary key is the only index a prune
// needs, and no write pays for another. (A row made while the clock was
// ahead does not stop it.) It returns how many rows it deleted.
func (s *Store) pruneWalk(ctx context.Context, table, made, cond string, cutoff time.Time) (int, error) {
	deleted, after, ms := 0, int64(0), cutoff.UnixMilli()
	batch := strconv.Itoa(pruneBatch)
	for {
		var rows, gone int
		var last, firstMade int64
		err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			var maxID, minMade sql.NullInt64
			if err := s.queryRow(ctx, tx, `SELECT count(*), max(id), min(`+made+`) FROM
				(SELECT id, `+made+` FROM `+table+` WHERE id > ? ORDER BY id LIMIT `+batch+`) AS batch`, after).Scan(&rows, &maxID, &minMade); err != nil {
				return err
			}
			last, firstMade = maxID.Int64, minMade.Int64
			if rows == 0 {
				return nil
			}
			res, err := s.exec(ctx, tx, `DELETE FROM `+table+` WHERE id > ? AND id <= ? AND `+cond, after, last, ms)
			if err != nil {
				return err
			}
			n, err := res.RowsAffected()
			gone = int(n)
			return err
		})
		if err != nil {
			return deleted, fmt.Errorf("prune %s: %w", table, err)
		}
		deleted += gone
		if rows < pruneBatch || firstMade >= ms || ctx.Err() != nil {
			return deleted, ctx.Err()
		}
		after = last
	}
}

// prune deletes, once an hour, what is kept for a while only (prune.go):
// day-old keys and delivered items, media past MediaRetention, the history
// past HistoryRetention (0 keeps it). Media goes with its history at the
// latest.
func (w *Worker) prune(ctx context.Context) {
	now := w.Now()
	if now.UnixMilli()-w.lastPruneMilli.Load() < time.Hour.Milliseconds() {
		return
	}
	w.lastPruneMilli.Store(now.UnixMilli())
	failed := func(what string, err error) bool {
		if err != nil && ctx.Err() == nil {
			w.Log.Error("prune "+what+" failed", "err", err)
		}
		return err != nil
	}
	keys, err := w.Store.PruneKeys(ctx, now.Add(-24*time.Hour))
	if failed("keys", err) {
		return
	}
	items, err := w.Store.PruneOutbox(ctx, now.Add(-deliveredKept)) // the quota reads when a reply arrived
	if failed("outbox", err) {
		return
	}
	media := w.MediaRetention
	if w.HistoryRetention > 0 {
		media = min(media, w.HistoryRetention)
	}
	if failed("media", w.Store.PruneMedia(ctx, now.Add(-media))) {
		return
	}
	var messages, conversations int
	if w.HistoryRetention > 0 {
		messages, conversations, err = w.Store.PruneHistory(ctx, now.Add(-w.HistoryRetention))
		if failed("history", err) {
			return
		}
	}
	w.Log.Info("pruned", "keys", keys, "outbox_items", items, "messages", messages, "conversations", conversations)
}
