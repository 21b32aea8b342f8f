package main

import (
	"cmp"
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
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

	stmts     sync.Map     // SQLite: query → *sql.Stmt (prepared.go)
	commit    *groupCommit // SQLite: its writer (commit.go); nil on PostgreSQL
	closeOnce sync.Once
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
	// SQLite: the agent of each open conversation the writer has met, by
	// customer, as committed, and the changes the transaction running
	// makes to it (openconv.go).
	openConv map[string]string
	convLog  []convChange
	mediaDir string // SQLite: where media's bytes are kept (media.go)
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
	s := &Store{}
	var err error
	if path, perr := sqlitePath(databaseURL); perr == nil {
		// synchronous(FULL): a commit returns once the log is on disk.
		dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)"
		if s.db, err = sql.Open("sqlite", dsn+"&_txlock=immediate"); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
		// Only the writer goroutine writes, one transaction at a time; a
		// second connection lets it prepare a statement while its
		// transaction holds the first.
		s.db.SetMaxOpenConns(2)
		if s.rdb, err = sql.Open("sqlite", dsn+"&_pragma=query_only(1)"); err != nil {
			s.db.Close()
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
		s.txLanes, s.openConv = map[string]*laneChange{}, map[string]string{}
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
		return nil, fmt.Errorf("open store: apply schema: %w", err)
	}
	if !s.postgres {
		s.commit = newGroupCommit(s.db, s.settle, harmless)
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
		if s.rdb != s.db {
			s.rdb.Close()
		}
		err = s.db.Close()
	})
	return err
}

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.rdb.PingContext(ctx) }

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
	IMUser string     // the customer's IM UserID
	Text   string     // for actMessage: what the agent reads
	Elems  []MsgElem  // for actMessage: the IM elements that carry it, if not Text
	Media  *PushMedia // for an image or a voice message: where its bytes are
	Agents []string   // the agents a new conversation may go to, in order
	// DeleteAccount: an unfollow deletes the customer's IM account
	// (IM_UNFOLLOW=delete) rather than keep it.
	DeleteAccount bool
	// NewRandom returns a fresh uint32 for MsgRandom.
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
// the conversation (and deletes the account, if in says so), and a message opens a conversation if
// none is open (assigning an agent) and queues the message to IM. A key seen
// before commits nothing and returns Duplicate with the first answer's reply.
// The push's signed query is bound to its key: the same query carrying
// another push returns errReplay and commits nothing.
func (s *Store) AcceptPush(ctx context.Context, in Inbound, now time.Time) (Accepted, error) {
	acc, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (Accepted, error) {
		return s.acceptPush(ctx, tx, in, now)
	})
	if err != nil {
		return Accepted{}, fmt.Errorf("accept push: %w", err)
	}
	return acc, nil
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
	var d Delivery
	switch in.Action {
	case actFollow:
		acc.Reply = replyWelcome
		d, err = s.follow(ctx, tx, in, now)
	case actUnfollow:
		d, err = s.unfollow(ctx, tx, in, now)
	case actMessage:
		var opened bool
		if d, opened, err = s.message(ctx, tx, in, now); opened {
			acc.Reply = replyConnecting
		}
	default:
		return acc, nil
	}
	if err != nil {
		return Accepted{}, err
	}
	if d.Kind == "" {
		// Nothing is owed to a vendor, so no outbox row carries the push:
		// its key goes to seen_keys.
		if rec != nil {
			_, _, err = s.claimKey(ctx, tx, in.Key, in.SigKey, now)
		}
		return acc, err
	}
	if rec != nil {
		rec.reply = acc.Reply
	}
	id, err := s.enqueueFor(ctx, tx, d, now, rec)
	if err != nil {
		return Accepted{}, err
	}
	if rec != nil {
		s.remember(rec, id) // recent.go
	}
	if rec == nil && acc.Reply != replyNone {
		_, err = s.exec(ctx, tx, `UPDATE seen_keys SET value = ? WHERE key = ?`, acc.Reply, in.Key)
	}
	return acc, err
}

// follow records that the customer follows, and returns the import of
// their IM account.
func (s *Store) follow(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (Delivery, error) {
	_, err := s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)
		ON CONFLICT (openid) DO UPDATE SET followed = 1`, in.OpenID, now.UnixMilli())
	return Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, err
}

// unfollow closes the customer's conversation, and returns the deletion of
// their IM account if in asks for it, else nothing.
func (s *Store) unfollow(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (Delivery, error) {
	s.noteConversation(in.OpenID, "")
	if _, err := s.exec(ctx, tx, `UPDATE customers SET followed = 0 WHERE openid = ?`, in.OpenID); err != nil {
		return Delivery{}, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE agent_load SET open = open - 1
		WHERE agent = (SELECT agent FROM conversations WHERE openid = ? AND closed_at IS NULL)`, in.OpenID); err != nil {
		return Delivery{}, err
	}
	_, err := s.exec(ctx, tx, `UPDATE conversations SET closed_at = ? WHERE openid = ? AND closed_at IS NULL`, now.UnixMilli(), in.OpenID)
	if !in.DeleteAccount {
		return Delivery{}, err
	}
	return Delivery{Kind: deliverIMDelete, OpenID: in.OpenID, IMUser: in.IMUser}, err
}

// message finds or opens the customer's conversation, and returns the
// message to their agent, with the MsgRandom every attempt reuses. opened
// is true for a conversation's first message.
func (s *Store) message(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (d Delivery, opened bool, err error) {
	agent, opened, err := s.openConversation(ctx, tx, in, now)
	return Delivery{Kind: deliverIMSend, OpenID: in.OpenID, IMUser: in.IMUser, Agent: agent, Text: in.Text, Elems: in.Elems, Media: in.Media,
		MsgRandom: in.NewRandom()}, opened, err
}

// errUnknownCustomer is returned for a reply to an IM account the bridge has
// no customer for.
var errUnknownCustomer = errors.New("unknown customer")

// AcceptReply commits an agent's reply to a customer, keyed by the IM
// message's key: it queues the reply to WeChat. A key seen before commits
// nothing and returns true; a customer the bridge does not know returns
// errUnknownCustomer and commits nothing. Like openConversation, it holds
// the customer's row, so replies keep their order across instances.
func (s *Store) AcceptReply(ctx context.Context, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	duplicate, err = write(ctx, s, func(ctx context.Context, tx *sql.Tx) (bool, error) {
		var one int
		err := s.queryRow(ctx, tx, `SELECT 1 FROM customers WHERE openid = ?`+s.lockRow(), d.OpenID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return false, errUnknownCustomer
		} else if err != nil {
			return false, err
		}
		return s.takeReply(ctx, tx, key, d, now)
	})
	if err != nil {
		return false, fmt.Errorf("accept reply: %w", err)
	}
	return duplicate, nil
}

// takeReply records a reply's key and queues it, unless the key was seen
// before.
func (s *Store) takeReply(ctx context.Context, tx *sql.Tx, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	if _, duplicate, err = s.claimKey(ctx, tx, key, "", now); err != nil || duplicate {
		return duplicate, err
	}
	return false, s.enqueue(ctx, tx, d, now)
}

// openConversation returns the agent of the customer's open conversation,
// opening one if there is none. On PostgreSQL it holds the customer's row
// until the transaction ends, so two instances taking two messages of one
// customer commit them one after the other, in the outbox's order. A
// customer the bridge has never seen (one who followed before it existed) is
// recorded and their IM account imported first. A new conversation goes to
// the customer's own agent while that agent is still configured, else to
// the agent with the fewest open conversations.
func (s *Store) openConversation(ctx context.Context, tx *sql.Tx, in Inbound, now time.Time) (agent string, opened bool, err error) {
	if agent, ok := s.openConv[in.OpenID]; ok { // nil, and never found, on PostgreSQL
		return agent, false, nil
	}
	ms := now.UnixMilli()
	var kept, open sql.NullString
	err = s.queryRow(ctx, tx, `SELECT c.agent, v.agent FROM customers c
		LEFT JOIN conversations v ON v.openid = c.openid AND v.closed_at IS NULL
		WHERE c.openid = ?`+s.lockRow("c"), in.OpenID).Scan(&kept, &open)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		// A new customer. Two instances racing here: one insert fails on
		// the key and its transaction runs again (inTx).
		if _, err := s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)`, in.OpenID, ms); err != nil {
			return "", false, err
		}
		if err := s.enqueue(ctx, tx, Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}, now); err != nil {
			return "", false, err
		}
	case err != nil:
		return "", false, err
	case open.Valid:
		s.noteConversation(in.OpenID, open.String)
		return open.String, false, nil
	}
	agent = kept.String
	if !slices.Contains(in.Agents, agent) {
		if agent, err = s.leastLoadedAgent(ctx, tx, in.Agents); err != nil {
			return "", false, err
		}
	}
	if _, err := s.exec(ctx, tx, `UPDATE customers SET agent = ?, followed = 1 WHERE openid = ?`, agent, in.OpenID); err != nil {
		return "", false, err
	}
	if _, err := s.exec(ctx, tx, `INSERT INTO conversations (openid, agent, opened_at) VALUES (?, ?, ?)`, in.OpenID, agent, ms); err != nil {
		return "", false, err
	}
	if _, err := s.exec(ctx, tx, `INSERT INTO agent_load (agent, open) VALUES (?, 1)
		ON CONFLICT (agent) DO UPDATE SET open = agent_load.open + 1`, agent); err != nil {
		return "", false, err
	}
	s.noteConversation(in.OpenID, agent)
	return agent, true, nil
}

// leastLoadedAgent returns the agent with the fewest open conversations; a
// tie goes to the agent listed first.
func (s *Store) leastLoadedAgent(ctx context.Context, tx *sql.Tx, agents []string) (string, error) {
	if len(agents) == 0 {
		return "", errors.New("no agents configured")
	}
	rows, err := s.query(ctx, tx, `SELECT agent, open FROM agent_load`)
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

// harmless reports whether err is one a write returns having written
// nothing, so that its batch can still commit.
func harmless(err error) bool {
	return errors.Is(err, errReplay) || errors.Is(err, errUnknownCustomer) || errors.Is(err, errNotHeld)
}

// settle keeps what the transaction the writer ran last did to the open
// conversations, the recent pushes, the lanes and their heads, if it
// committed, and forgets it either way: the group commit calls it after
// each transaction.
func (s *Store) settle(committed bool) {
	s.settleConversations(committed)
	s.settleRecent(committed)
	s.settleHeads(committed)
	s.settleLanes(committed)
}
