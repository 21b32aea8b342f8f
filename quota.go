package main

// WeChat's limits on customer-service messages, counted before WeChat would
// refuse (45015, 45047): a customer may be sent them only within 48 hours
// of their last message, five per message they send; a follow, a menu click
// or a QR scan allows three within the minute after it (unless a message's
// 48 hours run longer). The count is read from the history (history.go):
// the customer's last message, their last such event, and what was sent to
// them since. A reply beyond the quota is held until the customer writes
// again; one past the window is not sent; the agent is told either way, and
// when one reply is left.

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"
)

// WeChat's allowances: per message, after a follow, click or scan.
const (
	messageQuota  = 5
	messageWindow = 48 * time.Hour
	eventQuota    = 3
	eventWindow   = time.Minute
)

// deliveredKept is how long a delivered item is kept (Worker.prune): the
// count reads when a reply reached WeChat, which counts for the 48 hours of
// the customer's message after it.
const deliveredKept = messageWindow + time.Hour

// allowance returns how many more customer-service messages WeChat takes
// for openid, and whether any window is open at all, at now; grant names
// the allowance (the id of the customer's last message, or minus the time
// of their last event), which the messages sent under it record; lastIn is
// when the customer last wrote (zero if never).
func (s *Store) allowance(ctx context.Context, tx *sql.Tx, openid string, now time.Time) (left int, open bool, grant int64, lastIn time.Time, err error) {
	if err := s.settleHistory(ctx, tx, openid, 0); err != nil { // history.go
		return 0, false, 0, time.Time{}, err
	}
	var inID, in, eventAt int64
	err = s.queryRow(ctx, tx, `SELECT COALESCE(MAX(id), 0), COALESCE(MAX(created_at), 0), COALESCE((SELECT event_at FROM customers WHERE openid = ?), 0)
		FROM (SELECT id, created_at FROM messages WHERE openid = ? AND direction = 'in' ORDER BY id DESC LIMIT 1) m`,
		openid, openid).Scan(&inID, &in, &eventAt)
	if err != nil {
		return 0, false, 0, time.Time{}, err
	}
	if in > 0 {
		lastIn = time.UnixMilli(in)
	}
	// The fake's model, as far as WeChat tells it: a message allows five
	// for 48 hours; a later event three for a minute, unless the message's
	// window runs longer.
	grant, quota, until := inID, cmp.Or(s.desk.ReplyQuota, messageQuota), in+messageWindow.Milliseconds()
	if eventAt > in && (in == 0 || until < eventAt+eventWindow.Milliseconds()) {
		grant, quota, until = -eventAt, eventQuota, eventAt+eventWindow.Milliseconds()
	}
	if grant == 0 || now.UnixMilli() >= until {
		return 0, false, 0, lastIn, nil
	}
	// What was sent under the grant came after the customer's last message.
	// So, for WeChat, did what reached it after that message: an older
	// reply still on its way, or one that arrived since their previous
	// message was accepted and, since this one was, or within the second
	// before (WeChat had the message before it pushed it, and its times are
	// whole seconds). A reply in parts is counted whole once its first part
	// arrived after their previous message: its later parts come later.
	// After an event, the replies still on their way count. (A reply's
	// first item is made with it, or when it is released, never before:
	// SQLite gives a pruned item's id to a new one.)
	//
	// prevIn is when their previous message was accepted, read once here
	// rather than for each reply the count looks at.
	var prevIn int64
	err = s.queryRow(ctx, tx, `SELECT COALESCE((SELECT created_at FROM messages WHERE openid = ? AND direction = 'in' AND id < ?
		ORDER BY id DESC LIMIT 1), 0)`, openid, inID).Scan(&prevIn)
	if err != nil {
		return 0, false, 0, time.Time{}, err
	}
	arrived := ""
	args := []any{openid, inID, grant, inID, "wx:" + openid}
	if grant > 0 {
		arrived = ` OR o.state = ` + sqlDone + ` AND o.updated_at >= ? AND (o.updated_at >= ? OR m.parts > 1)`
		args = append(args, prevIn, in-time.Second.Milliseconds())
	}
	var used int
	err = s.queryRow(ctx, tx, `SELECT COALESCE(SUM(m.parts), 0) FROM messages m WHERE m.openid = ? AND m.direction = 'out'
		AND m.state = `+sqlQueued+` AND (m.id > ? AND m.grant_of = ? OR m.id < ? AND EXISTS (SELECT 1 FROM outbox o
			WHERE o.id = m.outbox_id AND o.lane = ? AND o.created_at >= m.created_at AND (o.state = `+sqlPending+arrived+`)))`,
		args...).Scan(&used)
	return max(quota-used, 0), true, grant, lastIn, err
}

// toCustomer sends d, a message to the customer in conversation conv, if
// WeChat will take it now, and records it in the history; from is the
// agent who wrote it, "" for the bridge's own texts. An agent's reply
// beyond the quota is held, and one past the window is not sent, the agent
// told at once; the bridge's own text then is not sent, and an empty one
// never. It returns the message's state.
func (s *Store) toCustomer(ctx context.Context, tx *sql.Tx, conv int64, d Delivery, from string, now time.Time) (MessageState, error) {
	if d.Text == "" && d.Media == nil && len(d.Elems) == 0 {
		return "", nil
	}
	parts := max(len(d.parts()), 1)
	left, open, grant, lastIn, err := s.allowance(ctx, tx, d.OpenID, now)
	if err != nil {
		return "", err
	}
	h := historyRow{conv: conv, openid: d.OpenID, direction: "out", agent: from, text: d.Text, parts: parts}
	switch {
	case !open:
		h.state = stateNotSent
		if from != "" {
			when := "never"
			if !lastIn.IsZero() {
				when = now.Sub(lastIn).Round(time.Minute).String() + " ago"
			}
			err = s.tellAgent(ctx, tx, d.OpenID, from, fmt.Sprintf("Not sent: WeChat takes replies only within 48 hours of the customer's last message, and they last wrote %s. %q", when, d.Text), now)
		}
	case left < parts && from != "":
		h.state = stateHeld
		b, merr := json.Marshal(d)
		if merr != nil {
			return "", merr
		}
		h.delivery = string(b)
		s.noteConversation(d.OpenID, 0, "") // their next message looks the held replies up
		if _, err = s.exec(ctx, tx, `UPDATE customers SET held = held + 1 WHERE openid = ?`, d.OpenID); err == nil {
			err = s.tellAgent(ctx, tx, d.OpenID, from, fmt.Sprintf("Held: WeChat takes no more replies until the customer writes again; this one goes then. %q", d.Text), now)
		}
	case left < parts:
		h.state = stateNotSent
	default:
		h.state, h.grant = stateQueued, grant
		if h.outbox, err = s.enqueueFor(ctx, tx, d, now, nil); err == nil && from != "" && left-parts == 1 {
			err = s.tellAgent(ctx, tx, d.OpenID, from, "One reply left: WeChat takes no more until the customer writes again.", now)
		}
	}
	if err != nil {
		return "", err
	}
	return h.state, s.record(ctx, tx, h, now)
}

// releaseHeldReplies sends the replies held for the customer, in order, as
// far as their new quota goes; those it does not reach stay held.
func (s *Store) releaseHeldReplies(ctx context.Context, tx *sql.Tx, openid string, now time.Time) error {
	held, err := s.parked(ctx, tx, openid, stateHeld)
	if err != nil {
		return err
	}
	left, open, grant, _, err := s.allowance(ctx, tx, openid, now)
	if err != nil || !open {
		return err
	}
	sent := 0
	for _, p := range held {
		if p.parts > left {
			break
		}
		if err := s.release(ctx, tx, p, "", grant, now); err != nil {
			return err
		}
		left -= p.parts
		sent++
	}
	_, err = s.exec(ctx, tx, `UPDATE customers SET held = held - ? WHERE openid = ?`, sent, openid)
	return err
}
