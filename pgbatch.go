package main

// One batch of pushes in one PostgreSQL transaction (pgpush.go): the
// statements that take every push of the batch at once, each round trip a
// pipeline. The batch takes a customer's messages if it can take them all
// as AcceptPush's write would, and leaves the customer's pushes alone
// otherwise:
//
//   - the customer's open conversation has an agent, and no reply is held
//     for them: the messages join it;
//   - the customer has no open conversation, no reply held and no rating
//     asked (or is new to the bridge), the desk is open, nobody waits and
//     an agent is free: the first message opens a conversation with that
//     agent, as startConversation would, and the others join it. A
//     customer new to the bridge is recorded, and their IM account's
//     import queued, before the desk is held (the lock order, db.go),
//     whether their messages are then taken or left alone.
//
// Each message goes in one item and owes its history row (history.go): the
// batch writes no history. Anything else (an event, a follow, a message in
// parts, a key seen before or twice in the batch, a signed query a push
// before it carries, a customer who waits, a rating, a held reply) is
// AcceptPush's alone.

import (
	"context"
	"encoding/json"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// batchPush is a push the batch may take: a message in one item.
type batchPush struct {
	op pushOp
}

// customerRow is what the batch reads of a known customer.
type customerRow struct {
	held       int
	ratingConv int64
}

// batchConv is a customer's open conversation, as the batch finds or opens
// it.
type batchConv struct {
	id     int64
	agent  string
	opened bool // the batch opens it
}

// pgBatch is one batch's transaction on c.
type pgBatch struct {
	s     *Store
	c     *pgx.Conn
	cands []batchPush
	// aloneFrom is the first push (by seq) taken alone, -1 while pushes
	// of an earlier batch are: no customer whose first push comes after it
	// is given an agent here, as one at a time it would not be first.
	aloneFrom int

	// Read in the first round trip: the keys the batch claimed, the
	// customers it holds, their open conversations.
	claimed   map[string]bool
	customers map[string]customerRow
	convs     map[string]batchConv
	// New to the bridge, and recorded by the batch before it holds the
	// desk (the lock order), in order, with when: their IM accounts are
	// imported whether or not the batch takes their messages.
	inserted []string
	firstAt  map[string]time.Time
	firstSeq map[string]int
}

// take runs the batch's transaction and returns, for each candidate, how
// it was accepted, or nil if it was left alone. If it takes no candidate
// it rolls back; if it fails, the caller rolls back.
func (b *pgBatch) take(ctx context.Context) ([]*Accepted, error) {
	if err := b.read(ctx); err != nil {
		return nil, err
	}
	taking := map[string]bool{}
	var opening []string // customers whose first message opens a conversation, in the batch's order
	keys := map[string]bool{}
	for _, bp := range b.cands {
		o, key := bp.op.in.OpenID, bp.op.in.Key
		// A key twice in the batch (WeChat's retry beside the push) is
		// claimed once, by either: the customer is left alone, where the
		// second finds the first.
		claimed := b.claimed[key] && !keys[key]
		keys[key] = true
		if _, seen := taking[o]; seen {
			if !claimed {
				taking[o] = false
			}
			continue
		}
		cust, known := b.customers[o]
		conv, open := b.convs[o]
		switch {
		case !claimed || cust.held != 0:
			taking[o] = false
		case open:
			// Known: held. One recorded by another instance since the
			// lock's statement began is not.
			taking[o] = known && conv.agent != ""
		default:
			taking[o] = !known || cust.ratingConv == 0
			if taking[o] {
				opening = append(opening, o)
			}
		}
	}
	for _, bp := range b.cands {
		if !taking[bp.op.in.OpenID] {
			b.aloneFrom = min(b.aloneFrom, bp.op.seq)
		}
	}
	var load map[string]int // conversations the batch gives each agent
	if len(opening) > 0 {
		var err error
		if load, err = b.open(ctx, opening, taking); err != nil {
			return nil, err
		}
	}
	return b.write(ctx, taking, load)
}

// read is the first round trip: it begins the transaction, claims the
// candidates' keys (in key order: two batches wait for each other's keys
// in one order), holds their customers (in openid order) and reads their
// open conversations once held.
func (b *pgBatch) read(ctx context.Context) error {
	n := len(b.cands)
	keys, sigs, openids := make([]string, n), make([]string, n), make([]string, n)
	ats := make([]int64, n)
	for i, bp := range b.cands {
		in := bp.op.in
		keys[i], sigs[i], openids[i], ats[i] = in.Key, in.SigKey, in.OpenID, bp.op.now.UnixMilli()
	}
	var q pgx.Batch
	q.Queue(`BEGIN`)
	q.Queue(`INSERT INTO seen_keys (key, sig, received_at)
		SELECT k, NULLIF(s, ''), at FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(k, s, at) ORDER BY k
		ON CONFLICT DO NOTHING RETURNING key`, keys, sigs, ats)
	// Each customer looked up by its key, and held, in the order of the
	// array: sorted, it is the lock order. (Read for the whole array at
	// once, PostgreSQL scans a table of a few thousand rows whole.)
	slices.Sort(openids)
	openids = slices.Compact(openids)
	q.Queue(`SELECT c.openid, c.held, c.rating_conv FROM unnest($1::text[]) AS t(o),
		LATERAL (SELECT openid, held, rating_conv FROM customers WHERE openid = t.o FOR UPDATE) AS c`, openids)
	// Runs after the customers are held: it reads their conversations as
	// the transactions that held them before left them. A customer's open
	// conversation is their last (lastConversation).
	q.Queue(`SELECT v.openid, v.id, v.agent FROM unnest($1::text[]) AS t(o),
		LATERAL (SELECT openid, id, agent, closed_at FROM conversations WHERE openid = t.o ORDER BY id DESC LIMIT 1) AS v
		WHERE v.closed_at IS NULL`, openids)
	b.claimed, b.customers, b.convs = map[string]bool{}, map[string]customerRow{}, map[string]batchConv{}
	return sendBatch(ctx, b.c, &q, skip, rowsOf(func(r pgx.Rows) error {
		var k string
		err := r.Scan(&k)
		b.claimed[k] = true
		return err
	}), rowsOf(func(r pgx.Rows) error {
		var o string
		var c customerRow
		err := r.Scan(&o, &c.held, &c.ratingConv)
		b.customers[o] = c
		return err
	}), rowsOf(func(r pgx.Rows) error {
		var o string
		var c batchConv
		err := r.Scan(&o, &c.id, &c.agent)
		b.convs[o] = c
		return err
	}))
}

// open gives each customer whose first message opens a conversation, in
// turn, the agent pickAgent would, while the desk is open, nobody waits and
// an agent is free; a customer it gives none is left alone. It returns the
// conversations it gave each agent.
func (b *pgBatch) open(ctx context.Context, opening []string, taking map[string]bool) (map[string]int, error) {
	desk, err := b.holdDesk(ctx, opening, taking)
	if err != nil {
		return nil, err
	}
	load := map[string]int{}
	for i, o := range opening {
		if !taking[o] { // a later push of theirs was seen before, or another instance recorded them
			continue
		}
		now := b.firstAt[o]
		agent := ""
		if desk.waiting == 0 && b.s.desk.Hours.Open(now) && b.firstSeq[o] < b.aloneFrom {
			agent = b.s.desk.pick(desk.agents)
		}
		if agent == "" {
			taking[o] = false
			b.aloneFrom = min(b.aloneFrom, b.firstSeq[o]) // who comes after waits too
			continue
		}
		st, ok := desk.agents[agent]
		if !ok {
			st.online = 1
		}
		st.open++
		st.assignedAt = now.UnixMilli()
		desk.agents[agent] = st
		load[agent]++
		b.convs[o] = batchConv{id: desk.convIDs[i], agent: agent, opened: true}
	}
	return load, nil
}

// deskRead is what the batch reads of the desk once it holds it.
type deskRead struct {
	waiting int // customers in the queue
	agents  map[string]agentState
	convIDs []int64 // one for each customer opening a conversation
}

// holdDesk is the second round trip, for the customers whose first message
// opens a conversation. It records those new to the bridge first, in
// openid order, so that their rows are held, as a known customer's are,
// before the desk; one another instance records at once is left alone.
// Then it holds the desk and reads the queue's length and the agents.
func (b *pgBatch) holdDesk(ctx context.Context, opening []string, taking map[string]bool) (deskRead, error) {
	b.firstAt, b.firstSeq = map[string]time.Time{}, map[string]int{}
	for _, bp := range b.cands {
		if _, ok := b.firstAt[bp.op.in.OpenID]; !ok {
			b.firstAt[bp.op.in.OpenID], b.firstSeq[bp.op.in.OpenID] = bp.op.now, bp.op.seq
		}
	}
	var news []string
	var newAts []int64
	for _, o := range opening {
		if _, known := b.customers[o]; !known && taking[o] {
			news, newAts = append(news, o), append(newAts, b.firstAt[o].UnixMilli())
		}
	}
	var q pgx.Batch
	var reads []func(pgx.BatchResults) error
	inserted := map[string]bool{}
	if len(news) > 0 {
		q.Queue(`INSERT INTO customers (openid, followed, created_at)
			SELECT o, 1, at FROM unnest($1::text[], $2::bigint[]) AS t(o, at) ORDER BY o
			ON CONFLICT DO NOTHING RETURNING openid`, news, newAts)
		reads = append(reads, rowsOf(func(r pgx.Rows) error {
			var o string
			err := r.Scan(&o)
			inserted[o] = true
			return err
		}))
	}
	q.Queue(`SELECT pg_advisory_xact_lock(hashtext('desk'))`)
	q.Queue(`SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ''`)
	q.Queue(`SELECT agent, open, online, assigned_at FROM agent_load`)
	q.Queue(`SELECT nextval('conversations_id_seq') FROM generate_series(1, $1)`, len(opening))
	d := deskRead{agents: map[string]agentState{}}
	err := sendBatch(ctx, b.c, &q, append(reads, skip, func(br pgx.BatchResults) error {
		return br.QueryRow().Scan(&d.waiting)
	}, rowsOf(func(r pgx.Rows) error {
		var a string
		var st agentState
		err := r.Scan(&a, &st.open, &st.online, &st.assignedAt)
		d.agents[a] = st
		return err
	}), rowsOf(func(r pgx.Rows) error {
		var id int64
		err := r.Scan(&id)
		d.convIDs = append(d.convIDs, id)
		return err
	}))...)
	for _, o := range news {
		if inserted[o] {
			b.inserted = append(b.inserted, o)
		} else {
			taking[o] = false
			b.aloneFrom = min(b.aloneFrom, b.firstSeq[o])
		}
	}
	return d, err
}

// batchRows are the rows the batch adds, a column a slice.
type batchRows struct {
	unclaim                   []string // keys of the customers left alone
	convIDs                   []int64  // conversations opened
	convOpenids, convAgents   []string
	convAts                   []int64
	loadAgents                []string // conversations given each agent
	loadCounts                []int32
	loadAts                   []int64
	lanes                     []string // the lanes the batch adds to
	itemNs                    []int64  // outbox items, numbered from 1 in the batch
	itemLanes, itemDeliveries []string
	itemAts                   []int64
	itemFirst                 []bool   // first of its lane in the batch
	itemOwed                  []int32  // owes its message's history row (history.go)
	connectingKeys            []string // pushes answered "connecting"

	laneSeen map[string]bool
}

// item adds d, accepted at now, as an outbox item, owing its message's
// history row if owed.
func (r *batchRows) item(d Delivery, now time.Time, owed bool) error {
	js, err := json.Marshal(d)
	if err != nil {
		return err
	}
	lane := d.lane()
	r.itemFirst = append(r.itemFirst, !r.laneSeen[lane])
	if !r.laneSeen[lane] {
		r.laneSeen[lane] = true
		r.lanes = append(r.lanes, lane)
	}
	r.itemNs = append(r.itemNs, int64(len(r.itemNs)+1))
	r.itemLanes = append(r.itemLanes, lane)
	r.itemDeliveries = append(r.itemDeliveries, string(js))
	r.itemAts = append(r.itemAts, now.UnixMilli())
	r.itemOwed = append(r.itemOwed, int32(boolInt(owed)))
	return nil
}

// message adds in, accepted at now, to its conversation, which opens
// with it if opens, and returns how it was accepted.
func (r *batchRows) message(in Inbound, now time.Time, conv batchConv, opens bool) (*Accepted, error) {
	ms := now.UnixMilli()
	acc := &Accepted{}
	if opens {
		r.convIDs, r.convOpenids, r.convAgents = append(r.convIDs, conv.id), append(r.convOpenids, in.OpenID), append(r.convAgents, conv.agent)
		r.convAts = append(r.convAts, ms)
		acc.Reply, acc.Assigned = replyConnecting, []Assignment{{OpenID: in.OpenID, Agent: conv.agent}}
		r.connectingKeys = append(r.connectingKeys, in.Key)
	}
	d := Delivery{Kind: deliverIMSend, OpenID: in.OpenID, IMUser: in.IMUser, Agent: conv.agent, Text: in.Text, Elems: in.Elems,
		Media: in.Media, MsgRandom: in.NewRandom(), Conv: conv.id}
	return acc, r.item(d, now, true)
}

// write is the last round trip: it adds what the batch takes (the IM
// imports of the customers it recorded first) and commits, or rolls back
// if it adds nothing.
func (b *pgBatch) write(ctx context.Context, taking map[string]bool, load map[string]int) ([]*Accepted, error) {
	r := batchRows{laneSeen: map[string]bool{}}
	imUsers, takenKeys := map[string]string{}, map[string]bool{}
	for _, bp := range b.cands {
		imUsers[bp.op.in.OpenID] = bp.op.in.IMUser
		if taking[bp.op.in.OpenID] {
			takenKeys[bp.op.in.Key] = true
		}
	}
	for _, o := range b.inserted {
		if err := r.item(Delivery{Kind: deliverIMImport, OpenID: o, IMUser: imUsers[o]}, b.firstAt[o], false); err != nil {
			return nil, err
		}
	}
	accs := make([]*Accepted, len(b.cands))
	started := map[string]bool{}
	for i, bp := range b.cands {
		in := bp.op.in
		if !taking[in.OpenID] {
			if b.claimed[in.Key] && !takenKeys[in.Key] {
				r.unclaim = append(r.unclaim, in.Key)
			}
			continue
		}
		conv := b.convs[in.OpenID]
		var err error
		if accs[i], err = r.message(in, bp.op.now, conv, conv.opened && !started[in.OpenID]); err != nil {
			return nil, err
		}
		started[in.OpenID] = true
	}
	for agent, n := range load {
		r.loadAgents, r.loadCounts = append(r.loadAgents, agent), append(r.loadCounts, int32(n))
		at := int64(0) // the last conversation given: its time is the agent's assigned_at
		for i, a := range r.convAgents {
			if a == agent {
				at = r.convAts[i]
			}
		}
		r.loadAts = append(r.loadAts, at)
	}
	if len(r.itemNs) == 0 {
		_, err := b.c.Exec(ctx, `ROLLBACK`)
		return accs, err
	}
	q := r.statements()
	reads := make([]func(pgx.BatchResults) error, q.Len())
	for i := range reads {
		reads[i] = skip
	}
	return accs, sendBatch(ctx, b.c, q, reads...)
}

// statements are the batch's last round trip: its rows added, the lock
// order kept (the desk, held already, before the lanes), and COMMIT.
func (r *batchRows) statements() *pgx.Batch {
	var q pgx.Batch
	if len(r.unclaim) > 0 {
		q.Queue(`DELETE FROM seen_keys WHERE key = ANY($1)`, r.unclaim)
	}
	if len(r.convIDs) > 0 {
		q.Queue(`INSERT INTO conversations (id, openid, agent, opened_at, queued_at, assigned_at)
			SELECT id, o, a, at, 0, at FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS t(id, o, a, at)`,
			r.convIDs, r.convOpenids, r.convAgents, r.convAts)
		q.Queue(`INSERT INTO agent_load (agent, open, assigned_at) SELECT a, n, at FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS t(a, n, at)
			ON CONFLICT (agent) DO UPDATE SET open = agent_load.open + excluded.open, assigned_at = excluded.assigned_at`,
			r.loadAgents, r.loadCounts, r.loadAts)
		q.Queue(`UPDATE seen_keys SET value = $1 WHERE key = ANY($2)`, replyConnecting, r.connectingKeys)
	}
	q.Queue(`SELECT pg_advisory_xact_lock(h) FROM
		(SELECT DISTINCT hashtext(l) AS h FROM unnest($1::text[]) AS l ORDER BY 1) AS lanes`, r.lanes)
	// The items' ids are drawn once their lanes are held, so that a lane's
	// ids follow the order in which its items were added (the next head
	// is the lane's first pending id). An item heads its lane if the lane
	// has no pending item and no item of the batch comes before it: the
	// statement does not see the rows it adds.
	q.Queue(`WITH ids AS MATERIALIZED (SELECT n, nextval('outbox_id_seq') AS id FROM generate_series(1, $1::integer) AS n)
		INSERT INTO outbox (id, lane, delivery, next_at, created_at, updated_at, history_owed, head)
		SELECT ids.id, t.lane, t.delivery, t.at, t.at, t.at, t.owed, CASE WHEN t.first AND (`+lanePending("t.lane")+`) IS NULL THEN 1 ELSE 0 END
		FROM unnest($2::text[], $3::text[], $4::bigint[], $5::boolean[], $6::integer[]) WITH ORDINALITY AS t(lane, delivery, at, first, owed, n)
		JOIN ids ON ids.n = t.n`,
		len(r.itemNs), r.itemLanes, r.itemDeliveries, r.itemAts, r.itemFirst, r.itemOwed)
	q.Queue(`COMMIT`)
	return &q
}

// sendBatch sends q to PostgreSQL as one pipeline and reads its results,
// one a statement, with read, in turn, until one fails.
func sendBatch(ctx context.Context, c *pgx.Conn, q *pgx.Batch, read ...func(pgx.BatchResults) error) error {
	br := c.SendBatch(ctx, q)
	var err error
	for _, r := range read {
		if err = r(br); err != nil {
			break
		}
	}
	if cerr := br.Close(); err == nil { // after a failed read, Close returns its error again
		err = cerr
	}
	return err
}

// skip reads a statement's result for its error alone.
func skip(br pgx.BatchResults) error {
	_, err := br.Exec()
	return err
}

// rowsOf reads a query's rows with scan.
func rowsOf(scan func(pgx.Rows) error) func(pgx.BatchResults) error {
	return func(br pgx.BatchResults) error {
		rows, err := br.Query()
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			if err := scan(rows); err != nil {
				return err
			}
		}
		return rows.Err()
	}
}
