package main

import (
	"context"
	"database/sql"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMetricsAndProbes plays the round trip and reads /metrics, /healthz
// and /readyz.
func TestMetricsAndProbes(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	h.wx.SendText(ctx, customer, question)
	h.wx.Push(ctx, h.wx.EventXML(customer, "CLICK", "MENU"))
	eventually(t, "the question in IM", func() bool { return len(h.im.Messages()) == 1 })
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) == 1 })
	eventually(t, "an empty outbox", func() bool { return strings.Contains(h.metricsText(), "bridge_outbox_depth 0") })

	m := h.metricsText()
	for _, want := range []string{
		`bridge_wechat_pushes_total{outcome="accepted",type="text"} 1`,
		`bridge_wechat_pushes_total{outcome="accepted",type="event_subscribe"} 1`,
		`bridge_wechat_pushes_total{outcome="accepted",type="event_CLICK"} 1`,
		`bridge_im_callbacks_total{outcome="forwarded"} 1`,
		`bridge_im_callbacks_total{outcome="ignored"} 1`, // the Before callback
		`bridge_deliveries_total{outcome="delivered",target="im"} 2`,
		`bridge_deliveries_total{outcome="delivered",target="wechat"} 1`,
		`bridge_outbox_oldest_age_seconds 0`,
		`bridge_dead_letters 0`,
		`bridge_webhook_duration_seconds_count{endpoint="wechat"} 3`,
		`bridge_webhook_duration_seconds_count{endpoint="imcallback"} 2`,
		`bridge_delivery_latency_seconds_count{target="wechat"} 1`,
		`go_goroutines`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	for _, probe := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(h.base + probe)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("%s answered %d, want 200", probe, resp.StatusCode)
		}
	}
}

// TestReadyzNotReady: /readyz answers 503 while the worker is not running
// or the store does not answer; /healthz still answers 200.
func TestReadyzNotReady(t *testing.T) {
	st, _ := newTestStore(t)
	b := &bridge{store: st, worker: &Worker{}, metrics: newMetrics(st)}
	routes := b.routes()
	get := func(path string) int {
		rec := httptest.NewRecorder()
		routes.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code
	}
	if got := get("/readyz"); got != 503 {
		t.Errorf("/readyz with the worker stopped: got %d, want 503", got)
	}
	st.Close()
	if got := get("/healthz"); got != 200 {
		t.Errorf("/healthz: got %d, want 200", got)
	}
}

// The outbox gauges read the store at each scrape: the items pending, the
// age of the oldest, the dead letters. On SQLite none of them reads the
// delivered items: the dead letters are counted through their index.
func TestOutboxGauges(t *testing.T) {
	eachStore(t, func(t *testing.T, st *Store) {
		ctx, then := context.Background(), time.Now().Add(-time.Minute)
		for _, q := range []struct {
			openid, text string
			at           time.Time
		}{{"o1", "one", then}, {"o1", "two", then}, {"o1", "three", then}, {"o2", "later", then.Add(30 * time.Second)}} {
			if err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
				return st.enqueue(ctx, tx, Delivery{Kind: deliverWeChat, OpenID: q.openid, Text: q.text}, q.at)
			}); err != nil {
				t.Fatal(err)
			}
		}
		heads, err := st.Claim(ctx, "w", then, time.Minute, 10)
		if err != nil || len(heads) != 1 || heads[0].Delivery.Text != "one" {
			t.Fatalf("claimed %+v, %v; want o1's head, the one item due", heads, err)
		}
		if err := st.GiveUp(ctx, heads[0], "given up", nil, then); err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		newMetrics(st).handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		m := rec.Body.String()
		for _, want := range []string{"bridge_outbox_depth 3\n", "bridge_dead_letters 1\n"} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
		var age float64
		for _, line := range strings.Split(m, "\n") {
			if v, ok := strings.CutPrefix(line, "bridge_outbox_oldest_age_seconds "); ok {
				age, _ = strconv.ParseFloat(v, 64)
			}
		}
		if age < 59 || age > 600 {
			t.Errorf("the oldest pending item is %v s old, want about 60", age)
		}
		if st.postgres {
			return
		}
		var id, parent, unused int
		var plan string
		if err := st.rdb.QueryRow(`EXPLAIN QUERY PLAN SELECT COUNT(*) FROM outbox WHERE state = 'failed'`).
			Scan(&id, &parent, &unused, &plan); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(plan, "outbox_failed") {
			t.Errorf("the dead letters are counted by %q, want through outbox_failed", plan)
		}
	})
}

// Stats reads the outbox while the writer commits: a scrape loop beside a
// stream of pushes, under the race detector, and the count right at the end.
func TestStatsWhileWriting(t *testing.T) {
	st, _ := newTestStore(t)
	ctx, now := context.Background(), time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			key := strconv.Itoa(i)
			if _, err := st.AcceptPush(ctx, message(key, "o"+strconv.Itoa(i%7), "m"+key), now); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for scraping := true; scraping; {
		select {
		case <-done:
			scraping = false
		default:
		}
		if _, err := st.Stats(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if s, err := st.Stats(ctx); err != nil || s.Pending != 207 {
		t.Errorf("stats %+v, %v; want 207 pending: the 200 messages and the 7 customers' imports", s, err)
	}
}

// TestMetricsWhenTheStoreFails: when the store cannot be read, /metrics
// says so (bridge_store_up 0) and leaves the outbox gauges out rather than
// report a false zero, and /readyz answers 503; once it can, both recover.
func TestMetricsWhenTheStoreFails(t *testing.T) {
	h := newHarness(t, harnessOptions{postgres: true})
	db, err := sql.Open("pgx", h.env["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ready := func() int {
		resp, err := http.Get(h.base + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if m := h.metricsText(); !strings.Contains(m, "bridge_store_up 1") || !strings.Contains(m, "bridge_outbox_depth 0") || ready() != 200 {
		t.Fatal("a healthy store: want bridge_store_up 1, the outbox gauges, and ready")
	}
	if _, err := db.Exec(`ALTER TABLE outbox RENAME TO outbox_away`); err != nil {
		t.Fatal(err)
	}
	m := h.metricsText()
	if !strings.Contains(m, "bridge_store_up 0") || strings.Contains(m, "bridge_outbox_depth") || strings.Contains(m, "bridge_outbox_oldest_age_seconds") {
		t.Errorf("the store unreadable, /metrics says:\n%s\n%s", grepLines(m, "bridge_store_up"), grepLines(m, "bridge_outbox"))
	}
	if got := ready(); got != http.StatusServiceUnavailable {
		t.Errorf("/readyz answered %d, want 503", got)
	}
	if _, err := db.Exec(`ALTER TABLE outbox_away RENAME TO outbox`); err != nil {
		t.Fatal(err)
	}
	if m := h.metricsText(); !strings.Contains(m, "bridge_store_up 1") || ready() != 200 {
		t.Error("the store back: want bridge_store_up 1 and ready")
	}
}
