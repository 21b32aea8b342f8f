package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func newTestStore(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bridge.db")
	st, err := openStore(context.Background(), "sqlite:"+path, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	return st, path
}

// openTestStore opens a store of the kind named, "sqlite" (in a temporary
// folder) or "postgres" (in a schema of TEST_DATABASE_URL, or skips).
func openTestStore(t testing.TB, kind string) *Store {
	t.Helper()
	db := "sqlite:" + filepath.Join(t.TempDir(), "bridge.db")
	if kind == "postgres" {
		db = testPostgres(t)
	}
	return openStoreAt(t, db)
}

// openStoreAt opens a store on db (another instance, if one is open on it
// already) with two agents, closed when the test ends.
func openStoreAt(t testing.TB, db string) *Store {
	t.Helper()
	st, err := openStore(context.Background(), db, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	return st
}

func message(key, openid, text string) Inbound {
	n := uint32(0)
	return Inbound{Key: key, Action: actMessage, OpenID: openid, IMUser: "wx_" + openid, Text: text,
		NewRandom: func() uint32 { n++; return n }}
}

func TestAcceptPushOnce(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	first, err := st.AcceptPush(ctx, message("k1", "o1", "hi"), now)
	if err != nil {
		t.Fatal(err)
	}
	again, err := st.AcceptPush(ctx, message("k1", "o1", "hi"), now)
	if err != nil {
		t.Fatal(err)
	}
	if first.Duplicate || first.Reply != replyConnecting || len(first.Assigned) != 1 || !again.Duplicate || again.Reply != replyConnecting {
		t.Errorf("got %+v then %+v, want the connecting reply, then the same as a duplicate", first, again)
	}
	stats, err := st.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if stats.Pending != 2 { // the import of a customer not seen before, and the message
		t.Errorf("got %d pending items, want 2", stats.Pending)
	}
}

func TestClaimTakesLaneHeadsOnce(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	for i, k := range []string{"k1", "k2", "k3"} {
		if _, err := st.AcceptPush(ctx, message(k, "o1", k), now.Add(time.Duration(i)*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.AcceptPush(ctx, message("k4", "o2", "k4"), now); err != nil {
		t.Fatal(err)
	}
	later := now.Add(time.Second)
	heads, err := st.Claim(ctx, "a", later, time.Minute, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(heads) != 2 || heads[0].Delivery.Kind != deliverIMImport || heads[1].Delivery.Kind != deliverIMImport {
		t.Fatalf("got heads %+v, want the import at the head of each customer's lane", heads)
	}
	// Held heads are not taken again, by this instance or another.
	if again, err := st.Claim(ctx, "b", later, time.Minute, 10); err != nil || len(again) != 0 {
		t.Fatalf("a second claim got %+v, %v; want nothing", again, err)
	}
	// A head waiting for a retry holds its lane back; the other lane goes on.
	if err := st.RetryLater(ctx, heads[0], "busy", false, now.Add(time.Hour), later); err != nil {
		t.Fatal(err)
	}
	// Delivering a head makes the next item of its lane the head.
	if err := st.Delivered(ctx, heads[1:], later); err != nil {
		t.Fatal(err)
	}
	got, err := st.Claim(ctx, "a", later, time.Minute, 10)
	if err != nil || len(got) != 1 || got[0].Delivery.Text != "k4" {
		t.Fatalf("after the import was delivered, got %+v, %v; want o2's message and nothing of the lane waiting for a retry", got, err)
	}
	next := got[0]
	// A holder that dies lets go when its lease ends; Release lets go at once.
	if got, _ := st.Claim(ctx, "b", later.Add(2*time.Minute), time.Minute, 10); len(got) != 1 || got[0].ID != next.ID {
		t.Fatalf("after the lease, got %+v; want o2's message", got)
	}
	if err := st.Release(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if got, _ := st.Claim(ctx, "c", later.Add(2*time.Minute), time.Minute, 10); len(got) != 1 {
		t.Fatalf("after release, got %+v; want o2's message", got)
	}
}

func TestLeastLoadedAgent(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	want := map[string]string{"o1": "a1", "o2": "a2", "o3": "a1", "o4": "a2"}
	for _, o := range []string{"o1", "o2", "o3", "o4"} {
		if _, err := st.AcceptPush(ctx, message("k"+o, o, "hi"), now); err != nil {
			t.Fatal(err)
		}
	}
	convs, err := st.OpenConversations(ctx, 0, math.MaxInt64, 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range convs {
		if want[c.OpenID] != c.Agent {
			t.Errorf("%s went to %s, want %s", c.OpenID, c.Agent, want[c.OpenID])
		}
	}
}

func TestAcceptReplyNeedsKnownCustomer(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	d := Delivery{Kind: deliverWeChat, OpenID: "o1", Text: "hi"}
	if _, err := st.AcceptReply(ctx, "im:1", d, now); err == nil {
		t.Fatal("a reply to an unknown customer was accepted")
	}
	if _, err := st.AcceptPush(ctx, message("k1", "o1", "hi"), now); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{false, true} {
		t2, err := st.AcceptReply(ctx, "im:1", d, now)
		dup := t2.Duplicate
		if err != nil || dup != want {
			t.Errorf("reply %d: got duplicate %v, %v; want %v", i+1, dup, err, want)
		}
	}
}

func TestStoreSurvivesReopen(t *testing.T) {
	st, path := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	if _, err := st.AcceptPush(ctx, message("k1", "o1", "hi"), now); err != nil {
		t.Fatal(err)
	}
	st2 := reopen(t, st, path)
	acc, err := st2.AcceptPush(ctx, message("k1", "o1", "hi"), now)
	if err != nil || !acc.Duplicate {
		t.Errorf("after reopening, the same push got %+v, %v; want a duplicate", acc, err)
	}
	if s, _ := st2.Stats(ctx); s.Pending != 2 {
		t.Errorf("after reopening, %d items are pending, want 2", s.Pending)
	}
}

// Delivered settles many items of many lanes in one write; each lane's
// next item becomes its head then, in order, on SQLite and PostgreSQL.
func TestDeliveredPromotesEachLaneInOrder(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx, now := context.Background(), time.Now()
		for i, k := range []string{"a1", "b1", "a2", "b2", "a3"} {
			if _, err := st.AcceptPush(ctx, message(k, "o"+k[:1], k), now.Add(time.Duration(i)*time.Millisecond)); err != nil {
				t.Fatal(err)
			}
		}
		got := deliverAll(t, st, now.Add(time.Second))
		want := []string{"im_import ", "im_import ", "im_send a1", "im_send b1", "im_send a2", "im_send b2", "im_send a3"}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("delivered %q, want %q", got, want)
		}
		if s, err := st.Stats(ctx); err != nil || s.Pending != 0 {
			t.Errorf("after all deliveries: %+v, %v; want nothing pending", s, err)
		}
	})
}

// SQLite's writer keeps the open conversations it met in memory, but only
// what its transactions committed: a conversation opened by a transaction
// that rolled back is forgotten, and the customer's next message opens one.
func TestRolledBackConversationIsForgotten(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	writeThenFail(t, st, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := st.findConversation(ctx, tx, message("k1", "o1", "hi"), now); err != nil {
			return err
		}
		_, err := st.startConversation(ctx, tx, "o1", now)
		return err
	})
	acc, err := st.AcceptPush(ctx, message("k2", "o1", "hi again"), now)
	if err != nil || acc.Reply != replyConnecting {
		t.Errorf("the next message got %+v, %v; want the connecting reply of a new conversation", acc, err)
	}
	convs, err := st.OpenConversations(ctx, 0, math.MaxInt64, 100)
	if err != nil || len(convs) != 1 {
		t.Errorf("got open conversations %+v, %v; want one", convs, err)
	}
}

// A conversation closed in a transaction is looked up again by the same
// transaction's later writes, and what the transaction leaves is what the
// writer remembers: here, the conversation it opened last.
func TestConversationClosedAndOpenedInOneTransaction(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	if acc, err := st.AcceptPush(ctx, message("k1", "o1", "hi"), now); err != nil || acc.Reply != replyConnecting {
		t.Fatalf("first message: %+v, %v", acc, err)
	}
	if _, err := st.PresenceEvent(ctx, "a1", "Logout", now, now); err != nil { // a1, who had the customer, goes
		t.Fatal(err)
	}
	in := message("k2", "o1", "hi")
	err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		c, err := st.findConversation(ctx, tx, in, now)
		if err != nil || c.id == 0 || c.agent != "a1" {
			return fmt.Errorf("before closing: got %+v, %v; want a1's open conversation", c, err)
		}
		if err := st.closeConversation(ctx, tx, "o1", c.id, c.agent, "agent", now); err != nil {
			return err
		}
		if c, err = st.findConversation(ctx, tx, in, now); err != nil || c.id != 0 {
			return fmt.Errorf("after closing: got %+v, %v; want none open", c, err)
		}
		if c, err = st.startConversation(ctx, tx, "o1", now); err != nil || c.agent != "a2" {
			return fmt.Errorf("after closing: got %+v, %v; want a new conversation with a2", c, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	in = message("k3", "o1", "and again")
	if acc, err := st.AcceptPush(ctx, in, now); err != nil || acc.Reply != replyNone {
		t.Errorf("the next message got %+v, %v; want no reply: its conversation is open", acc, err)
	}
	var agents []string
	rows, err := st.rdb.QueryContext(ctx, `SELECT delivery FROM outbox WHERE lane = 'im:o1' AND delivery LIKE '%im_send%' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var raw string
		var d Delivery
		if err := rows.Scan(&raw); err != nil || json.Unmarshal([]byte(raw), &d) != nil {
			t.Fatal("unreadable outbox item")
		}
		agents = append(agents, d.Agent)
	}
	if strings.Join(agents, " ") != "a1 a2" {
		t.Errorf("the messages went to %v, want a1 then a2", agents)
	}
}

// deliverAll claims and delivers until nothing is left, one round at a
// time, and returns what it delivered, in order: kind and text. It fails
// the test if a round claims two items of one lane.
func deliverAll(t *testing.T, st *Store, now time.Time) []string {
	t.Helper()
	var got []string
	for round := 0; round < 20; round++ {
		heads, err := st.Claim(context.Background(), "w", now, time.Minute, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(heads) == 0 {
			return got
		}
		lanes := map[string]bool{}
		for _, h := range heads {
			if lanes[h.Lane] {
				t.Fatalf("claimed two items of lane %s at once", h.Lane)
			}
			lanes[h.Lane] = true
			got = append(got, h.Delivery.Kind+" "+h.Delivery.Text)
		}
		if err := st.Delivered(context.Background(), heads, now); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("still claiming after 20 rounds")
	return nil
}

// eachStore runs fn on a new store of each kind, SQLite and PostgreSQL
// (skipped without TEST_DATABASE_URL).
func eachStore(t *testing.T, fn func(t *testing.T, st *Store)) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) { fn(t, openTestStore(t, kind)) })
	}
}

// reopen closes st and opens the SQLite store at path again.
func reopen(t *testing.T, st *Store, path string) *Store {
	t.Helper()
	st.Close()
	return openSQLite(t, path, storeOptions{})
}

// openSQLite opens the SQLite store at path with opts, closed when the test
// ends.
func openSQLite(t *testing.T, path string, opts storeOptions) *Store {
	t.Helper()
	st, err := openStore(context.Background(), "sqlite:"+path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	return st
}

// writeThenFail runs fn in a write that fails after it, and checks that the
// write's own error comes back: its transaction was rolled back.
func writeThenFail(t *testing.T, st *Store, fn func(ctx context.Context, tx *sql.Tx) error) {
	t.Helper()
	boom := errors.New("a write that fails after its statements")
	err := st.writeTx(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		if err := fn(ctx, tx); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("the write returned %v, want its own error", err)
	}
}

// queueReply queues a reply to customer o1, in a write of its own.
func queueReply(t *testing.T, st *Store, text string, now time.Time) {
	t.Helper()
	err := st.writeTx(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o1", Text: text}, now)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// queueReplies queues a reply to customer o1 for each text, in order.
func queueReplies(t *testing.T, st *Store, now time.Time, texts ...string) {
	t.Helper()
	for _, text := range texts {
		queueReply(t, st, text, now)
	}
}

// Reopened, the store goes on with each lane in order.
func TestLanesReadBackAtOpen(t *testing.T) {
	st, path := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	for i, k := range []string{"a1", "b1", "a2", "b2", "a3"} {
		if _, err := st.AcceptPush(ctx, message(k, "o"+k[:1], k), now.Add(time.Duration(i)*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	heads, err := st.Claim(ctx, "w", now.Add(time.Second), time.Minute, 10)
	if err != nil || len(heads) != 2 {
		t.Fatalf("claimed %d, %v; want the two imports", len(heads), err)
	}
	if err := st.Delivered(ctx, heads, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	st2 := reopen(t, st, path)
	if _, err := st2.AcceptPush(ctx, message("a4", "oa", "a4"), now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	got := deliverAll(t, st2, now.Add(2*time.Second))
	want := []string{"im_send a1", "im_send b1", "im_send a2", "im_send b2", "im_send a3", "im_send a4"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("delivered %q, want %q", got, want)
	}
}

// An item added by a transaction that rolled back leaves its lane as it
// was: the lane's next item heads it and is delivered.
func TestRolledBackItemLeavesLaneEmpty(t *testing.T) {
	st, _ := newTestStore(t)
	now := time.Now()
	writeThenFail(t, st, func(ctx context.Context, tx *sql.Tx) error {
		return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o1", Text: "lost"}, now)
	})
	queueReply(t, st, "kept", now)
	if got := deliverAll(t, st, now); strings.Join(got, ",") != "wx_send kept" {
		t.Errorf("delivered %q, want the item kept only", got)
	}
}

// An item reported delivered twice finishes its lane's head once: the
// second report is told the item is no longer held, the next item is not
// skipped, and the lane stays in order.
func TestDeliveredTwiceFinishesOnce(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx, now := context.Background(), time.Now()
		queueReplies(t, st, now, "one", "two", "three")
		heads, err := st.Claim(ctx, "w", now, time.Minute, 10)
		if err != nil || len(heads) != 1 {
			t.Fatalf("claimed %d, %v; want the lane's head", len(heads), err)
		}
		if err := st.Delivered(ctx, heads, now); err != nil {
			t.Fatal(err)
		}
		if err := st.Delivered(ctx, heads, now); !errors.Is(err, errNotHeld) {
			t.Fatalf("delivered again: %v, want %v", err, errNotHeld)
		}
		if got := deliverAll(t, st, now); strings.Join(got, ",") != "wx_send two,wx_send three" {
			t.Errorf("then delivered %q, want two, then three", got)
		}
	})
}

// Pruning puts right a lane whose first pending item lost its head mark,
// on PostgreSQL. (SQLite's writer keeps the heads in memory: there is no
// mark to lose.)
func TestPruneRestoresLaneHeads(t *testing.T) {
	st := openTestStore(t, "postgres")
	ctx, now := context.Background(), time.Now()
	var want []string
	if err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		for i := range 20 {
			text := fmt.Sprint("hi ", i)
			want = append(want, "wx_send "+text)
			if err := st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: fmt.Sprint("o", i), Text: text}, now); err != nil {
				return err
			}
		}
		_, err := st.exec(ctx, tx, `UPDATE outbox SET head = 0`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got := deliverAll(t, st, now); len(got) != 0 {
		t.Fatalf("delivered %q from lanes without a head", got)
	}
	if _, err := st.PruneOutbox(ctx, now); err != nil {
		t.Fatal(err)
	}
	got := deliverAll(t, st, now)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("after pruning, delivered %q, want each lane's item %q", got, want)
	}
}

// claimOf returns the owner of the claim that holds item id and its
// claimed_until: on SQLite as the writer keeps them (heads.go), on
// PostgreSQL as the outbox does.
func claimOf(t *testing.T, st *Store, id int64) (owner string, until int64) {
	t.Helper()
	ctx := context.Background()
	var err error
	if st.postgres {
		err = st.rdb.QueryRowContext(ctx, st.q(`SELECT claimed_by, claimed_until FROM outbox WHERE id = ?`), id).Scan(&owner, &until)
	} else {
		err = st.writeTx(ctx, func(context.Context, *sql.Tx) error {
			h, _ := st.headOf(id)
			owner, until = h.owner, h.until
			return nil
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return owner, until
}

// An item added and finished in one transaction leaves its lane empty:
// the next item heads it.
func TestItemAddedAndFinishedInOneTransaction(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if err := st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o1", Text: "gone"}, now); err != nil {
			return err
		}
		var id int64
		if err := st.queryRow(ctx, tx, `SELECT id FROM outbox WHERE lane = 'wx:o1' AND state = 'pending'`).Scan(&id); err != nil {
			return err
		}
		if ended, err := st.finish(ctx, tx, OutboxItem{ID: id, Lane: "wx:o1"}, "done", "", now); !ended || err != nil {
			return fmt.Errorf("finish: %v, %v", ended, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	queueReply(t, st, "next", now)
	if got := deliverAll(t, st, now); strings.Join(got, ",") != "wx_send next" {
		t.Errorf("delivered %q, want the next item only", got)
	}
}

// An instance whose lease ran out, and whose item another claim took since,
// writes no outcome: no retry, no dead letter, no notice, no done. The item
// stays with the claim that holds it, and its lane goes on in order.
func TestOutcomeOfAnOutrunClaimChangesNothing(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx, now := context.Background(), time.Now()
		queueReplies(t, st, now, "one", "two", "three")
		claim := func(owner string, at time.Time) OutboxItem {
			t.Helper()
			got, err := st.Claim(ctx, owner, at, time.Minute, 10)
			if err != nil || len(got) != 1 || got[0].Delivery.Text != "one" {
				t.Fatalf("%s claimed %+v, %v; want the lane's head", owner, got, err)
			}
			return got[0]
		}
		a := claim("a", now)
		later := now.Add(2 * time.Minute) // a's lease is over
		b := claim("b", later)

		var rows int
		held := func(when string) {
			t.Helper()
			var state string
			var attempts int
			err := st.rdb.QueryRowContext(ctx, st.q(`SELECT state, attempts FROM outbox WHERE id = ?`), a.ID).Scan(&state, &attempts)
			if err != nil {
				t.Fatal(err)
			}
			by, until := claimOf(t, st, a.ID)
			if state != "pending" || attempts != 0 || by != "b" || until != b.claimedUntil {
				t.Errorf("after %s: item is %s, %d attempts, held by %q until %d; want pending, 0, held by b until %d",
					when, state, attempts, by, until, b.claimedUntil)
			}
			if err := st.rdb.QueryRowContext(ctx, `SELECT COUNT(*) FROM outbox`).Scan(&rows); err != nil {
				t.Fatal(err)
			}
		}
		if err := st.RetryLater(ctx, a, "busy", false, later.Add(time.Hour), later); !errors.Is(err, errNotHeld) {
			t.Fatalf("a's retry: %v, want %v", err, errNotHeld)
		}
		held("a's retry")
		before := rows
		notice := &Delivery{Kind: deliverIMSend, IMUser: "wx_o1", Agent: "agent_kim", Text: "given up"}
		if err := st.GiveUp(ctx, a, "failed for good", notice, later); !errors.Is(err, errNotHeld) {
			t.Fatalf("a's giving up: %v, want %v", err, errNotHeld)
		}
		if held("a's giving up"); rows != before {
			t.Errorf("a's giving up queued a notice: %d rows, want %d", rows, before)
		}
		if err := st.Delivered(ctx, []OutboxItem{a}, later); !errors.Is(err, errNotHeld) {
			t.Fatalf("a's delivery: %v, want %v", err, errNotHeld)
		}
		held("a's delivery")
		if err := st.Delivered(ctx, []OutboxItem{b}, later); err != nil {
			t.Fatal(err)
		}
		if got := deliverAll(t, st, later); strings.Join(got, ",") != "wx_send two,wx_send three" {
			t.Errorf("after b delivered, then delivered %q, want two, then three", got)
		}
	})
}

// On PostgreSQL an instance starting beside others that are writing takes
// no lock on their tables once the schema is in place: a write in flight
// does not hold it up. A schema that changed is applied again.
func TestPostgresOpenBesideAWriteInFlight(t *testing.T) {
	url := testPostgres(t)
	ctx := context.Background()
	first, err := openStore(ctx, url, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	tx, err := first.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at) VALUES ('l', '{}', 0, 0, 0)`); err != nil {
		t.Fatal(err)
	}
	openCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	second, err := openStore(openCtx, url, storeOptions{})
	if err != nil {
		t.Fatalf("an instance could not open beside a write in flight: %v", err)
	}
	second.Close()
	tx.Rollback()

	// An older schema, without an index the current one makes.
	for _, q := range []string{`DROP INDEX outbox_due`, `UPDATE schema_applied SET digest = 'older'`} {
		if _, err := first.db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	third, err := openStore(ctx, url, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	third.Close()
	var n int
	if err := first.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'outbox_due' AND schemaname = current_schema()`).Scan(&n); err != nil || n != 1 {
		t.Errorf("after an open with a changed schema, outbox_due exists %d times (%v); want once", n, err)
	}
}

// A dead letter ends its item as a delivery does: the next item of its lane
// becomes the head and is delivered.
func TestDeadLetterLetsItsLaneGoOn(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx, now := context.Background(), time.Now()
		queueReplies(t, st, now, "one", "two")
		heads, err := st.Claim(ctx, "w", now, time.Minute, 10)
		if err != nil || len(heads) != 1 || heads[0].Delivery.Text != "one" {
			t.Fatalf("claimed %+v, %v; want the lane's head", heads, err)
		}
		if err := st.GiveUp(ctx, heads[0], "failed for good", nil, now); err != nil {
			t.Fatal(err)
		}
		if got := deliverAll(t, st, now); strings.Join(got, ",") != "wx_send two" {
			t.Errorf("after the dead letter, delivered %q, want two", got)
		}
	})
}

// TestSQLitePathWithHash: a database file whose path holds '#' or '?' is
// that file, not the part of its path before them (a file: URI reads them
// as its fragment and query).
func TestSQLitePathWithHash(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a#b?c")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	st, err := openStore(context.Background(), "sqlite:"+filepath.Join(dir, "bridge.db"), storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	if _, err := os.Stat(filepath.Join(dir, "bridge.db")); err != nil {
		t.Errorf("the database is not where DATABASE_URL says: %v", err)
	}
}

// TestOneBridgeASQLiteFile: a second bridge on the SQLite file of a
// running one stops at start, naming the file; PostgreSQL takes several.
func TestOneBridgeASQLiteFile(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	path, _ := sqlitePath(h.env["DATABASE_URL"])
	err := run(context.Background(), nil, mapEnv(h.env), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "in use by another bridge") {
		t.Fatalf("a second bridge on %s: %v, want it refused, naming the file", path, err)
	}
	h.wx.SendText(context.Background(), customer, question) // the first one serves on
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
}
