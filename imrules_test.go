package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
	"wechat-im-bridge/fakes"
)

// TestAgentSeesMessagesInOrder: a customer's quick messages reach IM with
// MsgSeq increasing, so that the agent's client, which orders the messages
// of one second by MsgSeq, shows them as they were written.
func TestAgentSeesMessagesInOrder(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	const n = 30
	var want []string
	for i := range n {
		text := fmt.Sprintf("message %02d", i)
		want = append(want, text)
		if r := h.wx.SendText(ctx, customer, text); r.Status != 200 {
			t.Fatalf("push %d answered %d", i, r.Status)
		}
	}
	eventually(t, "every message in IM", func() bool { return len(h.messagesTo("agent_kim")) == n })

	var prev uint32
	for i, r := range h.im.RequestsTo("/v4/openim/sendmsg") {
		var m SendMsg
		if err := json.Unmarshal(r.Body, &m); err != nil {
			t.Fatal(err)
		}
		if m.MsgSeq <= prev {
			t.Errorf("sendmsg %d has MsgSeq %d after %d: want it increasing", i, m.MsgSeq, prev)
		}
		prev = m.MsgSeq
	}
	conv := h.im.Conversation(customerIM(customer), "agent_kim")
	for i, m := range conv {
		if m.Text != want[i] {
			t.Fatalf("the agent's client shows %q at place %d, want %q", m.Text, i, want[i])
		}
	}
}

// TestLongMessagesCrossInParts: an agent's reply longer than WeChat takes in
// one customer-service text, and a customer's text longer than IM takes in
// one message, cross as several messages within the limit, in order,
// joined exactly the text.
func TestLongMessagesCrossInParts(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	long := strings.Repeat("你好，这是一条很长的消息 👍🏽🇨🇳 with words. ", 700) // about 33 KB
	h.wx.SendText(ctx, customer, long)
	eventually(t, "the long text in IM", func() bool { return strings.Join(textsOf(h.messagesTo("agent_kim")), "") == long })
	for i, r := range h.im.RequestsTo("/v4/openim/sendmsg") {
		var m SendMsg
		json.Unmarshal(r.Body, &m)
		if b, _ := json.Marshal(m.MsgBody); len(b) > fakes.MaxMsgBody {
			t.Errorf("sendmsg %d has a body of %d bytes, over IM's %d", i, len(b), fakes.MaxMsgBody)
		}
	}

	reply := strings.Repeat("您的包裹已经发出，请注意查收 📦✨ ", 120) // about 6 KB
	if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), reply); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the long reply in WeChat", func() bool {
		var texts []string
		for _, m := range h.sentTo(customer) {
			texts = append(texts, m.Text)
		}
		return strings.Join(texts, "") == reply
	})
	sent := h.sentTo(customer)
	if len(sent) < 3 {
		t.Errorf("the reply crossed as %d messages, want at least 3", len(sent))
	}
	for i, m := range sent {
		if len(m.Text) > fakes.MaxCustomText {
			t.Errorf("part %d has %d bytes, over WeChat's %d", i, len(m.Text), fakes.MaxCustomText)
		}
	}
	if d := h.deadLetters(); len(d) != 0 {
		t.Errorf("dead letters: %q", d)
	}
}

func textsOf(ms []fakes.Message) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Text)
	}
	return out
}

// TestPermanentErrorsEndAtOnce: a code no retry can fix ends the delivery at
// its first attempt as a dead letter, and the agent is told why; when the
// agent's own account is gone, another agent is told.
func TestPermanentErrorsEndAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inject func(h *harness)
		toWX   bool   // the failing delivery is an agent's reply
		told   string // the agent told
		reason string
	}{
		{"IM content security", func(h *harness) { h.im.SetSensitive("forbidden") }, false, "agent_kim", "content security"},
		{"IM message too long", func(h *harness) { h.im.FailNext(1, 93000) }, false, "agent_kim", "longer than IM takes"},
		{"agent account gone", func(h *harness) { h.im.Remove("agent_kim") }, false, "agent_lee", "agent's account does not exist"},
		{"agent account gone, 90048", func(h *harness) { h.im.FailNext(1, 90048) }, false, "agent_lee", "agent's account does not exist"},
		{"WeChat text too long", func(h *harness) { h.wx.FailNext(1, 45002) }, true, "agent_kim", "longer than WeChat takes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}})
			ctx := context.Background()
			h.wx.SendText(ctx, customer, question)
			eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
			tc.inject(h)
			if tc.toWX {
				h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
			} else {
				h.wx.SendText(ctx, customer, "a forbidden word")
			}
			eventually(t, "the dead letter", func() bool { return len(h.deadLetters()) == 1 })
			if d := h.deadLetters()[0]; !strings.Contains(d, tc.reason) {
				t.Errorf("dead letter %q does not say %q", d, tc.reason)
			}
			eventually(t, "the notice", func() bool {
				for _, m := range h.messagesTo(tc.told) {
					if bridgeNotice(m) && strings.Contains(m.Text, tc.reason) {
						return true
					}
				}
				return false
			})
			if n := strings.Count(h.logs.String(), "will retry"); n != 0 {
				t.Errorf("the delivery was retried %d times, want none", n)
			}
		})
	}
}

// TestUnfollowAndFollowAgain: a customer who unfollows and follows again can
// talk again at once. By default the IM account is kept, which a paid app
// needs (it refuses a deleted UserID for three months, 70399);
// IM_UNFOLLOW=delete frees it, which a trial app takes again at once. A
// trial app's cap on accounts (70398) ends a message as a dead letter, with
// the agent told why and what to do.
func TestUnfollowAndFollowAgain(t *testing.T) {
	again := func(t *testing.T, h *harness, clock *fakeClock) {
		t.Helper()
		ctx := context.Background()
		h.wx.Follow(ctx, customer)
		h.wx.SendText(ctx, customer, question)
		eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
		if r := h.wx.Unfollow(ctx, customer); r.Body != "success" {
			t.Errorf("unfollow got %q, want success", r.Body)
		}
		clock.Advance(time.Minute) // events are keyed by sender, time and event
		h.wx.Follow(ctx, customer)
		if r := h.wx.SendText(ctx, customer, "again"); r.Reply == nil || !strings.Contains(r.Reply.Content, "connecting") {
			t.Errorf("first message after re-follow got %q, want the connecting text of a new conversation", r.Body)
		}
	}
	for _, tc := range []struct {
		name    string
		trial   bool
		env     map[string]string
		deletes int
	}{
		{"paid app, account kept", false, nil, 0},
		{"trial app, account kept", true, nil, 0},
		{"trial app, account deleted", true, map[string]string{"IM_UNFOLLOW": "delete"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := &fakeClock{now: time.Now()}
			h := newHarness(t, harnessOptions{wechat: fakes.WeChatOptions{Now: clock.Now}, im: fakes.IMOptions{Trial: tc.trial}, env: tc.env})
			again(t, h, clock)
			eventually(t, "the message after re-follow in IM", func() bool { return len(h.customerTexts("agent_kim", customer)) == 2 })
			del := h.im.RequestsTo("/v4/im_open_login_svc/account_delete")
			if len(del) != tc.deletes {
				t.Fatalf("got %d account_delete calls, want %d", len(del), tc.deletes)
			}
			if tc.deletes == 1 {
				goldenJSON(t, "im_account_delete.json", del[0].Body)
			}
			if d := h.deadLetters(); len(d) != 0 {
				t.Errorf("dead letters: %q", d)
			}
		})
	}

	t.Run("paid app, account deleted", func(t *testing.T) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{wechat: fakes.WeChatOptions{Now: clock.Now}, env: map[string]string{"IM_UNFOLLOW": "delete"}})
		again(t, h, clock)
		eventually(t, "the agent told", func() bool { return strings.Contains(h.textsTo("agent_kim", "\n"), "set IM_UNFOLLOW=keep") })
	})

	t.Run("trial app full", func(t *testing.T) {
		h := newHarness(t, harnessOptions{im: fakes.IMOptions{Trial: true}})
		ctx := context.Background()
		for i := range 98 { // with the admin and the agent, the app's 100 accounts
			h.wx.Follow(ctx, fmt.Sprintf("o_fill_%02d", i))
		}
		eventually(t, "98 customers imported", func() bool { return len(h.im.RequestsTo("/v4/im_open_login_svc/account_import")) >= 98 })
		h.wx.SendText(ctx, customer, question)
		eventually(t, "the agent told", func() bool {
			return strings.Contains(h.textsTo("agent_kim", "\n"), "a trial app: 100")
		})
	})
}

// TestEachIMAPIPacedAtItsLimit: each IM API is paced under its own
// documented limit (account_delete 100 a second, account_import and sendmsg
// 200), so IM, holding each API to its limit, never answers 60007.
func TestEachIMAPIPacedAtItsLimit(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"IM_UNFOLLOW": "delete"}})
	ctx := context.Background()
	const n = 260
	var wg sync.WaitGroup
	for c := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := c; i < n; i += 8 {
				h.wx.Follow(ctx, fmt.Sprintf("o_pace_%03d", i))
				h.wx.Unfollow(ctx, fmt.Sprintf("o_pace_%03d", i))
			}
		}()
	}
	wg.Wait()
	eventually(t, "every account deleted", func() bool {
		return len(h.im.RequestsTo("/v4/im_open_login_svc/account_delete")) >= n
	})
	if l := h.im.Limited(); l != 0 {
		t.Errorf("IM answered %d calls 60007, want none", l)
	}
}

// TestTypingIndicator: TUIKit's typing indicator never reaches the customer
// as a message; it shows WeChat's typing state instead, sent once while it
// shows. Online-only messages and custom messages with no text form are
// never sent to a customer, and use none of their replies.
func TestTypingIndicator(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	im := customerIM(customer)

	for range 2 { // the second while the first shows: not sent again (45081)
		if _, err := h.im.SendTypingAsAgent(ctx, "agent_kim", im, true); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the typing state", func() bool { return len(h.wx.Typings()) == 1 })
	h.im.SendTypingAsAgent(ctx, "agent_kim", im, false)
	eventually(t, "the typing state cancelled", func() bool { return len(h.wx.Typings()) == 2 })
	if ty := h.wx.Typings(); ty[0].Command != "Typing" || ty[1].Command != "CancelTyping" || ty[0].ToUser != customer {
		t.Errorf("typing commands %+v, want Typing then CancelTyping to the customer", ty)
	}
	if n := len(h.wx.RequestsTo("/cgi-bin/message/custom/typing")); n != 2 {
		t.Errorf("got %d custom/typing calls, want 2", n)
	}

	h.im.SendElemsAsAgent(ctx, "agent_kim", im, true, map[string]any{"MsgType": "TIMTextElem", "MsgContent": map[string]any{"Text": "online only"}})
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, map[string]any{"MsgType": "TIMCustomElem", "MsgContent": map[string]any{"Data": `{"businessID":"order_card"}`}})
	for i := range 5 { // the customer's five replies, all left for the agent's texts
		h.im.SendAsAgent(ctx, "agent_kim", im, fmt.Sprintf("%s %d", answer, i))
	}
	eventually(t, "the five answers in WeChat", func() bool { return len(h.sentTo(customer)) == 5 })
	for _, m := range h.sentTo(customer) {
		if !strings.HasPrefix(m.Text, answer) {
			t.Errorf("the customer received %q", m.Text)
		}
	}
	if d := h.deadLetters(); len(d) != 0 {
		t.Errorf("dead letters: %q", d)
	}
}
