package main

import (
	"context"
	"database/sql"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHistoryRetention: past HISTORY_RETENTION a customer's messages and
// closed conversations are gone from the store, and delivered items past a
// day from the outbox; a newer conversation stays whole; a rating armed for
// a conversation pruned since is taken as a message.
func TestHistoryRetention(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{postgres: pg, clock: clock,
			env: map[string]string{"ADMIN_TOKEN": "admintoken1", "HISTORY_RETENTION": "30d"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "my parcel is late")
		eventually(t, "c1's question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "It leaves today.")
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
		eventually(t, "c1's closing text", func() bool { return len(h.sentTo("c1")) == 2 })
		// Each move of the clock waits for the deliveries to be recorded,
		// which they are at the bridge's time.
		eventually(t, "the outbox empty", func() bool { return outboxDepth(t, h.base) == 0 })

		// (IM's callbacks keep the real time: no agent acts after the
		// clock moves.)
		clock.Advance(20 * 24 * time.Hour)
		h.wx.SendText(ctx, "c3", "hello")
		eventually(t, "c3's message in IM", func() bool { return len(h.customerTexts("agent_kim", "c3")) == 1 })
		eventually(t, "the outbox empty", func() bool { return outboxDepth(t, h.base) == 0 })

		clock.Advance(11 * 24 * time.Hour) // c1's conversation closed 31 days ago; c3 wrote 11 days ago
		eventually(t, "c1's history pruned", func() bool { return h.adminStatus("/admin/customers/c1/messages") == http.StatusNotFound })
		if convs := h.history("c3"); len(convs) != 1 || len(convs[0].Messages) == 0 || convs[0].Messages[0].Text != "hello" {
			t.Errorf("c3's history within HISTORY_RETENTION: %+v", convs)
		}
		db := h.openDB()
		defer db.Close()
		var done int
		if err := db.QueryRow(`SELECT count(*) FROM outbox WHERE state = 'done'`).Scan(&done); err != nil {
			t.Fatal(err)
		}
		if done != 0 {
			t.Errorf("%d delivered items older than a day are kept", done)
		}

		if got := replyText(h.wx.SendText(ctx, "c1", "5")); got != defaultConnectingText {
			t.Errorf("a rating for a pruned conversation was answered %q, want the connecting text of a new conversation", got)
		}
		eventually(t, "c1's 5 in IM", func() bool { return slices.Contains(h.customerTexts("agent_kim", "c1"), "5") })
	})
}

// adminStatus returns the status of an admin endpoint's answer.
func (h *harness) adminStatus(path string) int {
	h.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, h.base+path, nil)
	req.Header.Set("Authorization", "Bearer "+h.env["ADMIN_TOKEN"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// openDB opens the bridge's database through a connection of the test's
// own. The caller closes it.
func (h *harness) openDB() *sql.DB {
	h.t.Helper()
	if strings.HasPrefix(h.env["DATABASE_URL"], "sqlite:") {
		return h.openStoreDB(false)
	}
	db, err := sql.Open("pgx", h.env["DATABASE_URL"])
	if err != nil {
		h.t.Fatal(err)
	}
	return db
}

// TestPruneInBatches: the prunes walk the tables a few rows a write, and
// delete exactly the rows past their cutoff that are finished: messages but
// those waiting or held, conversations closed before the cutoff, delivered
// items; dead letters, pending items and everything newer stay.
func TestPruneInBatches(t *testing.T) {
	defer func(n int) { pruneBatch = n }(pruneBatch)
	pruneBatch = 3
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			ctx := context.Background()
			cutoff := time.UnixMilli(1_000_000)
			// Rows made one a second from 40 s before the cutoff to 40 s
			// after, in id order, in every state; one message made while
			// the clock was a year ahead stops nothing.
			var wantMessages, wantConvs, wantItems []int64
			states := []MessageState{stateQueued, stateWaiting, stateHeld, stateNotSent, stateRating}
			items := []ItemState{itemDone, itemPending, itemFailed, itemRetried}
			err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
				for i := range int64(80) {
					made := cutoff.UnixMilli() + (i-40)*1000
					state := states[i%int64(len(states))]
					madeMsg := made
					if i == 4 {
						madeMsg = cutoff.Add(365 * 24 * time.Hour).UnixMilli()
					}
					if _, err := st.exec(ctx, tx, `INSERT INTO messages (id, conversation, openid, direction, text, state, created_at)
						VALUES (?, 1, 'o1', 'in', 'x', ?, ?)`, i+1, string(state), madeMsg); err != nil {
						return err
					}
					if madeMsg >= cutoff.UnixMilli() || state == stateWaiting || state == stateHeld {
						wantMessages = append(wantMessages, i+1)
					}
					var closed any // every third is open; the others close 5 s after opening
					if i%3 != 0 {
						closed = made + 5000
					}
					if _, err := st.exec(ctx, tx, `INSERT INTO conversations (id, openid, agent, opened_at, closed_at)
						VALUES (?, ?, 'a1', ?, ?)`, i+1, fmt.Sprint("o", i), made, closed); err != nil {
						return err
					}
					if closed == nil || made+5000 >= cutoff.UnixMilli() {
						wantConvs = append(wantConvs, i+1)
					}
					state2 := items[i%int64(len(items))]
					if _, err := st.exec(ctx, tx, `INSERT INTO outbox (id, lane, delivery, state, next_at, created_at, updated_at)
						VALUES (?, ?, '{}', ?, ?, ?, ?)`, i+1, fmt.Sprint("im:o", i), string(state2), made, made, made+2000); err != nil {
						return err
					}
					if made+2000 >= cutoff.UnixMilli() || state2 == itemPending || state2 == itemFailed {
						wantItems = append(wantItems, i+1)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			m, c, err := st.PruneHistory(ctx, cutoff)
			if err != nil {
				t.Fatal(err)
			}
			n, err := st.PruneOutbox(ctx, cutoff)
			if err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				table   string
				deleted int
				want    []int64
			}{{"messages", m, wantMessages}, {"conversations", c, wantConvs}, {"outbox", n, wantItems}} {
				var got []int64
				rows, err := st.rdb.QueryContext(ctx, `SELECT id FROM `+tc.table+` ORDER BY id`)
				if err != nil {
					t.Fatal(err)
				}
				for rows.Next() {
					var id int64
					rows.Scan(&id)
					got = append(got, id)
				}
				rows.Close()
				if !slices.Equal(got, tc.want) {
					t.Errorf("%s kept %v, want %v", tc.table, got, tc.want)
				}
				if tc.deleted != 80-len(tc.want) {
					t.Errorf("%s: %d deleted, want %d", tc.table, tc.deleted, 80-len(tc.want))
				}
			}
		})
	}
}
