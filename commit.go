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
	db  *sql.DB
	ops chan commitOp
	// settle is told, after each transaction, whether it committed: what
	// the writes staged in memory is kept or dropped then (lanes.go).
	settle func(committed bool)
	// harmless reports the errors a write returns having written nothing:
	// its batch still commits.
	harmless func(error) bool
	stop     chan struct{}
	done     chan struct{}
}

// newGroupCommit starts the writer on db.
func newGroupCommit(db *sql.DB, settle func(committed bool), harmless func(error) bool) *groupCommit {
	g := &groupCommit{db: db, ops: make(chan commitOp), settle: settle, harmless: harmless,
		stop: make(chan struct{}), done: make(chan struct{})}
	go g.run()
	return g
}

// close stops the writer once the batch it runs is committed.
func (g *groupCommit) close() {
	close(g.stop)
	<-g.done
}

// write runs fn in a transaction and returns what it produced once the
// transaction is committed and durable. fn shares its transaction with
// other writes: it returns an error only if it failed in the database, or
// one that harmless accepts.
func (g *groupCommit) write(ctx context.Context, fn txFunc) (any, error) {
	op := commitOp{fn: fn, done: make(chan commitResult, 1)}
	select {
	case g.ops <- op:
	case <-g.stop:
		return nil, errStoreClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	r := <-op.done
	return r.v, r.err
}

// run commits the writes that arrive, batching those that wait while a
// commit runs, until close.
func (g *groupCommit) run() {
	defer close(g.done)
	for {
		var first commitOp
		select {
		case first = <-g.ops:
		case <-g.stop:
			return
		}
		batch := gather(first, g.ops, maxBatch)
		for i, r := range g.commit(batch) {
			batch[i].done <- r
		}
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
