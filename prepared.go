package main

// SQLite's statements prepared once and kept: parsing a statement again at
// every push costs more than running it (docs/SPEED.md). pgx caches
// PostgreSQL's statements itself.

import (
	"context"
	"database/sql"
)

// stmtKey names a statement prepared on one of the store's pools.
type stmtKey struct {
	db    *sql.DB
	query string
}

// prepared returns query prepared on SQLite's writing connection, from a
// cache; nil on PostgreSQL.
func (s *Store) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	return s.preparedOn(ctx, s.db, query)
}

// preparedOn returns query prepared on db, one of the store's pools, from
// a cache; nil on PostgreSQL. database/sql prepares it again on each of
// db's connections the first time it runs there.
func (s *Store) preparedOn(ctx context.Context, db *sql.DB, query string) (*sql.Stmt, error) {
	if s.postgres {
		return nil, nil
	}
	key := stmtKey{db, query}
	if st, ok := s.stmts.Load(key); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := s.stmts.LoadOrStore(key, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

// readRow runs a query for one row, written with ? placeholders, outside
// any transaction, on the pool of reads; on SQLite, prepared once.
func (s *Store) readRow(ctx context.Context, query string, args ...any) *sql.Row {
	if st, err := s.preparedOn(ctx, s.rdb, query); err == nil && st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return s.rdb.QueryRowContext(ctx, s.q(query), args...)
}
