package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestOwedHistoryFuzz: random sequences of what customers, agents and the
// worker do, on one store; after each step, each customer's history rows
// (followed by the rows still owed) read the customer's messages in the
// order they were pushed, each once.
func TestOwedHistoryFuzz(t *testing.T) {
	seeds := 30
	if s := os.Getenv("OWED_SEEDS"); s != "" {
		seeds, _ = strconv.Atoi(s)
	}
	for _, kind := range []string{"sqlite", "postgres"} {
		for seed := 0; seed < seeds; seed++ {
			t.Run(fmt.Sprintf("%s/%d", kind, seed), func(t *testing.T) {
				if kind == "postgres" && os.Getenv("TEST_DATABASE_URL") == "" {
					t.Skip()
				}
				owedFuzzOne(t, kind, uint64(seed))
			})
		}
	}
}

func owedFuzzOne(t *testing.T, kind string, seed uint64) {
	st := openTestStore(t, kind)
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_", MaxOpen: 1})
	r := rand.New(rand.NewPCG(seed, 7))
	ctx := context.Background()
	now := time.Now()
	customers := []string{"c0", "c1", "c2"}
	pushed := map[string][]string{}
	var log []string
	n := 0
	db := st.rdb
	check := func() {
		t.Helper()
		for _, c := range customers {
			var got []string
			rows, err := db.QueryContext(ctx, st.q(`SELECT text, state FROM messages WHERE openid = ? AND direction = 'in' ORDER BY id`), c)
			if err != nil {
				t.Fatal(err)
			}
			for rows.Next() {
				var txt, state string
				rows.Scan(&txt, &state)
				if state == "rating" {
					continue
				}
				got = append(got, txt)
			}
			rows.Close()
			// Owed: flagged, and on PostgreSQL past the customer's last
			// settled item (history.go).
			settled := ""
			if st.postgres {
				settled = ` AND id > COALESCE((SELECT history_settled FROM customers WHERE openid = '` + c + `'), 0)`
			}
			rows, err = db.QueryContext(ctx, st.q(`SELECT delivery, state FROM outbox WHERE lane = ? AND history_owed = 1`+settled+` ORDER BY id`), "im:"+c)
			if err != nil {
				t.Fatal(err)
			}
			for rows.Next() {
				var raw, state string
				rows.Scan(&raw, &state)
				if state != "pending" {
					t.Fatalf("seed %d: an item owing its row ended (%s): %s\n%s", seed, state, raw, strings.Join(log, "\n"))
				}
				i := strings.Index(raw, `"text":"`)
				txt := raw[i+8:]
				txt = txt[:strings.Index(txt, `"`)]
				got = append(got, txt+"(owed)")
			}
			rows.Close()
			want := pushed[c]
			var gotClean []string
			for _, g := range got {
				g = strings.TrimSuffix(g, "(owed)")
				g = strings.TrimLeft(g, "y")
				gotClean = append(gotClean, g)
			}
			if strings.Join(gotClean, ",") != strings.Join(want, ",") {
				t.Fatalf("seed %d: %s's history %q, want %q\n%s", seed, c, got, want, strings.Join(log, "\n"))
			}
		}
	}
	agentOf := func(c string) (int64, string, bool) {
		var id int64
		var agent string
		var closed sql.NullInt64
		err := db.QueryRowContext(ctx, st.q(`SELECT id, agent, closed_at FROM conversations WHERE openid = ? ORDER BY id DESC LIMIT 1`), c).Scan(&id, &agent, &closed)
		if err != nil {
			return 0, "", false
		}
		return id, agent, !closed.Valid
	}
	key := func() string { n++; return fmt.Sprintf("k%d", n) }
	var held []OutboxItem
	for step := 0; step < 60; step++ {
		now = now.Add(time.Duration(r.IntN(5000)) * time.Millisecond)
		c := customers[r.IntN(len(customers))]
		switch op := r.IntN(14); op {
		case 0, 1, 2, 3:
			txt := fmt.Sprintf("m%05d", n+1)
			long := r.IntN(4) == 0
			full := txt
			if long {
				full = strings.Repeat("y", 13000) + txt
			}
			log = append(log, fmt.Sprintf("push %s %s long=%v", c, txt, long))
			if _, err := st.AcceptPush(ctx, message(key(), c, full), now); err != nil {
				t.Fatal(err)
			}
			pushed[c] = append(pushed[c], txt)
		case 4:
			_, agent, open := agentOf(c)
			if !open || agent == "" {
				continue
			}
			log = append(log, fmt.Sprintf("reply %s by %s", c, agent))
			if _, err := st.AcceptReply(ctx, key(), Delivery{Kind: deliverWeChat, OpenID: c, IMUser: "wx_" + c, Agent: agent, Text: "r"}, now); err != nil {
				t.Fatal(err)
			}
		case 5:
			_, agent, open := agentOf(c)
			if !open || agent == "" {
				continue
			}
			name, arg := "end", ""
			if r.IntN(2) == 0 {
				name, arg = "transfer", map[string]string{"a1": "a2", "a2": "a1"}[agent]
			}
			log = append(log, fmt.Sprintf("%s %s by %s %s", name, c, agent, arg))
			if _, err := st.AcceptCommand(ctx, key(), Command{Agent: agent, OpenID: c, Name: name, Arg: arg}, now); err != nil {
				t.Fatal(err)
			}
		case 6, 7, 8:
			// the worker: claim, ask the recipient, then an outcome
			items, err := st.Claim(ctx, "w", now, time.Minute, 10)
			if err != nil {
				t.Fatal(err)
			}
			var done []OutboxItem
			for _, it := range items {
				if it.Delivery.Kind == deliverIMSend {
					if _, err := st.Recipient(ctx, it); errors.Is(err, errParked) {
						log = append(log, fmt.Sprintf("parked %d %s", it.ID, tail(it.Delivery.Text)))
						continue
					} else if err != nil {
						t.Fatal(err)
					}
				}
				switch r.IntN(6) {
				case 0:
					log = append(log, fmt.Sprintf("retry %d %s %s", it.ID, it.Delivery.Kind, tail(it.Delivery.Text)))
					if err := st.RetryLater(ctx, it, "x", false, now.Add(time.Second), now); err != nil {
						t.Fatal(err)
					}
				case 1:
					log = append(log, fmt.Sprintf("giveup %d %s %s", it.ID, it.Delivery.Kind, tail(it.Delivery.Text)))
					if err := st.GiveUp(ctx, it, "x", nil, now); err != nil {
						t.Fatal(err)
					}
				case 2:
					log = append(log, fmt.Sprintf("hold %d %s %s", it.ID, it.Delivery.Kind, tail(it.Delivery.Text)))
					held = append(held, it)
				default:
					log = append(log, fmt.Sprintf("delivered %d %s %s", it.ID, it.Delivery.Kind, tail(it.Delivery.Text)))
					done = append(done, it)
				}
			}
			if len(done) > 0 {
				if err := st.Delivered(ctx, done, now); err != nil && !errors.Is(err, errNotHeld) {
					t.Fatal(err)
				}
			}
		case 9:
			if len(held) > 0 {
				log = append(log, fmt.Sprintf("late delivered %d", held[0].ID))
				if err := st.Delivered(ctx, held[:1], now); err != nil && !errors.Is(err, errNotHeld) {
					t.Fatal(err)
				}
				held = held[1:]
			}
		case 10:
			var id int64
			if err := db.QueryRowContext(ctx, `SELECT COALESCE(MAX(id), 0) FROM outbox WHERE state = 'failed'`).Scan(&id); err != nil {
				t.Fatal(err)
			}
			if id != 0 {
				log = append(log, fmt.Sprintf("retry dead %d", id))
				if err := st.RetryDeadLetter(ctx, id, now); err != nil {
					t.Fatal(err)
				}
			}
		case 11:
			a := []string{"a1", "a2"}[r.IntN(2)]
			act := []string{"Login", "Logout"}[r.IntN(2)]
			log = append(log, fmt.Sprintf("%s %s", act, a))
			if _, err := st.PresenceEvent(ctx, a, act, now, now); err != nil {
				t.Fatal(err)
			}
		case 12:
			now = now.Add(time.Duration(r.IntN(40)) * time.Minute)
			log = append(log, "sweep")
			if _, err := st.Sweep(ctx, 30*time.Minute, now); err != nil {
				t.Fatal(err)
			}
		case 13:
			act := []pushAction{actUnfollow, actFollow}[r.IntN(2)]
			log = append(log, fmt.Sprintf("follow/unfollow %d %s", act, c))
			if _, err := st.AcceptPush(ctx, Inbound{Key: key(), Action: act, OpenID: c, IMUser: "wx_" + c, DeleteAccount: r.IntN(2) == 0,
				NewRandom: func() uint32 { return 1 }}, now); err != nil {
				t.Fatal(err)
			}
		}
		check()
	}
	for _, c := range customers {
		if _, err := st.CustomerHistory(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	check()
	if os.Getenv("OWED_LOG") != "" {
		t.Log(strings.Join(log, "\n"))
	}
}

func tail(s string) string {
	if len(s) > 8 {
		return s[len(s)-8:]
	}
	return s
}
