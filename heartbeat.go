package main

// The heartbeat: each instance records that it is serving, so that the
// next start knows how long no bridge answered, and reads back from IM's
// history the replies agents sent meanwhile (recover.go).

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Heartbeat records name's heartbeat at now, unless it holds a later one:
// with several instances, the latest of them stands.
func (s *Store) Heartbeat(ctx context.Context, name string, now time.Time) error {
	later := "max(heartbeats.at, excluded.at)"
	if s.postgres {
		later = "GREATEST(heartbeats.at, excluded.at)"
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `INSERT INTO heartbeats (name, at) VALUES (?, ?)
			ON CONFLICT (name) DO UPDATE SET at = `+later, name, now.UnixMilli())
		return err
	})
	if err != nil {
		return fmt.Errorf("heartbeat %s: %w", name, err)
	}
	return nil
}

// LastHeartbeat returns name's heartbeat; found is false if there has been
// none.
func (s *Store) LastHeartbeat(ctx context.Context, name string) (at time.Time, found bool, err error) {
	var ms int64
	switch err := s.readRow(ctx, `SELECT at FROM heartbeats WHERE name = ?`, name).Scan(&ms); {
	case errors.Is(err, sql.ErrNoRows):
		return time.Time{}, false, nil
	case err != nil:
		return time.Time{}, false, fmt.Errorf("heartbeat %s: %w", name, err)
	}
	return time.UnixMilli(ms), true, nil
}

// Liveness, on PostgreSQL: each instance records every aliveEvery that it
// runs (instances.seen_at, by the database's clock, so that instances'
// clocks and the business clock tests move do not matter). A claim held by
// an instance not seen for deadAfter is taken as if its lease had run out,
// so a crash costs seconds, not the lease (claim.go). SQLite has one
// process a file (db.go): a start finds no other instance's claims.
const (
	aliveEvery = 2 * time.Second
	deadAfter  = 10 * time.Second
)

// pgNowMilli is PostgreSQL's clock in Unix milliseconds.
const pgNowMilli = `(extract(epoch from clock_timestamp()) * 1000)::bigint`

// deadOwners selects the instances not seen for deadAfter, other than the
// one given as its argument.
var deadOwners = `SELECT owner FROM instances WHERE owner <> ? AND seen_at < ` + pgNowMilli +
	` - ` + strconv.FormatInt(deadAfter.Milliseconds(), 10)

// Alive records that owner runs now. The first time, it also forgets the
// instances not seen for a day.
func (s *Store) Alive(ctx context.Context, owner string, first bool) error {
	if !s.postgres {
		return nil
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if first {
			if _, err := s.exec(ctx, tx, `DELETE FROM instances WHERE seen_at < `+pgNowMilli+` - 86400000`); err != nil {
				return err
			}
		}
		_, err := s.exec(ctx, tx, `INSERT INTO instances (owner, seen_at) VALUES (?, `+pgNowMilli+`)
			ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at`, owner)
		return err
	})
	if err != nil {
		return fmt.Errorf("liveness: %w", err)
	}
	return nil
}

// Gone forgets owner, which stopped having handed back its claims.
func (s *Store) Gone(ctx context.Context, owner string) error {
	if !s.postgres {
		return nil
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `DELETE FROM instances WHERE owner = ?`, owner)
		return err
	})
	if err != nil {
		return fmt.Errorf("liveness: %w", err)
	}
	return nil
}
