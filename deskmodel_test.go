package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"pgregory.net/rapid"
)

// The desk's rules, checked against random sequences of what customers,
// agents, IM and time do (DESIGN.md, invariant 12). Each sequence runs on a
// bridge of its own, through the fakes; after every step, once the bridge
// is quiet, what crossed the wire and what the store says are held to the
// rules. CI runs a short pass on both databases; more sequences:
//
//	go test -run TestDeskModel -rapid.checks=2000 .
//
// A failure rapid finds is shrunk to its fewest steps, printed; keep it as a
// plain test.

// modelCustomers and modelAgents are the sequences' people.
var (
	modelCustomers = []string{"m0", "m1", "m2"}
	modelAgents    = []string{"agent_kim", "agent_lee"}
)

// The rules' figures in the sequences.
const (
	modelCap  = 1
	modelIdle = 30 * time.Minute
)

// deskStep is one thing that happens: kind, to customer c, by agent a;
// rush, if set, goes on to the next step without waiting for the bridge
// to settle, so that steps meet messages on their way.
type deskStep struct {
	kind string
	c, a int
	rush bool
}

func (s deskStep) String() string {
	rush := ""
	if s.rush {
		rush = ", rushed"
	}
	return fmt.Sprintf("%s(%s, %s%s)", s.kind, modelCustomers[s.c], modelAgents[s.a], rush)
}

// deskSteps are the kinds of step, each as likely as the others but for
// writing, which most steps are.
var deskSteps = []string{"write", "write", "write", "follow", "unfollow", "reply", "reply", "replies", "end", "end",
	"transfer", "other", "login", "logout", "disconnect", "idle", "window", "imfails", "wechatfails", "restart"}

func TestDeskModel(t *testing.T) {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "rapid.checks" })
	if !set {
		flag.Set("rapid.checks", "6") // CI's short pass; -rapid.checks=N for more
	}
	forStores(t, func(t *testing.T, pg bool) {
		if pg {
			testPostgres(t) // skips without a database
		}
		rapid.Check(t, func(rt *rapid.T) {
			steps := rapid.SliceOfN(rapid.Custom(func(rt *rapid.T) deskStep {
				return deskStep{rapid.SampledFrom(deskSteps).Draw(rt, "kind"),
					rapid.IntRange(0, len(modelCustomers)-1).Draw(rt, "customer"),
					rapid.IntRange(0, len(modelAgents)-1).Draw(rt, "agent"),
					rapid.Bool().Draw(rt, "rush")}
			}), 1, 25).Draw(rt, "steps")
			var broken string
			t.Run("sequence", func(t *testing.T) { broken = runDeskSequence(t, pg, steps) })
			if broken != "" {
				rt.Fatalf("%s", broken)
			}
		})
	})
}

// runDeskSequence plays steps on a bridge of its own, and returns the first
// rule broken, with the steps that led there, or "".
func runDeskSequence(t *testing.T, pg bool, steps []deskStep) string {
	clock := &fakeClock{now: time.Now()}
	h := newHarness(t, harnessOptions{postgres: pg, clock: clock, agents: modelAgents, sweepEvery: 20 * time.Millisecond,
		env: map[string]string{"IM_AGENT_MAX_OPEN": fmt.Sprint(modelCap), "SESSION_IDLE_TIMEOUT": modelIdle.String(),
			"AGENT_AWAY_GRACE": "5m", "RETRY_MIN_DELAY": "10ms", "RETRY_MAX_DELAY": "50ms"}})
	var db *sql.DB
	if pg {
		var err error
		if db, err = sql.Open("pgx", h.env["DATABASE_URL"]); err != nil {
			t.Fatal(err)
		}
	} else {
		db = h.openStoreDB(false)
	}
	defer db.Close()
	ctx := context.Background()
	// owners are the agents who had each customer's open conversation at
	// some point since the last check, as the conversations say (not the
	// history, which the bridge writes as it delivers): a customer's
	// message may reach any of them, and no one else.
	owners := map[string]map[string]bool{}
	noteOwners := func() {
		for _, c := range modelCustomers {
			if owners[c] == nil {
				owners[c] = map[string]bool{}
			}
			if o := modelOwner(db, c); o != "" {
				owners[c][o] = true
			}
		}
	}
	seenIM := 0
	unfollowed := map[string]bool{} // WeChat refuses them with 45015, rightly
	for i, s := range steps {
		c, a := modelCustomers[s.c], modelAgents[s.a]
		noteOwners()
		owner := modelOwner(db, c)
		switch s.kind {
		case "write":
			h.wx.SendText(ctx, c, fmt.Sprintf("%s says %d", c, i))
		case "follow":
			h.wx.Follow(ctx, c)
		case "unfollow":
			h.wx.Unfollow(ctx, c)
			unfollowed[c] = true
		case "reply", "replies":
			for range map[string]int{"reply": 1, "replies": 6}[s.kind] {
				if owner != "" {
					h.im.SendAsAgent(ctx, owner, customerIM(c), fmt.Sprintf("%s answers %d", owner, i))
				}
			}
		case "end":
			if owner != "" {
				h.im.SendAsAgent(ctx, owner, customerIM(c), "/end")
			}
		case "transfer":
			if owner != "" {
				h.im.SendAsAgent(ctx, owner, customerIM(c), "/transfer "+a)
			}
		case "other": // an agent runs a command in a conversation that is not theirs
			h.im.SendAsAgent(ctx, a, customerIM(c), "/end")
		case "login":
			h.im.Login(ctx, a)
		case "logout":
			h.im.Logout(ctx, a)
		case "disconnect":
			h.im.Disconnect(ctx, a)
		case "idle":
			clock.Advance(modelIdle + time.Minute)
		case "window":
			clock.Advance(49 * time.Hour)
		case "imfails":
			h.im.FailNextStatus(1, http.StatusBadGateway)
		case "wechatfails":
			h.wx.FailNextStatus(1, http.StatusBadGateway)
		case "restart":
			h.restart()
		}
		if s.rush && s.kind != "restart" && i < len(steps)-1 {
			continue
		}
		if !modelQuiet(h, db, clock) {
			return fmt.Sprintf("after %v: the bridge did not settle", steps[:i+1])
		}
		noteOwners()
		if broken := modelCheck(h, db, unfollowed); broken != "" {
			return fmt.Sprintf("after %v: %s", steps[:i+1], broken)
		}
		msgs := h.im.Messages()
		for _, m := range msgs[seenIM:] {
			openid, isCustomer := strings.CutPrefix(m.From, "wx_")
			if isCustomer && !bridgeNotice(m) && !owners[openid][m.To] {
				return fmt.Sprintf("after %v: %s's %q reached %s, who never had the conversation meanwhile (%v)",
					steps[:i+1], openid, m.Text, m.To, owners[openid])
			}
		}
		seenIM = len(msgs)
		for _, c := range modelCustomers {
			owners[c] = nil
		}
	}
	return ""
}

// modelOwner is the agent of the customer's open conversation, "" if none.
func modelOwner(db *sql.DB, openid string) string {
	var agent string
	db.QueryRow(`SELECT agent FROM conversations WHERE openid = '` + openid + `' AND closed_at IS NULL`).Scan(&agent)
	return agent
}

// modelQuiet waits until nothing is left to deliver and the desk has swept
// twice since, moving the clock on a little while retries wait on it.
func modelQuiet(h *harness, db *sql.DB, clock *fakeClock) bool {
	sweeps := func() int {
		var n int
		fmt.Sscan(metricValue(h.metricsText(), "bridge_desk_sweeps_total"), &n)
		return n
	}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		var pending int
		db.QueryRow(`SELECT count(*) FROM outbox WHERE state = 'pending'`).Scan(&pending)
		if pending == 0 {
			from := sweeps()
			for time.Now().Before(deadline) && sweeps() < from+2 {
				time.Sleep(5 * time.Millisecond)
			}
			db.QueryRow(`SELECT count(*) FROM outbox WHERE state = 'pending'`).Scan(&pending)
			if pending == 0 {
				return true
			}
		}
		clock.Advance(100 * time.Millisecond) // a retry waits on the bridge's clock
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// metricValue is the value of the unlabelled metric name in text.
func metricValue(text, name string) string {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}

// modelCheck holds the store and the wire to the desk's rules, and returns
// the first broken, or "".
func modelCheck(h *harness, db *sql.DB, unfollowed map[string]bool) string {
	refused := "'-'" // the lanes of customers who unfollowed: WeChat refuses them with 45015
	for c := range unfollowed {
		refused += ", 'wx:" + c + "'"
	}
	rows := func(query string) []string {
		r, err := db.Query(query)
		if err != nil {
			return []string{"query failed: " + err.Error()}
		}
		defer r.Close()
		var out []string
		for r.Next() {
			var s string
			r.Scan(&s)
			out = append(out, s)
		}
		return out
	}
	rules := []struct{ rule, query string }{
		{"each customer in at most one open conversation",
			`SELECT openid FROM conversations WHERE closed_at IS NULL GROUP BY openid HAVING count(*) > 1`},
		{fmt.Sprintf("no agent over the cap of %d", modelCap),
			`SELECT agent FROM conversations WHERE closed_at IS NULL AND agent <> '' GROUP BY agent HAVING count(*) > ` + fmt.Sprint(modelCap)},
		{"each agent's count of open conversations true",
			`SELECT a.agent FROM agent_load a WHERE a.open <> (SELECT count(*) FROM conversations v WHERE v.agent = a.agent AND v.closed_at IS NULL)`},
		{"nobody waiting while an agent online has room",
			`SELECT v.openid FROM conversations v WHERE v.closed_at IS NULL AND v.agent = '' AND EXISTS (SELECT 1 FROM agent_load a
				WHERE a.online = 1 AND a.agent IN ('agent_kim', 'agent_lee') AND a.open < ` + fmt.Sprint(modelCap) + `)`},
		{"the queue taken in order: nobody given an agent while someone who came before still waits",
			`SELECT v.openid FROM conversations v WHERE v.closed_at IS NULL AND v.agent <> '' AND v.queued_at > 0 AND EXISTS (
				SELECT 1 FROM conversations w WHERE w.closed_at IS NULL AND w.agent = '' AND w.id < v.id AND w.queued_at < v.assigned_at)`},
		{"no conversation closed as idle within SESSION_IDLE_TIMEOUT of its last message",
			`SELECT v.openid FROM conversations v WHERE v.closed_by = 'idle' AND v.closed_at - (SELECT MAX(m.created_at) FROM messages m
				WHERE m.conversation = v.id AND m.created_at < v.closed_at) < ` + fmt.Sprint(modelIdle.Milliseconds())},
		{"no reply past WeChat's quota or window",
			// 45015 is the bridge's fault only if the window was still open,
			// by the bridge's own count, when WeChat refused: an item can be
			// on its way while the clock passes the 48 hours.
			`SELECT CAST(o.id AS TEXT) FROM outbox o WHERE o.state = 'failed' AND (o.last_error LIKE '%45047%' OR o.last_error LIKE '%45015%'
				AND o.lane NOT IN (` + refused + `) AND o.updated_at - (SELECT MAX(m.created_at) FROM messages m
				WHERE m.openid = substr(o.lane, 4) AND m.direction = 'in' AND m.created_at <= o.updated_at) < ` + fmt.Sprint((48 * time.Hour).Milliseconds()) + `)`},
		{"a rating only after its question",
			`SELECT v.openid FROM conversations v WHERE v.rating > 0 AND NOT EXISTS (SELECT 1 FROM messages m
				WHERE m.conversation = v.id AND m.direction = 'out' AND m.state = 'queued' AND m.text LIKE '%How did we do?%')`},
		{"a customer's message waits only while their conversation does",
			`SELECT m.openid FROM messages m WHERE m.state = 'waiting' AND NOT EXISTS (SELECT 1 FROM conversations v
				WHERE v.openid = m.openid AND v.closed_at IS NULL AND v.agent = '')`},
		{"every message delivered, or in a final state (a dead letter is, and its agent is told)",
			`SELECT m.text FROM messages m JOIN outbox o ON o.id = m.outbox_id AND o.lane = (CASE m.direction WHEN 'in' THEN 'im:' ELSE 'wx:' END) || m.openid
				WHERE m.state = 'queued' AND o.state NOT IN ('done', 'failed')`},
	}
	for _, r := range rules {
		if got := rows(r.query); len(got) > 0 {
			return fmt.Sprintf("%s: %v", r.rule, got)
		}
	}
	// Each customer's message reached, once, the agent the history says it
	// went to.
	type key struct{ from, text string }
	seen := map[key][]string{}
	for _, m := range h.im.Messages() {
		if strings.HasPrefix(m.From, "wx_") && !bridgeNotice(m) {
			seen[key{m.From, m.Text}] = append(seen[key{m.From, m.Text}], m.To)
		}
	}
	hist, err := db.Query(`SELECT m.openid, m.text, m.agent FROM messages m JOIN outbox o ON o.id = m.outbox_id
		AND o.lane = 'im:' || m.openid WHERE m.direction = 'in' AND m.state = 'queued' AND o.state = 'done'`)
	if err != nil {
		return "query failed: " + err.Error()
	}
	defer hist.Close()
	for hist.Next() {
		var openid, text, agent string
		hist.Scan(&openid, &text, &agent)
		if got := seen[key{customerIM(openid), text}]; len(got) != 1 || got[0] != agent {
			var all []string
			for _, m := range h.im.Messages() {
				all = append(all, m.From+">"+m.To+":"+m.Text)
			}
			return fmt.Sprintf("%s's %q reached %v, want the history's agent %s once (IM has %q)", openid, text, got, agent, all)
		}
	}
	return ""
}
