package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// TestRepliesSentWhileNoBridgeAnsweredAreRecovered: IM does not make a
// callback again. The replies an agent sent while the bridge was stopped
// are read from IM's history when it starts again, and reach the customer
// once each, in order; a reply taken by its callback before the stop is
// not sent again, nor one the agent recalled. IM failing the first history
// call only delays them.
func TestRepliesSentWhileNoBridgeAnsweredAreRecovered(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, env: map[string]string{"RETRY_MIN_DELAY": "50ms", "RETRY_MAX_DELAY": "200ms"}})
		ctx := context.Background()
		h.wx.SendText(ctx, customer, question)
		eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
		if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "before the stop"); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the first reply in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
		if n := len(h.im.RequestsTo("/v4/openim/admin_getroammsg")); n != 0 {
			t.Errorf("a bridge on a new database read IM's history %d times, want none", n)
		}

		if err := h.stop(); err != nil {
			t.Fatal(err)
		}
		callbacks := len(h.im.Callbacks())
		for _, text := range []string{"while stopped, one", "while stopped, two", "recalled"} {
			m, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), text)
			if err != nil {
				t.Fatal(err)
			}
			if text == "recalled" {
				h.im.Recall(m.MsgKey)
			}
		}
		for _, cb := range h.im.Callbacks()[callbacks:] {
			if cb.Err == nil {
				t.Fatalf("callback %s answered while the bridge was stopped", cb.Command)
			}
		}

		h.im.FailNextStatus(1, http.StatusBadGateway)
		mark := h.logs.Len()
		h.start()
		eventually(t, "recovery to end and its replies to be sent", func() bool {
			return strings.Contains(h.logs.From(mark), "reply recovery done") && outboxDepth(t, h.base) == 0
		})
		var texts []string
		for _, m := range h.sentTo(customer) {
			texts = append(texts, m.Text)
		}
		if got, want := strings.Join(texts, " | "), "before the stop | while stopped, one | while stopped, two"; got != want {
			t.Errorf("WeChat got %q, want %q", got, want)
		}
		if n := len(h.im.RequestsTo("/v4/openim/admin_getroammsg")); n != 2 {
			t.Errorf("history read %d times, want 2 (one failed, one answered)", n)
		}
		if !strings.Contains(h.logs.From(mark), "recovered=2") {
			t.Errorf("logs do not say two replies were recovered:\n%s", h.logs.From(mark))
		}

		// A second restart finds nothing more to take.
		sent := len(h.wx.Sent())
		mark = h.logs.Len()
		h.restart()
		eventually(t, "recovery to end", func() bool { return strings.Contains(h.logs.From(mark), "reply recovery done") })
		if n := len(h.wx.Sent()); n != sent || !strings.Contains(h.logs.From(mark), "recovered=0") {
			t.Errorf("after a clean restart WeChat got %d messages, had %d; logs:\n%s", n, sent, h.logs.From(mark))
		}
	})
}

// replyWhileStopped opens the customer's conversation, stops the bridge,
// and has the agent send text meanwhile: its callback finds nobody.
func replyWhileStopped(t *testing.T, h *harness, text string) {
	t.Helper()
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), text); err != nil {
		t.Fatal(err)
	}
}

// outboxDepth reads bridge_outbox_depth from the bridge's /metrics; -1 if
// it cannot.
func outboxDepth(t testing.TB, base string) int {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "bridge_outbox_depth "); ok {
			if v == "0" {
				return 0
			}
			return 1
		}
	}
	return -1
}

// TestReplyRecoveryTellsWhatItCannotRecover: a gap longer than the keys are
// kept is read back only as far as they reach, and a history IM keeps
// failing is given up after its attempts; both are logged at error level,
// and the conversations given up are counted.
func TestReplyRecoveryTellsWhatItCannotRecover(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"RETRY_MIN_DELAY": "10ms", "RETRY_MAX_DELAY": "20ms"}})
	replyWhileStopped(t, h, "while stopped")
	db := h.openStoreDB(true)
	_, err := db.Exec(`UPDATE heartbeats SET at = at - ?`, (30 * time.Hour).Milliseconds())
	db.Close()
	if err != nil {
		t.Fatal(err)
	}

	h.im.FailNextStatus(recoveryAttempts, http.StatusBadGateway)
	mark := h.logs.Len()
	h.start()
	eventually(t, "recovery to give up", func() bool { return strings.Contains(h.logs.From(mark), "reply recovery done") })
	logs := h.logs.From(mark)
	for _, want := range []string{"level=ERROR msg=\"reply recovery: the bridge was away too long", "level=ERROR msg=\"reply recovery gave up"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q:\n%s", want, logs)
		}
	}
	if n := len(h.im.RequestsTo("/v4/openim/admin_getroammsg")); n != recoveryAttempts {
		t.Errorf("history asked for %d times, want %d", n, recoveryAttempts)
	}
	resp, err := http.Get(h.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), `bridge_im_callbacks_total{outcome="unrecovered"} 1`) {
		t.Errorf("metrics do not count the conversation given up")
	}
	if n := len(h.sentTo(customer)); n != 0 {
		t.Errorf("WeChat got %d messages, want none", n)
	}
}

// TestLiveReplyWaitsForItsConversationsRecovery: a reply that comes by
// callback while its conversation's history is still to be read back goes
// to the customer after the replies of the gap, not before them.
func TestLiveReplyWaitsForItsConversationsRecovery(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg})
		ctx := context.Background()
		replyWhileStopped(t, h, "while stopped")

		release := h.im.Hold() // the history is asked for, and not answered yet
		defer release()
		mark := h.logs.Len()
		h.start()
		eventually(t, "the history to be asked for", func() bool {
			return len(h.im.RequestsTo("/v4/openim/admin_getroammsg")) == 1
		})
		if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "after the restart"); err != nil {
			t.Fatal(err)
		}
		cbs := h.im.Callbacks()
		if last := cbs[len(cbs)-1]; last.Err != nil || last.Status != http.StatusOK {
			t.Fatalf("the live reply's callback: %+v", last)
		}
		release()
		eventually(t, "recovery to end and its replies to be sent", func() bool {
			return strings.Contains(h.logs.From(mark), "reply recovery done") && outboxDepth(t, h.base) == 0 && len(h.sentTo(customer)) >= 2
		})
		var texts []string
		for _, m := range h.sentTo(customer) {
			texts = append(texts, m.Text)
		}
		if got, want := strings.Join(texts, " | "), "while stopped | after the restart"; got != want {
			t.Errorf("WeChat got %q, want %q", got, want)
		}
	})
}

// TestDeferredReplyFollowsTheHistory: a reply deferred for its conversation's sweep
// is committed at once, and queued once: in its place among the history's
// replies if the sweep read it there, after them if not.
func TestDeferredReplyFollowsTheHistory(t *testing.T) {
	ctx, now := context.Background(), time.Now()
	st := openTestStore(t, "sqlite")
	im := fakes.NewIM(t, fakes.IMOptions{Accounts: []string{"a1", "wx_c1"}})
	if _, err := st.AcceptPush(ctx, message("k1", "c1", "hello"), now); err != nil {
		t.Fatal(err)
	}
	if err := st.Heartbeat(ctx, callbacksHeartbeat, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	mustSend := func(text string) fakes.Message {
		m, err := im.SendAsAgent(ctx, "a1", "wx_c1", text) // no callback URL: no callback
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	mustSend("in the gap")
	live := mustSend("held, in the history")
	mustSend("in the history after it") // its callback has not come yet
	r := testRecovery(st, im, http.DefaultClient, "a1")
	if err := r.prepare(ctx); err != nil || !r.gap || len(r.gapConvs) != 1 {
		t.Fatalf("prepare: %v, gap %v, %d conversations; want one to read", err, r.gap, len(r.gapConvs))
	}
	reply := func(text string) Delivery {
		return Delivery{Kind: deliverWeChat, OpenID: "c1", IMUser: "wx_c1", Agent: "a1", Text: text}
	}
	hold := func(openid, key, text string) bool {
		t.Helper()
		held, dup, err := r.deferReply(ctx, openid, key, reply(text))
		if err != nil || dup {
			t.Fatalf("hold %s: duplicate %v, %v", text, dup, err)
		}
		return held
	}
	if !hold("c1", "im:"+live.MsgKey, "held, in the history") || !hold("c1", "im:not-in-the-history", "held, sent after the read") {
		t.Fatal("replies not held before the sweep")
	}
	if hold("c2", "im:x", "x") {
		t.Error("a reply to a conversation with nothing to read was held")
	}
	var n int
	if err := st.rdb.QueryRowContext(ctx, `SELECT count(*) FROM deferred_replies`).Scan(&n); err != nil || n != 2 {
		t.Fatalf("%d replies committed as held (%v), want 2", n, err)
	}
	// One an earlier run held for a conversation not read this time (its
	// customer wrote: WeChat takes the reply).
	if _, err := st.AcceptPush(ctx, message("k9", "c9", "hi"), now); err != nil {
		t.Fatal(err)
	}
	if _, err := st.DeferReply(ctx, "im:earlier", Delivery{Kind: deliverWeChat, OpenID: "c9", IMUser: "wx_c9", Agent: "a1", Text: "earlier"}, now); err != nil {
		t.Fatal(err)
	}
	if !r.recoverGap(ctx) {
		t.Fatal("recovery did not end")
	}
	if hold("c1", "im:later", "later") {
		t.Error("a reply was held after recovery")
	}
	if got, want := queuedTexts(t, st, "wx:c1", "wx:c9"),
		"in the gap | held, in the history | in the history after it | held, sent after the read | earlier"; got != want {
		t.Errorf("queued %q, want %q", got, want)
	}
}

// TestReplyWhoseCallbackFailedIsReadBack: when the store fails, /imcallback
// answers 500 and IM does not make the callback again; once the store works,
// the bridge reads the conversation back from IM's history, and the reply
// reaches the customer once, before the replies sent after it.
func TestReplyWhoseCallbackFailedIsReadBack(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"RETRY_MIN_DELAY": "50ms", "RETRY_MAX_DELAY": "200ms"}})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })

	db := h.openStoreDB(true)
	defer db.Close()
	if _, err := db.Exec(`ALTER TABLE seen_keys RENAME TO seen_keys_away`); err != nil { // the store fails
		t.Fatal(err)
	}
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "sent while the store failed")
	cbs := h.im.Callbacks()
	if last := cbs[len(cbs)-1]; last.Command != "C2C.CallbackAfterSendMsg" || last.Status != 500 {
		t.Fatalf("the callback was answered %d, want 500", last.Status)
	}
	if _, err := db.Exec(`ALTER TABLE seen_keys_away RENAME TO seen_keys`); err != nil { // the store works again
		t.Fatal(err)
	}
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "sent after")
	eventually(t, "both replies in WeChat", func() bool { return len(h.sentTo(customer)) == 2 })
	if s := h.sentTo(customer); s[0].Text != "sent while the store failed" || s[1].Text != "sent after" {
		t.Errorf("the customer read %q then %q", s[0].Text, s[1].Text)
	}
	h.restart() // a later start finds nothing more to read back
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "last")
	eventually(t, "the last reply", func() bool { return len(h.sentTo(customer)) == 3 })
	if s := h.sentTo(customer); s[2].Text != "last" {
		t.Errorf("the customer read %q last", s[2].Text)
	}
}

// TestGapReadPageByPage: the gap's conversations are listed at the start and
// swept a few at a time, no sweep held before its page: a reply that comes
// by callback for a conversation whose page has not begun waits for it all
// the same, and goes after the gap's replies; one for a conversation
// already read is not deferred. Every conversation's replies of the gap are
// taken, even one's that closed before its page.
func TestGapReadPageByPage(t *testing.T) {
	defer func(n int) { recoveryPage = n }(recoveryPage)
	recoveryPage = 2
	ctx, now := context.Background(), time.Now()
	st := openTestStore(t, "sqlite")
	customers := []string{"c1", "c2", "c3", "c4", "c5"}
	im := fakes.NewIM(t, fakes.IMOptions{Accounts: []string{"a1", "a2", "wx_c1", "wx_c2", "wx_c3", "wx_c4", "wx_c5"}})
	agent := map[string]string{}
	for _, c := range customers {
		if _, err := st.AcceptPush(ctx, message("k"+c, c, "hello"), now); err != nil {
			t.Fatal(err)
		}
	}
	convs, err := st.OpenConversations(ctx, 0, math.MaxInt64, 100)
	if err != nil || len(convs) != len(customers) {
		t.Fatalf("open conversations %v, %v", convs, err)
	}
	for _, c := range convs {
		agent[c.OpenID] = c.Agent
		if _, err := im.SendAsAgent(ctx, c.Agent, "wx_"+c.OpenID, "gap reply to "+c.OpenID); err != nil { // no callback URL: no callback
			t.Fatal(err)
		}
	}
	if err := st.Heartbeat(ctx, callbacksHeartbeat, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	r := testRecovery(st, im, http.DefaultClient, "a1", "a2")
	if err := r.prepare(ctx); err != nil || !r.gap {
		t.Fatalf("prepare: %v, gap %v", err, r.gap)
	}
	if len(r.sweeps) != 0 {
		t.Errorf("%d sweeps held before any page began", len(r.sweeps))
	}
	live := func(openid, text string) bool {
		t.Helper()
		deferred, dup, err := r.deferReply(ctx, openid, "im:live-"+openid, Delivery{Kind: deliverWeChat, OpenID: openid,
			IMUser: "wx_" + openid, Agent: agent[openid], Text: text})
		if err != nil || dup {
			t.Fatalf("live reply to %s: duplicate %v, %v", openid, dup, err)
		}
		return deferred
	}
	if !live("c5", "live reply to c5") {
		t.Fatal("a reply to a conversation whose page has not begun did not wait for it")
	}
	if len(r.sweeps) != 1 {
		t.Errorf("%d sweeps held, want only the one a reply waits for", len(r.sweeps))
	}
	// c3's conversation closes before its page: its gap reply is read all
	// the same.
	if err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := st.exec(ctx, tx, `UPDATE conversations SET closed_at = ?, closed_by = 'idle' WHERE openid = 'c3'`, now.UnixMilli())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !r.recoverGap(ctx) {
		t.Fatal("recovery did not end")
	}
	if len(r.sweeps) != 0 || live("c1", "after") {
		t.Errorf("after recovery: %d sweeps held, or a reply waited", len(r.sweeps))
	}
	rows, err := st.rdb.QueryContext(ctx, `SELECT lane, delivery FROM outbox WHERE lane LIKE 'wx:%' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var lane, raw string
		var d Delivery
		if err := rows.Scan(&lane, &raw); err != nil || json.Unmarshal([]byte(raw), &d) != nil {
			t.Fatal(err)
		}
		got = append(got, d.Text)
	}
	want := "gap reply to c1 | gap reply to c2 | gap reply to c3 | gap reply to c4 | gap reply to c5 | live reply to c5"
	if strings.Join(got, " | ") != want {
		t.Errorf("queued %q, want %q", strings.Join(got, " | "), want)
	}
}

// rtFunc is an http.RoundTripper made of a function.
type rtFunc func(*http.Request) (*http.Response, error)

func (f rtFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestRetakeWhileItsSweepReads: the gap's sweep of c1 has read IM's
// history; before it takes what it read, the agent sends a reply whose
// callback cannot be committed (the store blinks) and asks for a retake.
// The sweep's read lacks that reply, so it is read again before the
// heartbeat moves on: both replies are queued, in order.
func TestRetakeWhileItsSweepReads(t *testing.T) {
	ctx, now := context.Background(), time.Now()
	st := openTestStore(t, "sqlite")
	im := fakes.NewIM(t, fakes.IMOptions{Accounts: []string{"a1", "wx_c1"}})
	if _, err := st.AcceptPush(ctx, message("k1", "c1", "hello"), now); err != nil {
		t.Fatal(err)
	}
	if err := st.Heartbeat(ctx, callbacksHeartbeat, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := im.SendAsAgent(ctx, "a1", "wx_c1", "in the gap"); err != nil {
		t.Fatal(err)
	}
	var r *replyRecovery
	var once sync.Once
	tr := rtFunc(func(req *http.Request) (*http.Response, error) {
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err == nil && strings.Contains(req.URL.Path, "admin_getroammsg") {
			once.Do(func() {
				m, err := im.SendAsAgent(ctx, "a1", "wx_c1", "live, callback failed")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := st.db.Exec(`ALTER TABLE deferred_replies RENAME TO dr_away`); err != nil { // the store blinks
					t.Fatal(err)
				}
				cctx := ctx
				d := Delivery{Kind: deliverWeChat, OpenID: "c1", IMUser: "wx_c1", Agent: "a1", Text: "live, callback failed"}
				_, _, derr := r.deferReply(cctx, "c1", partKey(callbackKey(IMCallback{MsgKey: m.MsgKey}), 0), d)
				if derr == nil {
					t.Fatal("deferReply did not fail")
				}
				r.retake("c1", "a1", time.Unix(m.MsgTime, 0)) // as callback.go does
				if _, err := st.db.Exec(`ALTER TABLE dr_away RENAME TO deferred_replies`); err != nil {
					t.Fatal(err)
				}
			})
		}
		return resp, err
	})
	r = testRecovery(st, im, &http.Client{Transport: tr}, "a1")
	if err := r.prepare(ctx); err != nil || !r.gap {
		t.Fatalf("prepare: %v, gap %v", err, r.gap)
	}
	if !r.recoverGap(ctx) {
		t.Fatal("recovery did not end")
	}
	if r.retaking() {
		r.retakeAll(ctx)
	}
	if got, want := queuedTexts(t, st, "wx:c1"), "in the gap | live, callback failed"; got != want {
		t.Errorf("queued %q, want %q (retaking now: %v)", got, want, r.retaking())
	}
}

// testRecovery returns a reply recovery on st reading im's history through
// client, taking replies from agents, retrying at once.
func testRecovery(st *Store, im *fakes.IM, client *http.Client, agents ...string) *replyRecovery {
	o := im.Options()
	return &replyRecovery{store: st, worker: &Worker{wake: make(chan struct{}, 1)}, metrics: newMetrics(st), wake: make(chan struct{}, 1),
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), now: time.Now, agents: agents, userPrefix: "wx_",
		im: &IMClient{Base: im.URL, SDKAppID: o.SDKAppID, SecretKey: o.SecretKey, Admin: o.Admin,
			HTTP: client, SigLifetime: time.Hour, Now: time.Now}, minBackoff: time.Millisecond, maxBackoff: time.Millisecond}
}

// queuedTexts is the texts of the outbox's items in lanes, in order,
// joined by " | ".
func queuedTexts(t *testing.T, st *Store, lanes ...string) string {
	t.Helper()
	rows, err := st.rdb.QueryContext(context.Background(), `SELECT lane, delivery FROM outbox ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var texts []string
	for rows.Next() {
		var lane, raw string
		var d Delivery
		if err := rows.Scan(&lane, &raw); err != nil || json.Unmarshal([]byte(raw), &d) != nil {
			t.Fatal(err)
		}
		if slices.Contains(lanes, lane) {
			texts = append(texts, d.Text)
		}
	}
	return strings.Join(texts, " | ")
}
