package main

// Group commit for SQLite: one goroutine runs every write, many to a
// transaction, and one fsync of the write-ahead log makes the whole batch
// durable before any of its callers is answered. It buys the webhook its
// speed on SQLite, where each commit waits for the disk (docs/SPEED.md).

import (
	"context"
	"database/sql"
	"errors"
)

// maxBatch bounds the writes committed together.
const maxBatch = 256

// txFunc is one write: what it does in tx, and what it produced. ctx is the
// context its statements must run with.
//
// The contract: a txFunc may run more than once. The group commit runs it
// in a batch, and if the batch fails it runs it again alone, so that one bad
// write fails only itself. So a txFunc keeps nothing outside its return
// value: what it produced is what it returns, and only the last run's
// return reaches the caller.
type txFunc func(ctx context.Context, tx *sql.Tx) (any, error)

// commitOp is one write waiting for the writer, and where its result goes.
type commitOp struct {
	fn   txFunc
	done chan commitResult
}

// commitResult is what a write returned, once its transaction ended.
type commitResult struct {
	v   any
	err error
}

// groupCommit is SQLite's writer.
type groupCommit struct {
	db     *sql.DB
	writer *batcher[commitOp]
	// settle is told, after each transaction, whether it committed: what
	// the writes staged in memory is kept or dropped then (lanes.go).
	settle func(committed bool)
	// harmless reports the errors a write returns having written nothing:
	// its batch still commits.
	harmless func(error) bool
}

// newGroupCommit starts the writer on db.
func newGroupCommit(db *sql.DB, settle func(committed bool), harmless func(error) bool) *groupCommit {
	g := &groupCommit{db: db, settle: settle, harmless: harmless}
	g.writer = startBatcher(g.take)
	return g
}

// close stops the writer once the batch it runs is committed.
func (g *groupCommit) close() { g.writer.close() }

// write runs fn in a transaction and returns what it produced once the
// transaction is committed and durable. fn shares its transaction with
// other writes: it returns an error only if it failed in the database, or
// one that harmless accepts.
func (g *groupCommit) write(ctx context.Context, fn txFunc) (any, error) {
	op := commitOp{fn: fn, done: make(chan commitResult, 1)}
	if err := g.writer.send(ctx, op); err != nil {
		return nil, err
	}
	r := <-op.done
	return r.v, r.err
}

// take commits a batch of writes and answers each.
func (g *groupCommit) take(batch []commitOp) {
	for i, r := range g.commit(batch) {
		batch[i].done <- r
	}
}

// commit runs the batch in one transaction. If a write fails in the
// database, or the commit does, the batch is rolled back and each write
// runs again alone. Writes run with a context that is never cancelled: they
// share a transaction, which one caller giving up must not fail.
func (g *groupCommit) commit(batch []commitOp) []commitResult {
	ctx := context.Background()
	results := make([]commitResult, len(batch))
	err := g.tx(ctx, func(tx *sql.Tx) error {
		for i, op := range batch {
			v, err := op.fn(ctx, tx)
			results[i] = commitResult{v, err}
			if err != nil && !g.harmless(err) {
				return err
			}
		}
		return nil
	})
	if err == nil || len(batch) == 1 {
		for i := range results {
			if err != nil {
				results[i] = commitResult{err: err}
			}
		}
		return results
	}
	for i, op := range batch {
		var v any
		err := g.tx(ctx, func(tx *sql.Tx) error {
			var err error
			v, err = op.fn(ctx, tx)
			return err
		})
		results[i] = commitResult{v, err}
	}
	return results
}

// tx runs fn in a transaction, commits it if fn returns nil, and tells
// settle whether it committed.
func (g *groupCommit) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	err := runTx(ctx, g.db, fn)
	g.settle(err == nil)
	return err
}

// batcher is a writer: one goroutine that runs take on the ops sent to
// it, batching those that wait while take runs, until close. SQLite's
// writes (groupCommit) and PostgreSQL's pushes (pgpush.go) each have one.
type batcher[T any] struct {
	ops  chan T
	stop chan struct{}
	done chan struct{}
}

// startBatcher starts a writer that runs take.
func startBatcher[T any](take func(batch []T)) *batcher[T] {
	b := &batcher[T]{ops: make(chan T), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		for {
			var first T
			select {
			case first = <-b.ops:
			case <-b.stop:
				return
			}
			take(gather(first, b.ops, maxBatch))
		}
	}()
	return b
}

// send hands op to the writer, or returns errStoreClosed once it is
// closed, or ctx's error.
func (b *batcher[T]) send(ctx context.Context, op T) error {
	select {
	case b.ops <- op:
		return nil
	case <-b.stop:
		return errStoreClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// close stops the writer once the batch it takes is done.
func (b *batcher[T]) close() {
	close(b.stop)
	<-b.done
}

// gather returns first and whatever else waits on ch, up to limit in all,
// without blocking: a batch of what queued while the last one was worked on.
// It stops at a closed channel.
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

// errStoreClosed is returned for a write after Close.
var errStoreClosed = errors.New("store closed")

// runTx runs fn in a transaction on db and commits it if fn returns nil.
func runTx(ctx context.Context, db *sql.DB, fn func(*sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// harmless reports whether err is one a write returns having written
// nothing, so that its batch can still commit.
func harmless(err error) bool {
	return errors.Is(err, errReplay) || errors.Is(err, errUnknownCustomer) || errors.Is(err, errNotHeld)
}

// settle keeps what the transaction the writer ran last did to the open
// conversations, the recent pushes, the lanes and their heads, if it
// committed, and forgets it either way: the group commit calls it after
// each transaction.
func (s *Store) settle(committed bool) {
	s.settleConversations(committed)
	s.settleRecent(committed)
	s.settleHeads(committed)
	s.settleLanes(committed)
}
