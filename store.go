package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"database/sql"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the pure-Go "sqlite" driver
)

//go:embed schema.sql
var schemaSQL string

// Store keeps the bridge's durable state: customers, conversations, the keys
// of accepted pushes and callbacks, the outbox and shared credentials, in
// SQLite (one instance) or PostgreSQL (one or several). Every method that
// accepts work commits it in one transaction before it returns.
type Store struct {
	db       *sql.DB // writes (on SQLite, one connection, used by the writer only)
	rdb      *sql.DB // reads (on SQLite, a pool of its own; on PostgreSQL, db)
	postgres bool

	stmts sync.Map     // SQLite: query → *sql.Stmt
	ops   chan writeOp // SQLite: writes waiting for the writer
	// SQLite: the agent of each open conversation the writer has met, by
	// customer, as committed, and the changes the transaction running
	// makes to it. The writer alone reads and changes them.
	openConv map[string]string
	convLog  []convChange
	// SQLite: the pending items of each lane, in order, as committed, and
	// the changes the transaction running makes to them (lanes.go).
	lanes   map[string][]int64
	txLanes map[string]*laneChange
	// lanesMu guards lanes against Stats, which reads them from another
	// goroutine, while the writer changes them (settle). The writer's
	// own reads need no lock.
	lanesMu sync.RWMutex
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
	recent     *recentPushes // SQLite: the pushes of the push window (recent.go)
	stopped    chan struct{}
	writerDone chan struct{}
}

// schemaLock is the PostgreSQL advisory lock held while the schema is
// applied, so instances starting together do not race on CREATE.
const schemaLock = 7_261_948_305

// defaultPGConns is how many connections an instance opens to PostgreSQL
// unless DATABASE_MAX_CONNS says otherwise. Few connections, each busy,
// beat many that wait on each other's locks: on a 2-core machine running
// PostgreSQL too, 8 answered 13–46% more pushes than 32 in four pairs of
// runs, the slowest answer within 0.4 s instead of 1.2–1.7 s. Ten
// instances stay under PostgreSQL's default max_connections of 100.
const defaultPGConns = 8

// storeOptions tune a store; the zero value serves.
type storeOptions struct {
	PGConns    int           // connections to PostgreSQL at most (0: defaultPGConns)
	PushWindow time.Duration // how long a push is remembered at least (0: defaultPushWindow)
	recentMax  int           // digests SQLite's writer keeps at most (0: maxRecent); tests set it
}

// openStore opens the database DATABASE_URL names, sqlite:PATH or
// postgres://…, creating what is missing, and applies the schema.
func openStore(ctx context.Context, databaseURL string, opts storeOptions) (*Store, error) {
	s := &Store{}
	schema := schemaSQL
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
		// SQLite's rowid: a new row's id is one more than the largest.
		// AUTOINCREMENT, which databases made before kept, also updates
		// sqlite_sequence at each insert, a page more in each commit.
		schema = strings.ReplaceAll(schema, "ID_PRIMARY_KEY", "INTEGER PRIMARY KEY")
		schema = strings.ReplaceAll(schema, "PENDING_BY_LANE", "DROP INDEX IF EXISTS outbox_pending")
		schema = strings.ReplaceAll(schema, "DUE_HEADS", "DROP INDEX IF EXISTS outbox_due")
	} else if isPostgresURL(databaseURL) {
		if s.db, err = sql.Open("pgx", databaseURL); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
		s.postgres = true
		s.rdb = s.db
		pgConns := cmp.Or(opts.PGConns, defaultPGConns)
		s.db.SetMaxOpenConns(pgConns)
		s.db.SetMaxIdleConns(pgConns)
		schema = strings.ReplaceAll(schema, "ID_PRIMARY_KEY", "BIGSERIAL PRIMARY KEY")
		schema = strings.ReplaceAll(schema, "PENDING_BY_LANE",
			"CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (lane, id) WHERE state = 'pending'")
		schema = strings.ReplaceAll(schema, "DUE_HEADS",
			"CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at, id, claimed_until) WHERE state = 'pending' AND head = 1")
	} else {
		return nil, perr
	}
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if s.postgres {
			return applyPGSchema(ctx, tx, schema)
		}
		if _, err := tx.ExecContext(ctx, schema); err != nil {
			return err
		}
		return addPushColumns(ctx, tx)
	})
	if err == nil && !s.postgres {
		s.openConv, s.txLanes = map[string]string{}, map[string]*laneChange{}
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
		s.ops, s.stopped, s.writerDone = make(chan writeOp), make(chan struct{}), make(chan struct{})
		go s.runWriter()
	}
	return s, nil
}

// applyPGSchema applies schema on PostgreSQL under an advisory lock, unless
// the database has it already: schema_applied keeps the digest of the
// schema last applied. Applying it again would take a SHARE lock on each
// table with an index (CREATE INDEX IF NOT EXISTS locks the table before it
// finds the index), one after the other in one transaction, while the
// instances already running lock those tables in other orders: an instance
// starting under load could deadlock with them.
func applyPGSchema(ctx context.Context, tx *sql.Tx, schema string) error {
	digest := fmt.Sprintf("%x", sha256.Sum256([]byte(schema)))
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(schemaLock)); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_applied (digest TEXT NOT NULL)`); err != nil {
		return err
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_applied WHERE digest = $1`, digest).Scan(&n); err != nil || n > 0 {
		return err
	}
	if _, err := tx.ExecContext(ctx, schema); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM schema_applied`); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO schema_applied (digest) VALUES ($1)`, digest)
	return err
}

// addPushColumns adds, on SQLite, the columns in which an outbox row
// carries the push that added it (recent.go), to an outbox made before
// them.
func addPushColumns(ctx context.Context, tx *sql.Tx) error {
	for _, col := range []string{"push_key", "push_sig", "push_reply"} {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('outbox') WHERE name = ?`, col).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			if _, err := tx.ExecContext(ctx, `ALTER TABLE outbox ADD COLUMN `+col+` TEXT NOT NULL DEFAULT ''`); err != nil {
				return err
			}
		}
	}
	return nil
}

// isPostgresURL reports whether u names a PostgreSQL database.
func isPostgresURL(u string) bool {
	return strings.HasPrefix(u, "postgres://") || strings.HasPrefix(u, "postgresql://")
}

// Close stops the writer and closes the database.
func (s *Store) Close() error {
	if s.stopped != nil {
		select {
		case <-s.stopped:
			return nil // closed before
		default:
		}
		close(s.stopped)
		<-s.writerDone
		s.rdb.Close()
	}
	return s.db.Close()
}

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.rdb.PingContext(ctx) }

// q adapts a query written with ? placeholders to the dialect.
func (s *Store) q(query string) string {
	if !s.postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// exec runs a statement, written with ? placeholders, in tx. On SQLite the
// statement is prepared once and reused: parsing it again for every push
// would cost more than running it. pgx caches its statements itself.
func (s *Store) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	if st, err := s.prepared(ctx, query); err != nil {
		return nil, err
	} else if st != nil {
		return tx.StmtContext(ctx, st).ExecContext(ctx, args...)
	}
	return tx.ExecContext(ctx, s.q(query), args...)
}

// query runs a query, as exec does.
func (s *Store) query(ctx context.Context, tx *sql.Tx, query string, args ...any) (*sql.Rows, error) {
	if st, err := s.prepared(ctx, query); err != nil {
		return nil, err
	} else if st != nil {
		return tx.StmtContext(ctx, st).QueryContext(ctx, args...)
	}
	return tx.QueryContext(ctx, s.q(query), args...)
}

// queryRow runs a query for one row, as exec does.
func (s *Store) queryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) *sql.Row {
	if st, err := s.prepared(ctx, query); err == nil && st != nil {
		return tx.StmtContext(ctx, st).QueryRowContext(ctx, args...)
	}
	return tx.QueryRowContext(ctx, s.q(query), args...)
}

// prepared returns query prepared on SQLite's writing connection, from a
// cache; nil on PostgreSQL.
func (s *Store) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	if s.postgres {
		return nil, nil
	}
	if st, ok := s.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := s.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

// lockRow is the clause that locks the rows a SELECT reads (of the named
// tables, if any) until the transaction ends. SQLite needs none: its
// transactions take the whole database for writing from their start.
func (s *Store) lockRow(tables ...string) string {
	switch {
	case !s.postgres:
		return ""
	case len(tables) > 0:
		return " FOR UPDATE OF " + strings.Join(tables, ", ")
	}
	return " FOR UPDATE"
}

// Delivery kinds: what an outbox item asks a vendor to do.
const (
	deliverIMImport = "im_import" // account_import of a customer's IM account
	deliverIMDelete = "im_delete" // account_delete of a customer's IM account
	deliverIMSend   = "im_send"   // openim/sendmsg from a customer to their agent
	deliverWeChat   = "wx_send"   // custom/send of an agent's reply to a customer
	deliverNotice   = "im_notice" // openim/sendmsg from the admin to an agent: a dead letter's notice
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
	switch d.Kind {
	case deliverWeChat:
		return "wx:" + d.OpenID
	case deliverNotice:
		return "notice:" + d.Agent
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
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		acc = Accepted{}
		// rec, if not nil, is carried by the push's outbox row, with the
		// reply: the push is recorded nowhere else.
		rec, prev, dup, err := s.claimPush(ctx, tx, in, now)
		if err != nil || dup {
			acc = Accepted{Duplicate: dup, Reply: prev}
			return err
		}
		enqueuePush := func(d Delivery) error {
			if rec != nil {
				rec.reply = acc.Reply
			}
			return s.enqueueFor(ctx, tx, d, now, rec)
		}
		ms := now.UnixMilli()
		switch in.Action {
		case actFollow:
			acc.Reply = replyWelcome
			if _, err := s.exec(ctx, tx, `INSERT INTO customers (openid, followed, created_at) VALUES (?, 1, ?)
				ON CONFLICT (openid) DO UPDATE SET followed = 1`, in.OpenID, ms); err != nil {
				return err
			}
			if err := enqueuePush(Delivery{Kind: deliverIMImport, OpenID: in.OpenID, IMUser: in.IMUser}); err != nil {
				return err
			}
		case actUnfollow:
			s.noteConversation(in.OpenID, "")
			if _, err := s.exec(ctx, tx, `UPDATE customers SET followed = 0 WHERE openid = ?`, in.OpenID); err != nil {
				return err
			}
			if _, err := s.exec(ctx, tx, `UPDATE agent_load SET open = open - 1
				WHERE agent = (SELECT agent FROM conversations WHERE openid = ? AND closed_at IS NULL)`, in.OpenID); err != nil {
				return err
			}
			if _, err := s.exec(ctx, tx, `UPDATE conversations SET closed_at = ? WHERE openid = ? AND closed_at IS NULL`, ms, in.OpenID); err != nil {
				return err
			}
			if err := enqueuePush(Delivery{Kind: deliverIMDelete, OpenID: in.OpenID, IMUser: in.IMUser}); err != nil {
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
			if err := enqueuePush(d); err != nil {
				return err
			}
		}
		if rec != nil || acc.Reply == replyNone {
			return nil
		}
		_, err = s.exec(ctx, tx, `UPDATE seen_keys SET value = ? WHERE key = ?`, acc.Reply, in.Key)
		return err
	})
	if err != nil {
		return Accepted{}, fmt.Errorf("accept push: %w", err)
	}
	return acc, nil
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

// maxOpenConv bounds the conversations SQLite's writer keeps in memory;
// past it, it starts again from none. 50,000 take about 5 MB.
const maxOpenConv = 50_000

// convChange is a change a transaction made to the open conversations:
// the customer's conversation goes to agent, or is closed ("").
type convChange struct{ openid, agent string }

// noteConversation records, on SQLite, that the transaction running found
// or opened the customer's open conversation with agent, or closed it
// (""). What it found or opened is remembered once the transaction
// commits (settleConversations): until then it may yet be rolled back. A
// closing is forgotten at once, so that a later write of the same
// transaction looks the customer up again.
func (s *Store) noteConversation(openid, agent string) {
	if s.postgres {
		return
	}
	if agent == "" {
		delete(s.openConv, openid)
	}
	s.convLog = append(s.convLog, convChange{openid, agent})
}

// settleConversations applies the changes the transaction made to the
// open conversations it remembers if it committed, and drops them either
// way. The writer calls it after each transaction.
func (s *Store) settleConversations(committed bool) {
	if committed {
		if len(s.openConv)+len(s.convLog) > maxOpenConv {
			clear(s.openConv)
		}
		for _, c := range s.convLog {
			if c.agent == "" {
				delete(s.openConv, c.openid)
			} else {
				s.openConv[c.openid] = c.agent
			}
		}
	}
	s.convLog = s.convLog[:0]
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

// errUnknownCustomer is returned for a reply to an IM account the bridge has
// no customer for.
var errUnknownCustomer = errors.New("unknown customer")

// AcceptReply commits an agent's reply to a customer, keyed by the IM
// message's key: it queues the reply to WeChat. A key seen before commits
// nothing and returns true; a customer the bridge does not know returns
// errUnknownCustomer and commits nothing. Like openConversation, it holds
// the customer's row, so replies keep their order across instances.
func (s *Store) AcceptReply(ctx context.Context, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		var one int
		err := s.queryRow(ctx, tx, `SELECT 1 FROM customers WHERE openid = ?`+s.lockRow(), d.OpenID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return errUnknownCustomer
		} else if err != nil {
			return err
		}
		duplicate, err = s.takeReply(ctx, tx, key, d, now)
		return err
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

// HoldReply commits a reply as AcceptReply does, key and all, but keeps it
// in held_replies rather than the outbox, until ReleaseHeld moves it there:
// it waits for its conversation's replies of a gap (recover.go).
func (s *Store) HoldReply(ctx context.Context, key string, d Delivery, now time.Time) (duplicate bool, err error) {
	b, err := json.Marshal(d)
	if err != nil {
		return false, err
	}
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, duplicate, err = s.claimKey(ctx, tx, key, "", now); err != nil || duplicate {
			return err
		}
		_, err := s.exec(ctx, tx, `INSERT INTO held_replies (openid, key, delivery, created_at) VALUES (?, ?, ?, ?)`,
			d.OpenID, key, string(b), now.UnixMilli())
		return err
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
// conversation's history, in order: one held since its callback goes to
// the outbox in its place, one not seen yet goes there as AcceptReply
// would put it, one seen before is skipped. Then the replies still held for
// the customer openid follow (for every customer if openid is ""). It
// returns how many replies not seen before it took.
func (s *Store) TakeHistory(ctx context.Context, openid string, replies []Reply, now time.Time) (taken int, err error) {
	err = s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		taken = 0
		if openid != "" { // as AcceptReply does
			var one int
			if err := s.queryRow(ctx, tx, `SELECT 1 FROM customers WHERE openid = ?`+s.lockRow(), openid).Scan(&one); err != nil &&
				!errors.Is(err, sql.ErrNoRows) {
				return err
			}
		}
		for _, r := range replies {
			held, err := s.releaseHeld(ctx, tx, "", r.Key, now)
			if err != nil {
				return err
			}
			if held > 0 {
				continue
			}
			dup, err := s.takeReply(ctx, tx, r.Key, r.D, now)
			if err != nil {
				return err
			}
			if !dup {
				taken++
			}
		}
		_, err := s.releaseHeld(ctx, tx, openid, "", now)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("take history: %w", err)
	}
	return taken, nil
}

// releaseHeld moves the replies held for openid (any customer's if "")
// with key (any key if "") to the outbox, in the order they came, and
// returns how many it moved.
func (s *Store) releaseHeld(ctx context.Context, tx *sql.Tx, openid, key string, now time.Time) (int, error) {
	rows, err := s.query(ctx, tx, `DELETE FROM held_replies WHERE (openid = ? OR ? = '') AND (key = ? OR ? = '')
		RETURNING id, delivery`, openid, openid, key, key)
	if err != nil {
		return 0, err
	}
	type held struct {
		id  int64
		raw string
	}
	var all []held
	for rows.Next() {
		var h held
		if err := rows.Scan(&h.id, &h.raw); err != nil {
			rows.Close()
			return 0, err
		}
		all = append(all, h)
	}
	if err := cmp.Or(rows.Err(), rows.Close()); err != nil {
		return 0, err
	}
	slices.SortFunc(all, func(a, b held) int { return cmp.Compare(a.id, b.id) })
	for _, h := range all {
		var d Delivery
		if err := json.Unmarshal([]byte(h.raw), &d); err != nil {
			return 0, fmt.Errorf("held reply %d: %w", h.id, err)
		}
		if err := s.enqueue(ctx, tx, d, now); err != nil {
			return 0, err
		}
	}
	return len(all), nil
}

// claimKey records key as seen, bound to sig (the push's signed query; ""
// for none), in one statement. If key was seen before it returns the value
// kept with it and dup true; if sig was used by another key it returns
// errReplay. Either way it writes nothing.
func (s *Store) claimKey(ctx context.Context, tx *sql.Tx, key, sig string, now time.Time) (prev string, dup bool, err error) {
	var sigArg any
	if sig != "" {
		sigArg = sig
	}
	res, err := s.exec(ctx, tx, `INSERT INTO seen_keys (key, sig, received_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING`, key, sigArg, now.UnixMilli())
	if err != nil {
		return "", false, err
	}
	if n, err := res.RowsAffected(); err != nil || n == 1 {
		return "", false, err
	}
	err = s.queryRow(ctx, tx, `SELECT value FROM seen_keys WHERE key = ?`, key).Scan(&prev)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, errReplay
	}
	return prev, err == nil, err
}

// enqueue adds d to the outbox, due now.
func (s *Store) enqueue(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time) error {
	return s.enqueueFor(ctx, tx, d, now, nil)
}

// enqueueFor adds d to the outbox, due now, as the row that carries rec,
// if rec is not nil (SQLite only, recent.go).
func (s *Store) enqueueFor(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time, rec *pushRecord) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	ms := now.UnixMilli()
	lane := d.lane()
	if !s.postgres {
		var carried pushRecord
		if rec != nil {
			carried = *rec
		}
		res, err := s.exec(ctx, tx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at, push_key, push_sig, push_reply)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, lane, string(b), ms, ms, ms, carried.key, carried.sig, carried.reply)
		if err != nil {
			return err
		}
		id, err := res.LastInsertId()
		if err != nil {
			return err
		}
		if _, busy := s.laneItem(lane, 0); !busy {
			s.setHead(id, headState{lane: lane, at: ms}) // heads.go
		}
		s.laneAdd(lane, id)
		if rec != nil {
			s.remember(rec, id)
		}
		return nil
	}
	if err := s.lockLane(ctx, tx, lane); err != nil {
		return err
	}
	_, err = s.exec(ctx, tx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at, head)
		VALUES (?, ?, ?, ?, ?, CASE WHEN EXISTS (SELECT 1 FROM outbox WHERE lane = ? AND state = 'pending') THEN 0 ELSE 1 END)`,
		lane, string(b), ms, ms, ms, lane)
	return err
}

// lockLane serializes, on PostgreSQL, the transactions that change which
// item heads a lane (adding to it, finishing its head), until the
// transaction ends. SQLite's transactions are serial already.
func (s *Store) lockLane(ctx context.Context, tx *sql.Tx, lane string) error {
	if !s.postgres {
		return nil
	}
	_, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext($1))`, lane)
	return err
}

// PruneKeys forgets push and callback keys received before cutoff, and
// items delivered before it; vendors retry within seconds, so old keys only
// cost space.
func (s *Store) PruneKeys(ctx context.Context, cutoff time.Time) error {
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `DELETE FROM seen_keys WHERE received_at < ?`, cutoff.UnixMilli()); err != nil {
			return err
		}
		// Delivered items are history; dead letters stay.
		if _, err := s.exec(ctx, tx, `DELETE FROM outbox WHERE state = 'done' AND updated_at < ?`, cutoff.UnixMilli()); err != nil {
			return err
		}
		// A safety net: a lane whose first pending item is not marked
		// head would never be taken. (SQLite's writer keeps the heads
		// in memory.)
		if !s.postgres {
			return nil
		}
		_, err := s.exec(ctx, tx, `UPDATE outbox SET head = 1 WHERE state = 'pending' AND head = 0 AND NOT EXISTS
			(SELECT 1 FROM outbox p WHERE p.lane = outbox.lane AND p.state = 'pending' AND p.id < outbox.id)`)
		return err
	})
	if err != nil {
		return fmt.Errorf("prune: %w", err)
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
	rows, err := s.rdb.QueryContext(ctx, `SELECT openid, agent FROM conversations WHERE closed_at IS NULL ORDER BY id`)
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

// Heartbeat records name's heartbeat at now, unless it holds a later one:
// with several instances, the latest of them stands.
func (s *Store) Heartbeat(ctx context.Context, name string, now time.Time) error {
	later := "max(heartbeats.at, excluded.at)"
	if s.postgres {
		later = "GREATEST(heartbeats.at, excluded.at)"
	}
	err := s.write(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `INSERT INTO heartbeats (name, at) VALUES (?, ?)
			ON CONFLICT (name) DO UPDATE SET at = `+later, name, now.UnixMilli())
		return err
	})
	if err != nil {
		return fmt.Errorf("heartbeat %s: %w", name, err)
	}
	return nil
}

// LastHeartbeat returns name's heartbeat; found is false if there has been
// none.
func (s *Store) LastHeartbeat(ctx context.Context, name string) (at time.Time, found bool, err error) {
	var ms int64
	switch err := s.rdb.QueryRowContext(ctx, s.q(`SELECT at FROM heartbeats WHERE name = ?`), name).Scan(&ms); {
	case errors.Is(err, sql.ErrNoRows):
		return time.Time{}, false, nil
	case err != nil:
		return time.Time{}, false, fmt.Errorf("heartbeat %s: %w", name, err)
	}
	return time.UnixMilli(ms), true, nil
}

// SharedCredential returns the credential name as the instances share it on
// PostgreSQL: the stored value while it is not due for refresh and is not
// stale (a value the vendor refused), else a new one from fetch, stored for
// the others. The row is locked while fetch runs, so one instance refreshes
// at a time and the others take its result. On SQLite, with one instance,
// it calls fetch.
func (s *Store) SharedCredential(ctx context.Context, name, stale string, now time.Time,
	fetch func() (string, time.Time, error)) (value string, refreshAt time.Time, err error) {
	if !s.postgres {
		return fetch()
	}
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `INSERT INTO credentials (name) VALUES (?) ON CONFLICT (name) DO NOTHING`, name); err != nil {
			return err
		}
		var at int64
		if err := s.queryRow(ctx, tx, `SELECT value, refresh_at FROM credentials WHERE name = ?`+s.lockRow(), name).Scan(&value, &at); err != nil {
			return err
		}
		refreshAt = time.UnixMilli(at)
		if value != "" && value != stale && now.Before(refreshAt) {
			return nil
		}
		if value, refreshAt, err = fetch(); err != nil {
			return err
		}
		_, err := s.exec(ctx, tx, `UPDATE credentials SET value = ?, refresh_at = ? WHERE name = ?`, value, refreshAt.UnixMilli(), name)
		return err
	})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("shared credential %s: %w", name, err)
	}
	return value, refreshAt, nil
}

// inTx runs fn in a transaction and commits it if fn returns nil. On
// PostgreSQL a transaction that lost a race with another instance (a
// unique key taken, a serialization failure, a deadlock) is run again.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	for attempt := 1; ; attempt++ {
		err := s.tryTx(ctx, fn)
		var pe *pgconn.PgError
		if attempt < 4 && errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "40001" || pe.Code == "40P01") {
			continue
		}
		return err
	}
}

func (s *Store) tryTx(ctx context.Context, fn func(*sql.Tx) error) error {
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
