package main

import (
	"context"
	"database/sql"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the pure-Go "sqlite" driver
)

//go:embed schema.sql
var schemaSQL string

// Store keeps the bridge's durable state: customers, conversations, the keys
// of accepted pushes and callbacks, and the outbox. Every method that accepts
// work commits it in one transaction before it returns.
type Store struct {
	db *sql.DB
}

// openStore opens the SQLite database at path, creating it if need be, and
// applies the schema.
func openStore(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	// One connection: SQLite allows one writer, and the bridge's reads are
	// small; this keeps every transaction free of SQLITE_BUSY.
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, schemaSQL); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store: apply schema: %w", err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// Delivery kinds: what an outbox item asks a vendor to do.
const (
	deliverIMImport = "im_import" // account_import of a customer's IM account
	deliverIMDelete = "im_delete" // account_delete of a customer's IM account
	deliverIMSend   = "im_send"   // openim/sendmsg from a customer to their agent
	deliverWeChat   = "wx_send"   // custom/send of an agent's reply to a customer
)

// Delivery is one call the bridge owes a vendor, as kept in the outbox.
// MsgSeq and MsgRandom are chosen once, so every retry of a sendmsg is the
// same message to IM, which drops repeats within 120 s.
type Delivery struct {
	Kind      string `json:"kind"`
	OpenID    string `json:"openid"`
	IMUser    string `json:"im_user"`
	Agent     string `json:"agent,omitempty"`
	Text      string `json:"text,omitempty"`
	MsgSeq    uint32 `json:"msg_seq,omitempty"`
	MsgRandom uint32 `json:"msg_random,omitempty"`
}

// lane is the outbox lane of d: one per customer and direction, so that a
// customer's messages and an agent's replies each keep their order, and a
// slow vendor on one side never holds up the other.
func (d Delivery) lane() string {
	if d.Kind == deliverWeChat {
		return "wx:" + d.OpenID
	}
	return "im:" + d.OpenID
}

// Reply kinds kept with a push key, so a retried push gets the same answer.
const (
	replyNone       = ""
	replyWelcome    = "welcome"
	replyConnecting = "connecting"
)

// pushAction is what a push asks of the store.
type pushAction int

const (
	actNone pushAction = iota
	actFollow
	actUnfollow
	actMessage
)

// Inbound is a push the handler decoded and decided on.
type Inbound struct {
	Key    string     // pushKey of the push
	SigKey string     // the push's signed query (timestamp, nonce, signature)
	Action pushAction // what it asks for
	OpenID string
	IMUser string   // the customer's IM UserID
	Text   string   // for actMessage: what the agent reads
	Agents []string // the agents a new conversation may go to, in order
	// NewRandom returns a fresh uint32 for MsgSeq and MsgRandom.
	NewRandom func() uint32
}

// Accepted says how a push was taken.
type Accepted struct {
	Duplicate bool   // the key was seen before: nothing new was committed
	Reply     string // replyNone, replyWelcome or replyConnecting
}

// errReplay is returned for a push whose signed query was already used by
// a different push: someone replays a captured URL with another body.
var errReplay = errors.New("signed query already used for another push")

// AcceptPush commits what in asks for together with its key, in one
// transaction: a follow imports the customer's IM account, an unfollow closes
// the conversation and deletes it, and a message opens a conversation if
// none is open (assigning an agent) and queues the message to IM. A key seen
// before commits nothing and returns Duplicate with the first answer's reply.
// The push's signed query is bound to its key: the same query carrying
// another push returns errReplay and commits nothing.
func (s *Store) AcceptPush(ctx context.Context, in Inbound, now time.Time) (Accepted, error) {
	var acc Accepted
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		prev, dup, err := claimKey(ctx, tx, in.Key, "", now)
		if err != nil || dup {
			acc = Accepted{Duplicate: dup, Reply: prev}
			return err
		}
		if in.SigKey != "" {
			signed, dup, err := claimKey(ctx, tx, in.SigKey, in.Key, now)
			if err != nil {
				return err
			}
			if dup && signed != in.Key {
				return errReplay
			}
		}
		ms := now.UnixMilli()
		switch in.Action {
		case actFollow:
			acc.Reply = replyWelcome
			if _, err := tx.ExecContext(ctx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)
				ON CONFLICT (openid) DO UPDATE SET followed = 1`, in.OpenID, ms); err != nil {
				return err
			}
			if err := enqueue(ctx, tx, Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, now); err != nil {
				return err
			}
		case actUnfollow:
			if _, err := tx.ExecContext(ctx, `UPDATE customers SET followed = 0 WHERE openid = ?`, in.OpenID); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE conversations SET closed_at = ? WHERE openid = ? AND closed_at IS NULL`, ms, in.OpenID); err != nil {
				return err
			}
			if err := enqueue(ctx, tx, Delivery{Kind: deliverIMDelete, OpenID: in.OpenID, IMUser: in.IMUser}, now); err != nil {
				return err
			}
		case actMessage:
			agent, opened, err := s.openConversation(ctx, tx, in, now)
			if err != nil {
				return err
			}
			if opened {
				acc.Reply = replyConnecting
			}
			d := Delivery{Kind: deliverIMSend, OpenID: in.OpenID, IMUser: in.IMUser, Agent: agent, Text: in.Text,
				MsgSeq: in.NewRandom(), MsgRandom: in.NewRandom()}
			if err := enqueue(ctx, tx, d, now); err != nil {
				return err
			}
		}
		_, err = tx.ExecContext(ctx, `UPDATE seen_keys SET value = ? WHERE key = ?`, acc.Reply, in.Key)
		return err
	})
	if err != nil {
		return Accepted{}, fmt.Errorf("accept push: %w", err)
	}
	return acc, nil
}

// openConversation returns the agent of the customer's open conversation,
// opening one if there is none. A customer the bridge has never seen (one
// who followed before it existed) is recorded and their IM account imported
// first. A new conversation goes to the customer's own agent while that agent
// is still configured, else to the agent with the fewest open conversations.
func (s *Store) openConversation(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (agent string, opened bool, err error) {
	ms := now.UnixMilli()
	err = tx.QueryRowContext(ctx, `SELECT agent FROM conversations WHERE openid = ? AND closed_at IS NULL`, in.OpenID).Scan(&agent)
	if err == nil {
		return agent, false, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return "", false, err
	}
	var kept string
	err = tx.QueryRowContext(ctx, `SELECT agent FROM customers WHERE openid = ?`, in.OpenID).Scan(&kept)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		if _, err := tx.ExecContext(ctx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)`, in.OpenID, ms); err != nil {
			return "", false, err
		}
		if err := enqueue(ctx, tx, Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, now); err != nil {
			return "", false, err
		}
	case err != nil:
		return "", false, err
	}
	agent = kept
	if !slices.Contains(in.Agents, agent) {
		if agent, err = leastLoadedAgent(ctx, tx, in.Agents); err != nil {
			return "", false, err
		}
	}
	if _, err := tx.ExecContext(ctx, `UPDATE customers SET agent = ?, followed = 1 WHERE openid = ?`, agent, in.OpenID); err != nil {
		return "", false, err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO conversations (openid, agent, opened_at) VALUES (?, ?, ?)`, in.OpenID, agent, ms); err != nil {
		return "", false, err
	}
	return agent, true, nil
}

// leastLoadedAgent returns the agent with the fewest open conversations; a
// tie goes to the agent listed first.
func leastLoadedAgent(ctx context.Context, tx *sql.Tx, agents []string) (string, error) {
	if len(agents) == 0 {
		return "", errors.New("no agents configured")
	}
	rows, err := tx.QueryContext(ctx, `SELECT agent, COUNT(*) FROM conversations WHERE closed_at IS NULL GROUP BY agent`)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	load := map[string]int{}
	for rows.Next() {
		var a string
		var n int
		if err := rows.Scan(&a, &n); err != nil {
			return "", err
		}
		load[a] = n
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	best := agents[0]
	for _, a := range agents[1:] {
		if load[a] < load[best] {
			best = a
		}
	}
	return best, nil
}

// errUnknownCustomer is returned for a reply to an IM account the bridge has
// no customer for.
var errUnknownCustomer = errors.New("unknown customer")

// AcceptReply commits an agent's reply to a customer, keyed by the IM
// message's key: it queues the reply to WeChat. A key seen before commits
// nothing and returns true; a customer the bridge does not know returns
// errUnknownCustomer and commits nothing.
func (s *Store) AcceptReply(ctx context.Context, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM customers WHERE openid = ?`, d.OpenID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return errUnknownCustomer
		} else if err != nil {
			return err
		}
		if _, duplicate, err = claimKey(ctx, tx, key, "", now); err != nil || duplicate {
			return err
		}
		return enqueue(ctx, tx, d, now)
	})
	if err != nil {
		return false, fmt.Errorf("accept reply: %w", err)
	}
	return duplicate, nil
}

// claimKey records key as seen, with value. If it was seen before it returns
// the value kept with it and dup true.
func claimKey(ctx context.Context, tx *sql.Tx, key, value string, now time.Time) (prev string, dup bool, err error) {
	res, err := tx.ExecContext(ctx, `INSERT INTO seen_keys (key, value, received_at) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING`, key, value, now.UnixMilli())
	if err != nil {
		return "", false, err
	}
	if n, err := res.RowsAffected(); err != nil || n == 1 {
		return "", false, err
	}
	err = tx.QueryRowContext(ctx, `SELECT value FROM seen_keys WHERE key = ?`, key).Scan(&prev)
	return prev, true, err
}

// enqueue adds d to the outbox, due now.
func enqueue(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	ms := now.UnixMilli()
	_, err = tx.ExecContext(ctx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?)`,
		d.lane(), string(b), ms, ms, ms)
	return err
}

// OutboxItem is one pending delivery.
type OutboxItem struct {
	ID        int64
	Lane      string
	Delivery  Delivery
	Attempts  int
	NextAt    time.Time
	CreatedAt time.Time
}

// DueHeads returns up to limit lanes' first pending items that are due at
// now, skipping the lanes in busy. Only a lane's first item is ever returned,
// so a lane is delivered in order.
func (s *Store) DueHeads(ctx context.Context, now time.Time, limit int, busy map[string]bool) ([]OutboxItem, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT o.id, o.lane, o.delivery, o.attempts, o.next_at, o.created_at FROM outbox o
		WHERE o.state = 'pending' AND o.next_at <= ?
		  AND o.id = (SELECT MIN(id) FROM outbox WHERE lane = o.lane AND state = 'pending')
		ORDER BY o.id LIMIT ?`, now.UnixMilli(), limit+len(busy))
	if err != nil {
		return nil, fmt.Errorf("due heads: %w", err)
	}
	defer rows.Close()
	var items []OutboxItem
	for rows.Next() {
		it, err := scanItem(rows)
		if err != nil {
			return nil, fmt.Errorf("due heads: %w", err)
		}
		if !busy[it.Lane] && len(items) < limit {
			items = append(items, it)
		}
	}
	return items, rows.Err()
}

// LaneHead returns the first pending item of lane if it is due at now; ok is
// false when the lane is empty or its head is waiting for a retry.
func (s *Store) LaneHead(ctx context.Context, lane string, now time.Time) (it OutboxItem, ok bool, err error) {
	row := s.db.QueryRowContext(ctx, `
		SELECT id, lane, delivery, attempts, next_at, created_at FROM outbox
		WHERE lane = ? AND state = 'pending' ORDER BY id LIMIT 1`, lane)
	it, err = scanItem(row)
	if errors.Is(err, sql.ErrNoRows) {
		return OutboxItem{}, false, nil
	}
	if err != nil {
		return OutboxItem{}, false, fmt.Errorf("lane head: %w", err)
	}
	return it, !it.NextAt.After(now), nil
}

// NextDue returns when the earliest pending item falls due, and false if
// nothing is pending.
func (s *Store) NextDue(ctx context.Context) (time.Time, bool, error) {
	var next sql.NullInt64
	if err := s.db.QueryRowContext(ctx, `SELECT MIN(next_at) FROM outbox WHERE state = 'pending'`).Scan(&next); err != nil {
		return time.Time{}, false, fmt.Errorf("next due: %w", err)
	}
	return time.UnixMilli(next.Int64), next.Valid, nil
}

// Delivered marks an item done.
func (s *Store) Delivered(ctx context.Context, id int64, now time.Time) error {
	return s.setState(ctx, id, "done", "", now.UnixMilli(), now)
}

// RetryLater records a failed attempt and makes the item due again at next.
func (s *Store) RetryLater(ctx context.Context, id int64, reason string, next, now time.Time) error {
	return s.setState(ctx, id, "pending", reason, next.UnixMilli(), now)
}

// GiveUp marks an item failed for good, keeping the reason.
func (s *Store) GiveUp(ctx context.Context, id int64, reason string, now time.Time) error {
	return s.setState(ctx, id, "failed", reason, now.UnixMilli(), now)
}

func (s *Store) setState(ctx context.Context, id int64, state, reason string, next int64, now time.Time) error {
	_, err := s.db.ExecContext(ctx, `UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, next_at = ?, updated_at = ? WHERE id = ?`,
		state, reason, next, now.UnixMilli(), id)
	if err != nil {
		return fmt.Errorf("outbox set %s: %w", state, err)
	}
	return nil
}

// OutboxCounts returns how many items are in each state.
func (s *Store) OutboxCounts(ctx context.Context) (map[string]int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT state, COUNT(*) FROM outbox GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("outbox counts: %w", err)
	}
	defer rows.Close()
	counts := map[string]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, err
		}
		counts[st] = n
	}
	return counts, rows.Err()
}

// Failed returns the items given up on, oldest first, with their reasons.
func (s *Store) Failed(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT lane, delivery, last_error FROM outbox WHERE state = 'failed' ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("failed items: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var lane, d, reason string
		if err := rows.Scan(&lane, &d, &reason); err != nil {
			return nil, err
		}
		out = append(out, strings.Join([]string{lane, d, reason}, " | "))
	}
	return out, rows.Err()
}

// PruneKeys forgets push and callback keys received before cutoff; vendors
// retry within seconds, so old keys only cost space.
func (s *Store) PruneKeys(ctx context.Context, cutoff time.Time) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM seen_keys WHERE received_at < ?`, cutoff.UnixMilli()); err != nil {
		return fmt.Errorf("prune keys: %w", err)
	}
	return nil
}

// Conversation is a customer's open conversation.
type Conversation struct {
	OpenID string
	Agent  string
}

// OpenConversations lists the open conversations, oldest first.
func (s *Store) OpenConversations(ctx context.Context) ([]Conversation, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT openid, agent FROM conversations WHERE closed_at IS NULL ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("open conversations: %w", err)
	}
	defer rows.Close()
	var out []Conversation
	for rows.Next() {
		var c Conversation
		if err := rows.Scan(&c.OpenID, &c.Agent); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

type scanner interface{ Scan(...any) error }

func scanItem(r scanner) (OutboxItem, error) {
	var it OutboxItem
	var d string
	var next, created int64
	if err := r.Scan(&it.ID, &it.Lane, &d, &it.Attempts, &next, &created); err != nil {
		return OutboxItem{}, err
	}
	if err := json.Unmarshal([]byte(d), &it.Delivery); err != nil {
		return OutboxItem{}, fmt.Errorf("decode delivery %d: %w", it.ID, err)
	}
	it.NextAt, it.CreatedAt = time.UnixMilli(next), time.UnixMilli(created)
	return it, nil
}

// inTx runs fn in a transaction and commits it if fn returns nil.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}
