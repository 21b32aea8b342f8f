package main

// Group commit for SQLite. Every write of the bridge is a short function
// run in a transaction; on SQLite one goroutine, the writer, runs them, many
// to a transaction, and its commit fsyncs the write-ahead log
// (synchronous=FULL) before any of their callers returns. The writes that
// arrive while a commit runs wait, and go into the next one: one fsync makes
// a batch of writes durable. On PostgreSQL, where concurrent commits already
// share their WAL flushes, writes run in transactions of their own.
//
// An earlier writer committed without waiting for the disk and left the
// fsync to a second goroutine, so that it could commit the next batch while
// the disk worked. On the 2-core machines the speed is measured on, that
// answered no more pushes (one kind) or 4–11% fewer (another) than this one:
// its batches were smaller, and each handed over twice (SPEED.md).

import (
	"context"
	"database/sql"
	"errors"
)

// maxBatch bounds the writes committed together.
const maxBatch = 256

// writeFunc is a write: what it does in tx. ctx is the context it must run
// its statements with. On SQLite the writer gives it one that is never
// cancelled: its statements share a transaction with other callers'
// writes, which one caller giving up must not fail, and the driver watches
// a cancellable context with a goroutine per statement.
type writeFunc func(ctx context.Context, tx *sql.Tx) error

// writeOp is one write waiting for the writer.
type writeOp struct {
	fn   writeFunc
	done chan error
}

// noWrite marks the errors a write function returns before it has written
// anything: its batch can still commit.
var noWrite = []error{errReplay, errUnknownCustomer, errNotHeld}

func isNoWrite(err error) bool {
	for _, e := range noWrite {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// write runs fn in a transaction and returns once it is committed and
// durable. fn may share its transaction with other writes: it must return
// an error of noWrite, or none, unless it fails in the database.
func (s *Store) write(ctx context.Context, fn writeFunc) error {
	if s.postgres {
		return s.inTx(ctx, func(tx *sql.Tx) error { return fn(ctx, tx) })
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
// while a commit runs, and answers their callers once the commit is
// durable, until the store closes.
func (s *Store) runWriter() {
	defer close(s.writerDone)
	for {
		var first writeOp
		select {
		case first = <-s.ops:
		case <-s.stopped:
			return
		}
		batch := gather(first, s.ops, maxBatch)
		for i, err := range s.commitBatch(batch) {
			batch[i].done <- err
		}
	}
}

// commitBatch runs the batch in one transaction. If a write fails in the
// database, or the commit does, the batch is rolled back and each write
// runs again alone, so one bad write fails only itself.
func (s *Store) commitBatch(batch []writeOp) []error {
	results := make([]error, len(batch))
	ctx := context.Background()
	err := s.tryTx(ctx, func(tx *sql.Tx) error {
		for i, op := range batch {
			results[i] = op.fn(ctx, tx)
			if results[i] != nil && !isNoWrite(results[i]) {
				return results[i]
			}
		}
		return nil
	})
	s.settle(err == nil)
	if err != nil && len(batch) > 1 {
		for i, op := range batch {
			results[i] = s.tryTx(ctx, func(tx *sql.Tx) error { return op.fn(ctx, tx) })
			s.settle(results[i] == nil)
		}
		return results
	}
	for i := range batch {
		if err != nil {
			results[i] = err
		}
	}
	return results
}

// gather returns first and whatever else waits on ch, up to limit in all,
// without blocking: a batch of what queued while the last one was worked on.
func gather[T any](first T, ch <-chan T, limit int) []T {
	batch := []T{first}
	for len(batch) < limit {
		select {
		case v, ok := <-ch:
			if !ok {
				return batch
			}
			batch = append(batch, v)
		default:
			return batch
		}
	}
	return batch
}
