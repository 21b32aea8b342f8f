package main

// The lane heads in memory. On SQLite, which one instance owns, the writer
// keeps each lane's head (its first pending item): when it is due and the
// claim that holds it, if any, with a heap of the heads in the order they
// can be claimed. A claim then writes nothing, and an outcome changes one
// row, the item's own. With the heads in the outbox, a delivery changed
// four old rows or index entries (its claim, its outcome, the next head,
// the index of due heads), each a page written whole in the commit that
// followed (docs/SPEED.md). A claim need not outlive the process: no other instance
// shares the database, and one that stopped holds nothing. PostgreSQL, which
// several instances share, keeps heads and claims in the outbox (outbox.go).
//
// As with the lanes, a transaction's changes are kept once it commits:
// until then they are staged, and what it took off the heap goes back if
// it rolls back. A head's place in the heap is not updated when the head
// changes: a new entry is pushed, and the old one, now stale, is dropped
// when it comes to the top, or when stale entries outnumber the heads.

import (
	"container/heap"
	"context"
	"database/sql"
	"math"
)

// headState is a lane head as the writer knows it: 32 bytes a lane with
// work, besides the lane's queue (docs/MEMORY.md).
type headState struct {
	at    int64  // next_at: due from then (Unix ms)
	owner string // the claim that holds it, while until is not 0
	until int64  // claimed_until (Unix ms)
}

// ready is when the head can next be claimed: due, and not held.
func (h headState) ready() int64 { return max(h.at, h.until) }

// dueEntry is a head in the heap, with the time it was ready when pushed.
type dueEntry struct{ ready, id int64 }

// dueHeap orders heads by when they are ready, then by id, as PostgreSQL's
// claim orders them (next_at, id).
type dueHeap []dueEntry

func (h dueHeap) Len() int { return len(h) }
func (h dueHeap) Less(i, j int) bool {
	return h[i].ready < h[j].ready || h[i].ready == h[j].ready && h[i].id < h[j].id
}
func (h dueHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)   { *h = append(*h, x.(dueEntry)) }
func (h *dueHeap) Pop() any {
	e := (*h)[len(*h)-1]
	*h = (*h)[:len(*h)-1]
	return e
}

// headOf returns item id's head state as the transaction running sees it,
// and false if the item heads no lane.
func (s *Store) headOf(id int64) (headState, bool) {
	if h, staged := s.txHeads[id]; staged {
		if h == nil {
			return headState{}, false
		}
		return *h, true
	}
	h, ok := s.heads[id]
	return h, ok
}

// setHead records, in the transaction running, that item id heads its lane
// as h says.
func (s *Store) setHead(id int64, h headState) {
	s.txHeads[id] = &h
	s.txDue = append(s.txDue, dueEntry{h.ready(), id})
}

// holds reports whether the claim that took it holds it still: an outcome
// is written only then, as fenced says on PostgreSQL.
func (s *Store) holds(it OutboxItem) bool {
	h, ok := s.headOf(it.ID)
	return ok && h.owner == it.claimedBy && h.until == it.claimedUntil
}

// takeDue takes up to limit heads that are ready at now, for owner until
// until, and returns their ids, in the order they were ready.
func (s *Store) takeDue(now int64, owner string, until int64, limit int) []int64 {
	var ids []int64
	for len(ids) < limit && len(s.due) > 0 && s.due[0].ready <= now {
		e := heap.Pop(&s.due).(dueEntry)
		s.txTaken = append(s.txTaken, e)
		h, ok := s.headOf(e.id)
		if !ok || h.ready() != e.ready {
			continue // stale
		}
		h.owner, h.until = owner, until
		s.setHead(e.id, h)
		ids = append(ids, e.id)
	}
	return ids
}

// finishHead records that head it is finished, done or failed, and makes
// next, the next pending item of its lane if ok, the head, due from its own
// next_at.
func (s *Store) finishHead(ctx context.Context, tx *sql.Tx, it OutboxItem, next int64, ok bool) error {
	s.txHeads[it.ID] = nil
	if !ok {
		return nil
	}
	var at int64
	if err := s.queryRow(ctx, tx, `SELECT next_at FROM outbox WHERE id = ?`, next).Scan(&at); err != nil {
		return err
	}
	s.setHead(next, headState{at: at})
	return nil
}

// releaseHeads lets go of the heads owner holds.
func (s *Store) releaseHeads(owner string) {
	release := func(id int64) {
		if h, ok := s.headOf(id); ok && h.until != 0 && h.owner == owner {
			h.owner, h.until = "", 0
			s.setHead(id, h)
		}
	}
	for id := range s.heads {
		release(id)
	}
	for id := range s.txHeads {
		release(id)
	}
}

// settleHeads keeps what the transaction the writer ran last did to the
// heads, if it committed, and puts back what it took off the heap if not.
// Then it drops the stale entries at the top of the heap, and publishes
// when the first head is ready (NextDue).
func (s *Store) settleHeads(committed bool) {
	if committed {
		for id, h := range s.txHeads {
			if h == nil {
				delete(s.heads, id)
			} else {
				s.heads[id] = *h
			}
		}
		for _, e := range s.txDue {
			heap.Push(&s.due, e)
		}
	} else {
		for _, e := range s.txTaken {
			heap.Push(&s.due, e)
		}
	}
	clear(s.txHeads)
	s.txDue, s.txTaken = s.txDue[:0], s.txTaken[:0]
	if len(s.due) > 2*len(s.heads)+64 {
		s.rebuildDue()
	}
	for len(s.due) > 0 {
		if h, ok := s.heads[s.due[0].id]; ok && h.ready() == s.due[0].ready {
			break
		}
		heap.Pop(&s.due)
	}
	first := int64(math.MaxInt64)
	if len(s.due) > 0 {
		first = s.due[0].ready
	}
	s.firstReady.Store(first)
}

// rebuildDue makes the heap anew from the committed heads, without stale
// entries.
func (s *Store) rebuildDue() {
	s.due = s.due[:0]
	for id, h := range s.heads {
		s.due = append(s.due, dueEntry{h.ready(), id})
	}
	heap.Init(&s.due)
}
