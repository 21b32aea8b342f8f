package main

// Group commit for SQLite. Every write of the bridge is a short function
// run in a transaction; on SQLite one goroutine, the writer, runs them, many
// to a transaction. SQLite commits into its write-ahead log without waiting
// for the disk (synchronous=NORMAL); a second goroutine, the syncer, then
// fsyncs the log and only then tells the callers. So one fsync makes many
// transactions durable, the writer runs the next batch while the disk
// works, and each caller still returns only once its write is on disk, as
// synchronous=FULL would. On PostgreSQL, where concurrent commits already
// share their WAL flushes, writes run in transactions of their own.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"os"
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

// committed is a batch the writer committed, waiting for the syncer.
type committed struct {
	ops     []writeOp
	results []error
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
// while a commit runs, and hands each batch to the syncer, until the store
// closes.
func (s *Store) runWriter() {
	defer close(s.synced)
	for {
		var first writeOp
		select {
		case first = <-s.ops:
		case <-s.stopped:
			return
		}
		batch := gather(first, s.ops, maxBatch)
		// The syncer takes the batch once its fsync in flight is done.
		// Meanwhile the writes that arrive wait, and go into one batch
		// rather than many small ones: a commit writes each page it
		// changed, however few its writes.
		s.synced <- committed{batch, s.commitBatch(batch)}
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
	if err != nil && len(batch) > 1 {
		for i, op := range batch {
			results[i] = s.tryTx(ctx, func(tx *sql.Tx) error { return op.fn(ctx, tx) })
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

// runSyncer makes committed batches durable, all that wait with one fsync
// of the write-ahead log, and answers their callers, until the writer stops.
func (s *Store) runSyncer() {
	defer close(s.writerDone)
	for c := range s.synced {
		batches := gather(c, s.synced, math.MaxInt)
		err := s.syncWAL()
		for _, c := range batches {
			for i, op := range c.ops {
				if c.results[i] == nil && err != nil {
					c.results[i] = err
				}
				op.done <- c.results[i]
			}
		}
	}
	if s.wal != nil {
		s.wal.Close()
	}
}

// syncWAL fsyncs SQLite's write-ahead log. SQLite keeps the log file while
// a connection is open, but should it have been made anew, the new one is
// opened: what was committed before it is in the database file already.
func (s *Store) syncWAL() error {
	path := s.path + "-wal"
	if fi, err := os.Stat(path); err != nil {
		return fmt.Errorf("sync write-ahead log: %w", err)
	} else if s.wal != nil {
		if mine, err := s.wal.Stat(); err != nil || !os.SameFile(fi, mine) {
			s.wal.Close()
			s.wal = nil
		}
	}
	if s.wal == nil {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("sync write-ahead log: %w", err)
		}
		s.wal = f
	}
	if err := s.wal.Sync(); err != nil {
		return fmt.Errorf("sync write-ahead log: %w", err)
	}
	return nil
}
