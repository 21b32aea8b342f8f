package main

// The lanes in memory, on SQLite: the writer keeps the pending items of
// each lane, in order, instead of an index by lane, which each insert
// changed at a random place (docs/SPEED.md). They are read from the outbox
// when the store opens; after that only the writer changes them (Stats
// reads them under lanesMu), and a transaction's changes are kept once it
// commits. A pending item takes 8 bytes and its slice's slack: a backlog of
// a million, about 16 MB. Each lane's head, when it is due and who holds
// it, is kept too (heads.go). PostgreSQL finds a lane's items by its index.

import (
	"context"
)

// laneChange is what the transaction running did to a lane: the items it
// finished off the front of the lane's queue as committed, and the items it
// added.
type laneChange struct {
	finished int
	added    []int64
}

// pendingSnapshot returns how many items are pending and the id of the
// oldest (0 if none), as the writer last committed, from any goroutine.
func (s *Store) pendingSnapshot() (n int, oldest int64) {
	s.lanesMu.RLock()
	defer s.lanesMu.RUnlock()
	for _, q := range s.lanes {
		n += len(q)
		if oldest == 0 || q[0] < oldest {
			oldest = q[0]
		}
	}
	return n, oldest
}

// loadLanes reads the pending items of every lane, in order, and makes the
// first of each its head, held by no one.
func (s *Store) loadLanes(ctx context.Context) error {
	rows, err := s.db.QueryContext(ctx, `SELECT lane, id, next_at FROM outbox WHERE state = `+sqlPending+` ORDER BY id`)
	if err != nil {
		return err
	}
	defer rows.Close()
	s.lanes = map[string][]int64{}
	for rows.Next() {
		var lane string
		var id, at int64
		if err := rows.Scan(&lane, &id, &at); err != nil {
			return err
		}
		if len(s.lanes[lane]) == 0 {
			s.heads[id] = headState{at: at}
		}
		s.lanes[lane] = append(s.lanes[lane], id)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	s.rebuildDue()
	s.settleHeads(true)
	return nil
}

// laneChanged returns the change the transaction running makes to lane.
func (s *Store) laneChanged(lane string) *laneChange {
	c := s.txLanes[lane]
	if c == nil {
		c = &laneChange{}
		s.txLanes[lane] = c
	}
	return c
}

// laneItem returns the i-th pending item of lane as the transaction
// running sees it, and false past the last.
func (s *Store) laneItem(lane string, i int) (int64, bool) {
	q := s.lanes[lane]
	c := s.txLanes[lane]
	if c != nil {
		i += c.finished
	}
	if i < len(q) {
		return q[i], true
	}
	if c != nil && i-len(q) < len(c.added) {
		return c.added[i-len(q)], true
	}
	return 0, false
}

// laneAdd records that the transaction running added item id to lane.
func (s *Store) laneAdd(lane string, id int64) {
	c := s.laneChanged(lane)
	c.added = append(c.added, id)
}

// laneFinish records that the transaction running finished item id of
// lane, if id heads it, and returns the lane's next item, which heads it
// now. An item that does not head its lane was finished before (its lease
// ran out during a slow delivery and it was taken again): nothing changes.
func (s *Store) laneFinish(lane string, id int64) (next int64, ok bool) {
	if head, _ := s.laneItem(lane, 0); head != id {
		return 0, false
	}
	s.laneChanged(lane).finished++
	return s.laneItem(lane, 0)
}

// settleLanes keeps what the transaction the writer ran last did to the
// lanes, if it committed, and forgets it either way.
func (s *Store) settleLanes(committed bool) {
	if committed && len(s.txLanes) > 0 {
		s.lanesMu.Lock()
		defer s.lanesMu.Unlock()
		for lane, c := range s.txLanes {
			// Items it finished come off the committed queue first,
			// then off what it added.
			q := s.lanes[lane]
			n := min(c.finished, len(q))
			q = append(q[n:], c.added[c.finished-n:]...)
			if len(q) == 0 {
				delete(s.lanes, lane)
			} else {
				s.lanes[lane] = q
			}
		}
	}
	clear(s.txLanes)
}
