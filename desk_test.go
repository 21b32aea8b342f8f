package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// replyText is the passive reply a push got, "" for none.
func replyText(r fakes.PushResult) string {
	if r.Reply == nil {
		return ""
	}
	return r.Reply.Content
}

// noticesTo returns the bridge's notices agent read in the customer
// openid's conversation, in order, without the mark.
func (h *harness) noticesTo(agent, openid string) []string {
	var out []string
	for _, m := range h.messagesTo(agent) {
		if text, ok := strings.CutPrefix(m.Text, noticeMark); ok && m.From == customerIM(openid) {
			out = append(out, text)
		}
	}
	return out
}

// customerTexts returns what agent read from the customer openid, without
// the bridge's notices.
func (h *harness) customerTexts(agent, openid string) []string {
	var out []string
	for _, m := range h.messagesTo(agent) {
		if m.From == customerIM(openid) && !strings.HasPrefix(m.Text, noticeMark) {
			out = append(out, m.Text)
		}
	}
	return out
}

// sentTexts returns the texts WeChat took for openid, in order.
func (h *harness) sentTexts(openid string) []string {
	var out []string
	for _, m := range h.sentTo(openid) {
		out = append(out, m.Text)
	}
	return out
}

// eventuallyNotice waits for agent to read a notice in openid's
// conversation that contains want.
func (h *harness) eventuallyNotice(agent, openid, want string) {
	h.t.Helper()
	eventually(h.t, agent+" told "+want, func() bool {
		for _, n := range h.noticesTo(agent, openid) {
			if strings.Contains(n, want) {
				return true
			}
		}
		return false
	})
}

// TestQueueWhileNobodyIsFree: with no agent online, customers wait in
// order, told their place, their messages kept; the first agent to log in
// takes the longest-waiting customer up to IM_AGENT_MAX_OPEN, who is told
// AGENT_JOINED_TEXT, and receives their messages in order; the next agent
// takes the next.
func TestQueueWhileNobodyIsFree(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}, im: fakes.IMOptions{Online: []string{}},
			env: map[string]string{"IM_AGENT_MAX_OPEN": "1"}})
		ctx := context.Background()
		for _, step := range []struct{ openid, text, reply string }{
			{"c1", "first", defaultDeskTexts.queuedText(1)},
			{"c2", "second", defaultDeskTexts.queuedText(2)},
			{"c1", "first again", defaultDeskTexts.queuedText(1)},
		} {
			if got := replyText(h.wx.SendText(ctx, step.openid, step.text)); got != step.reply {
				t.Errorf("%s wrote %q and read %q, want %q", step.openid, step.text, got, step.reply)
			}
		}
		if strings.Contains(h.metricsText(), "bridge_customers_waiting 2") == false {
			t.Error("/metrics does not count 2 customers waiting")
		}
		if n := len(h.im.Messages()); n != 0 {
			t.Fatalf("IM got %d messages while nobody was online", n)
		}

		h.im.Login(ctx, "agent_kim")
		eventually(t, "c1's messages to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
		if got := strings.Join(h.customerTexts("agent_kim", "c1"), "|"); got != "first|first again" {
			t.Errorf("agent_kim read %q, want c1's messages in order", got)
		}
		eventually(t, "c1 told an agent joined", func() bool { return strings.Join(h.sentTexts("c1"), "|") == defaultDeskTexts.Joined })
		if got := h.customerTexts("agent_kim", "c2"); len(got) != 0 {
			t.Errorf("agent_kim, full, was given c2: %q", got)
		}

		h.im.Login(ctx, "agent_lee")
		eventually(t, "c2's message to agent_lee", func() bool { return strings.Join(h.customerTexts("agent_lee", "c2"), "|") == "second" })
		eventually(t, "nobody waiting", func() bool {
			m := h.metricsText()
			return strings.Contains(m, "bridge_customers_waiting 0") && strings.Contains(m, "bridge_customer_wait_seconds_count 2") &&
				strings.Contains(m, `bridge_agent_open_conversations{agent="agent_kim"} 1`)
		})
		// A customer with an agent writes on as usual.
		if got := replyText(h.wx.SendText(ctx, "c1", "thanks")); got != "" {
			t.Errorf("c1, served, read %q", got)
		}
		eventually(t, "c1's next message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 3 })
	})
}

// TestAssignmentFollowsPresence: a new conversation goes to the online
// agent with the fewest open conversations (a tie: the one given one
// longest ago); an agent who logs out gets none, and keeps their customers
// across a disconnect.
func TestAssignmentFollowsPresence(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}})
		ctx := context.Background()
		write := func(openid string) {
			t.Helper()
			if got := replyText(h.wx.SendText(ctx, openid, "hi from "+openid)); got != defaultConnectingText {
				t.Fatalf("%s read %q, want the connecting text", openid, got)
			}
		}
		write("c1") // a tie: agent_kim, listed first
		write("c2") // agent_lee has fewer
		write("c3") // a tie again: agent_kim was given one longest ago
		// agent_lee answers c2 before logging out: c2 has not written
		// since, so the conversation stays agent_lee's.
		eventually(t, "c2's message", func() bool { return len(h.customerTexts("agent_lee", "c2")) == 1 })
		h.im.SendAsAgent(ctx, "agent_lee", customerIM("c2"), "Back tomorrow!")
		eventually(t, "the answer", func() bool { return len(h.sentTo("c2")) == 1 })
		h.im.Logout(ctx, "agent_lee")
		write("c4") // agent_lee is offline
		h.im.Disconnect(ctx, "agent_kim")
		h.im.Login(ctx, "agent_lee")
		h.wx.SendText(ctx, "c1", "c1 again") // agent_kim keeps c1 while disconnected
		write("c5")                          // agent_lee: the only one online
		want := map[string]string{"hi from c1": "agent_kim", "hi from c2": "agent_lee", "hi from c3": "agent_kim",
			"hi from c4": "agent_kim", "c1 again": "agent_kim", "hi from c5": "agent_lee"}
		customers := func() (out []fakes.Message) {
			for _, m := range h.im.Messages() {
				if _, ok := want[m.Text]; ok {
					out = append(out, m)
				}
			}
			return out
		}
		eventually(t, "every message in IM", func() bool { return len(customers()) == len(want) })
		for _, m := range customers() {
			if want[m.Text] != m.To {
				t.Errorf("%q went to %s, want %s", m.Text, m.To, want[m.Text])
			}
		}
	})
}

// TestPresenceReadAtStart: the bridge asks IM who is online before it
// takes a push, so an agent offline when it starts gets nobody.
func TestPresenceReadAtStart(t *testing.T) {
	h := newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}, im: fakes.IMOptions{Online: []string{"agent_lee"}}})
	if n := len(h.im.RequestsTo("/v4/openim/query_online_status")); n != 1 {
		t.Fatalf("query_online_status called %d times at start, want once", n)
	}
	h.wx.SendText(context.Background(), "c1", "hello")
	eventually(t, "the message in IM", func() bool { return len(h.im.Messages()) == 1 })
	if to := h.im.Messages()[0].To; to != "agent_lee" {
		t.Errorf("the message went to %s, want agent_lee, the only one online", to)
	}
}

// TestBusinessHours: outside BUSINESS_HOURS a customer is answered
// OFFLINE_TEXT and waits; when the desk opens, the first free agent takes
// them. The desk opens two minutes after the test starts, to the end of the
// day, on the bridge's clock, which the test moves.
func TestBusinessHours(t *testing.T) {
	forStores(t, testBusinessHours)
}

func testBusinessHours(t *testing.T, pg bool) {
	shanghai, err := time.LoadLocation("Asia/Shanghai")
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{now: time.Now()}
	opens := clock.Now().In(shanghai).Add(2 * time.Minute).Truncate(time.Minute)
	hours := weekdays[opens.Weekday()] + " " + opens.Format("15:04") + "-24:00"
	h := newHarness(t, harnessOptions{postgres: pg, clock: clock, env: map[string]string{"BUSINESS_HOURS": hours}})
	ctx := context.Background()
	if got := replyText(h.wx.SendText(ctx, "c1", "are you open?")); got != defaultDeskTexts.Offline {
		t.Fatalf("read %q outside business hours (%s), want OFFLINE_TEXT", got, hours)
	}
	if got := replyText(h.wx.SendText(ctx, "c1", "hello?")); got != defaultDeskTexts.Offline {
		t.Errorf("read %q outside business hours, want OFFLINE_TEXT", got)
	}
	if n := len(h.im.Messages()); n != 0 {
		t.Fatalf("IM got %d messages while closed", n)
	}
	clock.Advance(opens.Sub(clock.Now())) // the sweep gives c1 to the agent
	eventually(t, "c1's messages to the agent", func() bool {
		return strings.Join(h.customerTexts("agent_kim", "c1"), "|") == "are you open?|hello?"
	})
	eventually(t, "c1 told", func() bool { return strings.Join(h.sentTexts("c1"), "|") == defaultDeskTexts.Joined })
}

// TestHours reads BUSINESS_HOURS and answers whether the desk is open.
func TestHours(t *testing.T) {
	shanghai, _ := time.LoadLocation("Asia/Shanghai")
	h, err := parseHours("Mon-Fri 09:00-18:00, Sat 10:00-14:00, Sun-Mon 22:00-24:00", shanghai)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		at   string
		open bool
	}{
		{"2026-12-07 08:59", false}, {"2026-12-07 09:00", true}, {"2026-12-07 17:59", true}, {"2026-12-07 18:00", false},
		{"2026-12-05 10:30", true}, {"2026-12-05 14:00", false}, {"2026-12-06 23:59", true}, {"2026-12-07 22:00", true},
		{"2026-12-08 22:00", false},
	} {
		at, _ := time.ParseInLocation("2006-01-02 15:04", tc.at, shanghai)
		if got := h.Open(at); got != tc.open {
			t.Errorf("open at %s (%s): got %v, want %v", tc.at, at.Weekday(), got, tc.open)
		}
	}
	if (*Hours)(nil).Open(time.Now()) != true {
		t.Error("no hours: the desk is not always open")
	}
	for _, bad := range []string{"Mon-Fri", "Mon-Fry 09:00-18:00", "Mon 18:00-09:00", "Mon 9:00-18:00", "Mon 09:00-25:00"} {
		if _, err := parseHours(bad, shanghai); err == nil {
			t.Errorf("parseHours(%q) took it", bad)
		}
	}
}

// TestEndAndRating: /end closes the conversation; the customer reads
// CLOSED_TEXT and RATING_TEXT; their rating is stored and shown to the
// agent; any other message opens a new conversation. No command reaches
// the customer.
func TestEndAndRating(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, env: map[string]string{"ADMIN_TOKEN": "admintoken1"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "my parcel is late")
		eventually(t, "the question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "It leaves today.")
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
		h.eventuallyNotice("agent_kim", "c1", "Conversation ended; the customer is asked to rate it.")
		closing := defaultDeskTexts.Closed + "\n\n" + defaultDeskTexts.Rating
		eventually(t, "the closing text", func() bool { return len(h.sentTo("c1")) == 2 })
		if got := strings.Join(h.sentTexts("c1"), "|"); got != "It leaves today.|"+closing {
			t.Errorf("c1 read %q", got)
		}
		// The next message is a rating once the bridge has the question
		// delivered, which it records after WeChat took it: a customer reads
		// it only then.
		eventually(t, "the question recorded delivered", func() bool {
			msgs := h.history("c1")[0].Messages
			return len(msgs) == 3 && msgs[2].Text == closing && msgs[2].State == "delivered"
		})
		if got := replyText(h.wx.SendText(ctx, "c1", " 4 ")); got != defaultDeskTexts.Rated {
			t.Errorf("the rating was answered %q, want RATED_TEXT", got)
		}
		h.eventuallyNotice("agent_kim", "c1", "The customer rated the conversation 4 of 5.")
		if m := h.metricsText(); !strings.Contains(m, `bridge_ratings_total{rating="4"} 1`) || !strings.Contains(m, "bridge_first_reply_seconds_count 1") {
			t.Error("/metrics does not count the rating and the agent's first reply")
		}
		if got := replyText(h.wx.SendText(ctx, "c1", "one more thing")); got != defaultConnectingText {
			t.Errorf("the next message was answered %q, want the connecting text of a new conversation", got)
		}
		// Ended again, a message that is no rating opens a new conversation.
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
		eventually(t, "the second closing text", func() bool { return len(h.sentTo("c1")) == 3 })
		if got := replyText(h.wx.SendText(ctx, "c1", "6 stars!")); got != defaultConnectingText {
			t.Errorf("a message that is no rating was answered %q, want the connecting text", got)
		}

		convs := h.history("c1")
		if len(convs) != 3 || convs[0].Rating != 4 || convs[0].ClosedBy != "agent" || convs[1].Rating != 0 || convs[2].ClosedAt != 0 {
			t.Fatalf("history: %+v", convs)
		}
		var got []string
		for _, m := range convs[0].Messages {
			got = append(got, m.Direction+" "+m.Agent+" "+m.Text+" "+m.State)
		}
		want := []string{"in agent_kim my parcel is late delivered", "out agent_kim It leaves today. delivered",
			"out  " + closing + " delivered", "in agent_kim  4  rating"}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("first conversation's messages:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	})
}

// history reads the customer's conversations from the admin endpoint.
func (h *harness) history(openid string) []HistoryConversation {
	h.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, h.base+"/admin/customers/"+openid+"/messages", nil)
	req.Header.Set("Authorization", "Bearer "+h.env["ADMIN_TOKEN"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		OpenID        string
		Conversations []HistoryConversation
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&body) != nil || body.OpenID != openid {
		h.t.Fatalf("history of %s: status %d", openid, resp.StatusCode)
	}
	return body.Conversations
}

// TestTransferWithSummary: /transfer AGENT hands the conversation over; the
// new agent first reads a summary of both sides, the customer
// TRANSFER_TEXT, and the customer's next message goes to the new agent.
func TestTransferWithSummary(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "I want a refund")
		eventually(t, "the question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "Let me find who handles refunds.")
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/transfer nobody")
		h.eventuallyNotice("agent_kim", "c1", `Not transferred: "nobody" is not an agent. Agents: agent_kim, agent_lee.`)
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/transfer agent_lee")
		h.eventuallyNotice("agent_kim", "c1", "Transferred to agent_lee.")
		h.eventuallyNotice("agent_lee", "c1", "Transferred to you by agent_kim. The last messages:\ncustomer: I want a refund\n"+
			"agent_kim: Let me find who handles refunds.")
		eventually(t, "c1 told", func() bool { return len(h.sentTo("c1")) == 2 })
		if got := strings.Join(h.sentTexts("c1"), "|"); got != "Let me find who handles refunds.|"+defaultDeskTexts.Transfer {
			t.Errorf("c1 read %q", got)
		}
		h.wx.SendText(ctx, "c1", "thank you")
		eventually(t, "the next message to agent_lee", func() bool { return strings.Join(h.customerTexts("agent_lee", "c1"), "|") == "thank you" })
		if m := h.metricsText(); !strings.Contains(m, `bridge_agent_open_conversations{agent="agent_kim"} 0`) ||
			!strings.Contains(m, `bridge_agent_open_conversations{agent="agent_lee"} 1`) {
			t.Error("/metrics does not show the conversation moved to agent_lee")
		}
		// Back to agent_kim, who has logged out: not done, and agent_lee is
		// told (a customer waiting on an agent away goes to the next free one).
		h.im.Logout(ctx, "agent_kim")
		h.im.SendAsAgent(ctx, "agent_lee", customerIM("c1"), "/transfer agent_kim")
		h.eventuallyNotice("agent_lee", "c1", "Not transferred: agent_kim is offline.")
	})
}

// TestQueueAndHelpCommands: /queue lists who waits and for how long;
// /help and any unknown /word list the commands; none reaches the
// customer.
func TestQueueAndHelpCommands(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"IM_AGENT_MAX_OPEN": "1"}})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1's message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/queue")
	h.eventuallyNotice("agent_kim", "c1", "Nobody is waiting.")
	h.wx.SendText(ctx, "c2", "anyone?") // agent_kim is full
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/queue")
	h.eventuallyNotice("agent_kim", "c1", "1 waiting:\nwx_c2 for ")
	for _, cmd := range []string{"/help", "/frobnicate now"} {
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), cmd)
	}
	eventually(t, "two helps", func() bool {
		n := 0
		for _, text := range h.noticesTo("agent_kim", "c1") {
			if strings.HasPrefix(text, "Commands, typed in a customer's conversation") && strings.Contains(text, "/transfer AGENT") {
				n++
			}
		}
		return n == 2
	})
	if n := len(h.wx.RequestsTo("/cgi-bin/message/custom/send")); n != 0 {
		t.Errorf("WeChat got %d messages: commands reached the customer", n)
	}
	// /end frees agent_kim's place for c2.
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
	eventually(t, "c2 given agent_kim", func() bool { return strings.Join(h.customerTexts("agent_kim", "c2"), "|") == "anyone?" })
}

// TestIdleConversationCloses: a conversation without a message for
// SESSION_IDLE_TIMEOUT closes by itself: the customer reads
// IDLE_CLOSED_TEXT, the agent is told, the place goes to a waiting
// customer, and the customer's next message opens a new conversation.
func TestIdleConversationCloses(t *testing.T) {
	forStores(t, testIdleConversationCloses)
}

func testIdleConversationCloses(t *testing.T, pg bool) {
	clock := &fakeClock{now: time.Now()}
	h := newHarness(t, harnessOptions{postgres: pg, clock: clock, env: map[string]string{"IM_AGENT_MAX_OPEN": "1",
		"SESSION_IDLE_TIMEOUT": "30m", "IDLE_CLOSED_TEXT": "Closed for now: write again any time."}})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	h.wx.SendText(ctx, "c2", "me too") // waits: agent_kim is full
	eventually(t, "c1's message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	clock.Advance(29 * time.Minute)
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "Anything else?")
	clock.Advance(29 * time.Minute) // 29 minutes after the reply: still open
	eventually(t, "the reply", func() bool { return len(h.sentTo("c1")) == 1 })
	clock.Advance(2 * time.Minute)
	h.eventuallyNotice("agent_kim", "c1", "The conversation closed after 30m0s without a message.")
	eventually(t, "c1 told", func() bool {
		return strings.Join(h.sentTexts("c1"), "|") == "Anything else?|Closed for now: write again any time."
	})
	eventually(t, "c2 given agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c2")) == 1 })
	if got := replyText(h.wx.SendText(ctx, "c1", "back again")); got != defaultDeskTexts.queuedText(1) {
		t.Errorf("c1's next message was answered %q, want a place in the queue: agent_kim has c2", got)
	}
}

// TestReplyQuotaAndWindow: the bridge counts WeChat's five replies a
// message (three within a minute of a follow or a menu click) and its 48
// hours: the agent is told when one reply is left, a reply beyond the
// quota is held and goes when the customer writes again, and one past the
// window is not sent; WeChat never has to refuse.
func TestReplyQuotaAndWindow(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{postgres: pg, clock: clock})
		ctx := context.Background()
		reply := func(openid, text string) {
			t.Helper()
			if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(openid), text); err != nil {
				t.Fatal(err)
			}
		}
		h.wx.SendText(ctx, "c1", "question")
		eventually(t, "the question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		for _, r := range []string{"r1", "r2", "r3", "r4"} {
			reply("c1", r)
		}
		h.eventuallyNotice("agent_kim", "c1", "One reply left")
		reply("c1", "r5")
		reply("c1", "r6")
		h.eventuallyNotice("agent_kim", "c1", `Held: WeChat takes no more replies until the customer writes again; this one goes then. "r6"`)
		eventually(t, "five replies", func() bool { return len(h.sentTo("c1")) == 5 })
		// A reply that reached WeChat within the second before the
		// customer's message may count under it: they write later.
		clock.Advance(2 * time.Second)
		h.wx.SendText(ctx, "c1", "and?")
		eventually(t, "the held reply", func() bool { return len(h.sentTo("c1")) == 6 })
		if got := strings.Join(h.sentTexts("c1"), ","); got != "r1,r2,r3,r4,r5,r6" {
			t.Errorf("c1 read %s", got)
		}

		clock.Advance(48*time.Hour + time.Minute)
		reply("c1", "too late")
		h.eventuallyNotice("agent_kim", "c1", "Not sent: WeChat takes replies only within 48 hours of the customer's last message, and they last wrote 48h1m0s ago.")

		// A menu click allows three replies within the minute.
		h.wx.Click(ctx, "c1", "MENU_HELP")
		for _, r := range []string{"m1", "m2", "m3", "m4"} {
			reply("c1", r)
		}
		h.eventuallyNotice("agent_kim", "c1", `this one goes then. "m4"`)
		eventually(t, "three replies after the click", func() bool { return len(h.sentTo("c1")) == 9 })
		if got := strings.Join(h.sentTexts("c1"), ","); got != "r1,r2,r3,r4,r5,r6,m1,m2,m3" {
			t.Errorf("c1 read %s", got)
		}
		// So does a follow.
		h.wx.Follow(ctx, "c2")
		eventually(t, "c2's account", func() bool { return h.im.Imported(customerIM("c2")) })
		for _, r := range []string{"f1", "f2", "f3", "f4"} {
			reply("c2", r)
		}
		h.eventuallyNotice("agent_kim", "c2", `this one goes then. "f4"`)
		eventually(t, "three replies after the follow", func() bool { return len(h.sentTo("c2")) == 3 })
		if got := strings.Join(h.sentTexts("c2"), ","); got != "f1,f2,f3" {
			t.Errorf("c2 read %s", got)
		}
		if n := len(h.wx.RequestsTo("/cgi-bin/message/custom/send")); n != 12 {
			t.Errorf("custom/send called %d times, want 12: no call WeChat would refuse", n)
		}
	})
}

// TestUnfollowWhileWaiting: a customer who unfollows leaves the queue, and
// their waiting messages reach no agent.
func TestUnfollowWhileWaiting(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, im: fakes.IMOptions{Online: []string{}}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello?")
		h.wx.SendText(ctx, "c2", "anyone?")
		h.wx.Unfollow(ctx, "c1")
		if got := replyText(h.wx.SendText(ctx, "c2", "still here")); got != defaultDeskTexts.queuedText(1) {
			t.Errorf("c2 read %q, want first place: c1 left", got)
		}
		h.im.Login(ctx, "agent_kim")
		eventually(t, "c2's messages", func() bool { return len(h.customerTexts("agent_kim", "c2")) == 2 })
		if got := h.customerTexts("agent_kim", "c1"); len(got) != 0 {
			t.Errorf("agent_kim read %q from c1, who left", got)
		}
		if !strings.Contains(h.metricsText(), "bridge_customers_waiting 0") {
			t.Error("/metrics does not show the queue empty")
		}
		// Back again, they start afresh.
		h.wx.Follow(ctx, "c1")
		h.wx.SendText(ctx, "c1", "hello again")
		eventually(t, "c1's new message", func() bool { return len(h.customerTexts("agent_kim", "c1")) > 0 })
		if got := strings.Join(h.customerTexts("agent_kim", "c1"), "|"); got != "hello again" {
			t.Errorf("agent_kim read %q from c1, want only the message after they came back", got)
		}
	})
}

// TestQueueAcrossTwoBridges: two bridges on one PostgreSQL share one queue
// and one cap: customers who wrote to either while nobody was online are
// each given one agent, with their messages in order, and no agent is
// given more than IM_AGENT_MAX_OPEN.
func TestQueueAcrossTwoBridges(t *testing.T) {
	h := newHarness(t, harnessOptions{postgres: true, agents: []string{"agent_kim", "agent_lee"}, im: fakes.IMOptions{Online: []string{}},
		env: map[string]string{"IM_AGENT_MAX_OPEN": "2"}})
	second, _ := startBridge(t, h.env, h.logs)
	lb := roundRobin(t, h.base, second)
	h.wx.SetTarget(lb + "/wechat")
	h.im.SetCallbackURL(lb + "/imcallback")
	ctx := context.Background()
	h.burst(5, 3) // c0 … c4, three messages each, at once
	h.im.Login(ctx, "agent_kim")
	h.im.Login(ctx, "agent_lee")
	eventually(t, "four customers given an agent", func() bool {
		n := 0
		for c := range 5 {
			n += len(h.customerTexts("agent_kim", burstOpenID(c))) + len(h.customerTexts("agent_lee", burstOpenID(c)))
		}
		return n == 4*3
	})
	served := 0
	for c := range 5 {
		kim, lee := h.customerTexts("agent_kim", burstOpenID(c)), h.customerTexts("agent_lee", burstOpenID(c))
		got := append(kim, lee...)
		if len(kim) > 0 && len(lee) > 0 {
			t.Errorf("customer %d went to both agents", c)
		}
		if len(got) > 0 {
			served++
			if want := fmt.Sprintf("c%d m00,c%d m01,c%d m02", c, c, c); strings.Join(got, ",") != want {
				t.Errorf("customer %d: the agent read %v, want %s", c, got, want)
			}
		}
	}
	if served != 4 || !strings.Contains(h.metricsText(), "bridge_customers_waiting 1") {
		t.Errorf("%d customers served, want 4 (two agents of two each), one waiting", served)
	}
}

// TestHeldReplyKeepsConversationAlive: a reply held for WeChat's quota and
// sent when the customer writes again does not make the conversation look
// idle since the reply was written: it stays open SESSION_IDLE_TIMEOUT
// after the customer's message. c2, idle since a minute after the reply
// was written, is the sweep's witness: closing it, the sweep judged c1 too.
func TestHeldReplyKeepsConversationAlive(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{postgres: pg, clock: clock, env: map[string]string{"SESSION_IDLE_TIMEOUT": "30m"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "question")
		eventually(t, "the question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		for _, r := range []string{"r1", "r2", "r3", "r4", "r5", "r6"} {
			h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), r)
		}
		h.eventuallyNotice("agent_kim", "c1", `this one goes then. "r6"`)
		clock.Advance(time.Minute)
		h.wx.SendText(ctx, "c2", "hello")
		eventually(t, "c2's message", func() bool { return len(h.customerTexts("agent_kim", "c2")) == 1 })
		clock.Advance(19 * time.Minute)
		h.wx.SendText(ctx, "c1", "and?")
		eventually(t, "the held reply", func() bool { return len(h.sentTo("c1")) == 6 })
		clock.Advance(11*time.Minute + 30*time.Second) // r6 written 31.5 minutes ago, c1's message 11.5
		h.eventuallyNotice("agent_kim", "c2", "The conversation closed after 30m0s without a message.")
		for _, n := range h.noticesTo("agent_kim", "c1") {
			if strings.Contains(n, "closed after") {
				t.Fatalf("c1's conversation closed 11.5 minutes after the customer wrote")
			}
		}
		clock.Advance(19 * time.Minute)
		h.eventuallyNotice("agent_kim", "c1", "The conversation closed after 30m0s without a message.")
	})
}

// TestQuotaCountsRepliesOnTheirWay: a reply queued before the customer's
// new message but delivered after it counts, as WeChat counts it, against
// the quota the new message opens: the bridge holds the reply that would
// be one too many, and WeChat never refuses (45047). Found by TestDeskModel.
func TestQuotaCountsRepliesOnTheirWay(t *testing.T) {
	// r1 reaches WeChat after the customer's next message was accepted:
	// while the agent writes again, or before.
	for _, settled := range []bool{false, true} {
		t.Run(map[bool]string{false: "still on its way", true: "arrived since"}[settled], func(t *testing.T) {
			h, clock := quotaHarness(t, harnessOptions{})
			ctx := context.Background()
			h.replyOnItsWay(clock)
			h.wx.SendText(ctx, "c1", "and?")
			if settled {
				clock.Advance(2 * time.Second)
				eventually(t, "r1 in WeChat", func() bool { return len(h.sentTo("c1")) == 2 })
			}
			h.agentReplies("c1", "r2", "r3", "r4", "r5", "r6")
			h.eventuallyNotice("agent_kim", "c1", `this one goes then. "r6"`)
			clock.Advance(2 * time.Second)
			eventually(t, "five replies after the message", func() bool { return len(h.sentTo("c1")) == 6 })
			if d := h.deadLetters(); len(d) != 0 {
				t.Errorf("dead letters %q, want none: WeChat refused nothing", d)
			}
		})
	}
}

// TestQuotaCountsWhatReachesWeChatAfterAMessage: a reply that reaches WeChat
// after the customer's message counts under that message's quota, however
// it got there late: queued before the customer's previous message, a held
// reply released and failing once, or the later parts of a long reply.
// The bridge holds the reply WeChat would refuse; WeChat refuses nothing.
func TestQuotaCountsWhatReachesWeChatAfterAMessage(t *testing.T) {
	t.Run("queued before the previous message", func(t *testing.T) {
		h, clock := quotaHarness(t, harnessOptions{})
		ctx := context.Background()
		h.replyOnItsWay(clock)
		h.wx.SendText(ctx, "c1", "m1")                                          // r1 on its way
		m2 := h.wx.MessageXML("c1", "text", map[string]string{"Content": "m2"}) // WeChat has m2 now
		clock.Advance(1100 * time.Millisecond)
		eventually(t, "r1 in WeChat, after m2", func() bool { return len(h.sentTo("c1")) == 2 })
		h.wx.Push(ctx, m2) // the bridge has m2 within the second
		h.agentReplies("c1", "r2", "r3", "r4", "r5", "r6")
		h.holdsRefusingNothing(clock, "r6")
	})
	t.Run("a held reply released", func(t *testing.T) {
		h, clock := quotaHarness(t, harnessOptions{})
		ctx := context.Background()
		h.agentReplies("c1", "r1", "r2", "r3", "r4", "r5", "r6")
		h.eventuallyNotice("agent_kim", "c1", `this one goes then. "r6"`)
		eventually(t, "five replies", func() bool { return len(h.sentTo("c1")) == 5 })
		clock.Advance(2 * time.Second)
		h.wx.FailNextStatus(1, http.StatusBadGateway)
		h.wx.SendText(ctx, "c1", "m1") // releases r6, whose first attempt fails
		h.eventuallyFirstRetry("r6's first attempt failed")
		h.wx.SendText(ctx, "c1", "m2") // r6 reaches WeChat after it
		clock.Advance(2 * time.Second)
		eventually(t, "r6 in WeChat", func() bool { return len(h.sentTo("c1")) == 6 })
		h.agentReplies("c1", "r7", "r8", "r9", "r10", "r11")
		h.holdsRefusingNothing(clock, "r11")
	})
	t.Run("the later parts of a long reply", func(t *testing.T) {
		var h *harness
		parts := 0
		h, clock := quotaHarness(t, harnessOptions{wechat: fakes.WeChatOptions{OnSend: func(m fakes.CustomMessage) {
			if strings.HasPrefix(m.Text, "long") {
				if parts++; parts == 1 {
					h.wx.FailNextStatus(1, http.StatusBadGateway) // the second part's first attempt
				}
			}
		}}})
		ctx := context.Background()
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "r0")
		eventually(t, "r0 in WeChat", func() bool { return len(h.sentTo("c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "long "+strings.Repeat("word ", 1000)) // three parts
		h.eventuallyFirstRetry("the second part's first attempt failed")
		h.wx.SendText(ctx, "c1", "m2") // the later parts reach WeChat after it
		clock.Advance(2 * time.Second)
		eventually(t, "the long reply in WeChat", func() bool { return len(h.sentTo("c1")) == 4 })
		h.agentReplies("c1", "r7", "r8", "r9", "r10", "r11")
		h.holdsRefusingNothing(clock, "r9")
	})
}

// eventuallyFirstRetry waits for the first delivery to WeChat that failed
// and will be retried.
func (h *harness) eventuallyFirstRetry(what string) {
	h.t.Helper()
	eventually(h.t, what, func() bool {
		return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="wechat"} 1`)
	})
}

// quotaHarness starts a harness with o on a clock the test moves, WeChat
// retried each second of it, and customer c1's question with agent_kim.
func quotaHarness(t *testing.T, o harnessOptions) (*harness, *fakeClock) {
	t.Helper()
	o.clock = &fakeClock{now: time.Now()}
	env := map[string]string{"RETRY_MIN_DELAY": "1s", "RETRY_MAX_DELAY": "1s"}
	maps.Copy(env, o.env)
	o.env = env
	h := newHarness(t, o)
	h.wx.SendText(context.Background(), "c1", "question")
	eventually(t, "the question in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	return h, o.clock
}

// replyOnItsWay has agent_kim answer c1 twice: r0 reaches WeChat, and r1,
// two seconds later, fails its first attempt and waits for the clock.
func (h *harness) replyOnItsWay(clock *fakeClock) {
	h.t.Helper()
	h.agentReplies("c1", "r0")
	eventually(h.t, "r0 in WeChat: the bridge has a token", func() bool { return len(h.sentTo("c1")) == 1 })
	// The bridge records when r0 reached WeChat once WeChat has answered:
	// the clock moves after that, or r0 would count as arrived later.
	eventually(h.t, "r0's delivery recorded", func() bool { return outboxDepth(h.t, h.base) == 0 })
	clock.Advance(2 * time.Second) // r0 reached WeChat well before what follows
	h.wx.FailNextStatus(1, http.StatusBadGateway)
	h.agentReplies("c1", "r1")
	h.eventuallyFirstRetry("r1's first attempt failed")
}

// agentReplies sends agent_kim's replies to the customer openid, in order.
func (h *harness) agentReplies(openid string, texts ...string) {
	h.t.Helper()
	for _, text := range texts {
		if _, err := h.im.SendAsAgent(context.Background(), "agent_kim", customerIM(openid), text); err != nil {
			h.t.Fatal(err)
		}
	}
}

// holdsRefusingNothing checks that the bridge held the reply held, as
// WeChat would refuse it, and, once the deliveries due after a retry have
// gone (the clock moves), that WeChat refused none it was sent.
func (h *harness) holdsRefusingNothing(clock *fakeClock, held string) {
	h.t.Helper()
	h.eventuallyNotice("agent_kim", "c1", fmt.Sprintf("this one goes then. %q", held))
	clock.Advance(2 * time.Second)
	eventually(h.t, "the outbox empty", func() bool { return outboxDepth(h.t, h.base) == 0 })
	if d := h.deadLetters(); len(d) != 0 {
		h.t.Errorf("dead letters %q, want none: WeChat refused a reply the bridge sent", d)
	}
}

// TestPassiveRepliesSetEmpty: WELCOME_TEXT and CONNECTING_TEXT set empty
// send no passive reply: the follow and the first message are answered
// "success", and both still reach IM.
func TestPassiveRepliesSetEmpty(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"WELCOME_TEXT": "", "CONNECTING_TEXT": " "}})
	ctx := context.Background()
	for _, r := range []fakes.PushResult{h.wx.Follow(ctx, "c1"), h.wx.SendText(ctx, "c1", "hello")} {
		if r.Status != 200 || r.Reply != nil || r.Body != "success" {
			t.Errorf("answered %d %q, want success and no passive reply", r.Status, r.Body)
		}
	}
	eventually(t, "the message in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
}

// TestRetriedDeadLetterCountsInTheQuota: a dead letter days old that the
// operator sends again counts among the replies of the customer's latest
// message, so the agent's fifth reply after it is held, not refused.
func TestRetriedDeadLetterCountsInTheQuota(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		const token = "admin-token-value"
		h, clock := quotaHarness(t, harnessOptions{postgres: pg, env: map[string]string{"ADMIN_TOKEN": token}})
		ctx := context.Background()
		h.wx.FailNext(1, 45015) // outside the window, as WeChat sees it: given up at once
		h.agentReplies("c1", "r1")
		var list []DeadLetter
		eventually(t, "r1 a dead letter", func() bool {
			_, body := h.adminCall("GET", "/admin/deadletters", token)
			return json.Unmarshal([]byte(body), &list) == nil && len(list) == 1
		})
		h.wx.SendText(ctx, "c1", "later")
		eventually(t, "later in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
		clock.Advance(50 * time.Hour)
		h.wx.SendText(ctx, "c1", "back")
		eventually(t, "back in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 3 })
		if status, _ := h.adminCall("POST", fmt.Sprintf("/admin/deadletters/%d/retry", list[0].ID), token); status != http.StatusAccepted {
			t.Fatalf("retry: %d", status)
		}
		eventually(t, "r1 in WeChat", func() bool { return len(h.sentTo("c1")) == 1 })
		h.agentReplies("c1", "r2", "r3", "r4", "r5", "r6")
		h.holdsRefusingNothing(clock, "r6")
		if got := strings.Join(h.sentTexts("c1"), ","); got != "r1,r2,r3,r4,r5" {
			t.Errorf("c1 read %s, want r1 and four more", got)
		}
	})
}

// TestQuotaCountsAReplyThatArrivedLate: a reply that kept failing across
// the customer's messages and reached WeChat after their latest counts
// under it for that message's 48 hours, however old the reply, and after
// its outbox item's first day: of the agent's next five, the fifth is held.
func TestQuotaCountsAReplyThatArrivedLate(t *testing.T) {
	for _, tc := range []struct {
		name         string
		latest, then time.Duration // when the customer last wrote, and when the agent answers again
	}{
		{"a reply recorded 55 hours before", 40 * time.Hour, 55 * time.Hour},
		{"a day after it arrived", 3 * time.Hour, 28 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forStores(t, func(t *testing.T, pg bool) {
				h, clock := quotaHarness(t, harnessOptions{postgres: pg, env: map[string]string{"SESSION_IDLE_TIMEOUT": "0"}})
				ctx := context.Background()
				h.wx.FailNextStatus(1000, http.StatusBadGateway)
				h.agentReplies("c1", "r1")
				h.eventuallyFirstRetry("r1's first attempt failed")
				clock.Advance(30 * time.Minute)
				h.wx.SendText(ctx, "c1", "m2")
				eventually(t, "m2 in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
				clock.Advance(tc.latest - 30*time.Minute)
				h.wx.SendText(ctx, "c1", "m3")
				eventually(t, "m3 in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 3 })
				h.wx.FailNextStatus(0, 0)
				// An attempt under way as WeChat recovers fails and is due a
				// second later, by the clock: it moves till r1 is through.
				eventually(t, "r1 in WeChat after m3", func() bool {
					clock.Advance(100 * time.Millisecond)
					return len(h.sentTo("c1")) == 1
				})
				clock.Advance(tc.then - tc.latest) // the hourly prune runs meanwhile
				h.agentReplies("c1", "r2", "r3", "r4", "r5", "r6")
				h.holdsRefusingNothing(clock, "r6")
				if got := strings.Join(h.sentTexts("c1"), ","); got != "r1,r2,r3,r4,r5" {
					t.Errorf("c1 read %s", got)
				}
			})
		})
	}
}
