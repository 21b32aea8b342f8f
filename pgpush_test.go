package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestPushesTakenTogether: customers write at once, some pushes beside
// WeChat's retry of them, some with an event between their messages, more
// customers than the agents have places; on PostgreSQL many pushes commit
// in one transaction. Whatever was taken together or alone, each customer's
// messages are recorded once, in order, and queued to IM once, in order;
// each lane with pending items has one head, its first; the push and its
// retry get one answer; every customer has one open conversation, and each
// agent's count of them is what it holds, within the cap.
func TestPushesTakenTogether(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_", MaxOpen: 3})
			const customers, each = 12, 6
			sent := writeAtOnce(t, st, customers, each)

			db := st.rdb
			for c := range customers {
				o := fmt.Sprintf("o%02d", c)
				if err := st.settleCustomer(context.Background(), o); err != nil { // the rows owed, history.go
					t.Fatal(err)
				}
				if got := columnOf(t, db, st, `SELECT text FROM messages WHERE openid = ? AND direction = 'in' ORDER BY id`, o); !slices.Equal(got, sent[o]) {
					t.Errorf("%s's history reads %q, want %q", o, got, sent[o])
				}
				var toIM []string
				for _, raw := range columnOf(t, db, st, `SELECT delivery FROM outbox WHERE lane = ? ORDER BY id`, "im:"+o) {
					var d Delivery
					if err := json.Unmarshal([]byte(raw), &d); err != nil {
						t.Fatal(err)
					}
					if d.Kind == deliverIMSend {
						toIM = append(toIM, d.Text)
					}
				}
				var agent string
				if err := db.QueryRow(st.q(`SELECT agent FROM conversations WHERE openid = ? AND closed_at IS NULL`), o).Scan(&agent); err != nil {
					t.Fatal(err)
				}
				if agent == "" {
					toIM = append(toIM, sent[o]...) // they wait: their messages stay in the history
				}
				if !slices.Equal(toIM, sent[o]) {
					t.Errorf("%s's messages queued to IM: %q, want %q", o, toIM, sent[o])
				}
			}
			if kind == "postgres" {
				checkHeads(t, db)
				if st.pushes.batched.Load() == 0 {
					t.Error("no push was committed together with another")
				}
			}
			checkDeskCounts(t, db, st, customers, 3)
		})
	}
}

// writeAtOnce has the customers write at once, every third push sent
// twice at once (the second with another signed query, as WeChat's retry),
// and checks that the two got one answer. It returns the texts each customer
// sent, in order.
func writeAtOnce(t *testing.T, st *Store, customers, each int) map[string][]string {
	ctx := context.Background()
	start := make(chan struct{})
	var mu sync.Mutex
	sent := map[string][]string{}
	var wg sync.WaitGroup
	for c := range customers {
		wg.Go(func() {
			<-start
			o := fmt.Sprintf("o%02d", c)
			for i := range each {
				in := message(fmt.Sprintf("k%02d-%d", c, i), o, fmt.Sprintf("c%d m%d", c, i))
				if c%4 == 1 && i == 2 {
					in.Action, in.Text = actEvent, "" // a menu click: taken alone, with what follows
				}
				sends := 1
				if i%3 == 0 {
					sends = 2
				}
				var accs [2]Accepted
				var inner sync.WaitGroup
				for r := range sends {
					inner.Go(func() {
						in := in
						in.SigKey = fmt.Sprintf("sig%d-%s", r, in.Key)
						var err error
						if accs[r], err = st.AcceptPush(ctx, in, time.Now()); err != nil {
							t.Error(err)
						}
					})
				}
				inner.Wait()
				if sends == 2 && (accs[0].Duplicate == accs[1].Duplicate || accs[0].Reply != accs[1].Reply) {
					t.Errorf("%s and its retry were answered %+v and %+v", in.Key, accs[0], accs[1])
				}
				if in.Action == actMessage {
					mu.Lock()
					sent[o] = append(sent[o], in.Text)
					mu.Unlock()
				}
			}
		})
	}
	close(start)
	wg.Wait()
	return sent
}

// columnOf returns the one text column query reads for args.
func columnOf(t *testing.T, db *sql.DB, st *Store, query string, args ...any) []string {
	t.Helper()
	rows, err := db.Query(st.q(query), args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

// checkHeads checks that each lane with pending items has one head, its
// first pending item.
func checkHeads(t *testing.T, db *sql.DB) {
	t.Helper()
	rows, err := db.Query(`SELECT lane, COUNT(*) FILTER (WHERE head = 1), MIN(id), COALESCE(MIN(id) FILTER (WHERE head = 1), 0)
		FROM outbox WHERE state = 'pending' GROUP BY lane`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var lane string
		var heads, first, head int64
		if err := rows.Scan(&lane, &heads, &first, &head); err != nil {
			t.Fatal(err)
		}
		if heads != 1 || head != first {
			t.Errorf("lane %s has %d heads, the first %d, want one: its first pending item %d", lane, heads, head, first)
		}
	}
}

// checkDeskCounts checks that every customer has one open conversation and
// that each agent's count of open conversations is what they hold, at most
// maxOpen.
func checkDeskCounts(t *testing.T, db *sql.DB, st *Store, customers, maxOpen int) {
	t.Helper()
	var open int
	if err := db.QueryRow(`SELECT COUNT(DISTINCT openid) FROM conversations WHERE closed_at IS NULL`).Scan(&open); err != nil {
		t.Fatal(err)
	}
	if open != customers {
		t.Errorf("%d customers have an open conversation, want %d", open, customers)
	}
	for _, a := range st.desk.Agents {
		var held, counted int
		if err := db.QueryRow(st.q(`SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL AND agent = ?`), a).Scan(&held); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRow(st.q(`SELECT COALESCE(MAX(open), 0) FROM agent_load WHERE agent = ?`), a).Scan(&counted); err != nil {
			t.Fatal(err)
		}
		if held != counted || held > maxOpen {
			t.Errorf("%s holds %d open conversations and is counted %d, cap %d", a, held, counted, maxOpen)
		}
	}
}

// batchOps makes pushOps for the batch writer.
func batchOps(now time.Time, ins ...Inbound) []pushOp {
	var ops []pushOp
	for _, in := range ins {
		ops = append(ops, pushOp{in: in, now: now, done: make(chan pushResult, 1)})
	}
	return ops
}

// TestReplayInABatchIsRefused: a push and, after it in the same batch, a
// replay of its signed query with another body, whose key sorts first (the
// batch claims keys in key order). As one at a time in the batch's order,
// the first is accepted and the replay refused.
func TestReplayInABatchIsRefused(t *testing.T) {
	st := openTestStore(t, "postgres")
	st.SetDesk(&Desk{Agents: []string{"a1"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	// Both customers known with an open conversation: the common case.
	for _, o := range []string{"oA", "oB"} {
		if _, err := st.AcceptPush(ctx, message("first-"+o, o, "hello"), now); err != nil {
			t.Fatal(err)
		}
	}
	genuine := message("k9", "oA", "genuine")
	genuine.SigKey = "sig:captured"
	replay := message("k1", "oB", "replayed body")
	replay.SigKey = "sig:captured"
	ops := batchOps(now, genuine, replay) // the genuine push first
	st.pushes.take(ops)
	g, r := <-ops[0].done, <-ops[1].done
	if g.err != nil || !errors.Is(r.err, errReplay) {
		t.Errorf("genuine push (first) got err=%v, replay (second) got err=%v; want the genuine accepted and the replay refused", g.err, r.err)
	}
}

// TestNewCustomerInABatchBesideALonePush: a batch on one instance and a
// push taken alone on another record the same new customer at once. The
// lone push holds the new row and goes on to the desk; the batch records
// its new customers before it takes the desk (the lock order, db.go), so it
// waits for the row, and PostgreSQL counts no deadlock.
func TestNewCustomerInABatchBesideALonePush(t *testing.T) {
	url := testPostgres(t)
	st1, st2 := openStoreAt(t, url), openStoreAt(t, url)
	ctx, now := context.Background(), time.Now()
	mon, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	deadlocks := func() int64 {
		var n int64
		// A fresh snapshot of the cumulative statistics each time.
		tx, err := mon.Begin()
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		tx.Exec(`SELECT pg_stat_clear_snapshot()`)
		if err := tx.QueryRow(`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := deadlocks()

	// Hold the new customer's IM lane, so the lone message below stops
	// between inserting the customer and taking the desk.
	hold := holdLock(t, mon, `SELECT pg_advisory_xact_lock(hashtext('im:oX'))`)
	// Instance 2 takes oX's message alone (as its chain does).
	alone := make(chan error, 1)
	go func() {
		_, err := write(ctx, st2, func(ctx context.Context, tx *sql.Tx) (Accepted, error) {
			return st2.acceptPush(ctx, tx, message("k-alone", "oX", "second"), now)
		})
		alone <- err
	}()
	eventually(t, "the lone message to wait for the lane", func() bool { return waitingOn(t, mon, "SELECT pg_advisory_xact_lock(hashtext($1))%") })
	// Instance 1 batches oX's other message: the desk, then the customer's row.
	batched := make(chan error, 1)
	go func() {
		_, err := st1.AcceptPush(ctx, message("k-batch", "oX", "first"), now)
		batched <- err
	}()
	eventually(t, "the batch to wait for the new row", func() bool {
		return waitingOn(t, mon, "%INSERT INTO customers (openid, followed, created_at)%SELECT o, 1, at%")
	})
	hold.Rollback() // the lone message goes on to the desk
	for _, ch := range []chan error{alone, batched} {
		select {
		case err := <-ch:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("stuck")
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for deadlocks() == before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := deadlocks() - before; n > 0 {
		t.Errorf("PostgreSQL detected %d deadlock(s) between the batch and a lone push of the same new customer", n)
	}
}

// waitingOn reports whether some backend waits on a lock running a query
// like like.
func waitingOn(t *testing.T, mon *sql.DB, like string) bool {
	var n int
	if err := mon.QueryRow(`SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1`, like).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// TestReplayBesideACustomerTakenAlone: the genuine push's customer has a
// push being taken alone (a menu click, its chain still running), so the
// genuine push joins that chain; a replay of its signed query comes later
// in the same batch from another customer. As one at a time in the batch's
// order, the genuine push is accepted and the replay refused: the replay
// waits for the genuine push's answer.
func TestReplayBesideACustomerTakenAlone(t *testing.T) {
	url := testPostgres(t)
	st := openStoreAt(t, url)
	st.SetDesk(&Desk{Agents: []string{"a1"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	for _, o := range []string{"oA", "oB"} {
		if _, err := st.AcceptPush(ctx, message("first-"+o, o, "hello"), now); err != nil {
			t.Fatal(err)
		}
	}
	mon, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	// Hold oA's row, so that oA's menu click, taken alone, stays in its
	// chain for a while (as any slow lone push would).
	hold := holdLock(t, mon, `SELECT 1 FROM customers WHERE openid = 'oA' FOR UPDATE`)
	click := message("k-click", "oA", "")
	click.Action = actEvent
	clickOps := batchOps(now, click)
	st.pushes.take(clickOps)
	eventually(t, "oA's click to wait for its row", func() bool { return waitingOn(t, mon, "%INSERT INTO customers%") })

	genuine := message("k9", "oA", "genuine")
	genuine.SigKey = "sig:captured"
	replay := message("k1", "oB", "replayed body")
	replay.SigKey = "sig:captured"
	ops := batchOps(now, genuine, replay) // the genuine push first
	st.pushes.take(ops)
	replayWaits(t, ops[1]) // the genuine push waits for oA's row
	hold.Rollback()
	results := make([]pushResult, 2)
	for i, op := range ops {
		select {
		case results[i] = <-op.done:
		case <-time.After(10 * time.Second):
			t.Fatal("stuck")
		}
	}
	<-clickOps[0].done
	if results[0].err != nil || !errors.Is(results[1].err, errReplay) {
		t.Errorf("genuine push (first) got err=%v; replay (second) got %+v err=%v; want the genuine accepted and the replay refused",
			results[0].err, results[1].acc, results[1].err)
	}
	var n int
	if err := mon.QueryRow(`SELECT COUNT(*) FROM messages WHERE text = 'replayed body'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("the replayed body was recorded %d time(s) and queued to the agent", n)
	}
}

// TestBatchIDsFollowTheLaneLock: a batch takes oA's message beside a new
// customer's first one and waits for the desk; meanwhile the worker queues
// a notice in oA's IM lane (Store.Notice, which holds no customer). The
// batch draws its items' ids once it holds their lanes, so the lane's head
// is its first pending item, and after the prune's markHeads one claim
// takes one item of the lane.
func TestBatchIDsFollowTheLaneLock(t *testing.T) {
	url := testPostgres(t)
	st := openStoreAt(t, url)
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	if _, err := st.AcceptPush(ctx, message("first", "oA", "hello"), now); err != nil {
		t.Fatal(err)
	}
	mon, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	// oA's first items were delivered: the lane is empty.
	if _, err := mon.Exec(`UPDATE outbox SET state = 'done', head = 0 WHERE lane = 'im:oA'`); err != nil {
		t.Fatal(err)
	}
	hold := holdLock(t, mon, `SELECT pg_advisory_xact_lock(hashtext('desk'))`)
	ops := batchOps(now, message("k-a", "oA", "second"), message("k-n", "oN", "new here"))
	done := make(chan struct{})
	go func() { st.pushes.take(ops); close(done) }()
	eventually(t, "the batch to wait for the desk", func() bool { return waitingOn(t, mon, "%pg_advisory_xact_lock(hashtext('desk'))%") })
	note := conversationNotice("wx_oA", "oA", "a1", "Your image reached WeChat customer wx_oA as a link")
	if err := st.Notice(ctx, note, now); err != nil {
		t.Fatal(err)
	}
	hold.Rollback()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("stuck")
	}
	for _, op := range ops {
		if r := <-op.done; r.err != nil {
			t.Fatal(r.err)
		}
	}
	checkHeads(t, mon)
	if _, err := st.PruneOutbox(ctx, now.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	items, err := st.Claim(ctx, "w1", now.Add(time.Second), time.Minute, 10)
	if err != nil {
		t.Fatal(err)
	}
	var inLane []int64
	for _, it := range items {
		if it.Lane == "im:oA" {
			inLane = append(inLane, it.ID)
		}
	}
	if len(inLane) > 1 {
		t.Errorf("one claim took %d items of lane im:oA at once: %v", len(inLane), inLane)
	}
}

// replayWaits checks that replay gets no answer while the genuine push it
// waits for cannot be taken: a bounded look for what must not happen.
func replayWaits(t *testing.T, replay pushOp) {
	t.Helper()
	select {
	case r := <-replay.done:
		t.Fatalf("the replay was answered (%+v, %v) before the genuine push could be taken", r.acc, r.err)
	case <-time.After(300 * time.Millisecond):
	}
}

// holdLock begins a transaction on db that takes the lock query takes,
// and rolls it back when the test ends, if the test has not.
func holdLock(t *testing.T, db *sql.DB, query string) *sql.Tx {
	t.Helper()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback() })
	if _, err := tx.Exec(query); err != nil {
		t.Fatal(err)
	}
	return tx
}
