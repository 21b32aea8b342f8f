package main

// The history: every message of every conversation, both ways, with its
// time, its agent and its delivery state, kept in the messages table;
// GET /admin/customers/{openid}/messages reads it back. A message's
// delivery state while it is in the outbox is its item's, read when asked;
// delivered items are pruned after 49 hours, and a message whose item is
// gone was delivered.
//
// The history is written once: a customer's message that goes to an agent
// in one item is not written at the push, whose outbox row carries it
// already, but owes its row (outbox.history_owed). settleHistory writes
// the rows a customer's messages owe, in order, before anything reads or
// writes that customer's history, and when such an item ends or its
// delivery is rewritten; so the rows keep the order and the times of the
// pushes, and a push writes one row, not two, nor a leaf of the history's
// index (docs/SPEED.md).

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// historyRow is a message as the history records it.
type historyRow struct {
	conv      int64
	openid    string
	direction string // in: the customer's; out: to the customer
	agent     string // the agent who received or wrote it; "" for the bridge's own
	text      string
	parts     int // the messages it takes at WeChat (out) or IM (in)
	state     MessageState
	outbox    int64  // its (first) outbox item, while queued
	delivery  string // its delivery, while waiting or held
	grant     int64  // to the customer: the allowance it was sent under (quota.go)
}

// record adds h to the history, after the rows the customer's messages owe.
func (s *Store) record(ctx context.Context, tx *sql.Tx, h historyRow, now time.Time) error {
	if err := s.settleHistory(ctx, tx, h.openid, 0); err != nil {
		return err
	}
	return s.addHistory(ctx, tx, h, now)
}

// addHistory adds h to the history.
func (s *Store) addHistory(ctx context.Context, tx *sql.Tx, h historyRow, now time.Time) error {
	_, err := s.exec(ctx, tx, insertHistory, h.args(now)...)
	return err
}

// insertHistory adds a row to the history; its arguments are a row's args.
const insertHistory = `INSERT INTO messages (conversation, openid, direction, agent, text, parts, state, outbox_id, delivery, created_at, grant_of)
	VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`

// args are insertHistory's arguments for h, written at now.
func (h historyRow) args(now time.Time) []any {
	return []any{h.conv, h.openid, h.direction, h.agent, h.text, max(h.parts, 1), h.state, h.outbox, h.delivery, now.UnixMilli(), h.grant}
}

// owedRow is the history row that it, a customer's message, owes; false if
// its delivery cannot be read: it only becomes a dead letter (worker.go),
// which the admin reads whole, and owes no row.
func owedRow(openid string, it OutboxItem) (historyRow, bool) {
	var d Delivery
	if err := json.Unmarshal([]byte(it.raw), &d); err != nil {
		return historyRow{}, false
	}
	return historyRow{conv: d.Conv, openid: openid, direction: "in", agent: d.Agent, text: d.Text, parts: 1, state: stateQueued, outbox: it.ID}, true
}

// settleHistory writes the history rows that the customer's messages owe,
// in the order they were accepted, each at the time it was: those of items
// up to item upTo, or all if upTo is 0. The caller holds the customer's
// row. A customer's message that owes nothing joins their IM lane only
// after the rows owed before it are written (enqueueFor), so the items that
// owe one are the newest of the lane's messages: on SQLite the writer,
// which knows the lane's pending items (lanes.go), reads them back from the
// newest to the last message that owes nothing.
func (s *Store) settleHistory(ctx context.Context, tx *sql.Tx, openid string, upTo int64) error {
	if upTo == 0 {
		upTo = math.MaxInt64
	}
	owed, err := s.owedItems(ctx, tx, openid, upTo)
	if err != nil || len(owed) == 0 {
		return err
	}
	for _, it := range owed {
		if h, ok := owedRow(openid, it); ok {
			if err := s.addHistory(ctx, tx, h, it.CreatedAt); err != nil {
				return err
			}
		}
		if !s.postgres {
			if _, err := s.exec(ctx, tx, `UPDATE outbox SET history_owed = 0 WHERE id = ?`, it.ID); err != nil {
				return err
			}
		}
	}
	if s.postgres {
		_, err = s.exec(ctx, tx, `UPDATE customers SET history_settled = ? WHERE openid = ?`, owed[len(owed)-1].ID, openid)
	}
	return err
}

// settleCustomer writes the history rows the customer's messages owe, in a
// transaction of its own, under the customer's row.
func (s *Store) settleCustomer(ctx context.Context, openid string) error {
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		switch err := s.lockCustomer(ctx, tx, openid); {
		case errors.Is(err, errUnknownCustomer):
			return nil
		case err != nil:
			return err
		}
		return s.settleHistory(ctx, tx, openid, 0)
	})
}

// owedItems returns the customer's pending IM items up to upTo whose
// history rows are owed, in order, with their deliveries undecoded and when
// they were accepted. On PostgreSQL those are the items flagged after the
// last one settled (customers.history_settled): a settle writes no outbox
// row, and so waits for no other transaction's; item ids grow while a
// customer's row is held. On SQLite, whose writer has no other to wait
// for, a settled item's flag is cleared.
func (s *Store) owedItems(ctx context.Context, tx *sql.Tx, openid string, upTo int64) ([]OutboxItem, error) {
	lane := "im:" + openid
	var owed []OutboxItem
	if s.postgres {
		rows, err := s.query(ctx, tx, pgOwed, lane, upTo, openid)
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		for rows.Next() {
			it, err := scanOwed(rows)
			if err != nil {
				return nil, err
			}
			owed = append(owed, it)
		}
		return owed, rows.Err()
	}
	n := 0
	for _, ok := s.laneItem(lane, 0); ok; _, ok = s.laneItem(lane, n) {
		n++
	}
	for i := n - 1; i >= 0; i-- {
		it := OutboxItem{}
		if it.ID, _ = s.laneItem(lane, i); it.ID > upTo {
			continue
		}
		var created, owes int64
		if err := s.queryRow(ctx, tx, `SELECT delivery, created_at, history_owed FROM outbox WHERE id = ?`, it.ID).Scan(&it.raw, &created, &owes); err != nil {
			return nil, err
		}
		if owes == 0 {
			var d struct{ Kind string }
			if err := json.Unmarshal([]byte(it.raw), &d); err == nil && d.Kind == deliverIMSend {
				break // a customer's message that owes nothing
			}
			continue
		}
		it.CreatedAt = time.UnixMilli(created)
		owed = append(owed, it)
	}
	slices.Reverse(owed)
	return owed, nil
}

// pgOwed reads, on PostgreSQL, the items of a customer's IM lane that owe
// their history rows, up to an id, oldest first; its arguments are the
// lane, the id and the customer's openid. Read by scanOwed.
const pgOwed = `SELECT o.id, o.delivery, o.created_at FROM outbox o
	WHERE o.lane = ? AND o.state = ` + sqlPending + ` AND o.history_owed = 1 AND o.id <= ?
	AND o.id > COALESCE((SELECT history_settled FROM customers WHERE openid = ?), 0) ORDER BY o.id`

// scanOwed reads a row of pgOwed.
func scanOwed(row interface{ Scan(...any) error }) (OutboxItem, error) {
	var it OutboxItem
	var created int64
	err := row.Scan(&it.ID, &it.raw, &created)
	it.CreatedAt = time.UnixMilli(created)
	return it, err
}

// parkedMessage is a message the history keeps with its delivery, until it
// can go: waiting for an agent, or held for the customer's next message.
type parkedMessage struct {
	id    int64
	parts int
	d     Delivery
}

// parked returns the customer's messages in state, oldest first.
func (s *Store) parked(ctx context.Context, tx *sql.Tx, openid string, state MessageState) ([]parkedMessage, error) {
	rows, err := s.query(ctx, tx, `SELECT id, parts, delivery FROM messages WHERE openid = ? AND state = ? ORDER BY id`, openid, state)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []parkedMessage
	for rows.Next() {
		var p parkedMessage
		var raw string
		if err := rows.Scan(&p.id, &p.parts, &raw); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(raw), &p.d); err != nil {
			return nil, fmt.Errorf("message %d: %w", p.id, err)
		}
		out = append(out, p)
	}
	return out, rows.Err()
}

// release sends a parked message on: its delivery to the outbox, its
// history row marked queued, with agent for a customer's message. A held
// reply's row moves to the end of the history, under grant, the allowance
// it goes under: the quota counts the replies after the customer's last
// message (quota.go).
func (s *Store) release(ctx context.Context, tx *sql.Tx, p parkedMessage, agent string, grant int64, now time.Time) error {
	if err := s.settleHistory(ctx, tx, p.d.OpenID, 0); err != nil {
		return err
	}
	id, err := s.enqueueFor(ctx, tx, p.d, now, nil)
	if err != nil {
		return err
	}
	if p.d.Kind != deliverWeChat {
		// Its delivery stays: the later parts of a long message, parked
		// whole, know by it that they went with it (Store.Recipient).
		_, err = s.exec(ctx, tx, `UPDATE messages SET state = `+sqlQueued+`, outbox_id = ?, agent = ? WHERE id = ?`, id, agent, p.id)
		return err
	}
	_, err = s.exec(ctx, tx, `INSERT INTO messages (conversation, openid, direction, agent, text, parts, state, outbox_id, delivery, created_at, grant_of)
		SELECT conversation, openid, direction, agent, text, parts, `+sqlQueued+`, ?, '', created_at, ? FROM messages WHERE id = ?`, id, grant, p.id)
	if err == nil {
		_, err = s.exec(ctx, tx, `DELETE FROM messages WHERE id = ?`, p.id)
	}
	return err
}

// HistoryConversation is a conversation as the history endpoint shows it.
// Times are Unix milliseconds, 0 for never.
type HistoryConversation struct {
	ID           int64            `json:"id"`
	Agent        string           `json:"agent"` // "" while waiting
	OpenedAt     int64            `json:"opened_at"`
	QueuedAt     int64            `json:"queued_at"`
	AssignedAt   int64            `json:"assigned_at"`
	FirstReplyAt int64            `json:"first_reply_at"`
	ClosedAt     int64            `json:"closed_at"`
	ClosedBy     string           `json:"closed_by"` // agent, idle or unfollow
	Rating       int              `json:"rating"`    // 1 to 5, 0 for none
	Messages     []HistoryMessage `json:"messages"`
}

// HistoryMessage is one message of a conversation. State is waiting (for
// an agent), held (for the customer's next message), not_sent (past the
// 48-hour window), pending, delivered, failed (a dead letter: Reason says
// why) or retried (a dead letter queued again).
type HistoryMessage struct {
	ID        int64  `json:"id"`
	Time      int64  `json:"time"`
	Direction string `json:"direction"` // in: from the customer; out: to the customer
	Agent     string `json:"agent"`     // the agent it went to or came from; "" for the bridge's own
	Text      string `json:"text"`
	State     string `json:"state"`
	Reason    string `json:"reason,omitempty"`
}

// History bounds: the newest conversations, and messages, of a customer.
const (
	maxHistoryConversations = 100
	maxHistoryMessages      = 2000
)

// CustomerHistory returns the customer's newest conversations, oldest
// first, each with its messages in order.
func (s *Store) CustomerHistory(ctx context.Context, openid string) ([]HistoryConversation, error) {
	if err := s.settleCustomer(ctx, openid); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT id, agent, opened_at, queued_at, assigned_at, first_reply_at,
		COALESCE(closed_at, 0), closed_by, rating FROM conversations WHERE openid = ? ORDER BY id DESC LIMIT `+
		strconv.Itoa(maxHistoryConversations)), openid)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	var convs []HistoryConversation
	byID := map[int64]int{}
	for rows.Next() {
		var c HistoryConversation
		if err := rows.Scan(&c.ID, &c.Agent, &c.OpenedAt, &c.QueuedAt, &c.AssignedAt, &c.FirstReplyAt, &c.ClosedAt, &c.ClosedBy, &c.Rating); err != nil {
			rows.Close()
			return nil, fmt.Errorf("history: %w", err)
		}
		c.Messages = []HistoryMessage{}
		convs = append(convs, c)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	for i, j := 0, len(convs)-1; i < j; i, j = i+1, j-1 {
		convs[i], convs[j] = convs[j], convs[i]
	}
	for i, c := range convs {
		byID[c.ID] = i
	}
	// An item's id is checked against its lane too: SQLite may give a
	// pruned item's id to a new one.
	rows, err = s.rdb.QueryContext(ctx, s.q(`SELECT m.id, m.conversation, m.created_at, m.direction, m.agent, m.text, m.state,
		COALESCE(o.state, ''), COALESCE(o.last_error, '') FROM messages m
		LEFT JOIN outbox o ON o.id = m.outbox_id AND o.lane = (CASE m.direction WHEN 'in' THEN 'im:' ELSE 'wx:' END) || m.openid
		WHERE m.openid = ? ORDER BY m.id DESC LIMIT `+strconv.Itoa(maxHistoryMessages)), openid)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer rows.Close()
	var msgs []struct {
		conv int64
		m    HistoryMessage
	}
	for rows.Next() {
		var m HistoryMessage
		var conv int64
		var item, reason string
		if err := rows.Scan(&m.ID, &conv, &m.Time, &m.Direction, &m.Agent, &m.Text, &m.State, &item, &reason); err != nil {
			return nil, fmt.Errorf("history: %w", err)
		}
		if m.State == string(stateQueued) {
			m.State = deliveryState(ItemState(item))
			if m.State == string(itemFailed) {
				m.Reason = reason
			}
		}
		msgs = append(msgs, struct {
			conv int64
			m    HistoryMessage
		}{conv, m})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	for k := len(msgs) - 1; k >= 0; k-- {
		if i, ok := byID[msgs[k].conv]; ok {
			convs[i].Messages = append(convs[i].Messages, msgs[k].m)
		}
	}
	return convs, nil
}

// deliveryState is a queued message's state from its outbox item's.
func deliveryState(item ItemState) string {
	switch item {
	case itemPending, itemFailed, itemRetried:
		return string(item)
	}
	return string(stateDelivered) // done, or pruned once done
}
