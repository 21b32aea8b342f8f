package main

// How the store talks to its database: SQL written once with ? placeholders
// for both dialects, SQLite's statements prepared once, and every write in
// a transaction that may run again.

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the pure-Go "sqlite" driver
)

// isPostgresURL reports whether u names a PostgreSQL database.
func isPostgresURL(u string) bool {
	return strings.HasPrefix(u, "postgres://") || strings.HasPrefix(u, "postgresql://")
}

// q adapts a query written with ? placeholders to the dialect.
func (s *Store) q(query string) string {
	if !s.postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// exec runs a statement, written with ? placeholders, in tx; on SQLite,
// prepared once (prepared.go).
func (s *Store) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	if st, err := s.prepared(ctx, query); err != nil {
		return nil, err
	} else if st != nil {
		return tx.StmtContext(ctx, st).ExecContext(ctx, args...)
	}
	return tx.ExecContext(ctx, s.q(query), args...)
}

// query runs a query, as exec does.
func (s *Store) query(ctx context.Context, tx *sql.Tx, query string, args ...any) (*sql.Rows, error) {
	if st, err := s.prepared(ctx, query); err != nil {
		return nil, err
	} else if st != nil {
		return tx.StmtContext(ctx, st).QueryContext(ctx, args...)
	}
	return tx.QueryContext(ctx, s.q(query), args...)
}

// queryRow runs a query for one row, as exec does.
func (s *Store) queryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) *sql.Row {
	if st, err := s.prepared(ctx, query); err == nil && st != nil {
		return tx.StmtContext(ctx, st).QueryRowContext(ctx, args...)
	}
	return tx.QueryRowContext(ctx, s.q(query), args...)
}

// boolInt is b as the integer the schemas keep a flag in.
func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// The lock order on PostgreSQL, which every transaction follows, so that no
// two wait for each other (SQLite's transactions are serial):
//
//  1. one customer's row (lockCustomer, or findConversation reading it), or
//     a batch of pushes' customers, taken in openid order (pgbatch.go); and
//     no other customer's while holding these or the desk except by
//     tryLockCustomer, which never waits;
//  2. the desk (lockDesk): who serves whom;
//  3. a customer's lanes (lockLane): their IM lane before their WeChat lane,
//     which lockLane takes care of (a batch: its customers' IM lanes, in
//     the order of their lock keys); then an agent's lane of notices from
//     the admin (notice:AGENT); the worker finishes delivered items one a
//     transaction, so that it holds one customer's lanes at most.
//
// The keys seen (seen_keys, keys.go) are rows of their own: a push claims
// its key before its customer (a batch, its pushes' keys in key order), a
// reply or a command after; their keys never meet.
//
// A transaction may skip a step, never go back to one.

// lockRow is the clause that locks the rows a SELECT reads (of the named
// tables, if any) until the transaction ends. SQLite needs none: its
// transactions take the whole database for writing from their start.
func (s *Store) lockRow(tables ...string) string {
	switch {
	case !s.postgres:
		return ""
	case len(tables) > 0:
		return " FOR UPDATE OF " + strings.Join(tables, ", ")
	}
	return " FOR UPDATE"
}

// write runs fn in a transaction and returns what it produced, once the
// transaction is committed and durable. On SQLite the group commit shares
// the transaction with other writes (commit.go); on PostgreSQL it is fn's
// own, run again if it lost a race with another instance (inTx). Either
// way fn may run more than once, and only its last run's return counts:
// fn keeps nothing outside it. fn returns an error only if it failed in the
// database, or one of harmless's, having written nothing.
func write[T any](ctx context.Context, s *Store, fn func(ctx context.Context, tx *sql.Tx) (T, error)) (T, error) {
	if s.commit == nil {
		var v T
		err := s.inTx(ctx, func(tx *sql.Tx) error {
			var err error
			v, err = fn(ctx, tx)
			return err
		})
		return v, err
	}
	v, err := s.commit.write(ctx, func(ctx context.Context, tx *sql.Tx) (any, error) { return fn(ctx, tx) })
	t, _ := v.(T) // nil when the store closed first
	return t, err
}

// writeTx is write for fn that produces nothing but its error.
func (s *Store) writeTx(ctx context.Context, fn func(ctx context.Context, tx *sql.Tx) error) error {
	_, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (struct{}, error) { return struct{}{}, fn(ctx, tx) })
	return err
}

// inTx runs fn in a transaction and commits it if fn returns nil. On
// PostgreSQL a transaction that lost a race with another instance (a
// unique key taken, a serialization failure, a deadlock) is run again.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	return retried(func() error { return runTx(ctx, s.db, fn) })
}

// retried runs f, a transaction on PostgreSQL, and runs it again, up to
// four times in all, while it loses a race with another instance.
func retried(f func() error) error {
	for attempt := 1; ; attempt++ {
		err := f()
		var pe *pgconn.PgError
		if attempt < 4 && errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "40001" || pe.Code == "40P01") {
			continue
		}
		return err
	}
}

// tryLockCustomer holds the customer's row until the transaction ends, if
// no other transaction holds it (on PostgreSQL), and reports whether it
// does: a transaction holding the desk or another customer takes a
// customer so, never waiting (the lock order, db.go).
func (s *Store) tryLockCustomer(ctx context.Context, tx *sql.Tx, openid string) (bool, error) {
	var one int
	lock := ""
	if s.postgres {
		lock = " FOR UPDATE SKIP LOCKED"
	}
	err := s.queryRow(ctx, tx, `SELECT 1 FROM customers WHERE openid = ?`+lock, openid).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

// lockCustomer holds the customer's row until the transaction ends (on
// PostgreSQL), or returns errUnknownCustomer.
func (s *Store) lockCustomer(ctx context.Context, tx *sql.Tx, openid string) error {
	var one int
	err := s.queryRow(ctx, tx, `SELECT 1 FROM customers WHERE openid = ?`+s.lockRow(), openid).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return errUnknownCustomer
	}
	return err
}

// fileURIPath escapes what a file: URI would read otherwise in a path: a
// '#' begins its fragment, a '?' its query.
func fileURIPath(path string) string {
	return strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(path)
}

// ownSQLite takes an OS lock (flock) on the SQLite file at path, made if
// missing, for as long as the store is open: a second bridge on the same
// file (a deploy that starts the new before stopping the old, a binary run
// by hand) would deliver the same work, so it stops at start instead. The
// lock goes with the process, however it ends. SQLite's own locks are of
// another kind (fcntl), and do not meet it.
func ownSQLite(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("open store: %s is in use by another bridge: one bridge a SQLite file (several need PostgreSQL)", path)
		}
		return nil, fmt.Errorf("open store: lock %s: %w", path, err)
	}
	return f, nil
}
