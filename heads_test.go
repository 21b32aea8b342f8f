package main

import (
	"context"
	"database/sql"
	"testing"
	"time"
)

// NextDue tells when the first head can be claimed: due, and not held. On
// SQLite the writer keeps it in memory (heads.go), on PostgreSQL the
// outbox does; both tell the same.
func TestNextDue(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx := context.Background()
		now := time.UnixMilli(time.Now().UnixMilli())
		want := func(when string, at time.Time, ok bool) {
			t.Helper()
			got, gotOK, err := st.NextDue(ctx)
			if err != nil || gotOK != ok || ok && !got.Equal(at) {
				t.Errorf("%s: next due %v, %v, %v; want %v, %v", when, got, gotOK, err, at, ok)
			}
		}
		want("with nothing pending", time.Time{}, false)
		queueReplies(t, st, now, "one", "two")
		want("with a head due", now, true)
		items, err := st.Claim(ctx, "w", now, time.Minute, 10)
		if err != nil || len(items) != 1 {
			t.Fatalf("claimed %d, %v; want the lane's head", len(items), err)
		}
		want("with the head held", now.Add(time.Minute), true)
		if err := st.RetryLater(ctx, items[0], "busy", false, now.Add(time.Hour), now); err != nil {
			t.Fatal(err)
		}
		want("with the head retried in an hour", now.Add(time.Hour), true)
		if err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: "o2", Text: "other"}, now.Add(time.Second))
		}); err != nil {
			t.Fatal(err)
		}
		want("with another lane's head due", now.Add(time.Second), true)
	})
}

// A claim in a transaction that rolls back holds nothing: the head is
// taken by the next claim.
func TestRolledBackClaimHoldsNothing(t *testing.T) {
	st, _ := newTestStore(t)
	now := time.Now()
	queueReply(t, st, "one", now)
	writeThenFail(t, st, func(ctx context.Context, tx *sql.Tx) error {
		if ids := st.takeDue(now.UnixMilli(), "gone", now.Add(time.Hour).UnixMilli(), 10); len(ids) != 1 {
			t.Errorf("the claim rolled back took %d heads, want 1", len(ids))
		}
		return nil
	})
	items, err := st.Claim(context.Background(), "w", now, time.Minute, 10)
	if err != nil || len(items) != 1 || items[0].Delivery.Text != "one" {
		t.Fatalf("claimed %+v, %v; want the head the rolled-back claim took", items, err)
	}
}

// Each claim and retry of a head leaves a stale entry in the writer's heap;
// they do not pile up.
func TestStaleHeadsDoNotPileUp(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	queueReply(t, st, "one", now)
	for i := range 500 {
		items, err := st.Claim(ctx, "w", now.Add(10*time.Millisecond), time.Minute, 10)
		if err != nil || len(items) != 1 {
			t.Fatalf("round %d: claimed %d, %v; want the lane's head", i, len(items), err)
		}
		if err := st.RetryLater(ctx, items[0], "busy", false, now.Add(time.Duration(i%7)*time.Millisecond), now); err != nil {
			t.Fatal(err)
		}
	}
	var entries, heads int
	if err := st.writeTx(ctx, func(context.Context, *sql.Tx) error {
		entries, heads = len(st.due), len(st.heads)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if heads != 1 || entries > 2*heads+64 {
		t.Errorf("%d entries in the heap for %d heads, want at most %d", entries, heads, 2*heads+64)
	}
}
