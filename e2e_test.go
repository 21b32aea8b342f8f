package main

// End-to-end tests: a signed WeChat push in, the exact IM REST call out; the
// IM callback in, the exact WeChat API call out. The bridge runs in-process
// through run, between the fakes.

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

const (
	customer = "o6_bmjrPTlm6_2sgVt7hMZOPfL2M"
	question = "아동복 신상품은 언제쯤 나오나요?"
	answer   = "5월에 출시될 예정이오니, 많은 관심 부탁드립니다!"
)

var createTime = regexp.MustCompile(`<CreateTime>\d+</CreateTime>`)

// goldenReply compares a passive reply with the golden file, its CreateTime
// (the time of the answer) masked.
func goldenReply(t *testing.T, name string, r fakes.PushResult) {
	t.Helper()
	if r.Reply == nil {
		t.Fatalf("%s: got no passive reply (status %d, body %q)", name, r.Status, r.Body)
	}
	golden(t, name, []byte(createTime.ReplaceAllString(r.Body, "<CreateTime>0</CreateTime>")+"\n"))
}

// TestTutorialExchange plays the tutorial's scenario: the customer follows
// and asks, the agent answers from IM, the customer reads the answer.
func TestTutorialExchange(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg})
		ctx := context.Background()

		goldenReply(t, "reply_welcome.xml", h.wx.Follow(ctx, customer))
		eventually(t, "the customer's IM account", func() bool { return h.im.Imported(customerIM(customer)) })
		imports := h.im.RequestsTo("/v4/im_open_login_svc/account_import")
		if len(imports) != 1 {
			t.Fatalf("got %d account_import calls, want 1", len(imports))
		}
		goldenJSON(t, "im_account_import.json", imports[0].Body)

		goldenReply(t, "reply_connecting.xml", h.wx.SendText(ctx, customer, question))
		eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
		m := h.messagesTo("agent_kim")[0]
		if m.From != customerIM(customer) || m.Text != question {
			t.Errorf("agent got %q from %s, want %q from %s", m.Text, m.From, question, customerIM(customer))
		}
		sends := h.im.RequestsTo("/v4/openim/sendmsg")
		if len(sends) != 1 {
			t.Fatalf("got %d sendmsg calls, want 1", len(sends))
		}
		goldenJSON(t, "im_sendmsg_text.json", sends[0].Body, "MsgSeq", "MsgRandom")
		q := sends[0].Query
		if q.Get("identifier") != "administrator" || q.Get("contenttype") != "json" || q.Get("usersig") == "" {
			t.Errorf("sendmsg query %v lacks the admin identifier, usersig or contenttype", q)
		}

		if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the answer in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
		if got := h.sentTo(customer)[0].Text; got != answer {
			t.Errorf("customer read %q, want %q", got, answer)
		}
		cs := h.wx.RequestsTo("/cgi-bin/message/custom/send")
		if len(cs) != 1 {
			t.Fatalf("got %d custom/send calls, want 1", len(cs))
		}
		goldenJSON(t, "wechat_custom_send_text.json", cs[0].Body)
		st := h.wx.RequestsTo("/cgi-bin/stable_token")
		if len(st) != 1 {
			t.Fatalf("got %d stable_token calls, want 1", len(st))
		}
		goldenJSON(t, "wechat_stable_token.json", st[0].Body)

		var after []fakes.CallbackResult
		for _, cb := range h.im.Callbacks() {
			if cb.Command == "C2C.CallbackAfterSendMsg" {
				after = append(after, cb)
			}
		}
		if len(after) != 1 {
			t.Fatalf("got %d C2C.CallbackAfterSendMsg, want the agent's one", len(after))
		}
		goldenJSON(t, "im_callback_after_send.json", after[0].Body, "MsgSeq", "MsgRandom", "MsgTime", "MsgKey")
		for _, cb := range h.im.Callbacks() {
			if cb.Err != nil || cb.Answer != `{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}` {
				t.Errorf("%s answered %d %q (%v), want the OK envelope", cb.Command, cb.Status, cb.Answer, cb.Err)
			}
		}
	})
}

// TestSecondMessageGetsSuccess: only a conversation's first message gets the
// connecting text; later ones get "success".
func TestSecondMessageGetsSuccess(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	if r := h.wx.SendText(ctx, customer, "first"); r.Reply == nil {
		t.Fatalf("first message got %q, want the connecting text", r.Body)
	}
	if r := h.wx.SendText(ctx, customer, "second"); r.Body != "success" || r.ContentType != "text/plain; charset=utf-8" {
		t.Fatalf("second message got %q (%s), want success (text/plain; charset=utf-8)", r.Body, r.ContentType)
	}
	eventually(t, "both messages in IM", func() bool { return len(h.messagesTo("agent_kim")) == 2 })
}

// TestFollowerFromBeforeTheBridge: a customer who never followed through the
// bridge has no IM account; it is imported before their message is sent.
func TestFollowerFromBeforeTheBridge(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	h.wx.SendText(context.Background(), customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	var paths []string
	for _, r := range h.im.Requests() {
		if r.Path != "/v4/openim/query_online_status" { // the agents' presence, read at start
			paths = append(paths, r.Path)
		}
	}
	want := []string{"/v4/im_open_login_svc/account_import", "/v4/openim/sendmsg"}
	if strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Errorf("IM calls %v, want %v", paths, want)
	}
}

// TestRetriedPushForwardsOnce: WeChat's retries of one push (same MsgId, or
// for events the same sender, time and event) forward once and get the
// first answer again.
func TestRetriedPushForwardsOnce(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg})
		ctx := context.Background()

		follow := h.wx.EventXML(customer, "subscribe", "")
		for i := range 3 {
			if r := h.wx.Push(ctx, follow); r.Reply == nil {
				t.Fatalf("follow delivery %d got %q, want the welcome", i+1, r.Body)
			}
		}
		msg := h.wx.MessageXML(customer, "text", map[string]string{"Content": question})
		for i := range 3 {
			if r := h.wx.Push(ctx, msg); r.Reply == nil || !strings.Contains(r.Reply.Content, "connecting") {
				t.Fatalf("message delivery %d got %q, want the connecting text", i+1, r.Body)
			}
		}
		h.wx.SendText(ctx, customer, "a later message")
		eventually(t, "the later message in IM", func() bool { return len(h.messagesTo("agent_kim")) == 2 })
		if n := len(h.im.RequestsTo("/v4/im_open_login_svc/account_import")); n != 1 {
			t.Errorf("got %d account_import calls, want 1", n)
		}
		if got := h.messagesTo("agent_kim"); got[0].Text != question || got[1].Text != "a later message" {
			t.Errorf("agent got %q, %q; want the question once, then the later message", got[0].Text, got[1].Text)
		}
	})
}

// TestPushSignatureChecked: a push or verification with a wrong or missing
// signature gets 403 and changes nothing.
func TestPushSignatureChecked(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	body := string(h.wx.MessageXML(customer, "text", map[string]string{"Content": question}))
	for _, tc := range []struct {
		name, method, query string
	}{
		{"push with wrong signature", "POST", "signature=0000000000000000000000000000000000000000&timestamp=1714037059&nonce=486452656"},
		{"push without signature", "POST", "timestamp=1714037059&nonce=486452656"},
		{"push with another token's signature", "POST", "signature=899cf89e464efb63f54ddac96b0a0a235f53aa78&timestamp=1714037059&nonce=486452656"},
		{"verification with wrong signature", "GET", "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, h.base+"/wechat?"+tc.query, strings.NewReader(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("got status %d, want 403", resp.StatusCode)
			}
		})
	}
	// A good push afterwards is the first thing IM hears of.
	h.wx.SendText(context.Background(), customer, "hello")
	eventually(t, "the good message in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	if got := h.messagesTo("agent_kim")[0].Text; got != "hello" {
		t.Errorf("IM got %q first, want hello", got)
	}
}

// TestURLVerification checks GET /wechat with WeChat's official example.
func TestURLVerification(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"WECHAT_TOKEN": "AAAAA"}})
	resp, err := http.Get(h.base + "/wechat?signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b := make([]byte, 64)
	n, _ := resp.Body.Read(b)
	if resp.StatusCode != http.StatusOK || string(b[:n]) != "4375120948345356249" {
		t.Errorf("got %d %q, want 200 with the echostr exactly", resp.StatusCode, b[:n])
	}
}

// TestNoEcho: the bridge's own sends carry ForbidCallbackControl, and a
// callback for a message sent as a customer account (IM does fire them for
// REST sends) is never sent back to WeChat.
func TestNoEcho(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	if n := len(h.im.Callbacks()); n != 0 {
		t.Errorf("IM made %d callbacks for the bridge's send, want none", n)
	}

	// A REST send as the customer without ForbidCallbackControl, as another
	// tool of the operator's might make: IM fires the callbacks.
	c := &IMClient{Base: h.im.URL, SDKAppID: h.im.Options().SDKAppID, SecretKey: h.im.Options().SecretKey,
		Admin: "administrator", HTTP: http.DefaultClient, SigLifetime: time.Hour, Now: time.Now}
	msg := textMessage(customerIM(customer), "agent_kim", "sent elsewhere", 1, 2)
	msg.ForbidCallbackControl = nil
	if err := c.Send(ctx, msg); err != nil {
		t.Fatal(err)
	}
	cbs := h.im.Callbacks()
	if len(cbs) != 2 || cbs[1].Command != cbAfterSendMsg || cbs[1].Status != http.StatusOK {
		t.Fatalf("callbacks %+v, want Before and After answered", cbs)
	}
	// The agent's reply that follows is the only thing WeChat receives.
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) > 0 })
	if sent := h.wx.Sent(); len(sent) != 1 || sent[0].Text != answer {
		t.Errorf("WeChat got %+v, want only the agent's answer", sent)
	}
}

// TestTokenRefresh: an access_token WeChat no longer accepts (expired,
// 42001; superseded, 40001) is fetched anew and the send tried once more.
func TestTokenRefresh(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg})
		ctx := context.Background()
		h.wx.SendText(ctx, customer, question)
		eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })

		reply := func(text string, want int) {
			t.Helper()
			h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), text)
			eventually(t, "reply "+text, func() bool { return len(h.wx.Sent()) == want })
		}
		reply("one", 1)
		h.wx.ExpireToken()
		reply("two", 2)
		h.wx.RevokeTokens()
		reply("three", 3)

		if n := len(h.wx.RequestsTo("/cgi-bin/stable_token")); n != 3 {
			t.Errorf("got %d stable_token calls, want 3 (first, after 42001, after 40001)", n)
		}
		var tokens []string
		for _, r := range h.wx.RequestsTo("/cgi-bin/message/custom/send") {
			tokens = append(tokens, r.Query.Get("access_token"))
		}
		if len(tokens) != 5 || tokens[0] != tokens[1] || tokens[1] == tokens[2] || tokens[2] != tokens[3] || tokens[3] == tokens[4] {
			t.Errorf("custom/send used tokens %v: want one, the same again (refused), a new one, that again (refused), a new one", tokens)
		}
		if got := h.wx.Sent(); got[0].Text != "one" || got[1].Text != "two" || got[2].Text != "three" {
			t.Errorf("customer read %q %q %q, want one two three", got[0].Text, got[1].Text, got[2].Text)
		}
	})
}

// TestWeChatAnswerDoesNotWaitForIM: with IM answering after 3 s, WeChat
// still gets its answer at once; the message follows when IM answers.
func TestWeChatAnswerDoesNotWaitForIM(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	h.wx.Follow(context.Background(), customer)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	h.im.Delay(3 * time.Second)
	r := h.wx.SendText(context.Background(), customer, question)
	delivered := len(h.im.Messages())
	if r.Reply == nil || r.Attempts != 1 {
		t.Fatalf("push got %q after %d attempts, want the connecting text at the first", r.Body, r.Attempts)
	}
	if delivered != 0 {
		t.Errorf("IM had delivered %d messages when WeChat got its answer; the answer waited for IM", delivered)
	}
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
}

// TestRestartDeliversPendingWork: work accepted while IM hangs is not lost
// when the bridge stops; the next start delivers it, once.
func TestRestartDeliversPendingWork(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, env: map[string]string{"SHUTDOWN_GRACE": "300ms"}})
		release := h.im.Hold()
		ctx := context.Background()
		h.wx.SendText(ctx, customer, "one")
		h.wx.SendText(ctx, customer, "two")
		eventually(t, "the worker to call IM", func() bool { return len(h.im.Requests()) > 0 })
		if err := h.stop(); err != nil {
			t.Fatal(err)
		}
		release()
		if n := len(h.im.Messages()); n != 0 {
			t.Fatalf("IM has %d messages before the restart, want 0", n)
		}
		h.start()
		eventually(t, "both messages in IM", func() bool { return len(h.messagesTo("agent_kim")) == 2 })
		if got := h.messagesTo("agent_kim"); got[0].Text != "one" || got[1].Text != "two" {
			t.Errorf("agent got %q, %q; want one, two", got[0].Text, got[1].Text)
		}
	})
}

// TestOrderUnderBurst: several customers write at once while IM fails now
// and then; each customer's messages reach IM once each, in order.
func TestOrderUnderBurst(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}})
		h.im.FailNext(3, 91000) // internal error: retry
		h.burst(4, 15)
		h.checkBurst(4, 15)
	})
}

// TestAssignment: a new customer goes to the agent with the fewest open
// conversations, and keeps that agent.
func TestAssignment(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}})
		ctx := context.Background()
		for _, c := range []string{"c1", "c2", "c3"} {
			h.wx.SendText(ctx, c, "hi from "+c)
		}
		h.wx.Unfollow(ctx, "c2") // agent_lee's only conversation closes
		h.wx.SendText(ctx, "c4", "hi from c4")
		h.wx.SendText(ctx, "c1", "again from c1")
		customers := func() (out []fakes.Message) { // the bridge's notices aside
			for _, m := range h.im.Messages() {
				if !bridgeNotice(m) {
					out = append(out, m)
				}
			}
			return out
		}
		eventually(t, "every message in IM", func() bool { return len(customers()) == 5 })
		want := map[string]string{"hi from c1": "agent_kim", "hi from c2": "agent_lee", "hi from c3": "agent_kim",
			"hi from c4": "agent_lee", "again from c1": "agent_kim"}
		for _, m := range customers() {
			if want[m.Text] != m.To {
				t.Errorf("%q went to %s, want %s", m.Text, m.To, want[m.Text])
			}
		}
	})
}

// TestUndeliverableReplyIsRecorded: a reply outside the customer's 48-hour
// window (45015) is given up at once, logged, and never retried.
func TestUndeliverableReplyIsRecorded(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	h := newHarness(t, harnessOptions{wechat: fakes.WeChatOptions{Now: clock.Now}})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	clock.Advance(49 * time.Hour)
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the failure logged", func() bool { return strings.Contains(h.logs.String(), "delivery failed for good") })
	if n := len(h.wx.RequestsTo("/cgi-bin/message/custom/send")); n != 1 {
		t.Errorf("got %d custom/send calls, want 1", n)
	}
	if !strings.Contains(h.logs.String(), "errcode 45015") {
		t.Errorf("the log does not give the reason 45015:\n%s", h.logs.String())
	}
}

// TestIMFailuresRetried: IM answering 502, then 70001 (UserSig expired):
// the message is sent again with the same MsgSeq and MsgRandom (at once
// after 70001, with a renewed UserSig) and arrives once.
func TestIMFailuresRetried(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	h.im.FailNextStatus(1, http.StatusBadGateway)
	h.wx.SendText(ctx, customer, question)
	// Answered, not only received: a request counted by the fake may not
	// have taken the 502 yet, and FailNext would take its place.
	eventually(t, "the first failure", func() bool { return strings.Contains(h.logs.String(), "delivery failed, will retry") })
	h.im.FailNext(1, 70001)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })

	sends := h.im.RequestsTo("/v4/openim/sendmsg")
	if len(sends) != 3 {
		t.Fatalf("got %d sendmsg calls, want 3 (502, 70001, OK)", len(sends))
	}
	var first SendMsg
	json.Unmarshal(sends[0].Body, &first)
	for i, s := range sends[1:] {
		var m SendMsg
		json.Unmarshal(s.Body, &m)
		if m.MsgSeq != first.MsgSeq || m.MsgRandom != first.MsgRandom {
			t.Errorf("retry %d has MsgSeq/MsgRandom %d/%d, want %d/%d", i+1, m.MsgSeq, m.MsgRandom, first.MsgSeq, first.MsgRandom)
		}
	}
}

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// forStores runs fn on SQLite, then on PostgreSQL when TEST_DATABASE_URL is
// set, so both stores are held to the same behaviour.
func forStores(t *testing.T, fn func(t *testing.T, pg bool)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, false) })
	t.Run("postgres", func(t *testing.T) { fn(t, true) })
}
