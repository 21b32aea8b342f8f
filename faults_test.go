package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// switchProxy forwards TCP connections to a target until Down, which
// closes its listener and every connection, so that calls are refused; Up
// listens again on the same address.
type switchProxy struct {
	t      *testing.T
	addr   string
	target string
	mu     sync.Mutex
	ln     net.Listener
	conns  []net.Conn
}

func newSwitchProxy(t *testing.T, targetURL string) *switchProxy {
	p := &switchProxy{t: t, target: strings.TrimPrefix(targetURL, "http://")}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(p.Down)
	return p
}

func (p *switchProxy) URL() string { return "http://" + p.addr }

func (p *switchProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
}

// Down refuses connections from now on.
func (p *switchProxy) Down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// Up takes connections again.
func (p *switchProxy) Up() {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatalf("proxy up again: %v", err)
	}
	p.serve(ln)
}

// fastRetries makes a bridge retry within milliseconds and give up on a
// vendor call after 300 ms, so that outages play out quickly.
var fastRetries = map[string]string{"RETRY_MIN_DELAY": "20ms", "RETRY_MAX_DELAY": "100ms", "VENDOR_TIMEOUT": "300ms", "MEDIA_FETCH_TIMEOUT": "1s"}

// TestVendorOutagesRecovered: IM or WeChat failing for a while (5xx, busy
// codes, timeouts, refused connections) delays a message, which arrives
// after recovery exactly once (at least once for a WeChat timeout: WeChat
// has no way to drop a repeated custom/send whose first answer was lost).
func TestVendorOutagesRecovered(t *testing.T) {
	for _, tc := range []struct {
		name        string
		wechat      bool                                                   // the reply to WeChat fails, else the message to IM
		fail        func(h *harness, im, wx *switchProxy) (recover func()) // starts the outage
		atLeastOnce bool
	}{
		{"IM answers 503", false, func(h *harness, _, _ *switchProxy) func() { h.im.FailNextStatus(3, 503); return func() {} }, false},
		{"IM busy 70169", false, func(h *harness, _, _ *switchProxy) func() { h.im.FailNext(3, 70169); return func() {} }, false},
		{"IM internal error 91000", false, func(h *harness, _, _ *switchProxy) func() { h.im.FailNext(3, 91000); return func() {} }, false},
		{"IM rate limit 60007", false, func(h *harness, _, _ *switchProxy) func() { h.im.FailNext(3, 60007); return func() {} }, false},
		{"IM times out", false, func(h *harness, _, _ *switchProxy) func() {
			h.im.Delay(time.Second)
			return func() { h.im.Delay(0) }
		}, false},
		{"IM refuses connections", false, func(h *harness, im, _ *switchProxy) func() { im.Down(); return im.Up }, false},
		{"WeChat answers 503", true, func(h *harness, _, _ *switchProxy) func() { h.wx.FailNextStatus(3, 503); return func() {} }, false},
		{"WeChat system busy -1", true, func(h *harness, _, _ *switchProxy) func() { h.wx.FailNext(3, -1); return func() {} }, false},
		{"WeChat quota 45009", true, func(h *harness, _, _ *switchProxy) func() { h.wx.FailNext(3, 45009); return func() {} }, false},
		{"WeChat times out", true, func(h *harness, _, _ *switchProxy) func() {
			h.wx.Delay(time.Second)
			return func() { h.wx.Delay(0) }
		}, true},
		{"WeChat refuses connections", true, func(h *harness, _, wx *switchProxy) func() { wx.Down(); return wx.Up }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{env: fastRetries})
			imProxy, wxProxy := newSwitchProxy(t, h.im.URL), newSwitchProxy(t, h.wx.URL)
			h.env["IM_API_BASE"], h.env["WECHAT_API_BASE"] = imProxy.URL(), wxProxy.URL()
			h.restart()
			ctx := context.Background()
			h.wx.SendText(ctx, customer, "before")
			eventually(t, "the first message in IM", func() bool { return len(h.im.Messages()) == 1 })
			h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "first reply")
			eventually(t, "the first reply in WeChat", func() bool { return len(h.wx.Sent()) == 1 })

			mark := h.logs.Len()
			recover := tc.fail(h, imProxy, wxProxy)
			if tc.wechat {
				h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "during the outage")
			} else {
				h.wx.SendText(ctx, customer, "during the outage")
			}
			eventually(t, "a failed attempt", func() bool { return strings.Contains(h.logs.From(mark), "will retry") })
			recover()

			if tc.wechat {
				count := func() (n int) {
					for _, m := range h.wx.Sent() {
						if m.Text == "during the outage" {
							n++
						}
					}
					return n
				}
				eventually(t, "the reply in WeChat", func() bool { return count() >= 1 })
				n := count()
				if n != 1 && !(tc.atLeastOnce && n > 1) {
					t.Errorf("the reply arrived %d times, want once", n)
				}
			} else {
				eventually(t, "the message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 2 })
				h.wx.SendText(ctx, customer, "after")
				eventually(t, "the next message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 3 })
				if got := h.textsTo("agent_kim", "|"); got != "before|during the outage|after" {
					t.Errorf("IM got %q, want each message once, in order", got)
				}
			}
		})
	}
}

// TestDeadLetterToldToAgent: a reply WeChat will not take (outside the
// 48-hour window) and a message IM will not take within IM_DELIVERY_WINDOW
// become dead letters with their reasons, and the agent of the
// conversation is told by an IM message from the admin.
func TestDeadLetterToldToAgent(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	env := map[string]string{"IM_DELIVERY_WINDOW": "1s"}
	for k, v := range fastRetries {
		env[k] = v
	}
	h := newHarness(t, harnessOptions{wechat: fakes.WeChatOptions{Now: clock.Now}, env: env})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.im.Messages()) == 1 })

	// IM failing longer than its window: the message is given up, and the
	// notice reaches the agent once IM takes calls again.
	h.im.FailNext(1000, 91000)
	h.wx.SendText(ctx, "o_other", "lost in IM")
	eventually(t, "the message given up", func() bool {
		return regexp.MustCompile(`msg="delivery failed for good" id=\d+ kind=im_send`).MatchString(h.logs.String())
	})
	h.im.FailNext(0, 0)
	eventually(t, "the notice of the lost message", func() bool {
		for _, m := range h.messagesTo("agent_kim") {
			if strings.Contains(m.Text, "lost in IM") && bridgeNotice(m) {
				return true
			}
		}
		return false
	})

	// The 48-hour window past, WeChat refuses the reply (45015) at once.
	clock.Advance(49 * time.Hour)
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	var notice fakes.Message
	eventually(t, "the notice of the lost reply", func() bool {
		for _, m := range h.messagesTo("agent_kim") {
			if strings.Contains(m.Text, answer) {
				notice = m
				return true
			}
		}
		return false
	})
	if notice.From != customerIM(customer) || !strings.HasPrefix(notice.Text, noticeMark) || !strings.Contains(notice.Text, "45015") {
		t.Errorf("agent got %q from %s, want a notice in the customer's conversation naming the reply and errcode 45015", notice.Text, notice.From)
	}

	reasons := h.deadLetters()
	if len(reasons) < 3 || !strings.Contains(strings.Join(reasons, "\n"), "errcode 45015") ||
		!strings.Contains(strings.Join(reasons, "\n"), "still failing 1s after it was accepted") {
		t.Errorf("dead letters %q, want the import and message given up on IM and the reply refused by WeChat, with reasons", reasons)
	}
	b := h.metricsText()
	for _, want := range []string{`bridge_dead_letters_total{target="wechat"} 1`, `bridge_dead_letters_total{target="im"}`} {
		if !strings.Contains(b, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestUnreadableItemIsDeadLetter: an outbox item whose stored delivery
// cannot be decoded becomes a dead letter with the reason, and holds up
// nothing: a customer's message behind it in the outbox still reaches IM.
func TestUnreadableItemIsDeadLetter(t *testing.T) {
	h := newHarness(t, harnessOptions{external: true})
	st, err := openStore(context.Background(), h.env["DATABASE_URL"], storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	db := h.openStoreDB(true)
	ms := time.Now().UnixMilli()
	_, err = db.Exec(`INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at)
		VALUES ('im:o_broken', '{"kind": "im_send", "text": ', ?, ?, ?)`, ms, ms, ms)
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	h.start()
	h.wx.SendText(context.Background(), customer, question)
	eventually(t, "the question in IM", func() bool { return strings.Contains(h.textsTo("agent_kim", "|"), question) })
	eventually(t, "the unreadable item given up", func() bool {
		return strings.Contains(strings.Join(h.deadLetters(), "\n"), ": decode delivery")
	})
}

// TestIMRateLimitRespected: with IM taking 50 calls a second per API, a
// burst of messages is paced under the limit: IM never answers 60007.
func TestIMRateLimitRespected(t *testing.T) {
	h := newHarness(t, harnessOptions{im: fakes.IMOptions{RateLimit: 50}, env: map[string]string{"IM_RATE_LIMIT": "50"}})
	h.burst(8, 10)
	h.checkBurst(8, 10)
	if n := h.im.Limited(); n != 0 {
		t.Errorf("IM refused %d calls for the rate limit, want none", n)
	}
}

// deadLetters returns "kind: reason" of each dead letter in the harness's
// SQLite store, read through a connection of its own.
func (h *harness) deadLetters() []string {
	h.t.Helper()
	db := h.openDB()
	defer db.Close()
	rows, err := db.Query(`SELECT delivery, last_error FROM outbox WHERE state = 'failed' ORDER BY id`)
	if err != nil {
		h.t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var d, reason string
		if err := rows.Scan(&d, &reason); err != nil {
			h.t.Fatal(err)
		}
		var del Delivery
		json.Unmarshal([]byte(d), &del)
		out = append(out, del.Kind+": "+reason)
	}
	return out
}

// metricsText returns GET /metrics.
func (h *harness) metricsText() string {
	h.t.Helper()
	return metricsAt(h.t, h.base)
}

// metricsAt returns GET /metrics of the bridge at base.
func metricsAt(t testing.TB, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// lonelyWorker returns a worker on a store of its own, not running, whose
// IM client calls the harness's IM fake with a time-out of 10 s; it logs
// to logs.
func lonelyWorker(t *testing.T, logs io.Writer) (*harness, *Store, *Worker) {
	h := newHarness(t, harnessOptions{external: true})
	st := openTestStore(t, "sqlite")
	imo := h.im.Options()
	im := &IMClient{Base: h.im.URL, SDKAppID: imo.SDKAppID, SecretKey: imo.SecretKey, Admin: imo.Admin,
		HTTP: &http.Client{Timeout: 10 * time.Second}, SigLifetime: time.Hour, Now: time.Now}
	return h, st, newWorker(st, im, nil, slog.New(slog.NewTextHandler(logs, nil)), newMetrics(st), time.Now)
}

// A worker whose lease ran out while IM failed, and whose item another
// claim took meanwhile, leaves the retry to that claim: it writes nothing
// and says so in its log.
func TestFailedAttemptOfAnOutrunClaim(t *testing.T) {
	logs := &syncBuffer{}
	h, st, w := lonelyWorker(t, logs)
	w.Lease = 2 * time.Second // as a's claim below, so its attempt may begin

	ctx, now := context.Background(), time.Now()
	if _, err := st.AcceptPush(ctx, message("k1", "o1", "hello"), now); err != nil {
		t.Fatal(err)
	}
	a, err := st.Claim(ctx, "a", now, w.Lease, 1)
	if err != nil || len(a) != 1 {
		t.Fatalf("a claimed %+v, %v; want the lane's head", a, err)
	}
	if b, err := st.Claim(ctx, "b", now.Add(3*time.Second), time.Minute, 1); err != nil || len(b) != 1 || b[0].ID != a[0].ID {
		t.Fatalf("b claimed %+v, %v; want the item a's lease let go", b, err)
	}
	h.im.FailNext(1, 91000)
	if w.deliverItem(ctx, a[0]) {
		t.Fatal("the attempt reported a delivery while IM failed")
	}
	if !strings.Contains(logs.String(), "its outcome is left to the newer claim") || strings.Contains(logs.String(), "will retry") {
		t.Errorf("worker logs do not say the outcome was left to the newer claim:\n%s", logs)
	}
	var attempts int
	if err := st.rdb.QueryRowContext(ctx, `SELECT attempts FROM outbox WHERE id = ?`, a[0].ID).Scan(&attempts); err != nil {
		t.Fatal(err)
	}
	if by, _ := claimOf(t, st, a[0].ID); attempts != 0 || by != "b" {
		t.Errorf("item has %d attempts, held by %q; want 0, held by b", attempts, by)
	}
}

// An attempt whose call IM holds unanswered is cut off before its claim
// runs out, so that no newer claim's call overlaps it, and its outcome, a
// retry, is written while the claim still holds the item.
func TestAttemptEndsBeforeItsClaim(t *testing.T) {
	h, st, w := lonelyWorker(t, io.Discard)
	w.Lease = 3 * time.Second // the client's time-out, 10 s, is longer

	ctx := context.Background()
	if _, err := st.AcceptPush(ctx, message("k1", "o1", "hello"), time.Now()); err != nil {
		t.Fatal(err)
	}
	items, err := st.Claim(ctx, "a", time.Now(), w.Lease, 1)
	if err != nil || len(items) != 1 {
		t.Fatalf("claimed %+v, %v; want the lane's head", items, err)
	}
	it := items[0]
	release := h.im.Hold()
	defer release()
	if w.deliverItem(ctx, it) {
		t.Fatal("the attempt reported a delivery while IM held its call")
	}
	if ended, until := time.Now(), time.UnixMilli(it.claimedUntil); !ended.Before(until) {
		t.Errorf("the attempt ended %s after its claim ran out", ended.Sub(until))
	}
	var attempts int
	var lastError string
	if err := st.rdb.QueryRowContext(ctx, `SELECT attempts, last_error FROM outbox WHERE id = ?`, it.ID).Scan(&attempts, &lastError); err != nil {
		t.Fatal(err)
	}
	if attempts != 1 || !strings.Contains(lastError, "cut off") {
		t.Errorf("item has %d attempts, last error %q; want a retry recorded for the cut-off attempt", attempts, lastError)
	}
	if by, until := claimOf(t, st, it.ID); until != 0 {
		t.Errorf("item still held by %q until %d; a retry lets it go", by, until)
	}
}
