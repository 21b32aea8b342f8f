package main

// The heartbeat: each instance records that it is serving, so that the
// next start knows how long no bridge answered, and reads back from IM's
// history the replies agents sent meanwhile (recover.go).

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
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
	switch err := s.rdb.QueryRowContext(ctx, s.q(`SELECT at FROM heartbeats WHERE name = ?`), name).Scan(&ms); {
	case errors.Is(err, sql.ErrNoRows):
		return time.Time{}, false, nil
	case err != nil:
		return time.Time{}, false, fmt.Errorf("heartbeat %s: %w", name, err)
	}
	return time.UnixMilli(ms), true, nil
}
