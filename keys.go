package main

// The keys the bridge has seen: a push's MsgId or event key, a callback's
// message key, each bound to the signed query it came with, so that a push
// WeChat repeats is taken once and a signed query used for another push is
// a replay.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// claimKey records key as seen, bound to sig (the push's signed query; ""
// for none), in one statement. If key was seen before it returns the value
// kept with it and dup true; if sig was used by another key it returns
// errReplay. Either way it writes nothing.
func (s *Store) claimKey(ctx context.Context, tx *sql.Tx, key, sig string, now time.Time) (prev string, dup bool, err error) {
	var sigArg any
	if sig != "" {
		sigArg = sig
	}
	res, err := s.exec(ctx, tx, `INSERT INTO seen_keys (key, sig, received_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING`, key, sigArg, now.UnixMilli())
	if err != nil {
		return "", false, err
	}
	if n, err := res.RowsAffected(); err != nil || n == 1 {
		return "", false, err
	}
	err = s.queryRow(ctx, tx, `SELECT value FROM seen_keys WHERE key = ?`, key).Scan(&prev)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, errReplay
	}
	return prev, err == nil, err
}

// PruneKeys forgets push and callback keys received before cutoff, and
// items delivered before it; vendors retry within seconds, so old keys only
// cost space.
func (s *Store) PruneKeys(ctx context.Context, cutoff time.Time) error {
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `DELETE FROM seen_keys WHERE received_at < ?`, cutoff.UnixMilli()); err != nil {
			return err
		}
		// Delivered items, and dead letters queued again, are history;
		// dead letters stay.
		if _, err := s.exec(ctx, tx, `DELETE FROM outbox WHERE state IN (`+sqlDone+`, `+sqlRetried+`) AND updated_at < ?`, cutoff.UnixMilli()); err != nil {
			return err
		}
		// A safety net: a lane whose first pending item is not marked
		// head would never be taken.
		// (SQLite's writer keeps the heads in memory.)
		if !s.postgres {
			return nil
		}
		_, err := s.exec(ctx, tx, markHeads)
		return err
	})
	if err != nil {
		return fmt.Errorf("prune: %w", err)
	}
	return nil
}
