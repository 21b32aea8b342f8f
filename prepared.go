package main

// SQLite's statements prepared once and kept: parsing a statement again at
// every push costs more than running it (docs/SPEED.md). pgx caches
// PostgreSQL's statements itself.

import (
	"context"
	"database/sql"
)

// prepared returns query prepared on SQLite's writing connection, from a
// cache; nil on PostgreSQL.
func (s *Store) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	if s.postgres {
		return nil, nil
	}
	if st, ok := s.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := s.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}
