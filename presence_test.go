package main

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// TestTransferTakesPendingMessages: a customer's message still in the
// outbox when its conversation is transferred (IM failing for a moment)
// reaches the new agent, not the old one.
func TestTransferTakesPendingMessages(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"},
			env: map[string]string{"RETRY_MIN_DELAY": "1s", "RETRY_MAX_DELAY": "1s"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1's message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.FailNextStatus(1, 502)
		h.wx.SendText(ctx, "c1", "are you there?")
		eventually(t, "the message's first attempt failed", func() bool {
			return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="im"} 1`)
		})
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/transfer agent_lee")
		eventually(t, "the message to agent_lee", func() bool {
			return strings.Join(h.customerTexts("agent_lee", "c1"), "|") == "are you there?"
		})
		if got := h.customerTexts("agent_kim", "c1"); len(got) != 1 {
			t.Errorf("agent_kim read %q from c1, want only the first message", got)
		}
	})
}

// TestLogoutRequeuesWaitingCustomers: an agent who logs out leaves the
// conversations whose customer wrote last: each goes back to the queue,
// ahead of new arrivals, and to the next free agent, who first reads how
// it went; the customer reads AGENT_JOINED_TEXT; the agent who left is
// told. A conversation the agent answered last stays theirs.
func TestLogoutRequeuesWaitingCustomers(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"},
			im: fakes.IMOptions{Online: []string{"agent_kim"}}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "my order is late")
		h.wx.SendText(ctx, "c2", "thanks!")
		eventually(t, "both with agent_kim", func() bool {
			return len(h.customerTexts("agent_kim", "c1")) == 1 && len(h.customerTexts("agent_kim", "c2")) == 1
		})
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c2"), "You are welcome.")
		eventually(t, "the answer to c2", func() bool { return len(h.sentTo("c2")) == 1 })
		h.im.Logout(ctx, "agent_kim")
		h.im.Login(ctx, "agent_lee")
		h.eventuallyNotice("agent_lee", "c1", "agent_kim was away, and the customer wrote: the conversation is yours now. The last messages:\ncustomer: my order is late")
		h.eventuallyNotice("agent_kim", "c1", "The customer wrote while you were away: the conversation went to the next free agent.")
		eventually(t, "c1 told an agent joined", func() bool {
			return strings.Join(h.sentTexts("c1"), "|") == defaultDeskTexts.Joined
		})
		h.wx.SendText(ctx, "c1", "hello?")
		h.wx.SendText(ctx, "c2", "one more thing")
		eventually(t, "c1's next message to agent_lee", func() bool { return len(h.customerTexts("agent_lee", "c1")) == 1 })
		eventually(t, "c2's next message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c2")) == 2 })
	})
}

// TestDisconnectGrace: an agent who loses their connection keeps their
// conversations for AGENT_AWAY_GRACE; if they do not log in again within
// it, the customers who wrote meanwhile go to the next free agent.
func TestDisconnectGrace(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		clock := &fakeClock{now: time.Now()}
		h := newHarness(t, harnessOptions{postgres: pg, clock: clock, agents: []string{"agent_kim", "agent_lee"},
			env: map[string]string{"AGENT_AWAY_GRACE": "5m"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.Disconnect(ctx, "agent_kim")
		h.wx.SendText(ctx, "c1", "still there?")
		eventually(t, "the message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
		clock.Advance(4 * time.Minute)
		h.wx.SendText(ctx, "c2", "hi") // agent_kim is offline by a reading: agent_lee takes c2
		eventually(t, "c2 with agent_lee", func() bool { return len(h.customerTexts("agent_lee", "c2")) == 1 })
		if got := h.noticesTo("agent_lee", "c1"); len(got) != 0 {
			t.Fatalf("agent_lee read %q within the grace", got)
		}
		clock.Advance(2 * time.Minute)
		h.eventuallyNotice("agent_lee", "c1", "agent_kim was away, and the customer wrote")
	})
}

// TestOnlineOnAnotherDevice: an agent who loses one device while logged in
// on another stays online and keeps their customers: the Disconnect is
// checked by a reading, which says Online.
func TestOnlineOnAnotherDevice(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	h := newHarness(t, harnessOptions{clock: clock, agents: []string{"agent_kim", "agent_lee"},
		im: fakes.IMOptions{Online: []string{"agent_kim"}}})
	ctx := context.Background()
	h.im.LoginOn(ctx, "agent_kim", "iOS")
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	reads := len(h.im.RequestsTo("/v4/openim/query_online_status"))
	h.im.DisconnectOn(ctx, "agent_kim", "iOS")
	eventually(t, "a reading after the Disconnect", func() bool {
		return len(h.im.RequestsTo("/v4/openim/query_online_status")) > reads
	})
	h.wx.SendText(ctx, "c1", "and?")
	clock.Advance(10 * time.Minute)
	h.wx.SendText(ctx, "c2", "hi")
	eventually(t, "c2's message", func() bool { return len(h.customerTexts("agent_kim", "c2")) == 1 })
	h.wx.SendText(ctx, "c3", "a sweep's witness")
	eventually(t, "c1's second message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
	if got := h.noticesTo("agent_kim", "c1"); len(got) != 0 {
		t.Errorf("agent_kim was told %q: they never left", got)
	}
}

// TestReadingNeverUndoesALaterWord: a reading of presence asked for before
// a Logout, and answered after it, leaves the agent offline.
func TestReadingNeverUndoesALaterWord(t *testing.T) {
	var h *harness
	var once sync.Once
	armed := make(chan struct{})
	opts := fakes.IMOptions{Online: []string{"agent_kim"}, OnStatusRead: func() {
		select {
		case <-armed:
			once.Do(func() { h.im.Logout(context.Background(), "agent_kim") }) // while the reading is on its way
		default:
		}
	}}
	h = newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}, im: opts})
	ctx := context.Background()
	h.im.LoginOn(ctx, "agent_lee", "Web")
	h.im.LoginOn(ctx, "agent_kim", "iOS")
	close(armed)
	h.im.DisconnectOn(ctx, "agent_kim", "iOS") // asks for a reading: agent_kim is Online on the Web when it is read
	eventually(t, "the reading taken", func() bool { return strings.Count(h.logs.String(), "agents' presence read from IM") >= 2 })
	for i := range 3 {
		openid := "c" + string(rune('1'+i))
		h.wx.SendText(ctx, openid, "hello")
		eventually(t, openid+"'s message", func() bool { return len(h.customerTexts("agent_lee", openid)) == 1 })
	}
}

// TestRemovedAgentsConversationsRequeued: an agent no longer in IM_AGENTS
// has their conversations taken from them when the bridge starts: each
// goes to the next free agent, who reads how it went.
func TestRemovedAgentsConversationsRequeued(t *testing.T) {
	h := newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.env["IM_AGENTS"] = "agent_lee"
	h.restart()
	h.eventuallyNotice("agent_lee", "c1", "agent_kim was away, and the customer wrote: the conversation is yours now.")
	h.wx.SendText(ctx, "c1", "hello?")
	eventually(t, "c1's next message to agent_lee", func() bool { return len(h.customerTexts("agent_lee", "c1")) == 1 })
	if got := h.noticesTo("agent_kim", "c1"); len(got) != 0 {
		t.Errorf("agent_kim, no longer an agent, was told %q", got)
	}
}

// TestLogoutOnOneDevice: an agent who logs out of one device while online
// on another keeps their conversations: the reading after the Logout says
// Online.
func TestLogoutOnOneDevice(t *testing.T) {
	h := newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}, sweepEvery: 20 * time.Millisecond})
	ctx := context.Background()
	h.im.LoginOn(ctx, "agent_kim", "iOS")
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	reads := strings.Count(h.logs.String(), "agents' presence read from IM")
	h.im.LogoutOn(ctx, "agent_kim", "iOS")
	eventually(t, "the reading after the Logout", func() bool {
		return strings.Count(h.logs.String(), "agents' presence read from IM") > reads
	})
	sweeps := metricValue(h.metricsText(), "bridge_desk_sweeps_total")
	eventually(t, "a sweep after the reading", func() bool { return metricValue(h.metricsText(), "bridge_desk_sweeps_total") != sweeps })
	h.wx.SendText(ctx, "c1", "still there?")
	eventually(t, "c1's message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
	if got := h.noticesTo("agent_kim", "c1"); len(got) != 0 {
		t.Errorf("agent_kim was told %q: they are online on the Web", got)
	}
}

// TestWaitingMessageNotSentWhenClosed: a customer's message still on its
// way when its conversation went back to the queue, and then closed there
// (the customer unfollowed), is not sent, and says so in the history.
func TestWaitingMessageNotSentWhenClosed(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"RETRY_MIN_DELAY": "3s", "RETRY_MAX_DELAY": "3s", "ADMIN_TOKEN": "t0ken-for-the-history"},
		sweepEvery: 20 * time.Millisecond})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.im.FailNextStatus(1, http.StatusBadGateway)
	h.wx.SendText(ctx, "c1", "my parcel")
	eventually(t, "the message's first attempt failed", func() bool {
		return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="im"} 1`)
	})
	h.im.Logout(ctx, "agent_kim")
	eventually(t, "the conversation back in the queue", func() bool { return strings.Contains(h.metricsText(), "bridge_customers_waiting 1") })
	h.wx.Unfollow(ctx, "c1")
	eventually(t, "the message not sent", func() bool {
		for _, c := range h.history("c1") {
			for _, m := range c.Messages {
				if m.Text == "my parcel" {
					return m.State == string(stateNotSent)
				}
			}
		}
		return false
	})
	if got := h.customerTexts("agent_kim", "c1"); len(got) != 1 {
		t.Errorf("agent_kim read %q, want only the first message", got)
	}
}

// TestLongMessageParkedWhole: a long message on its way when its
// conversation goes back to the queue waits whole, and reaches the agent
// who takes the conversation once, all its parts, none to the agent who
// left.
func TestLongMessageParkedWhole(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}, im: fakes.IMOptions{Online: []string{"agent_kim"}},
			env: map[string]string{"RETRY_MIN_DELAY": "2s", "RETRY_MAX_DELAY": "2s", "ADMIN_TOKEN": "t0ken-for-the-history"}, sweepEvery: 20 * time.Millisecond})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		long := strings.Repeat("가나다라 마바사 ", 1500) // two parts at IM's 12 KB
		h.im.FailNextStatus(1, http.StatusBadGateway)
		h.wx.SendText(ctx, "c1", long)
		eventually(t, "the first part's attempt failed", func() bool {
			return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="im"} 1`)
		})
		h.im.Logout(ctx, "agent_kim")
		state := func() string {
			for _, c := range h.history("c1") {
				for _, m := range c.Messages {
					if m.Text == long {
						return m.State
					}
				}
			}
			return ""
		}
		eventually(t, "the message waiting with its conversation", func() bool { return state() == string(stateWaiting) })
		h.im.Login(ctx, "agent_lee")
		eventually(t, "the message delivered", func() bool { return state() == string(stateDelivered) })
		eventually(t, "every part with agent_lee", func() bool { return len(strings.Join(h.customerTexts("agent_lee", "c1"), "")) >= len(long) })
		got := h.customerTexts("agent_lee", "c1")
		if strings.Join(got, "") != long {
			t.Errorf("agent_lee read %d messages of %d bytes in all, want the message once (%d bytes)", len(got), len(strings.Join(got, "")), len(long))
		}
		if n := len(h.customerTexts("agent_kim", "c1")); n != 1 {
			t.Errorf("agent_kim read %d messages from c1, want the first only", n)
		}
	})
}
