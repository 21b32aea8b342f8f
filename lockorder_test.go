package main

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// TestNoDeadlockAcrossTwoBridges: pushes, replies, commands, logins,
// logouts and the sweep run at once on two bridges sharing one PostgreSQL
// database, and PostgreSQL counts no deadlock: every transaction locks in
// the one order db.go writes down.
func TestNoDeadlockAcrossTwoBridges(t *testing.T) {
	agents := []string{"agent_kim", "agent_lee", "agent_nam"}
	h := newHarness(t, harnessOptions{postgres: true, agents: agents, im: fakes.IMOptions{Online: agents},
		env: map[string]string{"IM_AGENT_MAX_OPEN": "3", "AGENT_AWAY_GRACE": "1s", "RETRY_MIN_DELAY": "20ms", "RETRY_MAX_DELAY": "100ms"}})
	second, stopSecond := startBridge(t, h.env, h.logs)
	lb := roundRobin(t, h.base, second)
	h.wx.SetTarget(lb + "/wechat")
	h.im.SetCallbackURL(lb + "/imcallback")

	db, err := sql.Open("pgx", h.env["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	deadlocks := func() int64 {
		var n int64
		if err := db.QueryRow(`SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := deadlocks()

	ctx := context.Background()
	const customers, rounds = 12, 4
	var wg sync.WaitGroup
	for c := range customers {
		wg.Add(1)
		go func() { // a customer writes; whoever has them answers, ends or transfers
			defer wg.Done()
			openid := burstOpenID(c)
			for i := range rounds {
				h.wx.SendText(ctx, openid, fmt.Sprintf("c%d m%d", c, i))
				agent := agents[(c+i)%len(agents)]
				switch i % 4 {
				case 0:
					h.im.SendAsAgent(ctx, agent, customerIM(openid), "an answer")
				case 1:
					h.im.SendAsAgent(ctx, agent, customerIM(openid), "/transfer "+agents[(c+i+1)%len(agents)])
				case 2:
					h.im.SendAsAgent(ctx, agent, customerIM(openid), "/queue")
				case 3:
					h.im.SendAsAgent(ctx, agent, customerIM(openid), "/end")
				}
			}
		}()
	}
	wg.Add(1)
	go func() { // the agents come and go
		defer wg.Done()
		for i := range 3 * rounds {
			a := agents[i%len(agents)]
			switch i % 3 {
			case 0:
				h.im.Logout(ctx, a)
			case 1:
				h.im.Disconnect(ctx, agents[(i+1)%len(agents)])
			}
			h.im.Login(ctx, a)
			h.im.Login(ctx, agents[(i+1)%len(agents)])
		}
	}()
	wg.Wait()
	eventually(t, "the outbox delivered", func() bool {
		var n int
		db.QueryRow(`SELECT count(*) FROM outbox WHERE state = 'pending'`).Scan(&n)
		return n == 0
	})

	// A backend reports its deadlocks when it exits: stop both bridges,
	// and wait for their connections to close.
	if err := stopSecond(); err != nil {
		t.Fatal(err)
	}
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var others int
		db.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
			AND backend_type = 'client backend'`).Scan(&others)
		if others == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if after := deadlocks(); after != before {
		t.Errorf("PostgreSQL counted %d deadlocks", after-before)
	}
}
