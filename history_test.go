package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHistoryWrittenOnce: a customer's message in one item is written once
// at the push, in its outbox row; its history row follows, with the push's
// time and place in the order, when its item ends or when anything reads or
// writes the customer's history first. c1's messages wait in IM's hold
// while the idle timer passes, and c3's while its history is read: each
// sees them as if the push had written them. c2, idle, is the sweep's witness: closing it,
// the sweep judged c1 too.
func TestHistoryWrittenOnce(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{postgres: pg, clock: clock, env: map[string]string{"SESSION_IDLE_TIMEOUT": "30m",
			"IDLE_CLOSED_TEXT": "Closed for now.", "ADMIN_TOKEN": "admintoken1"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "m1")
		h.wx.SendText(ctx, "c2", "hello")
		eventually(t, "m1 and hello in IM", func() bool {
			return len(h.customerTexts("agent_kim", "c1")) == 1 && len(h.customerTexts("agent_kim", "c2")) == 1
		})
		db := h.openDB()
		defer db.Close()
		texts := func() []string { // c1's history rows, in order
			var out []string
			rows, err := db.Query(`SELECT text FROM messages WHERE openid = 'c1' AND direction = 'in' ORDER BY id`)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			for rows.Next() {
				var s string
				rows.Scan(&s)
				out = append(out, s)
			}
			return out
		}
		eventually(t, "m1's row, written as its item ended", func() bool { return slices.Equal(texts(), []string{"m1"}) })

		clock.Advance(29 * time.Minute)
		release := h.im.Hold()
		defer release()
		pushedAt := clock.Now()
		h.wx.SendText(ctx, "c1", "m2")
		h.wx.SendText(ctx, "c1", "m3")
		if got := texts(); !slices.Equal(got, []string{"m1"}) {
			t.Fatalf("c1's rows after the pushes: %q, want m1's alone: a push writes its outbox row only", got)
		}
		h.wx.SendText(ctx, "c3", "x1") // read by the history first
		if m := h.history("c3")[0].Messages; len(m) != 1 || m[0].Text != "x1" || m[0].State != "pending" || m[0].Time != pushedAt.UnixMilli() {
			t.Errorf("c3's history: %+v, want x1 pending since its push", m)
		}

		clock.Advance(2 * time.Minute) // m1 31 minutes ago, m2 and m3 2 minutes ago
		eventually(t, "c2 closed as idle", func() bool { return slices.Contains(h.sentTexts("c2"), "Closed for now.") })
		if slices.Contains(h.sentTexts("c1"), "Closed for now.") {
			t.Fatal("c1's conversation closed as idle 2 minutes after the customer wrote")
		}
		if got := texts(); !slices.Equal(got, []string{"m1", "m2", "m3"}) {
			t.Fatalf("c1's rows after the sweep: %q, want m1, m2, m3", got)
		}
		var got []string
		for _, m := range h.history("c1")[0].Messages {
			got = append(got, m.Direction+" "+m.Text+" "+m.State)
			if m.Text != "m1" && m.Time != pushedAt.UnixMilli() {
				t.Errorf("%s recorded at %d, want its push's time %d", m.Text, m.Time, pushedAt.UnixMilli())
			}
		}
		if want := "in m1 delivered|in m2 pending|in m3 pending"; strings.Join(got, "|") != want {
			t.Errorf("c1's history: %q, want %q", strings.Join(got, "|"), want)
		}

		release()
		eventually(t, "m2 and m3 in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 3 })
		eventually(t, "every message delivered", func() bool {
			got = got[:0]
			for _, m := range h.history("c1")[0].Messages {
				got = append(got, m.Text+" "+m.State)
			}
			return strings.Join(got, "|") == "m1 delivered|m2 delivered|m3 delivered"
		})
		if got := texts(); !slices.Equal(got, []string{"m1", "m2", "m3"}) {
			t.Errorf("c1's rows once delivered: %q, want each once", got)
		}
	})
}

// historyTexts returns the first ten bytes of each of the customer's
// messages in their history, as the admin reads it.
func historyTexts(t *testing.T, st *Store, openid string) []string {
	t.Helper()
	convs, err := st.CustomerHistory(context.Background(), openid)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, c := range convs {
		for _, m := range c.Messages {
			if m.Direction == "in" {
				txt := m.Text
				if len(txt) > 10 {
					txt = txt[:10]
				}
				out = append(out, txt)
			}
		}
	}
	return out
}

// TestHistoryOrderAroundAMessageInParts: a short message (owing its row),
// then a long one in parts (whose push writes its row): the history keeps
// the order of the pushes.
func TestHistoryOrderAroundAMessageInParts(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			ctx, now := context.Background(), time.Now()
			long := "LONG" + strings.Repeat("x", 13000)
			for i, txt := range []string{"one", long, "three"} {
				if _, err := st.AcceptPush(ctx, message("k"+txt[:3], "o1", txt), now.Add(time.Duration(i)*time.Second)); err != nil {
					t.Fatal(err)
				}
			}
			got := historyTexts(t, st, "o1")
			want := []string{"one", "LONGxxxxxx", "three"}
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Errorf("history %q, want %q", got, want)
			}
		})
	}
}

// TestAnsweredConversationNotRequeued: a short message (owing its row), a
// long one, the agent's reply, all delivered; the agent leaves. The
// customer's last message came before the reply, so the conversation is
// not abandoned, and the history reads in the order of the pushes.
func TestAnsweredConversationNotRequeued(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			ctx, now := context.Background(), time.Now()
			long := "LONG" + strings.Repeat("x", 13000)
			for i, txt := range []string{"one", long} {
				if _, err := st.AcceptPush(ctx, message("k"+txt[:3], "o1", txt), now.Add(time.Duration(i)*time.Second)); err != nil {
					t.Fatal(err)
				}
			}
			now = now.Add(5 * time.Second)
			if _, err := st.AcceptReply(ctx, "r1", Delivery{Kind: deliverWeChat, OpenID: "o1", IMUser: "wx_o1", Agent: "a1", Text: "reply"}, now); err != nil {
				t.Fatal(err)
			}
			deliverAll(t, st, now.Add(time.Second))
			if _, err := st.PresenceEvent(ctx, "a1", "Logout", now.Add(2*time.Second), now.Add(2*time.Second)); err != nil {
				t.Fatal(err)
			}
			later := now.Add(time.Hour)
			sw, err := st.Sweep(ctx, 0, later)
			if err != nil {
				t.Fatal(err)
			}
			if sw.Requeued != 0 {
				t.Errorf("requeued %d conversations; the agent answered the customer's last message", sw.Requeued)
			}
			got := historyTexts(t, st, "o1")
			if strings.Join(got, ",") != "one,LONGxxxxxx" {
				t.Errorf("history %q, want one, LONG", got)
			}
		})
	}
}

// deadFirstMessage has o1 write "one", the import of their account
// delivered and "one" refused for good, and returns its dead letter's id.
func deadFirstMessage(t *testing.T, st *Store, now time.Time) int64 {
	t.Helper()
	ctx := context.Background()
	if _, err := st.AcceptPush(ctx, message("k1", "o1", "one"), now); err != nil {
		t.Fatal(err)
	}
	for range 10 {
		items, err := st.Claim(ctx, "w", now, time.Minute, 10)
		if err != nil || len(items) == 0 {
			t.Fatal(err, len(items))
		}
		if it := items[0]; it.Delivery.Kind == deliverIMSend {
			if err := st.GiveUp(ctx, it, "refused", nil, now); err != nil {
				t.Fatal(err)
			}
			return it.ID
		}
		if err := st.Delivered(ctx, items, now); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("o1's message never claimed")
	return 0
}

// TestRetriedDeadLetterKeepsHistoryOrder: a dead letter retried while a
// later message of the customer still owes its row joins the lane's end
// after that row is written, so the history keeps the order of the pushes.
func TestRetriedDeadLetterKeepsHistoryOrder(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			ctx, now := context.Background(), time.Now()
			dead := deadFirstMessage(t, st, now)
			if _, err := st.AcceptPush(ctx, message("k2", "o1", "two"), now.Add(time.Second)); err != nil {
				t.Fatal(err)
			}
			if err := st.RetryDeadLetter(ctx, dead, now.Add(2*time.Second)); err != nil {
				t.Fatal(err)
			}
			if _, err := st.AcceptPush(ctx, message("k3", "o1", "three"), now.Add(3*time.Second)); err != nil {
				t.Fatal(err)
			}
			got := historyTexts(t, st, "o1")
			if strings.Join(got, ",") != "one,two,three" {
				t.Errorf("history %q, want one, two, three", got)
			}
			deliverAll(t, st, now.Add(5*time.Second))
			if got := historyTexts(t, st, "o1"); strings.Join(got, ",") != "one,two,three" {
				t.Errorf("after delivery, history %q, want one, two, three", got)
			}
		})
	}
}

// TestRetriedDeadLetterLeavesRecentMessageAlive: the customer's recent
// message, owing its row, and a dead letter retried after it: the idle
// sweep sees the recent message and leaves the conversation open.
func TestRetriedDeadLetterLeavesRecentMessageAlive(t *testing.T) {
	st := openTestStore(t, "sqlite")
	ctx, now := context.Background(), time.Now()
	dead := deadFirstMessage(t, st, now)
	t2 := now.Add(40 * time.Minute)
	if _, err := st.AcceptPush(ctx, message("k2", "o1", "two"), t2); err != nil {
		t.Fatal(err)
	}
	if err := st.RetryDeadLetter(ctx, dead, t2.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	sw, err := st.Sweep(ctx, 30*time.Minute, t2.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if sw.Closed != 0 {
		t.Errorf("closed %d conversations as idle one minute after the customer wrote", sw.Closed)
	}
}

// TestHistoryKeepsCustomerText: a customer's video that cannot cross goes
// to IM as its text and why; the history keeps what the customer sent.
func TestHistoryKeepsCustomerText(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com", "ADMIN_TOKEN": "admin-token-value"}})
	ctx := context.Background()
	h.agentReady()
	h.wx.SendText(ctx, customer, "hello")
	large := append(testMP4(), make([]byte, 12<<20)...)
	videoID, _ := h.wx.AddMedia(large, "video/mp4")
	thumbID, _ := h.wx.AddMedia(testPNG(t, 8, 6), "image/png")
	h.wx.SendMessage(ctx, customer, "video", map[string]string{"MediaId": videoID, "ThumbMediaId": thumbID})
	eventually(t, "the video's text in IM", func() bool { return len(h.customerTexts("agent_kim", customer)) == 3 })
	var got []string
	for _, c := range h.history(customer) {
		for _, m := range c.Messages {
			if m.Direction == "in" {
				got = append(got, m.Text)
			}
		}
	}
	if len(got) != 3 || strings.Contains(got[2], "not carried") {
		t.Errorf("history %q: the customer's message replaced by the bridge's rewrite", got)
	}
}
