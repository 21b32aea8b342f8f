package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestSettleLocksNoItem: on PostgreSQL a settle writes the customer's row,
// never an outbox item (history.go). A late finish holds the customer's
// lanes; an agent's reply settles the owed row of the IM lane's head, then
// waits for those lanes; a claim taking the heads must not wait behind the
// reply, or the three would wait in a ring. The test's own session only
// orders the steps: it holds wx:<o> for a moment.
func TestSettleLocksNoItem(t *testing.T) {
	st := openTestStore(t, "postgres")
	ctx := context.Background()
	o := fmt.Sprintf("dl%d", time.Now().UnixNano())
	t0 := time.Now()
	if _, err := st.AcceptPush(ctx, message("k1"+o, o, "hello"), t0); err != nil {
		t.Fatal(err)
	}
	deliverAll(t, st, t0) // the import and hello
	if _, err := st.AcceptReply(ctx, "r1"+o, Delivery{Kind: deliverWeChat, OpenID: o, IMUser: "wx_" + o, Agent: "a1", Text: "answer"}, t0); err != nil {
		t.Fatal(err)
	}
	items, err := st.Claim(ctx, "w1", t0, time.Minute, 10) // Z, the reply, taken by w1, whose lease runs out
	if err != nil || len(items) != 1 || items[0].Delivery.Kind != deliverWeChat {
		t.Fatal(err, items)
	}
	z := items[0]
	if _, err := st.AcceptPush(ctx, message("k2"+o, o, "two"), t0.Add(time.Second)); err != nil { // Y, owing its row
		t.Fatal(err)
	}
	base := st.db
	deadlocks := func() int64 {
		var n int64
		if err := base.QueryRow(`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	waiting := func(kind string) int {
		var n int
		base.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = $1`, kind).Scan(&n)
		return n
	}
	until := func(what string, f func() bool) { eventually(t, what, f) }
	before := deadlocks()

	ext, err := base.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ext.Close()
	if _, err := ext.ExecContext(ctx, `SELECT pg_advisory_lock(hashtext($1))`, "wx:"+o); err != nil {
		t.Fatal(err)
	}
	later := t0.Add(2 * time.Minute)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	wg.Add(1)
	go func() { // w1, late: finishes Z, holding im:<o>, waiting for wx:<o>
		defer wg.Done()
		errs[0] = st.Delivered(ctx, []OutboxItem{z}, later)
	}()
	until("the late finish waits", func() bool { return waiting("advisory") == 1 })
	wg.Add(1)
	go func() { // an agent's reply: settles Y, then waits for im:<o>
		defer wg.Done()
		_, errs[1] = st.AcceptReply(ctx, "r2"+o, Delivery{Kind: deliverWeChat, OpenID: o, IMUser: "wx_" + o, Agent: "a1", Text: "more"}, later)
	}()
	until("the reply waits", func() bool { return waiting("advisory") == 2 })
	// w2's claim takes Z, whose lease ran out, and Y: the reply holds
	// neither.
	claimCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := st.Claim(claimCtx, "w2", later, time.Minute, 10); err != nil {
		t.Fatalf("the claim waited behind the reply's settle: %v", err)
	}
	if _, err := ext.ExecContext(ctx, `SELECT pg_advisory_unlock(hashtext($1))`, "wx:"+o); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if errs[1] != nil {
		t.Errorf("the reply: %v", errs[1])
	}
	if n := deadlocks() - before; n > 0 {
		t.Errorf("PostgreSQL counted %d deadlock(s)", n)
	}
}
