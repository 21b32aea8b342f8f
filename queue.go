package main

// Who serves whom, in the store: a new conversation goes to the online
// agent with the fewest open conversations (a tie: the one given a
// conversation longest ago, then the one listed first), below
// IM_AGENT_MAX_OPEN; with nobody free, or outside business hours, it waits
// in the queue (agent '') with the customer's messages, and the first agent
// to come online or free a place takes the longest-waiting customer
// (drain). An agent keeps their conversations while they are offline:
// presence only decides who gets new ones. IM's word on an agent's presence
// comes by State.StateChange or query_online_status; an agent IM has said
// nothing of is taken as online.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Assignment is a customer given to an agent, and how long they waited.
type Assignment struct {
	OpenID, Agent string
	Waited        time.Duration
}

// convState is a customer's conversation as a message finds it.
type convState struct {
	id     int64  // the open conversation, 0 if none
	agent  string // its agent, "" while it waits
	opened bool   // this message opened it
	// Read from the customer's row when it was looked up (not on the
	// open conversations' fast path, which only holds customers with
	// neither): replies held for their next message, and the
	// conversation an agent ended that their next message may rate.
	held       int
	ratingConv int64
}

// lockDesk serializes, on PostgreSQL, the transactions that change who
// serves whom (assignments, the queue, presence), until the transaction
// ends, so that no agent is given more than IM_AGENT_MAX_OPEN. SQLite's
// transactions are serial already.
func (s *Store) lockDesk(ctx context.Context, tx *sql.Tx) error {
	if !s.postgres {
		return nil
	}
	_, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext('desk'))`)
	return err
}

// findConversation returns the customer's open conversation, recording a
// customer the bridge has never seen (one who followed before it existed)
// and queueing the import of their IM account. On PostgreSQL it holds the
// customer's row until the transaction ends, so two instances taking two
// messages of one customer commit them one after the other.
func (s *Store) findConversation(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (convState, error) {
	if oc, ok := s.openConv[in.OpenID]; ok { // nil, and never found, on PostgreSQL
		return convState{id: oc.id, agent: oc.agent}, nil
	}
	var c convState
	err := s.queryRow(ctx, tx, `SELECT held, rating_conv FROM customers WHERE openid = ?`+s.lockRow(), in.OpenID).Scan(&c.held, &c.ratingConv)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		// Two instances racing here: one insert fails on the key and its
		// transaction runs again (inTx).
		if _, err := s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)`, in.OpenID, now.UnixMilli()); err != nil {
			return c, err
		}
		return c, s.enqueue(ctx, tx, Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, now)
	case err != nil:
		return c, err
	}
	// Read once the customer's row is held: on PostgreSQL a statement that
	// waited for the lock would see the conversation as it was before.
	err = s.queryRow(ctx, tx, `SELECT id, agent FROM conversations WHERE openid = ? AND closed_at IS NULL`, in.OpenID).Scan(&c.id, &c.agent)
	if errors.Is(err, sql.ErrNoRows) {
		return c, nil
	} else if err != nil {
		return c, err
	}
	if c.agent != "" && c.held == 0 {
		s.noteConversation(in.OpenID, c.id, c.agent)
	}
	return c, nil
}

// errNoConversation is returned for a customer who has never had a
// conversation.
var errNoConversation = errors.New("no conversation")

// lastConversation returns the customer's open conversation, or their last
// one, and its agent ("" while it waits); errNoConversation if none.
func (s *Store) lastConversation(ctx context.Context, tx *sql.Tx, openid string) (id int64, agent string, open bool, err error) {
	var closed sql.NullInt64
	err = s.queryRow(ctx, tx, `SELECT id, agent, closed_at FROM conversations WHERE openid = ? ORDER BY id DESC LIMIT 1`, openid).
		Scan(&id, &agent, &closed)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, "", false, errNoConversation
	}
	return id, agent, !closed.Valid, err
}

// startConversation opens a conversation for the customer: with an agent
// if the desk is open, nobody waits and an agent is free, else in the
// queue.
func (s *Store) startConversation(ctx context.Context, tx *sql.Tx, openid string, now time.Time) (convState, error) {
	if err := s.lockDesk(ctx, tx); err != nil {
		return convState{}, err
	}
	agent := ""
	if s.desk.Hours.Open(now) {
		waiting, err := s.queueLength(ctx, tx)
		if err != nil {
			return convState{}, err
		}
		if waiting == 0 {
			if agent, err = s.pickAgent(ctx, tx); err != nil {
				return convState{}, err
			}
		}
	}
	ms := now.UnixMilli()
	queuedAt, assignedAt := ms, int64(0)
	if agent != "" {
		queuedAt, assignedAt = 0, ms
	}
	c := convState{agent: agent, opened: true}
	err := s.queryRow(ctx, tx, `INSERT INTO conversations (openid, agent, opened_at, queued_at, assigned_at)
		VALUES (?, ?, ?, ?, ?) RETURNING id`, openid, agent, ms, queuedAt, assignedAt).Scan(&c.id)
	if err != nil || agent == "" {
		return c, err
	}
	return c, s.assigned(ctx, tx, openid, agent, now)
}

// assigned counts a conversation given to agent. The customer's next
// message looks the conversation up (findConversation), and the writer
// remembers it then, if no reply is held for them.
func (s *Store) assigned(ctx context.Context, tx *sql.Tx, openid string, agent string, now time.Time) error {
	s.noteConversation(openid, 0, "")
	_, err := s.exec(ctx, tx, `INSERT INTO agent_load (agent, open, assigned_at) VALUES (?, 1, ?)
		ON CONFLICT (agent) DO UPDATE SET open = agent_load.open + 1, assigned_at = excluded.assigned_at`, agent, now.UnixMilli())
	return err
}

// queueLength counts the customers waiting.
func (s *Store) queueLength(ctx context.Context, tx *sql.Tx) (int, error) {
	var n int
	err := s.queryRow(ctx, tx, `SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ''`).Scan(&n)
	return n, err
}

// queuePosition is the place in the queue of conversation conv, from 1.
func (s *Store) queuePosition(ctx context.Context, tx *sql.Tx, conv int64) (int, error) {
	var n int
	err := s.queryRow(ctx, tx, `SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = '' AND id <= ?`, conv).Scan(&n)
	return n, err
}

// agentState is an agent's row in agent_load.
type agentState struct {
	open, online int
	assignedAt   int64
}

// agentStates reads agent_load: an agent without a row has nothing open
// and is taken as online.
func (s *Store) agentStates(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) (map[string]agentState, error) {
	rows, err := q.QueryContext(ctx, `SELECT agent, open, online, assigned_at FROM agent_load`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	states := map[string]agentState{}
	for rows.Next() {
		var a string
		var st agentState
		if err := rows.Scan(&a, &st.open, &st.online, &st.assignedAt); err != nil {
			return nil, err
		}
		states[a] = st
	}
	return states, rows.Err()
}

// pickAgent returns the online agent of the desk with the fewest open
// conversations, below the cap; a tie goes to the one given a conversation
// longest ago, then to the one listed first. It returns "" if none is
// free.
func (s *Store) pickAgent(ctx context.Context, tx *sql.Tx) (string, error) {
	states, err := s.agentStates(ctx, tx)
	if err != nil {
		return "", err
	}
	return s.desk.pick(states), nil
}

// pick is pickAgent's choice among the agents' states.
func (d *Desk) pick(states map[string]agentState) string {
	best, bestState := "", agentState{}
	for _, a := range d.Agents {
		st, ok := states[a]
		if !ok {
			st.online = 1
		}
		if st.online == 0 || (d.MaxOpen > 0 && st.open >= d.MaxOpen) {
			continue
		}
		if best == "" || st.open < bestState.open || (st.open == bestState.open && st.assignedAt < bestState.assignedAt) {
			best, bestState = a, st
		}
	}
	return best
}

// maxDrain bounds the customers one transaction takes from the queue.
const maxDrain = 500

// drain gives the longest-waiting customers to the agents free to take
// them, while the desk is open: each is told AGENT_JOINED_TEXT, and their
// agent receives their waiting messages in order.
func (s *Store) drain(ctx context.Context, tx *sql.Tx, now time.Time) ([]Assignment, error) {
	if !s.desk.Hours.Open(now) {
		return nil, nil
	}
	if err := s.lockDesk(ctx, tx); err != nil {
		return nil, err
	}
	var out []Assignment
	for range maxDrain {
		var conv, queuedAt int64
		var openid string
		err := s.queryRow(ctx, tx, `SELECT id, openid, queued_at FROM conversations WHERE closed_at IS NULL AND agent = ''
			ORDER BY id LIMIT 1`).Scan(&conv, &openid, &queuedAt)
		if errors.Is(err, sql.ErrNoRows) {
			break
		} else if err != nil {
			return nil, err
		}
		agent, err := s.pickAgent(ctx, tx)
		if err != nil || agent == "" {
			return out, err
		}
		// The customer's row, as a message of theirs takes it: one being
		// committed now is among the waiting ones taken. Held by such a
		// transaction, the customer is left to the next drain, and the
		// queue behind them too, so that it keeps its order.
		if got, err := s.tryLockCustomer(ctx, tx, openid); err != nil || !got {
			return out, err
		}
		took, err := s.takeFromQueue(ctx, tx, openid, conv, agent, now)
		if err != nil {
			return nil, err
		}
		if took {
			out = append(out, Assignment{OpenID: openid, Agent: agent, Waited: now.Sub(time.UnixMilli(queuedAt))})
		}
	}
	return out, nil
}

// takeFromQueue gives waiting conversation conv to agent: the customer's
// waiting messages go to the agent in order, and the customer is told. It
// reports false if the conversation no longer waits (it closed meanwhile).
// The caller holds the customer's row.
func (s *Store) takeFromQueue(ctx context.Context, tx *sql.Tx, openid string, conv int64, agent string, now time.Time) (bool, error) {
	res, err := s.exec(ctx, tx, `UPDATE conversations SET agent = ?, assigned_at = ? WHERE id = ? AND closed_at IS NULL AND agent = ''`,
		agent, now.UnixMilli(), conv)
	if err != nil {
		return false, err
	}
	if n, err := res.RowsAffected(); err != nil || n == 0 {
		return false, err
	}
	if err := s.assigned(ctx, tx, openid, agent, now); err != nil {
		return false, err
	}
	// A conversation an agent left: its new agent reads how it went first.
	var from string
	if err := s.queryRow(ctx, tx, `SELECT requeued_from FROM conversations WHERE id = ?`, conv).Scan(&from); err != nil {
		return false, err
	}
	if from != "" {
		if _, err := s.exec(ctx, tx, `UPDATE conversations SET requeued_from = '' WHERE id = ?`, conv); err != nil {
			return false, err
		}
		summary, err := s.summary(ctx, tx, openid, conv, from+" was away, and the customer wrote: the conversation is yours now.")
		if err == nil {
			err = s.tellAgent(ctx, tx, openid, agent, summary, now)
		}
		if err != nil {
			return false, err
		}
	}
	parked, err := s.parked(ctx, tx, openid, stateWaiting)
	if err != nil {
		return false, err
	}
	for _, p := range parked {
		p.d.Agent = agent
		if err := s.release(ctx, tx, p, agent, 0, now); err != nil {
			return false, err
		}
	}
	d := Delivery{Kind: deliverWeChat, OpenID: openid, IMUser: s.desk.imUser(openid), Agent: agent, Text: s.desk.Texts.Joined}
	_, err = s.toCustomer(ctx, tx, conv, d, "", now)
	return err == nil, err
}

// rating returns the rating a customer's message gives, if it is one: a
// digit from 1 to 5 and nothing else (a full-width one too).
func rating(text string, elems []MsgElem) (int, bool) {
	if len(elems) > 0 {
		return 0, false
	}
	t := strings.TrimSpace(text)
	if r := []rune(t); len(r) == 1 && r[0] >= '１' && r[0] <= '５' {
		return int(r[0]-'１') + 1, true
	}
	n, err := strconv.Atoi(t)
	if err != nil || n < 1 || n > 5 || len(t) != 1 {
		return 0, false
	}
	return n, true
}

// ArmRating makes the customer's next message their rating of conversation
// conv, the question having reached them: unless they have written since,
// opening another.
func (s *Store) ArmRating(ctx context.Context, openid string, conv int64) error {
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if err := s.lockCustomer(ctx, tx, openid); err != nil {
			return err
		}
		_, err := s.exec(ctx, tx, `UPDATE customers SET rating_conv = ? WHERE openid = ?
			AND NOT EXISTS (SELECT 1 FROM conversations WHERE openid = ? AND (closed_at IS NULL OR id > ?))`, conv, openid, openid, conv)
		return err
	})
	if err != nil {
		return fmt.Errorf("arm rating: %w", err)
	}
	return nil
}

// rate stores a customer's rating with conversation conv, and shows it to
// its agent. It reports false, having done nothing, if the conversation is
// no longer kept (HISTORY_RETENTION, prune.go): the message is a message.
func (s *Store) rate(ctx context.Context, tx *sql.Tx, in Inbound, conv int64, n int, now time.Time) (bool, error) {
	var agent string
	switch err := s.queryRow(ctx, tx, `UPDATE conversations SET rating = ? WHERE id = ? RETURNING agent`, n, conv).Scan(&agent); {
	case errors.Is(err, sql.ErrNoRows):
		return false, nil
	case err != nil:
		return false, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE customers SET rating_conv = 0 WHERE openid = ?`, in.OpenID); err != nil {
		return true, err
	}
	if err := s.record(ctx, tx, historyRow{conv: conv, openid: in.OpenID, direction: "in", agent: agent, text: in.Text, state: stateRating}, now); err != nil {
		return true, err
	}
	return true, s.tellAgent(ctx, tx, in.OpenID, agent, fmt.Sprintf("The customer rated the conversation %d of 5.", n), now)
}

// closeConversation closes conv, by agent, idle or unfollow, and frees its
// agent's place; one closed while it waited keeps its messages unsent.
func (s *Store) closeConversation(ctx context.Context, tx *sql.Tx, openid string, conv int64, agent string, by ClosedBy, now time.Time) error {
	s.noteConversation(openid, 0, "")
	if _, err := s.exec(ctx, tx, `UPDATE conversations SET closed_at = ?, closed_by = ? WHERE id = ?`, now.UnixMilli(), by, conv); err != nil {
		return err
	}
	if agent == "" {
		// It closed waiting: its messages reach no agent.
		_, err := s.exec(ctx, tx, `UPDATE messages SET state = `+sqlNotSent+`, delivery = '' WHERE openid = ? AND state = `+sqlWaiting+``, openid)
		return err
	}
	if err := s.lockDesk(ctx, tx); err != nil { // agent_load is the desk's
		return err
	}
	_, err := s.exec(ctx, tx, `UPDATE agent_load SET open = open - 1 WHERE agent = ?`, agent)
	return err
}

// imUser is the IM account of the customer openid.
func (d *Desk) imUser(openid string) string { return d.UserPrefix + openid }

// agentListed reports whether agent is one of the desk's.
func (d *Desk) agentListed(agent string) bool { return slices.Contains(d.Agents, agent) }

// waitingReply is the passive reply to a message of a waiting customer:
// OFFLINE_TEXT outside business hours, else QUEUED_TEXT with their place.
func (s *Store) waitingReply(ctx context.Context, tx *sql.Tx, conv int64, now time.Time) (string, error) {
	if !s.desk.Hours.Open(now) {
		return replyOffline, nil
	}
	pos, err := s.queuePosition(ctx, tx, conv)
	return replyQueued + strconv.Itoa(pos), err
}
