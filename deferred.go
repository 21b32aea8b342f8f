package main

// The store's part of reply recovery (recover.go): the replies deferred
// while their conversation's history is read back, taken in their place
// with the history's, and the open conversations whose histories to read.
// ("Held" is the quota's word, quota.go.)

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// DeferReply commits a reply as AcceptReply does, key and all, but keeps it
// in deferred_replies rather than the outbox, until TakeHistory moves it there:
// it waits for its conversation's replies of a gap (recover.go).
func (s *Store) DeferReply(ctx context.Context, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	b, err := json.Marshal(d)
	if err != nil {
		return false, err
	}
	duplicate, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) (bool, error) {
		if _, dup, err := s.claimKey(ctx, tx, key, "", now); err != nil || dup {
			return dup, err
		}
		_, err := s.exec(ctx, tx, `INSERT INTO deferred_replies (openid, key, delivery, created_at) VALUES (?, ?, ?, ?)`,
			d.OpenID, key, string(b), now.UnixMilli())
		return false, err
	})
	if err != nil {
		return false, fmt.Errorf("hold reply: %w", err)
	}
	return duplicate, nil
}

// Reply is a reply to take: its key (as callbackKey makes it) and what it
// asks for.
type Reply struct {
	Key string
	D   Delivery
}

// TakeHistory takes, in one write, the replies read back from a
// conversation's history, in order: one deferred since its callback goes to
// the outbox in its place, one not seen yet goes there as AcceptReply
// would put it, one seen before is skipped. Then the replies still deferred for
// the customer openid follow (for every customer if openid is ""). It
// returns how many replies not seen before it took.
func (s *Store) TakeHistory(ctx context.Context, openid string, replies []Reply, now time.Time) (taken int, err error) {
	if openid == "" && len(replies) == 0 {
		// Every customer's, each in a transaction holding that customer
		// (the lock order, db.go).
		rows, err := s.rdb.QueryContext(ctx, `SELECT DISTINCT openid FROM deferred_replies`)
		if err != nil {
			return 0, fmt.Errorf("take history: %w", err)
		}
		var openids []string
		for rows.Next() {
			var o string
			if err := rows.Scan(&o); err != nil {
				rows.Close()
				return 0, fmt.Errorf("take history: %w", err)
			}
			openids = append(openids, o)
		}
		if err := cmp.Or(rows.Err(), rows.Close()); err != nil {
			return 0, fmt.Errorf("take history: %w", err)
		}
		for _, o := range openids {
			if o == "" {
				continue
			}
			if _, err := s.TakeHistory(ctx, o, nil, now); err != nil {
				return 0, err
			}
		}
		return 0, nil
	}
	taken, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) (int, error) {
		if openid != "" { // as AcceptReply does
			if err := s.lockCustomer(ctx, tx, openid); err != nil && !errors.Is(err, errUnknownCustomer) {
				return 0, err
			}
		}
		taken := 0
		for _, r := range replies {
			deferred, err := s.releaseDeferred(ctx, tx, "", r.Key, now)
			if err != nil {
				return 0, err
			}
			if deferred > 0 {
				continue
			}
			t, err := s.takeReply(ctx, tx, r.Key, r.D, now)
			if err != nil {
				return 0, err
			}
			if !t.Duplicate {
				taken++
			}
		}
		_, err := s.releaseDeferred(ctx, tx, openid, "", now)
		return taken, err
	})
	if err != nil {
		return 0, fmt.Errorf("take history: %w", err)
	}
	return taken, nil
}

// releaseDeferred moves the replies deferred for openid (any customer's if "")
// with key (any key if "") to the outbox, in the order they came, and
// returns how many it moved.
func (s *Store) releaseDeferred(ctx context.Context, tx *sql.Tx, openid, key string, now time.Time) (int, error) {
	rows, err := s.query(ctx, tx, `DELETE FROM deferred_replies WHERE (openid = ? OR ? = '') AND (key = ? OR ? = '')
		RETURNING id, delivery`, openid, openid, key, key)
	if err != nil {
		return 0, err
	}
	type deferredReply struct {
		id  int64
		raw string
	}
	var all []deferredReply
	for rows.Next() {
		var h deferredReply
		if err := rows.Scan(&h.id, &h.raw); err != nil {
			rows.Close()
			return 0, err
		}
		all = append(all, h)
	}
	if err := cmp.Or(rows.Err(), rows.Close()); err != nil {
		return 0, err
	}
	slices.SortFunc(all, func(a, b deferredReply) int { return cmp.Compare(a.id, b.id) })
	for _, h := range all {
		var d Delivery
		if err := json.Unmarshal([]byte(h.raw), &d); err != nil {
			return 0, fmt.Errorf("deferred reply %d: %w", h.id, err)
		}
		if _, err := s.queueReply(ctx, tx, d, now); err != nil { // as WeChat's limits allow
			return 0, err
		}
	}
	return len(all), nil
}

// Conversation is a customer's open conversation.
type Conversation struct {
	ID     int64
	OpenID string
	Agent  string
}

// OpenConversations returns the conversations with an agent open now whose
// ids are past after and up to last, limit at most, in the order of their
// ids.
func (s *Store) OpenConversations(ctx context.Context, after, last int64, limit int) ([]Conversation, error) {
	rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT id, openid, agent FROM conversations
		WHERE id > ? AND id <= ? AND closed_at IS NULL AND agent <> '' ORDER BY id LIMIT ?`), after, last, limit)
	if err != nil {
		return nil, fmt.Errorf("open conversations: %w", err)
	}
	defer rows.Close()
	var out []Conversation
	for rows.Next() {
		var c Conversation
		if err := rows.Scan(&c.ID, &c.OpenID, &c.Agent); err != nil {
			return nil, fmt.Errorf("open conversations: %w", err)
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("open conversations: %w", err)
	}
	return out, nil
}
