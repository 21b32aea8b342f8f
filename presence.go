package main

// The store's part of the desk's clock and presence (sessions.go,
// callback.go): an agent's login, logout or lost connection recorded, idle
// conversations closed, waiting customers given to agents who came free,
// and the desk's figures for /metrics. Who gets whom is queue.go's.

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// SetPresence records IM's word that agent is online or not, said at at
// (a State.StateChange's EventTime, or the time of a query): a word older
// than the last one recorded changes nothing. An agent coming online
// takes the longest-waiting customers it has room for.
func (s *Store) SetPresence(ctx context.Context, agent string, online bool, at, now time.Time) ([]Assignment, error) {
	on := 0
	if online {
		on = 1
	}
	out, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) ([]Assignment, error) {
		if err := s.lockDesk(ctx, tx); err != nil {
			return nil, err
		}
		if _, err := s.exec(ctx, tx, `INSERT INTO agent_load (agent, online, presence_at) VALUES (?, ?, ?)
			ON CONFLICT (agent) DO UPDATE SET online = excluded.online, presence_at = excluded.presence_at
			WHERE agent_load.presence_at <= excluded.presence_at`, agent, on, at.UnixMilli()); err != nil {
			return nil, err
		}
		if !online {
			return nil, nil
		}
		return s.drain(ctx, tx, now)
	})
	if err != nil {
		return nil, fmt.Errorf("set presence: %w", err)
	}
	return out, nil
}

// Swept is what a sweep did: the conversations it closed for being idle,
// and the customers it took from the queue.
type Swept struct {
	Closed   int
	Assigned []Assignment
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
	var waiting int
	if err := s.rdb.QueryRowContext(ctx, `SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ''`).Scan(&waiting); err != nil {
		return Swept{}, fmt.Errorf("sweep: %w", err)
	}
	if len(stale) == 0 && (waiting == 0 || !s.desk.Hours.Open(now)) {
		return Swept{}, nil
	}
	sw, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (Swept, error) {
		var sw Swept
		if err := s.lockDesk(ctx, tx); err != nil {
			return sw, err
		}
		for _, c := range stale {
			closed, err := s.closeIdle(ctx, tx, c, idle, now)
			if err != nil {
				return sw, err
			}
			if closed {
				sw.Closed++
			}
		}
		var err error
		sw.Assigned, err = s.drain(ctx, tx, now)
		return sw, err
	})
	if err != nil {
		return Swept{}, fmt.Errorf("sweep: %w", err)
	}
	return sw, nil
}

// closeIdle closes c if it is still open with the same agent and still
// idle (a message may have come since it was read).
func (s *Store) closeIdle(ctx context.Context, tx *sql.Tx, c idleConv, idle time.Duration, now time.Time) (bool, error) {
	if err := s.lockCustomer(ctx, tx, c.openid); err != nil {
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
	if err := s.closeConversation(ctx, tx, c.openid, c.id, c.agent, "idle", now); err != nil {
		return false, err
	}
	d := Delivery{Kind: deliverWeChat, OpenID: c.openid, IMUser: s.desk.imUser(c.openid), Agent: c.agent, Text: s.desk.Texts.IdleClosed}
	if _, err := s.toCustomer(ctx, tx, c.id, d, "", now); err != nil {
		return false, err
	}
	return true, s.tellAgent(ctx, tx, c.openid, c.agent, fmt.Sprintf("The conversation closed after %s without a message.", idle), now)
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
