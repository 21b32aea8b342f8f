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
	"strconv"
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

// PruneKeys forgets the push and callback keys received before cutoff,
// pruneBatch keys a write (prune.go); vendors retry within seconds, so old
// keys only cost space.
func (s *Store) PruneKeys(ctx context.Context, cutoff time.Time) (int, error) {
	deleted := 0
	for ctx.Err() == nil {
		var gone int64
		err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			res, err := s.exec(ctx, tx, `DELETE FROM seen_keys WHERE key IN
				(SELECT key FROM seen_keys WHERE received_at < ? LIMIT `+strconv.Itoa(pruneBatch)+`)`, cutoff.UnixMilli())
			if err != nil {
				return err
			}
			gone, err = res.RowsAffected()
			return err
		})
		if err != nil {
			return deleted, fmt.Errorf("prune keys: %w", err)
		}
		deleted += int(gone)
		if gone < int64(pruneBatch) {
			break
		}
	}
	return deleted, ctx.Err()
}
