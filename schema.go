package main

// The schema, one plain SQL file per database, applied when the store opens.
// How a change reaches a database made before it: docs/SCHEMA.md.

import (
	"context"
	"crypto/sha256"
	"database/sql"
	_ "embed"
	"fmt"
	"strings"
)

var (
	//go:embed schema_sqlite.sql
	sqliteSchema string
	//go:embed schema_postgres.sql
	postgresSchema string
)

// schemaLock is the PostgreSQL advisory lock held while the schema is
// applied, so instances starting together do not race on CREATE.
const schemaLock = 7_261_948_305

// addedColumns are the columns added to a table after it was first made,
// which a database made before them lacks: SQLite cannot add a column only
// if it is absent, so applySQLiteSchema looks first.
var addedColumns = []struct{ table, column string }{
	{"outbox", "push_key TEXT NOT NULL DEFAULT ''"}, // the pushes the outbox carries, recent.go
	{"outbox", "push_sig TEXT NOT NULL DEFAULT ''"},
	{"outbox", "push_reply TEXT NOT NULL DEFAULT ''"},
	{"outbox", "tried_at BIGINT NOT NULL DEFAULT 0"},
	{"outbox", "history_owed INTEGER NOT NULL DEFAULT 0"}, // the history written once, history.go
	{"customers", "event_at BIGINT NOT NULL DEFAULT 0"},   // customer service, queue.go and quota.go
	{"customers", "held INTEGER NOT NULL DEFAULT 0"},
	{"customers", "rating_conv BIGINT NOT NULL DEFAULT 0"},
	{"conversations", "queued_at BIGINT NOT NULL DEFAULT 0"},
	{"conversations", "assigned_at BIGINT NOT NULL DEFAULT 0"},
	{"conversations", "first_reply_at BIGINT NOT NULL DEFAULT 0"},
	{"conversations", "closed_by TEXT NOT NULL DEFAULT ''"},
	{"conversations", "rating INTEGER NOT NULL DEFAULT 0"},
	{"agent_load", "online INTEGER NOT NULL DEFAULT 1"},
	{"agent_load", "presence_at BIGINT NOT NULL DEFAULT 0"},
	{"agent_load", "assigned_at BIGINT NOT NULL DEFAULT 0"},
	{"agent_load", "events BIGINT NOT NULL DEFAULT 0"}, // presence, presence.go
	{"agent_load", "gone_at BIGINT NOT NULL DEFAULT 0"},
	{"agent_load", "logged_out INTEGER NOT NULL DEFAULT 0"},
	{"conversations", "requeued_from TEXT NOT NULL DEFAULT ''"},
}

// applySQLiteSchema applies the schema on SQLite, then adds the columns a
// database made before them lacks.
func applySQLiteSchema(ctx context.Context, tx *sql.Tx) error {
	// held_replies is deferred_replies now: renamed, or, if an older
	// instance made it again, moved into deferred_replies.
	var old, renamed int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE name = 'held_replies'), count(*) FILTER (WHERE name = 'deferred_replies')
		FROM sqlite_master WHERE type = 'table'`).Scan(&old, &renamed); err != nil {
		return err
	}
	switch {
	case old > 0 && renamed == 0:
		if _, err := tx.ExecContext(ctx, `ALTER TABLE held_replies RENAME TO deferred_replies`); err != nil {
			return err
		}
	case old > 0:
		if _, err := tx.ExecContext(ctx, `INSERT INTO deferred_replies (openid, key, delivery, created_at)
			SELECT openid, key, delivery, created_at FROM held_replies ORDER BY id; DROP TABLE held_replies`); err != nil {
			return err
		}
	}
	if _, err := tx.ExecContext(ctx, sqliteSchema); err != nil {
		return err
	}
	for _, c := range addedColumns {
		name, _, _ := strings.Cut(c.column, " ")
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('`+c.table+`') WHERE name = ?`, name).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			if _, err := tx.ExecContext(ctx, `ALTER TABLE `+c.table+` ADD COLUMN `+c.column); err != nil {
				return err
			}
		}
	}
	return nil
}

// applyPostgresSchema applies the schema on PostgreSQL under an advisory
// lock, unless the database has it already: schema_applied keeps the digest
// of the schema last applied. Applying it again would take a SHARE lock on
// each table with an index (CREATE INDEX IF NOT EXISTS locks the table
// before it finds the index), one after the other, while the instances
// already running lock those tables in other orders: an instance starting
// under load could deadlock with them.
func applyPostgresSchema(ctx context.Context, tx *sql.Tx) error {
	digest := fmt.Sprintf("%x", sha256.Sum256([]byte(postgresSchema)))
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(schemaLock)); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_applied (digest TEXT NOT NULL)`); err != nil {
		return err
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_applied WHERE digest = $1`, digest).Scan(&n); err != nil || n > 0 {
		return err
	}
	if _, err := tx.ExecContext(ctx, postgresSchema); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM schema_applied`); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO schema_applied (digest) VALUES ($1)`, digest)
	return err
}
