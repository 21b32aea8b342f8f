package main

// Group commit for PostgreSQL's pushes. One goroutine an instance takes the
// pushes that wait, many to a transaction, and accepts the messages of the
// common case (a known customer's to their agent, or a first one that
// opens a conversation with a free agent) in two or three round trips for
// the whole batch, each a pipeline of statements that take every push of
// the batch at once (pgbatch.go). A push taken alone costs a round trip a
// statement, and round trips, not PostgreSQL's work, bound it
// (docs/SPEED.md). Every other push, and every push of a customer with one
// such in the batch, is accepted alone by AcceptPush's write once the
// batch has committed, each customer's in order, the customers at once.
//
// The batch keeps the lock order (db.go): it claims its keys before its
// customers, holds its customers in openid order, then the desk, then
// their IM lanes in the order of their lock keys; so two instances'
// batches may wait for each other, never in a ring.

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// pushOp is a push waiting for the writer, and where its answer goes.
type pushOp struct {
	in   Inbound
	now  time.Time
	done chan pushResult

	seq int // its place in the batch the writer gathered
	// A replay, a push whose signed query one before it in the batch
	// carries, is taken after that one is answered (after), which closes
	// answered then.
	after    <-chan struct{}
	answered chan struct{}
}

// answer gives op its answer.
func (op pushOp) answer(r pushResult) {
	op.done <- r
	if op.answered != nil {
		close(op.answered)
	}
}

// pushResult is how a push was accepted.
type pushResult struct {
	acc Accepted
	err error
}

// pgPushes is PostgreSQL's writer of pushes.
type pgPushes struct {
	s      *Store
	writer *batcher[pushOp] // commit.go

	// alone holds, for each customer whose pushes are taken alone, those
	// not yet taken, in order; a chain goroutine takes them, one after
	// the other, and deletes the customer when none is left. Until then
	// the customer's new pushes join it: they come after.
	mu     sync.Mutex
	alone  map[string][]pushOp
	chains sync.WaitGroup
	// waitingSigs holds the signed queries of the pushes in alone, each
	// with what closes once that push is answered.
	waitingSigs map[string]chan struct{}

	batched atomic.Int64 // pushes committed in a batch with others (the tests read it)
}

// newPGPushes starts the writer of s's pushes.
func newPGPushes(s *Store) *pgPushes {
	p := &pgPushes{s: s, alone: map[string][]pushOp{}, waitingSigs: map[string]chan struct{}{}}
	p.writer = startBatcher(p.take)
	return p
}

// close stops the writer once every push given to it is answered.
func (p *pgPushes) close() {
	p.writer.close()
	p.chains.Wait()
}

// accept returns how in was accepted, once what it asked for is committed.
func (p *pgPushes) accept(ctx context.Context, in Inbound, now time.Time) (Accepted, error) {
	op := pushOp{in: in, now: now, done: make(chan pushResult, 1)}
	if err := p.writer.send(ctx, op); err != nil {
		return Accepted{}, err
	}
	r := <-op.done
	return r.acc, r.err
}

// take accepts the batch: the common pushes together, the others alone,
// each customer's in order, and the customers at once. A customer whose
// pushes are being taken alone has the batch's taken alone too, after
// them. Writes run with a context that is never cancelled: one caller
// giving up must not fail the others.
func (p *pgPushes) take(batch []pushOp) {
	ctx := context.Background()
	p.mu.Lock()
	replays := p.markReplays(batch)
	// While pushes of an earlier batch are taken alone, no agent is given
	// in this one: one of those may need the place first.
	aloneFrom := len(batch) // the first push taken alone, by seq
	if len(p.alone) > 0 {
		aloneFrom = -1
	}
	var cands []pushOp
	for _, op := range batch {
		if _, busy := p.alone[op.in.OpenID]; busy {
			p.leave(op)
			aloneFrom = min(aloneFrom, op.seq)
		} else {
			cands = append(cands, op)
		}
	}
	p.mu.Unlock()
	taken := p.together(ctx, cands, replays, aloneFrom)
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, op := range cands {
		if taken[i] != nil {
			op.answer(pushResult{acc: *taken[i]})
		} else if p.leave(op) {
			p.chains.Add(1)
			go p.chain(ctx, op.in.OpenID)
		}
	}
}

// markReplays numbers the batch's pushes (seq), and has each replay, a
// push whose signed query a push before it carries (in the batch, or still
// to be taken alone), wait for that one's answer: so the first claims the
// query, as one at a time. It returns the customers with a replay. p.mu is
// held.
func (p *pgPushes) markReplays(batch []pushOp) map[string]bool {
	holders := map[string]int{} // signed query → the batch's first push that carries it
	replays := map[string]bool{}
	for i := range batch {
		op := &batch[i]
		op.seq = i
		if op.in.SigKey == "" {
			continue
		}
		if ch, ok := p.waitingSigs[op.in.SigKey]; ok {
			op.after, replays[op.in.OpenID] = ch, true
		} else if h, ok := holders[op.in.SigKey]; ok {
			if batch[h].answered == nil {
				batch[h].answered = make(chan struct{})
			}
			op.after, replays[op.in.OpenID] = batch[h].answered, true
		} else {
			holders[op.in.SigKey] = i
		}
	}
	return replays
}

// leave adds op to its customer's pushes taken alone, its signed query to
// those a later replay waits on, and reports whether it is the first (a
// chain must start). p.mu is held.
func (p *pgPushes) leave(op pushOp) bool {
	if op.in.SigKey != "" && op.after == nil {
		if op.answered == nil {
			op.answered = make(chan struct{})
		}
		p.waitingSigs[op.in.SigKey] = op.answered
	}
	q, busy := p.alone[op.in.OpenID]
	p.alone[op.in.OpenID] = append(q, op)
	return !busy
}

// chain takes the customer's pushes alone, in order, until none is left.
func (p *pgPushes) chain(ctx context.Context, openid string) {
	defer p.chains.Done()
	for {
		p.mu.Lock()
		q := p.alone[openid]
		if len(q) == 0 {
			delete(p.alone, openid)
			p.mu.Unlock()
			return
		}
		op := q[0]
		p.alone[openid] = q[1:]
		p.mu.Unlock()
		if op.after != nil {
			<-op.after
		}
		acc, err := p.s.acceptAlone(ctx, op.in, op.now)
		op.answer(pushResult{acc, err})
		p.mu.Lock()
		if ch, ok := p.waitingSigs[op.in.SigKey]; ok && ch == op.answered {
			delete(p.waitingSigs, op.in.SigKey)
		}
		p.mu.Unlock()
	}
}

// together commits, in one transaction, the batch's pushes that it can
// take at once (pgbatch.go), and returns how each was accepted, or nil for
// those it left alone: the customers with a push other than a message, a
// message in parts (whose history row its push writes, history.go) or a
// replay, and those the transaction leaves. It gives no agent to a
// customer whose first push comes after the first push left alone
// (aloneFrom, by seq), which would have had one first. It takes none if the
// transaction fails: each push is then taken alone, which tells its error.
func (p *pgPushes) together(ctx context.Context, batch []pushOp, replays map[string]bool, aloneFrom int) []*Accepted {
	taken := make([]*Accepted, len(batch))
	others := map[string]bool{}
	for _, op := range batch {
		d := Delivery{Kind: deliverIMSend, Text: op.in.Text, Elems: op.in.Elems}
		if op.in.Action != actMessage || replays[op.in.OpenID] || d.parts() != nil {
			others[op.in.OpenID] = true
			aloneFrom = min(aloneFrom, op.seq)
		}
	}
	var cands []batchPush
	var candOf []int // each candidate's place in the batch
	for i, op := range batch {
		if !others[op.in.OpenID] {
			cands = append(cands, batchPush{op: op})
			candOf = append(candOf, i)
		}
	}
	if len(cands) == 0 {
		return taken
	}
	// A connection of the pool's a batch, not one kept: the chains need
	// them too, and DATABASE_MAX_CONNS may be 1.
	var accs []*Accepted
	err := onPgConn(ctx, p.s.db, func(c *pgx.Conn) error {
		var err error
		accs, err = (&pgBatch{s: p.s, c: c, cands: cands, aloneFrom: aloneFrom}).take(ctx)
		return err
	})
	if err != nil {
		return taken
	}
	n := 0
	for j, acc := range accs {
		if taken[candOf[j]] = acc; acc != nil {
			n++
		}
	}
	if n > 1 {
		p.batched.Add(int64(n))
	}
	return taken
}
