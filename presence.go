package main

// The store's part of the desk's clock and presence (deskclock.go,
// callback.go): an agent's login, logout or lost connection recorded, idle
// conversations closed, waiting customers given to agents who came free,
// and the desk's figures for /metrics. Who gets whom is queue.go's.

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Presence, as the desk keeps it in agent_load: online decides who gets new
// customers; gone_at is when the agent's conversations are left without
// them if they are still away, 0 while they are here. Neither word says
// which device: a Logout takes the agent offline for new customers, and
// leaves their conversations once a reading asked after it says they are
// offline everywhere; a Disconnect leaves them online until a reading says
// otherwise, and their conversations until AGENT_AWAY_GRACE passes without
// a Login. Readings that fail leave either to the grace. IM's words (State.StateChange) are ordered by their
// EventTime and counted in events; a reading of query_online_status is
// taken only if no word came since it was asked for (ReadingTaken), so it
// never undoes one.

// PresenceEvent records IM's word that agent did action (Login, Logout or
// Disconnect) at at, IM's EventTime: a word older than the last one taken
// changes nothing. An agent coming online takes the longest-waiting
// customers it has room for.
func (s *Store) PresenceEvent(ctx context.Context, agent, action string, at, now time.Time) ([]Assignment, error) {
	var set string
	switch action {
	case "Login":
		set = `online = 1, gone_at = 0, logged_out = 0`
	case "Logout": // from one device: a reading tells whether another is still online
		set = `online = 0, logged_out = 1, gone_at = CASE WHEN agent_load.gone_at = 0 THEN ? ELSE agent_load.gone_at END`
	case "Disconnect":
		set = `gone_at = CASE WHEN agent_load.gone_at = 0 THEN ? ELSE agent_load.gone_at END`
	default:
		return nil, fmt.Errorf("presence: unknown action %q", action)
	}
	gone := now.Add(s.desk.AwayGrace).UnixMilli()
	out, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) ([]Assignment, error) {
		if err := s.lockDesk(ctx, tx); err != nil {
			return nil, err
		}
		if _, err := s.exec(ctx, tx, `INSERT INTO agent_load (agent) VALUES (?) ON CONFLICT (agent) DO NOTHING`, agent); err != nil {
			return nil, err
		}
		args := []any{at.UnixMilli(), agent, at.UnixMilli()}
		if action != "Login" {
			args = append([]any{gone}, args...)
		}
		if _, err := s.exec(ctx, tx, `UPDATE agent_load SET `+set+`, presence_at = ?, events = events + 1
			WHERE agent = ? AND presence_at <= ?`, args...); err != nil {
			return nil, err
		}
		if action != "Login" {
			return nil, nil
		}
		return s.drain(ctx, tx, now)
	})
	if err != nil {
		return nil, fmt.Errorf("presence event: %w", err)
	}
	return out, nil
}

// PresenceEvents returns how many of IM's words on each agent were taken:
// a reading asked for after this is taken only for the agents whose count
// has not changed when it is answered.
func (s *Store) PresenceEvents(ctx context.Context) (map[string]int64, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT agent, events FROM agent_load`)
	if err != nil {
		return nil, fmt.Errorf("presence: %w", err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var a string
		var n int64
		if err := rows.Scan(&a, &n); err != nil {
			return nil, fmt.Errorf("presence: %w", err)
		}
		out[a] = n
	}
	return out, rows.Err()
}

// ReadingTaken records a reading of agent's presence, asked for when IM's
// words on them numbered events: online, or not (Offline or PushOnline). A
// word taken since wins. An agent read offline stays here for
// AGENT_AWAY_GRACE, unless a word already started that; one read online
// is here. An agent coming online takes the longest-waiting customers.
func (s *Store) ReadingTaken(ctx context.Context, agent string, online bool, events int64, now time.Time) ([]Assignment, error) {
	out, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) ([]Assignment, error) {
		if err := s.lockDesk(ctx, tx); err != nil {
			return nil, err
		}
		if _, err := s.exec(ctx, tx, `INSERT INTO agent_load (agent) VALUES (?) ON CONFLICT (agent) DO NOTHING`, agent); err != nil {
			return nil, err
		}
		if online {
			_, err := s.exec(ctx, tx, `UPDATE agent_load SET online = 1, gone_at = 0, logged_out = 0 WHERE agent = ? AND events = ?`, agent, events)
			if err != nil {
				return nil, err
			}
			return s.drain(ctx, tx, now)
		}
		// Offline after a Logout: gone now, on every device. Else (a lost
		// connection, or no word at all) the grace runs.
		_, err := s.exec(ctx, tx, `UPDATE agent_load SET online = 0,
			gone_at = CASE WHEN logged_out = 1 THEN ? WHEN gone_at = 0 THEN ? ELSE gone_at END WHERE agent = ? AND events = ?`,
			now.UnixMilli(), now.Add(s.desk.AwayGrace).UnixMilli(), agent, events)
		return nil, err
	})
	if err != nil {
		return nil, fmt.Errorf("presence reading: %w", err)
	}
	return out, nil
}

// Swept is what a sweep did: the conversations it closed for being idle,
// those it took from agents who left them, and the customers it took from
// the queue.
type Swept struct {
	Closed, Requeued int
	Assigned         []Assignment
}

// abandonedConversation is the condition on conversation v of being open
// with an agent who has left it: gone since before now (its argument) and
// offline, with the customer's last message after the agent's; or no longer
// one of the desk's (whose names follow it: see leftConversations).
const abandonedConversation = `v.closed_at IS NULL AND v.agent <> '' AND (
	EXISTS (SELECT 1 FROM agent_load a WHERE a.agent = v.agent AND a.online = 0 AND a.gone_at > 0 AND a.gone_at <= ?)
	AND COALESCE((SELECT MAX(m.id) FROM messages m WHERE m.openid = v.openid AND m.conversation = v.id AND m.direction = 'in'), 0) >
		COALESCE((SELECT MAX(m.id) FROM messages m WHERE m.openid = v.openid AND m.conversation = v.id AND m.direction = 'out' AND m.agent = v.agent), 0)
	OR v.agent NOT IN (`

// leftCondition is abandonedConversation with its arguments: now, and the
// desk's agents.
func (s *Store) leftCondition(now time.Time) (string, []any) {
	args := []any{now.UnixMilli()}
	marks := make([]string, len(s.desk.Agents))
	for i, a := range s.desk.Agents {
		marks[i], args = "?", append(args, a)
	}
	return abandonedConversation + strings.Join(marks, ", ") + "))", args
}

// idleConversation is the condition on conversation v of being open with
// an agent, given to them and without a message both before the cutoff (its
// two arguments): the latest time in the customer's history, either way
// (not the newest row's: a held reply, once sent, is a new row that keeps
// the time it was written).
const idleConversation = `v.closed_at IS NULL AND v.agent <> '' AND v.assigned_at < ?
	AND COALESCE((SELECT MAX(m.created_at) FROM messages m WHERE m.openid = v.openid), 0) < ?`

// idleConv is an open conversation without a message since the cutoff.
type idleConv struct {
	id            int64
	openid, agent string
}

// Sweep closes the conversations without a message for idle (if idle > 0),
// telling the customer IDLE_CLOSED_TEXT and the agent, and gives waiting
// customers to free agents (the desk may have just opened). It reads
// first, and writes only when there is something to do.
func (s *Store) Sweep(ctx context.Context, idle time.Duration, now time.Time) (Swept, error) {
	var stale []idleConv
	if idle > 0 {
		cutoff := now.Add(-idle).UnixMilli()
		rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT v.id, v.openid, v.agent FROM conversations v WHERE `+idleConversation+`
			ORDER BY v.id LIMIT `+fmt.Sprint(maxDrain)), cutoff, cutoff)
		if err != nil {
			return Swept{}, fmt.Errorf("sweep: %w", err)
		}
		for rows.Next() {
			var c idleConv
			if err := rows.Scan(&c.id, &c.openid, &c.agent); err != nil {
				rows.Close()
				return Swept{}, fmt.Errorf("sweep: %w", err)
			}
			stale = append(stale, c)
		}
		if err := cmp.Or(rows.Err(), rows.Close()); err != nil {
			return Swept{}, fmt.Errorf("sweep: %w", err)
		}
	}
	if err := s.settleGone(ctx, now); err != nil {
		return Swept{}, fmt.Errorf("sweep: %w", err)
	}
	left, err := s.leftConversations(ctx, now)
	if err != nil {
		return Swept{}, fmt.Errorf("sweep: %w", err)
	}
	var waiting, away int
	if err := s.rdb.QueryRowContext(ctx, s.q(`SELECT (SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ''),
		(SELECT COUNT(*) FROM agent_load WHERE online = 1 AND gone_at > 0 AND gone_at <= ?)`), now.UnixMilli()).Scan(&waiting, &away); err != nil {
		return Swept{}, fmt.Errorf("sweep: %w", err)
	}
	if len(stale) == 0 && len(left) == 0 && away == 0 && (waiting == 0 || !s.desk.Hours.Open(now)) {
		return Swept{}, nil
	}
	// Each conversation in a transaction of its own: the customer, then
	// the desk (the lock order, db.go).
	var sw Swept
	for _, c := range stale {
		closed, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (bool, error) { return s.closeIdle(ctx, tx, c, idle, now) })
		if err != nil {
			return sw, fmt.Errorf("sweep: %w", err)
		}
		if closed {
			sw.Closed++
		}
	}
	for _, c := range left {
		requeued, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (bool, error) { return s.requeue(ctx, tx, c, now) })
		if err != nil {
			return sw, fmt.Errorf("sweep: %w", err)
		}
		if requeued {
			sw.Requeued++
		}
	}
	sw.Assigned, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) ([]Assignment, error) {
		if err := s.lockDesk(ctx, tx); err != nil {
			return nil, err
		}
		// Agents away for AGENT_AWAY_GRACE, no reading or Login having
		// said otherwise, are offline.
		if _, err := s.exec(ctx, tx, `UPDATE agent_load SET online = 0 WHERE online = 1 AND gone_at > 0 AND gone_at <= ?`, now.UnixMilli()); err != nil {
			return nil, err
		}
		return s.drain(ctx, tx, now)
	})
	if err != nil {
		return sw, fmt.Errorf("sweep: %w", err)
	}
	return sw, nil
}

// closeIdle closes c if it is still open with the same agent and still
// idle (a message may have come since it was read).
func (s *Store) closeIdle(ctx context.Context, tx *sql.Tx, c idleConv, idle time.Duration, now time.Time) (bool, error) {
	if err := s.lockCustomer(ctx, tx, c.openid); err != nil {
		return false, err
	}
	// A message the history owes is not idle (history.go).
	if err := s.settleHistory(ctx, tx, c.openid, 0); err != nil {
		return false, err
	}
	cutoff := now.Add(-idle).UnixMilli()
	var one int
	err := s.queryRow(ctx, tx, `SELECT 1 FROM conversations v WHERE v.id = ? AND v.agent = ? AND `+idleConversation,
		c.id, c.agent, cutoff, cutoff).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	if err := s.closeConversation(ctx, tx, c.openid, c.id, c.agent, closedByIdle, now); err != nil {
		return false, err
	}
	d := Delivery{Kind: deliverWeChat, OpenID: c.openid, IMUser: s.desk.imUser(c.openid), Agent: c.agent, Text: s.desk.Texts.IdleClosed}
	if _, err := s.toCustomer(ctx, tx, c.id, d, "", now); err != nil {
		return false, err
	}
	return true, s.tellAgent(ctx, tx, c.openid, c.agent, fmt.Sprintf("The conversation closed after %s without a message.", idle), now)
}

// settleGone writes the history rows owed by the customers of the open
// conversations whose agents are gone, so that abandonedConversation sees
// their messages (history.go), in one transaction; a customer whose row
// another holds is left to the next sweep. PostgreSQL's index names the
// customers who owe rows; SQLite's writer knows them from its lanes.
func (s *Store) settleGone(ctx context.Context, now time.Time) error {
	owing := ""
	if s.postgres {
		owing = ` AND EXISTS (SELECT 1 FROM outbox o WHERE o.lane = 'im:' || v.openid AND o.state = ` + sqlPending + `
			AND o.history_owed = 1 AND o.id > (SELECT c.history_settled FROM customers c WHERE c.openid = v.openid))`
	}
	rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT v.openid FROM conversations v WHERE v.closed_at IS NULL AND v.agent <> ''
		AND EXISTS (SELECT 1 FROM agent_load a WHERE a.agent = v.agent AND a.online = 0 AND a.gone_at > 0 AND a.gone_at <= ?)`+owing),
		now.UnixMilli())
	if err != nil {
		return err
	}
	var openids []string
	for rows.Next() {
		var o string
		if err := rows.Scan(&o); err != nil {
			rows.Close()
			return err
		}
		openids = append(openids, o)
	}
	if err := cmp.Or(rows.Err(), rows.Close()); err != nil || len(openids) == 0 {
		return err
	}
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		for _, o := range openids {
			if held, err := s.tryLockCustomer(ctx, tx, o); err != nil {
				return err
			} else if held {
				if err := s.settleHistory(ctx, tx, o, 0); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// leftConversations returns the conversations whose agents have left
// them (abandonedConversation), oldest first.
func (s *Store) leftConversations(ctx context.Context, now time.Time) ([]idleConv, error) {
	cond, args := s.leftCondition(now)
	rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT v.id, v.openid, v.agent FROM conversations v WHERE `+cond+`
		ORDER BY v.id LIMIT `+fmt.Sprint(maxDrain)), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []idleConv
	for rows.Next() {
		var c idleConv
		if err := rows.Scan(&c.id, &c.openid, &c.agent); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// requeue puts c back in the queue if its agent has still left it: ahead
// of the customers who came after it (the queue is in the order
// conversations opened), for the next free agent, who reads how it went
// so far (takeFromQueue). The agent who left it is told, if still one of
// the desk's.
func (s *Store) requeue(ctx context.Context, tx *sql.Tx, c idleConv, now time.Time) (bool, error) {
	if err := s.lockCustomer(ctx, tx, c.openid); err != nil {
		return false, err
	}
	if err := s.settleHistory(ctx, tx, c.openid, 0); err != nil { // history.go
		return false, err
	}
	cond, args := s.leftCondition(now)
	res, err := s.exec(ctx, tx, `UPDATE conversations SET agent = '', queued_at = ?, requeued_from = ?
		WHERE id IN (SELECT v.id FROM conversations v WHERE v.id = ? AND v.agent = ? AND `+cond+`)`,
		append([]any{now.UnixMilli(), c.agent, c.id, c.agent}, args...)...)
	if err != nil {
		return false, err
	}
	if n, err := res.RowsAffected(); err != nil || n == 0 {
		return false, err
	}
	s.noteConversation(c.openid, 0, "")
	if err := s.lockDesk(ctx, tx); err != nil {
		return false, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE agent_load SET open = open - 1 WHERE agent = ?`, c.agent); err != nil {
		return false, err
	}
	if !s.desk.agentListed(c.agent) {
		return true, nil
	}
	return true, s.tellAgent(ctx, tx, c.openid, c.agent, "The customer wrote while you were away: the conversation went to the next free agent.", now)
}

// DeskStats are the desk's figures for /metrics.
type DeskStats struct {
	Waiting int
	Agents  []AgentStats // the desk's agents, in order
}

// AgentStats are one agent's figures.
type AgentStats struct {
	Agent        string
	Open, Online int
}

// DeskStats returns how many customers wait, and each agent's open
// conversations and presence.
func (s *Store) DeskStats(ctx context.Context) (DeskStats, error) {
	var d DeskStats
	if err := s.rdb.QueryRowContext(ctx, `SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ''`).Scan(&d.Waiting); err != nil {
		return d, fmt.Errorf("desk stats: %w", err)
	}
	states, err := s.agentStates(ctx, s.rdb)
	if err != nil {
		return d, fmt.Errorf("desk stats: %w", err)
	}
	for _, a := range s.desk.Agents {
		st, ok := states[a]
		if !ok {
			st.online = 1
		}
		d.Agents = append(d.Agents, AgentStats{Agent: a, Open: st.open, Online: st.online})
	}
	return d, nil
}
