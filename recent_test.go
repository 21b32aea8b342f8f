package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// signed is a message push with its signed query.
func signed(key, sig string) Inbound {
	in := message(key, "o1", "hi")
	in.SigKey = sig
	return in
}

// accept accepts in at now and fails the test on an error.
func accept(t *testing.T, st *Store, in Inbound, now time.Time) Accepted {
	t.Helper()
	acc, err := st.AcceptPush(context.Background(), in, now)
	if err != nil {
		t.Fatalf("push %s: %v", in.Key, err)
	}
	return acc
}

// checkRetries checks that a retry of each push, signed anew, is a
// duplicate with the reply it was given, and that its signed query
// carrying another push is refused, all without a write.
func checkRetries(t *testing.T, st *Store, now time.Time, pushes ...Inbound) {
	t.Helper()
	ctx := context.Background()
	before := countRows(t, st, "outbox")
	for _, in := range pushes {
		retry := in
		retry.SigKey = in.SigKey + "-again"
		if acc, err := st.AcceptPush(ctx, retry, now); err != nil || !acc.Duplicate {
			t.Errorf("the retry of %s got %+v, %v; want a duplicate", in.Key, acc, err)
		}
		replay := signed("other-"+in.Key, in.SigKey)
		if _, err := st.AcceptPush(ctx, replay, now); !errors.Is(err, errReplay) {
			t.Errorf("%s's signed query with another push got %v, want %v", in.Key, err, errReplay)
		}
	}
	if n := countRows(t, st, "outbox"); n != before {
		t.Errorf("the retries and replays added %d outbox rows", n-before)
	}
}

// countRows returns how many rows table has (in the committed state).
func countRows(t *testing.T, st *Store, table string) int {
	t.Helper()
	var n int
	if err := st.rdb.QueryRow(`SELECT count(*) FROM ` + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// carried returns the keys of the pushes the outbox rows carry, in order.
func carried(t *testing.T, st *Store) []string {
	t.Helper()
	rows, err := st.rdb.Query(`SELECT push_key FROM outbox WHERE push_key != '' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var keys []string
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	return keys
}

// On SQLite a push is recorded in the outbox row it adds, with its reply,
// and nowhere else; retries and replays are known by it, after a restart
// too.
func TestPushRecordedInItsOutboxRow(t *testing.T) {
	st, path := newTestStore(t)
	now := time.Now()
	follow := signed("k-follow", "s-follow")
	follow.Action = actFollow
	msg := signed("k-msg", "s-msg")
	if acc := accept(t, st, follow, now); acc.Reply != replyWelcome {
		t.Fatalf("the follow got %+v", acc)
	}
	accept(t, st, msg, now)
	if n := countRows(t, st, "seen_keys"); n != 0 {
		t.Errorf("seen_keys holds %d keys, want none", n)
	}
	var key, sig, reply string
	if err := st.rdb.QueryRow(`SELECT push_key, push_sig, push_reply FROM outbox WHERE push_key = 'k-follow'`).Scan(&key, &sig, &reply); err != nil {
		t.Fatal(err)
	}
	if sig != "s-follow" || reply != replyWelcome {
		t.Errorf("the follow's row carries %q and %q, want its signed query and %q", sig, reply, replyWelcome)
	}
	checkRetries(t, st, now, follow, msg)
	if acc, _ := st.AcceptPush(context.Background(), signed("k-follow", "s-3"), now); acc.Reply != replyWelcome {
		t.Errorf("the follow's retry got %+v, want its reply", acc)
	}

	st = reopen(t, st, path)
	checkRetries(t, st, now, follow, msg)
}

// A push whose transaction is rolled back is forgotten: its row's id goes
// to the next row, and the push, sent again, is recorded in its own row.
func TestRolledBackPushIsForgotten(t *testing.T) {
	st, _ := newTestStore(t)
	now := time.Now()
	in := signed("k1", "s1")
	writeThenFail(t, st, func(ctx context.Context, tx *sql.Tx) error {
		rec, _, _, err := st.claimPush(ctx, tx, in, now)
		if err != nil {
			return err
		}
		id, err := st.enqueueFor(ctx, tx, Delivery{Kind: deliverIMSend, OpenID: "o1"}, now, rec)
		st.remember(rec, id)
		return err
	})
	queueReply(t, st, "takes the id", now)
	if acc := accept(t, st, in, now); acc.Duplicate {
		t.Fatalf("the push, after its rollback, got %+v", acc)
	}
	if keys := carried(t, st); len(keys) != 1 || keys[0] != "k1" {
		t.Errorf("the outbox rows carry %q, want k1", keys)
	}
	if n := countRows(t, st, "seen_keys"); n != 0 {
		t.Errorf("seen_keys holds %d keys, want none", n)
	}
}

// A push whose digest is another push's is recorded in seen_keys, and both
// are known again.
func TestPushOfATakenDigestGoesToSeenKeys(t *testing.T) {
	st, _ := newTestStore(t)
	st.recent.digest = func(string) uint64 { return 7 } // before the first write
	now := time.Now()
	a, b := signed("k-a", "s-a"), signed("k-b", "s-b")
	accept(t, st, a, now)
	accept(t, st, b, now)
	if keys := carried(t, st); len(keys) != 1 || keys[0] != "k-a" {
		t.Errorf("the outbox rows carry %q, want k-a alone", keys)
	}
	if n := countRows(t, st, "seen_keys"); n != 1 {
		t.Errorf("seen_keys holds %d keys, want k-b's", n)
	}
	checkRetries(t, st, now, a, b)
}

// The memory holds maxRecent digests; a push past them is recorded in
// seen_keys. A push is remembered for its window at least, and forgotten
// after twice that.
func TestFullMemoryAndPushWindow(t *testing.T) {
	window := time.Minute
	st := openSQLite(t, filepath.Join(t.TempDir(), "bridge.db"), storeOptions{PushWindow: window, recentMax: 4})
	t0 := time.Now()
	p1, p2, p3 := signed("k1", "s1"), signed("k2", "s2"), signed("k3", "s3")
	for _, in := range []Inbound{p1, p2, p3} {
		accept(t, st, in, t0)
	}
	if keys := carried(t, st); fmt.Sprint(keys) != "[k1 k2]" {
		t.Errorf("the outbox rows carry %q, want k1 and k2", keys)
	}
	if n := countRows(t, st, "seen_keys"); n != 1 {
		t.Errorf("seen_keys holds %d keys, want k3's", n)
	}
	checkRetries(t, st, t0.Add(window-time.Millisecond), p1, p2, p3)
	checkRetries(t, st, t0.Add(window+time.Millisecond), p1, p2, p3) // the window has turned
	// Once the window has turned again, the memory has let k1 go, and
	// seen_keys is no longer asked: the push is new again.
	later := t0.Add(3 * window)
	accept(t, st, signed("k4", "s4"), later)
	if acc := accept(t, st, signed("k1", "s1-late"), later); acc.Duplicate {
		t.Errorf("k1, three windows later, got %+v; want it taken as new", acc)
	}
}

// Reopened with more pushes of the window than half its memory holds, the
// store keeps the newest in memory and copies the others to seen_keys.
func TestPushesPastTheMemoryGoToSeenKeysAtOpen(t *testing.T) {
	st, path := newTestStore(t)
	now := time.Now()
	var pushes []Inbound
	for i := range 5 {
		in := signed(fmt.Sprintf("k%d", i), fmt.Sprintf("s%d", i))
		if i == 0 {
			in.Action = actFollow
		}
		accept(t, st, in, now)
		pushes = append(pushes, in)
	}
	st.Close()
	st = openSQLite(t, path, storeOptions{recentMax: 4})
	if n := countRows(t, st, "seen_keys"); n != 4 {
		t.Errorf("seen_keys holds %d keys, want the 4 oldest pushes'", n)
	}
	checkRetries(t, st, now, pushes...)
	if acc, _ := st.AcceptPush(context.Background(), signed("k0", "s-again"), now); acc.Reply != replyWelcome {
		t.Errorf("the follow's retry got %+v, want its reply from seen_keys", acc)
	}
}

// A database whose outbox was made before the push columns gets them at
// open.
func TestOutboxMadeBeforePushColumns(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bridge.db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = db.Exec(`CREATE TABLE outbox (
		id INTEGER PRIMARY KEY AUTOINCREMENT, lane TEXT NOT NULL, delivery TEXT NOT NULL,
		state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_at BIGINT NOT NULL,
		claimed_by TEXT NOT NULL DEFAULT '', head INTEGER NOT NULL DEFAULT 0, claimed_until BIGINT NOT NULL DEFAULT 0,
		last_error TEXT NOT NULL DEFAULT '', created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)`)
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	st := openSQLite(t, path, storeOptions{})
	now := time.Now()
	in := signed("k1", "s1")
	accept(t, st, in, now)
	checkRetries(t, st, now, in)
	if keys := carried(t, st); len(keys) != 1 {
		t.Errorf("the outbox rows carry %q, want k1", keys)
	}
}

// A push recorded in seen_keys because the memory was full is known for its
// window, even once the memory has room again.
func TestPushInSeenKeysKnownOnceTheMemoryHasRoom(t *testing.T) {
	window := time.Minute
	st := openSQLite(t, filepath.Join(t.TempDir(), "bridge.db"), storeOptions{PushWindow: window, recentMax: 4})
	t0 := time.Now()
	p1, p2, p3 := signed("k1", "s1"), signed("k2", "s2"), signed("k3", "s3")
	accept(t, st, p1, t0)
	accept(t, st, p2, t0.Add(window+time.Millisecond)) // p1 goes to the window before
	accept(t, st, p3, t0.Add(window+10*time.Second))   // the memory is full: seen_keys
	// The window turns before p3's ends: p1 is forgotten and the memory
	// has room.
	checkRetries(t, st, t0.Add(2*window+5*time.Second), p2, p3)
	if keys := carried(t, st); fmt.Sprint(keys) != "[k1 k2]" {
		t.Errorf("the outbox rows carry %q, want k1 and k2", keys)
	}
}

// A retry in the transaction of its push, as when both reach the writer
// in one batch, finds the push's row before it is committed; so does a
// replay of its signed query.
func TestRetryInThePushsTransaction(t *testing.T) {
	st, _ := newTestStore(t)
	now := time.Now()
	var retry, replay error
	var prev string
	var dup bool
	err := st.writeTx(context.Background(), func(ctx context.Context, tx *sql.Tx) error {
		rec, _, _, err := st.claimPush(ctx, tx, signed("k1", "s1"), now)
		if err != nil {
			return err
		}
		rec.reply = replyConnecting
		id, err := st.enqueueFor(ctx, tx, Delivery{Kind: deliverIMSend, OpenID: "o1"}, now, rec)
		if err != nil {
			return err
		}
		st.remember(rec, id)
		_, prev, dup, retry = st.claimPush(ctx, tx, signed("k1", "s2"), now)
		_, _, _, replay = st.claimPush(ctx, tx, signed("k2", "s1"), now)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if retry != nil || !dup || prev != replyConnecting {
		t.Errorf("the retry got %q, %v, %v; want a duplicate with the push's reply", prev, dup, retry)
	}
	if !errors.Is(replay, errReplay) {
		t.Errorf("the replay got %v, want %v", replay, errReplay)
	}
}

// TestRetryOfAPushNoItemCarries: WeChat's retry of a push that no outbox
// row carries (a message waiting for an agent, a menu click), with another
// signed query, is a duplicate: the memory finds it in seen_keys.
func TestRetryOfAPushNoItemCarries(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			st.SetDesk(&Desk{Agents: []string{"a1"}, UserPrefix: "wx_", MaxOpen: 1})
			ctx, now := context.Background(), time.Now()
			if _, err := st.AcceptPush(ctx, message("k0", "o0", "served"), now); err != nil {
				t.Fatal(err)
			}
			click := message("k-click", "o1", "")
			click.Action = actEvent
			for _, in := range []Inbound{message("k1", "o1", "waiting"), click} {
				var accs [2]Accepted
				for i := range accs {
					in.SigKey = fmt.Sprintf("sig%d-%s", i, in.Key)
					var err error
					if accs[i], err = st.AcceptPush(ctx, in, now); err != nil {
						t.Fatal(err)
					}
				}
				if accs[0].Duplicate || !accs[1].Duplicate || accs[1].Reply != accs[0].Reply {
					t.Errorf("%s and its retry were answered %+v and %+v, want the second a duplicate of the first", in.Key, accs[0], accs[1])
				}
			}
			var n int
			if err := st.rdb.QueryRow(`SELECT COUNT(*) FROM messages WHERE openid = 'o1'`).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 1 {
				t.Errorf("the waiting message is recorded %d times, want once", n)
			}
		})
	}
}
