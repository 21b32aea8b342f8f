package main

// The worker's pipelined writes on PostgreSQL (pgworker.go) against the
// statement-at-a-time finish they stand for, and when they fail or are
// given up.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pgRow is an outbox row a scenario writes directly.
type pgRow struct {
	lane     string
	state    string
	head     int
	by       string
	until    int64
	owed     int
	delivery string
	created  int64
}

type finishCase struct {
	name      string
	customers map[string]int64 // openid -> history_settled
	rows      []pgRow
	x         int // index of the delivered item in rows (id = x+1)
	by        string
	until     int64
	owes      bool
}

func caseDelivery(o, text string) string {
	return fmt.Sprintf(`{"kind":"im_send","openid":%q,"im_user":"wx_%s","agent":"a1","text":%q,"conv":7}`, o, o, text)
}

func setUpCase(t *testing.T, st *Store, sc finishCase) {
	t.Helper()
	ctx := context.Background()
	for o, settled := range sc.customers {
		if _, err := st.db.ExecContext(ctx, `INSERT INTO customers (openid, created_at, history_settled) VALUES ($1, 0, $2)`, o, settled); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range sc.rows {
		if _, err := st.db.ExecContext(ctx, `INSERT INTO outbox (lane, delivery, state, head, claimed_by, claimed_until, history_owed, next_at, created_at, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, 0)`, r.lane, r.delivery, r.state, r.head, r.by, r.until, r.owed, r.created); err != nil {
			t.Fatal(err)
		}
	}
}

func dumpOutbox(t *testing.T, st *Store) string {
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	rows, err := st.db.QueryContext(ctx, `SELECT id, lane, state, head, attempts, next_at, claimed_by, claimed_until, last_error, updated_at, tried_at, history_owed FROM outbox ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id, next, until, upd, tried int64
		var lane, state, by, lastErr string
		var head, attempts, owed int
		if err := rows.Scan(&id, &lane, &state, &head, &attempts, &next, &by, &until, &lastErr, &upd, &tried, &owed); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "outbox %d %s %s head=%d att=%d next=%d by=%s until=%d err=%q upd=%d tried=%d owed=%d\n", id, lane, state, head, attempts, next, by, until, lastErr, upd, tried, owed)
	}
	rows.Close()
	rows, err = st.db.QueryContext(ctx, `SELECT id, conversation, openid, direction, agent, text, state, outbox_id, created_at FROM messages ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id, conv, ob, created int64
		var o, dir, agent, text, state string
		if err := rows.Scan(&id, &conv, &o, &dir, &agent, &text, &state, &ob, &created); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "message %d conv=%d %s %s %s %q %s outbox=%d at=%d\n", id, conv, o, dir, agent, text, state, ob, created)
	}
	rows.Close()
	rows, err = st.db.QueryContext(ctx, `SELECT openid, history_settled FROM customers ORDER BY openid`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var o string
		var s int64
		rows.Scan(&o, &s)
		fmt.Fprintf(&b, "customer %s settled=%d\n", o, s)
	}
	rows.Close()
	return b.String()
}

func caseItem(sc finishCase) OutboxItem {
	return OutboxItem{ID: int64(sc.x + 1), Lane: sc.rows[sc.x].lane, owesHistory: sc.owes, claimedBy: sc.by, claimedUntil: sc.until,
		triedNow: 4242}
}

// TestDeliveredPGAsFinish: deliveredPG leaves the database as finish
// (claim.go) does with itemDone, and reports the same, in each case.
func TestDeliveredPGAsFinish(t *testing.T) {
	o := "c1"
	im, wx := "im:"+o, "wx:"+o
	d := func(s string) string { return caseDelivery(o, s) }
	scs := []finishCase{
		{name: "plain wx lane with items after", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 11},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 12},
		}, x: 0, by: "w", until: 100},
		{name: "not held", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 1, "v", 200, 0, `{"kind":"wx_send"}`, 10},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 11},
		}, x: 0, by: "w", until: 100},
		{name: "already done", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "done", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{wx, "pending", 1, "", 0, 0, `{"kind":"wx_send"}`, 11},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 12},
		}, x: 0, by: "w", until: 100},
		{name: "next already head", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{wx, "pending", 1, "", 0, 0, `{"kind":"wx_send"}`, 11},
		}, x: 0, by: "w", until: 100},
		{name: "non-pending items between", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{wx, "done", 0, "", 0, 0, `{"kind":"wx_send"}`, 11},
			{wx, "failed", 0, "", 0, 0, `{"kind":"wx_send"}`, 12},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 13},
		}, x: 0, by: "w", until: 100},
		{name: "earlier pending not head", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 9},
			{wx, "pending", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{wx, "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 11},
		}, x: 1, by: "w", until: 100},
		{name: "other lanes untouched", customers: map[string]int64{o: 0}, rows: []pgRow{
			{wx, "pending", 1, "w", 100, 0, `{"kind":"wx_send"}`, 10},
			{im, "pending", 0, "", 0, 0, d("x"), 11},
			{"wx:c2", "pending", 0, "", 0, 0, `{"kind":"wx_send"}`, 11},
		}, x: 0, by: "w", until: 100},
		{name: "owes, with owed after", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "pending", 1, "w", 100, 1, d("m1"), 10},
			{im, "pending", 0, "", 0, 1, d("m2"), 11},
		}, x: 0, by: "w", until: 100, owes: true},
		{name: "owes, not held", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "pending", 1, "v", 100, 1, d("m1"), 10},
			{im, "pending", 0, "", 0, 1, d("m2"), 11},
		}, x: 0, by: "w", until: 100, owes: true},
		{name: "owes, earlier owed", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "pending", 0, "", 0, 1, d("m0"), 9},
			{im, "pending", 1, "w", 100, 1, d("m1"), 10},
			{im, "pending", 0, "", 0, 1, d("m2"), 11},
		}, x: 1, by: "w", until: 100, owes: true},
		{name: "owes, unreadable before", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "pending", 0, "", 0, 1, `{not json`, 9},
			{im, "pending", 1, "w", 100, 1, d("m1"), 10},
		}, x: 1, by: "w", until: 100, owes: true},
		{name: "owes, unreadable itself", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "pending", 1, "w", 100, 1, `{not json`, 10},
			{im, "pending", 0, "", 0, 1, d("m2"), 11},
		}, x: 0, by: "w", until: 100, owes: true},
		{name: "owes, settled already", customers: map[string]int64{o: 5}, rows: []pgRow{
			{im, "pending", 1, "w", 100, 1, d("m1"), 10},
			{im, "pending", 0, "", 0, 1, d("m2"), 11},
		}, x: 0, by: "w", until: 100, owes: true},
		{name: "owes, unknown customer", customers: map[string]int64{}, rows: []pgRow{
			{im, "pending", 1, "w", 100, 1, d("m1"), 10},
		}, x: 0, by: "w", until: 100, owes: true},
		{name: "owes, done already", customers: map[string]int64{o: 0}, rows: []pgRow{
			{im, "done", 1, "w", 100, 1, d("m1"), 10},
			{im, "pending", 1, "", 0, 1, d("m2"), 11},
		}, x: 0, by: "w", until: 100, owes: true},
	}
	for _, sc := range scs {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()
			now := time.UnixMilli(5000)
			old := openTestStore(t, "postgres")
			setUpCase(t, old, sc)
			var oldEnded bool
			oldErr := old.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
				var err error
				oldEnded, err = old.finish(ctx, tx, caseItem(sc), itemDone, "", now)
				return err
			})
			nw := openTestStore(t, "postgres")
			setUpCase(t, nw, sc)
			newHeld, newErr := nw.deliveredPG(ctx, caseItem(sc), now)
			if oldEnded != newHeld || errors.Is(oldErr, errUnknownCustomer) != errors.Is(newErr, errUnknownCustomer) || (oldErr == nil) != (newErr == nil) {
				t.Errorf("old: %v, %v; new: %v, %v", oldEnded, oldErr, newHeld, newErr)
			}
			if a, b := dumpOutbox(t, old), dumpOutbox(t, nw); a != b {
				t.Errorf("the database differs:\nold finish:\n%s\ndeliveredPG:\n%s", a, b)
			}
		})
	}
}

// TestDeliveredPGFailsWhole: a statement of the pipeline that fails, or a
// COMMIT that fails, leaves nothing written and the one connection of the
// pool usable, outside any transaction, its locks let go.
func TestDeliveredPGFailsWhole(t *testing.T) {
	for _, fail := range []string{"insert", "commit", "unknown"} {
		t.Run(fail, func(t *testing.T) {
			url := testPostgres(t)
			ctx := context.Background()
			st, err := openStore(ctx, url, storeOptions{PGConns: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			sc := finishCase{customers: map[string]int64{"c1": 0}, rows: []pgRow{
				{"im:c1", "pending", 1, "w", 100, 1, caseDelivery("c1", "m1"), 10},
				{"im:c1", "pending", 0, "", 0, 1, caseDelivery("c1", "m2"), 11},
			}, x: 0, by: "w", until: 100, owes: true}
			if fail == "unknown" {
				sc.customers = nil
			}
			setUpCase(t, st, sc)
			before := dumpOutbox(t, st)
			boom := func(trigger string) {
				for _, q := range []string{`CREATE OR REPLACE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$`, trigger} {
					if _, err := st.db.ExecContext(ctx, q); err != nil {
						t.Fatal(err)
					}
				}
			}
			switch fail {
			case "insert":
				boom(`CREATE TRIGGER boom BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION boom()`)
			case "commit":
				boom(`CREATE CONSTRAINT TRIGGER boom AFTER UPDATE ON outbox DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION boom()`)
			}
			err = st.Delivered(ctx, []OutboxItem{caseItem(sc)}, time.UnixMilli(5000))
			if err == nil {
				t.Fatal("Delivered succeeded")
			}
			t.Logf("Delivered: %v", err)
			var x1, x2 int64
			e1 := st.db.QueryRowContext(ctx, `SELECT txid_current()`).Scan(&x1)
			e2 := st.db.QueryRowContext(ctx, `SELECT txid_current()`).Scan(&x2)
			if e1 != nil || e2 != nil || x1 == x2 {
				t.Errorf("the pool's connection is in a transaction still (%v, %v, %d, %d)", e1, e2, x1, x2)
			}
			st.db.ExecContext(ctx, `DROP TRIGGER IF EXISTS boom ON messages`)
			st.db.ExecContext(ctx, `DROP TRIGGER IF EXISTS boom ON outbox`)
			if after := dumpOutbox(t, st); after != before {
				t.Errorf("a failed Delivered wrote:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			other := openStoreAt(t, url)
			lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			if _, err := other.db.ExecContext(lctx, `SELECT pg_advisory_xact_lock(hashtext('im:c1'))`); err != nil {
				t.Errorf("the lane is held still: %v", err)
			}
		})
	}
}

// lockWaiters counts the sessions of the database waiting on a lock of the
// kind given ("advisory", "transactionid", ...).
func lockWaiters(st *Store, kind string) int {
	var n int
	st.db.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = $1`, kind).Scan(&n)
	return n
}

// quiet waits until no other session of the database runs a statement or
// holds a transaction open: one whose client gave up has ended what it was
// sent, committed or rolled back.
func quiet(t *testing.T, st *Store) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := st.db.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND pid <> pg_backend_pid() AND state <> 'idle'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions still busy", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// whenWaiting runs then once a session waits on a lock of the kind given.
func whenWaiting(st *Store, kind string, then func()) {
	go func() {
		deadline := time.Now().Add(10 * time.Second)
		for lockWaiters(st, kind) == 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		then()
	}()
}

// TestDeliveredGivenUpWritesNothing: Delivered whose context ends
// while it waits for its lane (held by another transaction, which ends just
// then) returns an error, and so must have written nothing: the item stays
// pending, and the lane's next item does not head it.
func TestDeliveredGivenUpWritesNothing(t *testing.T) {
	st := openTestStore(t, "postgres")
	ctx, now := context.Background(), time.Now()
	queueReplies(t, st, now, "one", "two")
	items, err := st.Claim(ctx, "w", now, time.Minute, 10)
	if err != nil || len(items) != 1 {
		t.Fatal(items, err)
	}
	ext, err := st.db.Conn(ctx) // another transaction holds the lane
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Close()
	if _, err := ext.ExecContext(ctx, `SELECT pg_advisory_lock(hashtext('wx:o1'))`); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	whenWaiting(st, "advisory", func() {
		cancel() // the worker stopping
		ext.ExecContext(ctx, `SELECT pg_advisory_unlock(hashtext('wx:o1'))`)
	})
	err = st.Delivered(cctx, items, now)
	if err == nil {
		t.Skip("Delivered finished before its context ended")
	}
	quiet(t, st)
	var state string
	var heads int
	if err := st.db.QueryRow(`SELECT state FROM outbox WHERE id = $1`, items[0].ID).Scan(&state); err != nil {
		t.Fatal(err)
	}
	st.db.QueryRow(`SELECT count(*) FROM outbox WHERE head = 1 AND state = 'pending'`).Scan(&heads)
	if state != "pending" {
		t.Errorf("Delivered returned %q, yet afterwards the item is %s (pending heads: %d)", err, state, heads)
	}
}

// TestClaimGivenUpTakesNothing: a claim whose context ends while it waits
// for the outbox (another transaction locks the table, as a schema change
// does, and ends just then) returns an error, and so must have taken
// nothing: the item is not held by it afterwards, and another instance
// takes it at once. The claim's statement is prepared already on the
// connection it takes, as in a running worker, so that it waits when it
// runs, not while pgx prepares it; the wait is watched from a pool of its
// own.
func TestClaimGivenUpTakesNothing(t *testing.T) {
	st := openTestStore(t, "postgres")
	ctx, now := context.Background(), time.Now()
	watch, err := sql.Open("pgx", os.Getenv("TEST_DATABASE_URL"))
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close()
	st.db.SetMaxOpenConns(2) // ext's, and the one the claims take
	ext, err := st.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Rollback()
	if got, err := st.Claim(ctx, "w", now, time.Minute, 10); err != nil || len(got) != 0 { // prepares the claim
		t.Fatal(got, err)
	}
	queueReply(t, st, "one", now)
	if _, err := ext.ExecContext(ctx, `LOCK TABLE outbox IN SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			var n int
			watch.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
				AND wait_event_type = 'Lock' AND wait_event = 'relation' AND query LIKE '%WITH due AS MATERIALIZED%'`).Scan(&n)
			select {
			case <-stop:
				return
			default:
			}
			if n > 0 {
				break
			}
		}
		cancel() // the worker stopping
		ext.Rollback()
	}()
	items, err := st.Claim(cctx, "w", now, time.Minute, 10)
	if err == nil {
		t.Skipf("the claim finished (%d items) before its context ended", len(items))
	}
	quiet(t, st)
	var by string
	var until int64
	if err := st.db.QueryRow(`SELECT claimed_by, claimed_until FROM outbox WHERE lane = 'wx:o1'`).Scan(&by, &until); err != nil {
		t.Fatal(err)
	}
	if by == "w" && until > now.UnixMilli() {
		t.Errorf("the claim returned %q, yet the item is held by w for %s more", err, time.Duration(until-now.UnixMilli())*time.Millisecond)
	}
	got, err := st.Claim(ctx, "v", now, time.Minute, 10)
	if err != nil || len(got) != 1 {
		t.Errorf("another instance claimed %d items (%v), want the item", len(got), err)
	}
}

// TestClaimSkipsHeldHeads: a claim passes over a head whose row another
// transaction holds (another instance's claim, not yet committed) and takes
// the next lane's, without waiting; the next claim takes the first once it
// is free.
func TestClaimSkipsHeldHeads(t *testing.T) {
	st := openTestStore(t, "postgres")
	ctx, now := context.Background(), time.Now()
	queueReply(t, st, "one", now)
	err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o2", Text: "two"}, now)
	})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := st.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Rollback()
	if _, err := ext.ExecContext(ctx, `SELECT id FROM outbox WHERE lane = 'wx:o1' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got, err := st.Claim(cctx, "w", now, time.Minute, 10)
	if err != nil || len(got) != 1 || got[0].Lane != "wx:o2" {
		t.Fatalf("with o1's head held, the claim took %v (%v); want o2's head alone", got, err)
	}
	if err := ext.Rollback(); err != nil {
		t.Fatal(err)
	}
	got, err = st.Claim(ctx, "v", now, time.Minute, 10)
	if err != nil || len(got) != 1 || got[0].Lane != "wx:o1" {
		t.Errorf("once o1's head is free, the claim took %v (%v); want it alone", got, err)
	}
}

// TestClaimRechecksHeadsTakenMidStatement: a claim whose statement began
// while two heads were free, one of which another instance then changes
// and commits before the claim reaches it, checks that one again as the
// other left it, and takes it only if it is still a free due head, as
// the other left it. A statement trigger holds the claim after its
// snapshot is taken.
func TestClaimRechecksHeadsTakenMidStatement(t *testing.T) {
	for _, tc := range []struct {
		change string
		taken  bool // the second head is still a free due head
	}{
		{`claimed_by = 'a', claimed_until = $2`, false}, // another instance's claim
		{`state = 'done', claimed_until = 0`, false},    // finished by an earlier claim
		{`next_at = $2, claimed_until = 0`, false},      // retried later by an earlier claim
		{`head = 0`, false},                             // no longer the head
		{`tried_at = 777, attempts = 3 + 0 * $2`, true}, // tried by an earlier claim, whose lease ran out
	} {
		change := tc.change
		t.Run(change, func(t *testing.T) {
			st := openTestStore(t, "postgres")
			ctx, now := context.Background(), time.Now()
			queueReply(t, st, "one", now)
			err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
				return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o2", Text: "two"}, now)
			})
			if err != nil {
				t.Fatal(err)
			}
			var first, second int64
			if err := st.db.QueryRow(`SELECT (SELECT id FROM outbox WHERE lane = 'wx:o1'), (SELECT id FROM outbox WHERE lane = 'wx:o2')`).Scan(&first, &second); err != nil {
				t.Fatal(err)
			}
			// Every UPDATE of the outbox waits while the test holds lock
			// 4242, but the other instance's, which says so.
			for _, q := range []string{
				`CREATE FUNCTION pause_claim() RETURNS trigger LANGUAGE plpgsql AS $$
				BEGIN
					IF current_setting('test.other', true) IS DISTINCT FROM 'on' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;
					RETURN NULL;
				END $$`,
				`CREATE TRIGGER pause_claim BEFORE UPDATE ON outbox FOR EACH STATEMENT EXECUTE FUNCTION pause_claim()`,
			} {
				if _, err := st.db.Exec(q); err != nil {
					t.Fatal(err)
				}
			}
			hold, err := st.db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer hold.Close()
			if _, err := hold.ExecContext(ctx, `SELECT pg_advisory_lock(4242)`); err != nil {
				t.Fatal(err)
			}
			type result struct {
				items []OutboxItem
				err   error
			}
			res := make(chan result, 1)
			go func() {
				items, err := st.Claim(ctx, "b", now, time.Minute, 10)
				res <- result{items, err}
			}()
			for deadline := time.Now().Add(10 * time.Second); !waitsOn4242(st); time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the claim never reached its trigger")
				}
			}
			other, err := st.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer other.Rollback()
			if _, err := other.Exec(`SET LOCAL test.other = 'on'; SET LOCAL lock_timeout = '5s'`); err != nil {
				t.Fatal(err)
			}
			if _, err := other.Exec(`UPDATE outbox SET `+change+` WHERE id = $1 AND $2::bigint > 0`, second, now.Add(time.Hour).UnixMilli()); err != nil {
				t.Fatal(err)
			}
			if err := other.Commit(); err != nil {
				t.Fatal(err)
			}
			if _, err := hold.ExecContext(ctx, `SELECT pg_advisory_unlock(4242)`); err != nil {
				t.Fatal(err)
			}
			r := <-res
			if r.err != nil {
				t.Fatal(r.err)
			}
			var ids []int64
			for _, it := range r.items {
				ids = append(ids, it.ID)
			}
			switch {
			case !tc.taken && (len(ids) != 1 || ids[0] != first):
				t.Errorf("after %q on o2's head (%d), the claim took items %v; want o1's head (%d) alone", change, second, ids, first)
			case tc.taken && (len(ids) != 2 || ids[1] != second):
				t.Errorf("after %q on o2's head (%d), the claim took items %v; want both heads", change, second, ids)
			case tc.taken && (r.items[1].triedAt != 777 || r.items[1].Attempts != 3):
				t.Errorf("after %q, the claim returned o2's head tried at %d after %d attempts; want it as the other left it (777, 3)",
					change, r.items[1].triedAt, r.items[1].Attempts)
			}
		})
	}
}

// TestClaimPlanFindsRowsByKey: the claim's UPDATE finds the rows it
// changes by primary key whatever the statistics say. Statistics taken
// while the outbox was young (all of it due heads) make PostgreSQL cache,
// on the connection, a generic plan; joined on the key alone, that plan
// would hash the due heads and scan the whole outbox for them, and without
// a new ANALYZE (autovacuum off) it is kept as the outbox grows.
func TestClaimPlanFindsRowsByKey(t *testing.T) {
	st := openTestStore(t, "postgres")
	st.db.SetMaxOpenConns(1) // one connection: the one whose plan is looked at
	ctx, now := context.Background(), time.Now()
	ms := now.UnixMilli()
	// As PostgreSQL's plan cache chooses after five runs of a statement whose
	// generic plan costs no more than its custom ones.
	if _, err := st.db.ExecContext(ctx, `SET plan_cache_mode = force_generic_plan`); err != nil {
		t.Fatal(err)
	}
	if _, err := st.db.ExecContext(ctx, `INSERT INTO outbox (lane, delivery, next_at, head, created_at, updated_at)
		SELECT 'wx:p' || g, '{"kind":"wechat","openid":"p' || g || '","text":"hi"}', $1, 1, $1, $1
		FROM generate_series(1, 3000) g`, ms); err != nil {
		t.Fatal(err)
	}
	if _, err := st.db.ExecContext(ctx, `ANALYZE outbox`); err != nil {
		t.Fatal(err)
	}
	for range 8 {
		if got, err := st.Claim(ctx, "w", now, time.Minute, 32); err != nil || len(got) != 32 {
			t.Fatal(len(got), err)
		}
	}
	// Many delivered items later, with no ANALYZE since.
	if _, err := st.db.ExecContext(ctx, `INSERT INTO outbox (lane, delivery, state, next_at, created_at, updated_at)
		SELECT 'wx:p' || (g % 3000), '{"kind":"wechat","text":"delivered"}', 'done', $1, $1, $1
		FROM generate_series(1, 200000) g`, ms); err != nil {
		t.Fatal(err)
	}
	var name, types string
	if err := st.db.QueryRowContext(ctx, `SELECT name, parameter_types::text FROM pg_prepared_statements
		WHERE statement LIKE '%WITH due AS MATERIALIZED%' AND statement LIKE '%LIMIT 32%'`).Scan(&name, &types); err != nil {
		t.Fatal(err)
	}
	var args []string // the claim's arguments: its times, and the owner
	for _, ty := range strings.Split(strings.Trim(types, "{}"), ",") {
		if ty == "text" {
			args = append(args, "'w'")
		} else {
			args = append(args, strconv.FormatInt(ms, 10))
		}
	}
	plan := columnOf(t, st.db, st, `EXPLAIN (COSTS OFF) EXECUTE `+name+`(`+strings.Join(args, ", ")+`)`)
	if p := strings.Join(plan, "\n"); regexp.MustCompile(`Seq Scan on outbox(\s|$)`).MatchString(p) {
		t.Errorf("the claim scans the whole outbox:\n%s", p)
	}
}

// waitsOn4242 reports whether a session of st's database waits for
// advisory lock 4242, the one the claim's trigger takes.
func waitsOn4242(st *Store) bool {
	var n int
	st.db.QueryRow(`SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
		AND classid = 0 AND objid = 4242 AND objsubid = 1
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n)
	return n > 0
}
