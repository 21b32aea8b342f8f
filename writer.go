package main

// Group commit for SQLite. Every write of the bridge is a short function
// run in a transaction; on SQLite one goroutine runs them, many to a
// transaction, so that one fsync makes a whole batch durable. Each caller
// still returns only once its write is committed. On PostgreSQL, where
// concurrent commits already share their WAL flushes, writes run in
// transactions of their own.

import (
	"context"
	"database/sql"
	"errors"
)

// maxBatch bounds the writes committed together.
const maxBatch = 256

// writeOp is one write waiting for the writer.
type writeOp struct {
	fn   func(*sql.Tx) error
	done chan error
}

// noWrite marks the errors a write function returns before it has written
// anything: its batch can still commit.
var noWrite = []error{errReplay, errUnknownCustomer}

func isNoWrite(err error) bool {
	for _, e := range noWrite {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// write runs fn in a transaction and returns once it is committed. fn may
// share its transaction with other writes: it must return an error of
// noWrite, or none, unless it fails in the database.
func (s *Store) write(ctx context.Context, fn func(*sql.Tx) error) error {
	if s.postgres {
		return s.inTx(ctx, fn)
	}
	op := writeOp{fn: fn, done: make(chan error, 1)}
	select {
	case s.ops <- op:
	case <-s.stopped:
		return errors.New("store closed")
	case <-ctx.Done():
		return ctx.Err()
	}
	return <-op.done
}

// runWriter commits the writes that arrive, batching those that wait
// while a commit runs, until the store closes.
func (s *Store) runWriter() {
	defer close(s.writerDone)
	for {
		var first writeOp
		select {
		case first = <-s.ops:
		case <-s.stopped:
			return
		}
		batch := []writeOp{first}
	collect:
		for len(batch) < maxBatch {
			select {
			case op := <-s.ops:
				batch = append(batch, op)
			default:
				break collect
			}
		}
		s.commitBatch(batch)
	}
}

// commitBatch runs the batch in one transaction. If a write fails in the
// database, or the commit does, the batch is rolled back and each write
// runs again alone, so one bad write fails only itself.
func (s *Store) commitBatch(batch []writeOp) {
	results := make([]error, len(batch))
	err := s.tryTx(context.Background(), func(tx *sql.Tx) error {
		for i, op := range batch {
			results[i] = op.fn(tx)
			if results[i] != nil && !isNoWrite(results[i]) {
				return results[i]
			}
		}
		return nil
	})
	if err != nil && len(batch) > 1 {
		for _, op := range batch {
			op.done <- s.tryTx(context.Background(), op.fn)
		}
		return
	}
	for i, op := range batch {
		if err != nil {
			results[i] = err
		}
		op.done <- results[i]
	}
}
