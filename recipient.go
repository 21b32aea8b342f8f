package main

// Who a customer's message goes to when it is delivered: whoever has its
// conversation then, who may not be the agent it was queued for (a
// transfer, an agent who left it); or nobody yet, and it waits with its
// conversation in the queue (queue.go). The worker asks before each
// delivery to IM (worker.go).

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// itemMessage selects the history's row of a customer's message by its
// outbox item and the customer: the newest, as SQLite may give a pruned
// item's id to a new one.
const itemMessage = `SELECT MAX(id) FROM messages WHERE outbox_id = ? AND openid = ? AND direction = 'in'`

// errParked is Recipient's word that a customer's message waits with its
// conversation in the queue, or will never go (the conversation closed
// while it waited): the item is finished either way.
var errParked = errors.New("parked: the conversation waits for an agent, or closed waiting")

// Recipient returns the agent a customer's message goes to: whoever has
// its conversation now, who may not be the agent it was queued for (a
// transfer; an agent who left it). While the conversation waits in the
// queue, the message waits with it, whole (its history row waiting again,
// its items finished), and errParked is returned; if the conversation
// closed while it waited, the message is not sent. A message with no
// conversation recorded goes where it was queued.
func (s *Store) Recipient(ctx context.Context, it OutboxItem) (string, error) {
	d := it.Delivery
	if d.Part > 0 && d.Conv != 0 {
		gone, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (bool, error) {
			if err := s.lockCustomer(ctx, tx, d.OpenID); err != nil {
				return false, err
			}
			return s.superseded(ctx, tx, it)
		})
		if err != nil {
			return "", fmt.Errorf("recipient: %w", err)
		}
		if gone {
			return "", errParked
		}
	}
	var agent string
	var closed bool
	err := s.readRow(ctx, `SELECT agent, closed_at IS NOT NULL FROM conversations WHERE id = ?`, d.Conv).Scan(&agent, &closed)
	switch {
	case d.Conv == 0 || errors.Is(err, sql.ErrNoRows):
		return d.Agent, nil
	case err != nil:
		return "", fmt.Errorf("recipient: %w", err)
	case agent == d.Agent:
		return agent, nil
	}
	// Under the customer's lock, as a transfer or takeFromQueue changes
	// who has the conversation: the message goes to whoever has it now.
	agent, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) (string, error) {
		if err := s.lockCustomer(ctx, tx, d.OpenID); err != nil {
			return "", err
		}
		if err := s.settleHistory(ctx, tx, d.OpenID, 0); err != nil { // the rows written below, history.go
			return "", err
		}
		var now string
		if err := s.queryRow(ctx, tx, `SELECT agent, closed_at IS NOT NULL FROM conversations WHERE id = ?`, d.Conv).Scan(&now, &closed); err != nil {
			return "", err
		}
		if now != "" { // the history says who received it
			_, err := s.exec(ctx, tx, `UPDATE messages SET agent = ? WHERE id = (`+itemMessage+`)`, now, it.ID, d.OpenID)
			return now, err
		}
		return "", s.park(ctx, tx, it, closed)
	})
	switch {
	case errors.Is(err, errCarried):
		return d.Agent, nil
	case err != nil:
		return "", fmt.Errorf("recipient: %w", err)
	case agent == "":
		return "", errParked
	}
	return agent, nil
}

// superseded finishes it, a later part of a long message, if its first
// part was parked (the whole message waits, or went on again as new
// items, or was not sent), and reports whether it did.
func (s *Store) superseded(ctx context.Context, tx *sql.Tx, it OutboxItem) (bool, error) {
	d := it.Delivery
	var n int
	err := s.queryRow(ctx, tx, `SELECT count(*) FROM messages WHERE conversation = ? AND direction = 'in' AND delivery LIKE ?
		AND (state IN (`+sqlWaiting+`, `+sqlNotSent+`) OR state = `+sqlQueued+` AND outbox_id > ?)`,
		d.Conv, fmt.Sprintf(`%%"msg_random":%d,%%`, d.MsgRandom-uint32(d.Part)), it.ID).Scan(&n)
	if err != nil || n == 0 {
		return false, err
	}
	switch ended, err := s.finish(ctx, tx, it, itemDone, errParked.Error(), time.Now()); {
	case err != nil:
		return false, err
	case !ended:
		return false, errNotHeld
	}
	return true, nil
}

// errCarried is park's word that a message's item is not the one its
// history row names (a later part of a long message whose first part
// went on): it goes where it was queued, with the rest of its message.
var errCarried = errors.New("carried where it was queued")

// park keeps the customer's message of item it waiting with its
// conversation, whole, or marks it not sent if the conversation closed,
// and finishes the item. A later part of a long message follows its first
// part: finished if that waits, else errCarried.
func (s *Store) park(ctx context.Context, tx *sql.Tx, it OutboxItem, closed bool) error {
	d := it.Delivery
	if d.Part > 0 {
		return errCarried // its first part went on: it follows (superseded said it was not parked)
	}
	var text string
	if err := s.queryRow(ctx, tx, `SELECT text FROM messages WHERE id = (`+itemMessage+`)`, it.ID, d.OpenID).Scan(&text); errors.Is(err, sql.ErrNoRows) {
		return errCarried
	} else if err != nil {
		return err
	}
	whole := d
	whole.MsgSeq, whole.Text = 0, text // a new item, a new MsgSeq; the whole text, split again when it goes
	state := stateWaiting
	if closed {
		state = stateNotSent
	}
	b, err := json.Marshal(whole) // kept even when not sent: the later parts know by it (superseded)
	if err != nil {
		return err
	}
	if _, err := s.exec(ctx, tx, `UPDATE messages SET state = ?, delivery = ?, outbox_id = 0 WHERE id = (`+itemMessage+`)`,
		string(state), string(b), it.ID, d.OpenID); err != nil {
		return err
	}
	switch ended, err := s.finish(ctx, tx, it, itemDone, errParked.Error(), time.Now()); {
	case err != nil:
		return err
	case !ended:
		return errNotHeld
	}
	return nil
}
