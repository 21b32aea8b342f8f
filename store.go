package main

import (
	"cmp"
	"context"
	"database/sql"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the pure-Go "sqlite" driver
)

// Store keeps the bridge's durable state: customers, conversations, the keys
// of accepted pushes and callbacks, the outbox and shared credentials, in
// SQLite (one instance) or PostgreSQL (one or several). Every method that
// accepts work commits it in one transaction before it returns.
type Store struct {
	db       *sql.DB // writes (on SQLite, one connection, used by the writer only)
	rdb      *sql.DB // reads (on SQLite, a pool of its own; on PostgreSQL, db)
	postgres bool

	stmts     sync.Map     // SQLite: stmtKey → *sql.Stmt (prepared.go)
	commit    *groupCommit // SQLite: its writer (commit.go); nil on PostgreSQL
	pushes    *pgPushes    // PostgreSQL: the writer of pushes (pgpush.go); nil on SQLite
	closeOnce sync.Once
	owned     *os.File // SQLite: the database file, locked while this store has it (ownSQLite)
	// SQLite: the pending items of each lane, in order, as committed, and
	// the changes the transaction running makes to them (lanes.go).
	lanes   map[string][]int64
	txLanes map[string]*laneChange
	// lanesMu guards lanes against Stats, which reads them from another
	// goroutine, while the writer changes them (settle). The writer's
	// own reads need no lock.
	lanesMu sync.RWMutex
	recent  *recentPushes // SQLite: the pushes of the push window (recent.go)
	// SQLite: the head of each lane, as committed, and the changes the
	// transaction running makes to them (nil: no longer a head); the heap
	// of heads by when each is ready, with the entries the transaction
	// adds and takes; and when the first is ready, for NextDue (heads.go).
	heads      map[int64]headState
	txHeads    map[int64]*headState
	due        dueHeap
	txDue      []dueEntry
	txTaken    []dueEntry
	firstReady atomic.Int64
	// SQLite: each customer's open conversation with an agent (its id and
	// agent) that the writer has met, as committed, and the changes the
	// transaction running makes to it (openconv.go).
	openConv map[string]openConversation
	convLog  []convChange
	mediaDir string // SQLite: where media's bytes are kept (media.go)
	// desk is who may serve, and how (desk.go): the queue, assignment and
	// WeChat's limits apply it.
	desk *Desk
}

// defaultPGConns is how many connections an instance opens to PostgreSQL
// unless DATABASE_MAX_CONNS says otherwise: few connections, each busy,
// beat many that wait on each other's locks (docs/SPEED.md), and ten
// instances stay under PostgreSQL's default max_connections of 100.
const defaultPGConns = 8

// storeOptions tune a store; the zero value serves.
type storeOptions struct {
	PGConns    int           // connections to PostgreSQL at most (0: defaultPGConns)
	PushWindow time.Duration // how long a push is remembered at least (0: defaultPushWindow)
	recentMax  int           // digests SQLite's writer keeps at most (0: maxRecent); tests set it
	MediaDir   string        // SQLite: where media's bytes are kept (default: "media" beside the database)
}

// openStore opens the database DATABASE_URL names, sqlite:PATH or
// postgres://…, creating what is missing, and applies the schema.
func openStore(ctx context.Context, databaseURL string, opts storeOptions) (*Store, error) {
	s := &Store{desk: &Desk{}}
	var err error
	if path, perr := sqlitePath(databaseURL); perr == nil {
		if s.owned, err = ownSQLite(path); err != nil {
			return nil, err
		}
		// synchronous(FULL): a commit returns once the log is on disk.
		dsn := "file:" + fileURIPath(path) + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)"
		if s.db, err = sql.Open("sqlite", dsn+"&_txlock=immediate"); err != nil {
			s.owned.Close()
			return nil, fmt.Errorf("open store: %w", err)
		}
		// Only the writer goroutine writes, one transaction at a time; a
		// second connection lets it prepare a statement while its
		// transaction holds the first.
		s.db.SetMaxOpenConns(2)
		if s.rdb, err = sql.Open("sqlite", dsn+"&_pragma=query_only(1)"); err != nil {
			s.db.Close()
			s.owned.Close()
			return nil, fmt.Errorf("open store: %w", err)
		}
		s.rdb.SetMaxOpenConns(4)
		s.mediaDir = cmp.Or(opts.MediaDir, filepath.Join(filepath.Dir(path), "media"))
	} else if isPostgresURL(databaseURL) {
		if s.db, err = sql.Open("pgx", databaseURL); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
		s.postgres = true
		s.rdb = s.db
		pgConns := cmp.Or(opts.PGConns, defaultPGConns)
		s.db.SetMaxOpenConns(pgConns)
		s.db.SetMaxIdleConns(pgConns)
	} else {
		return nil, perr
	}
	apply := applySQLiteSchema
	if s.postgres {
		apply = applyPostgresSchema
	}
	err = s.inTx(ctx, func(tx *sql.Tx) error { return apply(ctx, tx) })
	if err == nil && !s.postgres {
		s.txLanes, s.openConv = map[string]*laneChange{}, map[string]openConversation{}
		s.heads, s.txHeads = map[int64]headState{}, map[int64]*headState{}
		if err = s.loadLanes(ctx); err == nil {
			err = s.loadRecent(ctx, cmp.Or(opts.PushWindow, defaultPushWindow), cmp.Or(opts.recentMax, maxRecent), time.Now())
		}
	}
	if err != nil {
		s.db.Close()
		if s.rdb != s.db {
			s.rdb.Close()
		}
		if s.owned != nil {
			s.owned.Close()
		}
		return nil, fmt.Errorf("open store: apply schema: %w", err)
	}
	if s.postgres {
		s.pushes = newPGPushes(s)
	} else {
		s.commit = newGroupCommit(s.db, s.settle, harmless)
		if err := s.cleanMediaDir(ctx); err != nil {
			s.Close()
			return nil, fmt.Errorf("open store: %w", err)
		}
	}
	return s, nil
}

// Close stops the writer and closes the database; closing again does
// nothing.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		if s.commit != nil {
			s.commit.close()
		}
		if s.pushes != nil {
			s.pushes.close()
		}
		if s.rdb != s.db {
			s.rdb.Close()
		}
		err = s.db.Close()
		if s.owned != nil {
			s.owned.Close() // and with it the lock
		}
	})
	return err
}

// SetDesk sets the desk's rules, before the store takes any work.
func (s *Store) SetDesk(d *Desk) { s.desk = d }

// Ping reports whether the store can be read: the database answers a read
// of the outbox and the customers, not only a connection.
func (s *Store) Ping(ctx context.Context) error {
	var n int
	return s.rdb.QueryRowContext(ctx, `SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM outbox LIMIT 1) o)
		+ (SELECT COUNT(*) FROM (SELECT 1 FROM customers LIMIT 1) c)`).Scan(&n)
}

// Reply kinds kept with a push key, so a retried push gets the same answer;
// a queued customer's is replyQueued followed by their place.
const (
	replyNone       = ""
	replyWelcome    = "welcome"
	replyConnecting = "connecting"
	replyQueued     = "queued:"
	replyOffline    = "offline"
	replyRated      = "rated"
)

// pushAction is what a push asks of the store.
type pushAction int

const (
	actNone pushAction = iota
	actFollow
	actUnfollow
	actEvent // a menu click or a QR scan: three replies within the minute (quota.go)
	actMessage
)

// Inbound is a push the handler decoded and decided on.
type Inbound struct {
	Key    string     // pushKey of the push
	SigKey string     // the push's signed query (timestamp, nonce, signature)
	Action pushAction // what it asks for
	OpenID string
	IMUser string     // the customer's IM UserID
	Text   string     // for actMessage: what the agent reads
	Elems  []MsgElem  // for actMessage: the IM elements that carry it, if not Text
	Media  *PushMedia // for an image or a voice message: where its bytes are
	// DeleteAccount: an unfollow deletes the customer's IM account
	// (IM_UNFOLLOW=delete) rather than keep it.
	DeleteAccount bool
	// NewRandom returns a fresh uint32 for MsgRandom.
	NewRandom func() uint32
}

// Accepted says how a push was taken.
type Accepted struct {
	Duplicate bool   // the key was seen before: nothing new was committed
	Reply     string // replyNone, replyWelcome, replyConnecting, replyQueued+place, replyOffline or replyRated
	// Assigned are the customers the push gave an agent: its own, or
	// waiting ones an agent's freed place went to.
	Assigned []Assignment
	Rating   int // the rating the message gave, 0 if none
}

// errReplay is returned for a push whose signed query was already used by
// a different push: someone replays a captured URL with another body.
var errReplay = errors.New("signed query already used for another push")

// AcceptPush commits what in asks for together with its key, in one
// transaction: a follow imports the customer's IM account, an unfollow
// closes the conversation (and deletes the account, if in says so), and a
// message finds or opens a conversation (queue.go) and queues the message to
// its agent, or keeps it while the customer waits for one. A key seen
// before commits nothing and returns Duplicate with the first answer's
// reply. The push's signed query is bound to its key: the same query
// carrying another push returns errReplay and commits nothing.
func (s *Store) AcceptPush(ctx context.Context, in Inbound, now time.Time) (Accepted, error) {
	accept := s.acceptAlone
	if s.pushes != nil {
		accept = s.pushes.accept // pgpush.go
	}
	acc, err := accept(ctx, in, now)
	if err != nil {
		return Accepted{}, fmt.Errorf("accept push: %w", err)
	}
	return acc, nil
}

// acceptAlone takes in in a write of its own (on SQLite, shared with the
// others that wait: commit.go).
func (s *Store) acceptAlone(ctx context.Context, in Inbound, now time.Time) (Accepted, error) {
	return write(ctx, s, func(ctx context.Context, tx *sql.Tx) (Accepted, error) { return s.acceptPush(ctx, tx, in, now) })
}

// acceptPush is AcceptPush's write.
func (s *Store) acceptPush(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (Accepted, error) {
	// rec, if not nil, is carried by the push's outbox row, with the reply:
	// the push is recorded nowhere else (recent.go).
	rec, prev, dup, err := s.claimPush(ctx, tx, in, now)
	if err != nil || dup {
		return Accepted{Duplicate: dup, Reply: prev}, err
	}
	var acc Accepted
	var carried bool // an outbox row carries rec
	switch in.Action {
	case actFollow:
		acc.Reply = replyWelcome
		carried, err = s.follow(ctx, tx, in, rec, now)
	case actUnfollow:
		acc.Assigned, carried, err = s.unfollow(ctx, tx, in, rec, now)
	case actEvent:
		_, err = s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at, event_at) VALUES (?, 1, ?, ?)
			ON CONFLICT (openid) DO UPDATE SET event_at = excluded.event_at`, in.OpenID, now.UnixMilli(), now.UnixMilli())
	case actMessage:
		acc, carried, err = s.message(ctx, tx, in, rec, now)
	default:
		return acc, nil
	}
	if err != nil {
		return Accepted{}, err
	}
	if rec != nil && !carried {
		// No outbox row carries the push: its key goes to seen_keys, where
		// the memory finds it (recent.go).
		if _, _, err = s.claimKey(ctx, tx, in.Key, in.SigKey, now); err != nil {
			return Accepted{}, err
		}
		s.remember(rec, inSeenKeys)
		rec = nil
	}
	if rec == nil && acc.Reply != replyNone {
		_, err = s.exec(ctx, tx, `UPDATE seen_keys SET value = ? WHERE key = ?`, acc.Reply, in.Key)
	}
	return acc, err
}

// follow records that the customer follows (three replies within the
// minute), and queues the import of their IM account.
func (s *Store) follow(ctx context.Context, tx *sql.Tx, in Inbound, rec *pushRecord, now time.Time) (carried bool, err error) {
	ms := now.UnixMilli()
	if _, err := s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at, event_at) VALUES (?, 1, ?, ?)
		ON CONFLICT (openid) DO UPDATE SET followed = 1, event_at = excluded.event_at`, in.OpenID, ms, ms); err != nil {
		return false, err
	}
	_, err = s.carry(ctx, tx, Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, rec, replyWelcome, false, now)
	return err == nil, err
}

// unfollow closes the customer's conversation, gives the place it frees to
// the longest-waiting customer, and queues the deletion of their IM account
// if in asks for it.
func (s *Store) unfollow(ctx context.Context, tx *sql.Tx, in Inbound, rec *pushRecord, now time.Time) ([]Assignment, bool, error) {
	s.noteConversation(in.OpenID, 0, "")
	if _, err := s.exec(ctx, tx, `UPDATE customers SET followed = 0, held = 0, rating_conv = 0 WHERE openid = ?`, in.OpenID); err != nil {
		return nil, false, err
	}
	// Held replies will never go: WeChat takes nothing for a customer who
	// does not follow.
	if _, err := s.exec(ctx, tx, `UPDATE messages SET state = `+sqlNotSent+`, delivery = '' WHERE openid = ? AND state = `+sqlHeld+``, in.OpenID); err != nil {
		return nil, false, err
	}
	var assigned []Assignment
	conv, agent, open, err := s.lastConversation(ctx, tx, in.OpenID)
	switch {
	case errors.Is(err, errNoConversation):
	case err != nil:
		return nil, false, err
	case open:
		if err := s.closeConversation(ctx, tx, in.OpenID, conv, agent, closedByUnfollow, now); err != nil {
			return nil, false, err
		}
		if agent != "" {
			// Before the account's deletion, if asked for: the same lane.
			if err := s.tellAgent(ctx, tx, in.OpenID, agent, "The customer unfollowed the Official Account: the conversation is closed, and nothing more reaches them.", now); err != nil {
				return nil, false, err
			}
			if assigned, err = s.drain(ctx, tx, now); err != nil {
				return nil, false, err
			}
		}
	}
	if !in.DeleteAccount {
		return assigned, false, nil
	}
	_, err = s.carry(ctx, tx, Delivery{Kind: deliverIMDelete, OpenID: in.OpenID, IMUser: in.IMUser}, rec, replyNone, false, now)
	return assigned, err == nil, err
}

// message finds or opens the customer's conversation and queues the message
// to its agent, with the MsgRandom every attempt reuses, or keeps it while
// the conversation waits for one. A message after an agent ended the
// conversation may be its rating instead. The message lets the replies held
// for it go (quota.go).
func (s *Store) message(ctx context.Context, tx *sql.Tx, in Inbound, rec *pushRecord, now time.Time) (acc Accepted, carried bool, err error) {
	c, err := s.findConversation(ctx, tx, in, now) // queue.go
	if err != nil {
		return acc, false, err
	}
	if c.id == 0 && c.ratingConv != 0 {
		if n, ok := rating(in.Text, in.Elems); ok {
			if rated, err := s.rate(ctx, tx, in, c.ratingConv, n, now); rated || err != nil { // queue.go
				acc.Reply, acc.Rating = replyRated, n
				return acc, false, err
			}
		}
		if _, err := s.exec(ctx, tx, `UPDATE customers SET rating_conv = 0 WHERE openid = ?`, in.OpenID); err != nil {
			return acc, false, err
		}
	}
	if c.id == 0 {
		held := c.held
		if c, err = s.startConversation(ctx, tx, in.OpenID, now); err != nil {
			return acc, false, err
		}
		c.held = held
		if c.agent != "" {
			acc.Reply, acc.Assigned = replyConnecting, []Assignment{{OpenID: in.OpenID, Agent: c.agent}}
		}
	}
	d := Delivery{Kind: deliverIMSend, OpenID: in.OpenID, IMUser: in.IMUser, Agent: c.agent, Text: in.Text, Elems: in.Elems, Media: in.Media,
		MsgRandom: in.NewRandom(), Conv: c.id}
	h := historyRow{conv: c.id, openid: in.OpenID, direction: "in", agent: c.agent, text: in.Text, parts: max(len(d.parts()), 1)}
	if c.agent == "" {
		h.state = stateWaiting
		if acc.Reply, err = s.waitingReply(ctx, tx, c.id, now); err != nil {
			return acc, false, err
		}
		b, err := json.Marshal(d)
		if err != nil {
			return acc, false, err
		}
		h.delivery = string(b)
	} else {
		h.state = stateQueued
		// In one item, with no reply held for it to let go, the message
		// owes its history row: the push writes one row, not two.
		owed := c.held == 0 && len(d.parts()) == 0
		if h.outbox, err = s.carry(ctx, tx, d, rec, acc.Reply, owed, now); err != nil || owed {
			return acc, rec != nil && err == nil, err
		}
		carried = rec != nil
	}
	if err := s.record(ctx, tx, h, now); err != nil { // history.go
		return acc, false, err
	}
	if c.held > 0 {
		err = s.releaseHeldReplies(ctx, tx, in.OpenID, now) // quota.go
	}
	return acc, carried, err
}

// errUnknownCustomer is returned for a reply to an IM account the bridge has
// no customer for.
var errUnknownCustomer = errors.New("unknown customer")

// Taken says how an agent's reply was taken.
type Taken struct {
	Duplicate bool // the key was seen before: nothing new was committed
	// FirstReply is, for the agent's first reply in the conversation, the
	// time since it was given to them.
	FirstReply time.Duration
}

// AcceptReply commits an agent's reply to a customer, keyed by the IM
// message's key: it queues the reply to WeChat if WeChat will take it
// (quota.go), and records it. A key seen before commits nothing and
// returns Duplicate; a customer the bridge does not know returns
// errUnknownCustomer and commits nothing. Like findConversation, it holds
// the customer's row, so replies keep their order across instances.
func (s *Store) AcceptReply(ctx context.Context, key string, d Delivery, now time.Time) (Taken, error) {
	t, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (Taken, error) {
		if err := s.lockCustomer(ctx, tx, d.OpenID); err != nil {
			return Taken{}, err
		}
		return s.takeReply(ctx, tx, key, d, now)
	})
	if err != nil {
		return Taken{}, fmt.Errorf("accept reply: %w", err)
	}
	return t, nil
}

// takeReply records a reply's key and queues it, unless the key was seen
// before.
func (s *Store) takeReply(ctx context.Context, tx *sql.Tx, key string, d Delivery, now time.Time) (Taken, error) {
	if _, duplicate, err := s.claimKey(ctx, tx, key, "", now); err != nil || duplicate {
		return Taken{Duplicate: duplicate}, err
	}
	return s.queueReply(ctx, tx, d, now)
}

// queueReply sends an agent's reply on as WeChat's limits allow, records
// it in the customer's conversation, and notes the agent's first reply.
func (s *Store) queueReply(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time) (Taken, error) {
	var t Taken
	conv, agent, open, err := s.lastConversation(ctx, tx, d.OpenID)
	if err != nil && !errors.Is(err, errNoConversation) {
		return t, err
	}
	if open && agent == d.Agent {
		var assignedAt int64
		err := s.queryRow(ctx, tx, `UPDATE conversations SET first_reply_at = ? WHERE id = ? AND first_reply_at = 0
			RETURNING assigned_at`, now.UnixMilli(), conv).Scan(&assignedAt)
		switch {
		case err == nil:
			t.FirstReply = now.Sub(time.UnixMilli(assignedAt))
		case !errors.Is(err, sql.ErrNoRows):
			return t, err
		}
	}
	_, err = s.toCustomer(ctx, tx, conv, d, d.Agent, now) // quota.go
	return t, err
}
