package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
)

// TestCommandsOnlyFromTheirAgent: /end and /transfer work only for the
// conversation's agent; another agent is told it is not theirs, and
// nothing changes.
func TestCommandsOnlyFromTheirAgent(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, agents: []string{"agent_kim", "agent_lee"}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_lee", customerIM("c1"), "/end")
		h.eventuallyNotice("agent_lee", "c1", "Not done: the conversation is agent_kim's, and only they can end it.")
		h.im.SendAsAgent(ctx, "agent_lee", customerIM("c1"), "/transfer agent_lee")
		h.eventuallyNotice("agent_lee", "c1", "Not done: the conversation is agent_kim's, and only they can transfer it.")
		h.wx.SendText(ctx, "c1", "still there?")
		eventually(t, "c1's message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
		if n := len(h.sentTo("c1")); n != 0 {
			t.Errorf("c1 got %d messages, want none: nothing was ended or transferred", n)
		}
	})
}

// TestTransferRespectsTheCap: a transfer to an agent who holds
// IM_AGENT_MAX_OPEN conversations is refused, and says so.
func TestTransferRespectsTheCap(t *testing.T) {
	h := newHarness(t, harnessOptions{agents: []string{"agent_kim", "agent_lee"}, env: map[string]string{"IM_AGENT_MAX_OPEN": "1"}})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	h.wx.SendText(ctx, "c2", "hello too")
	eventually(t, "c1 with agent_kim, c2 with agent_lee", func() bool {
		return len(h.customerTexts("agent_kim", "c1")) == 1 && len(h.customerTexts("agent_lee", "c2")) == 1
	})
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/transfer agent_lee")
	h.eventuallyNotice("agent_kim", "c1", "Not transferred: agent_lee has 1 open conversations, as many as IM_AGENT_MAX_OPEN allows.")
	h.wx.SendText(ctx, "c1", "and?")
	eventually(t, "c1's message to agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
}

// TestUnfollowTellsTheAgent: a customer who unfollows closes their
// conversation, and its agent is told.
func TestUnfollowTellsTheAgent(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.wx.Unfollow(ctx, "c1")
	h.eventuallyNotice("agent_kim", "c1", "The customer unfollowed the Official Account: the conversation is closed")
}

// TestRatingOnlyWhenAsked: a customer's "5" is their rating only if the
// question reached them: with WeChat's quota spent, or RATING_TEXT set
// empty (then nothing is asked, and nothing empty is sent), it is a
// message like any other.
func TestRatingOnlyWhenAsked(t *testing.T) {
	t.Run("quota spent", func(t *testing.T) {
		h := newHarness(t, harnessOptions{})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		for _, r := range []string{"r1", "r2", "r3", "r4", "r5"} {
			h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), r)
		}
		eventually(t, "five replies", func() bool { return len(h.sentTo("c1")) == 5 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
		h.eventuallyNotice("agent_kim", "c1", "Conversation ended.")
		if got := replyText(h.wx.SendText(ctx, "c1", "5")); got == replyRated {
			t.Fatalf("the customer's 5 was taken as a rating they were never asked for")
		}
		eventually(t, "the 5 in IM", func() bool { return strings.HasSuffix(strings.Join(h.customerTexts("agent_kim", "c1"), "|"), "|5") })
	})
	t.Run("no question", func(t *testing.T) {
		h := newHarness(t, harnessOptions{env: map[string]string{"RATING_TEXT": "", "CLOSED_TEXT": ""}})
		ctx := context.Background()
		h.wx.SendText(ctx, "c1", "hello")
		eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
		h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
		h.eventuallyNotice("agent_kim", "c1", "Conversation ended.")
		h.wx.SendText(ctx, "c1", "5")
		eventually(t, "the 5 in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
		if n := len(h.sentTo("c1")); n != 0 {
			t.Errorf("c1 got %d messages, want none: both texts are set empty", n)
		}
	})
}

// TestCustomerCannotPassForTheBridge: a customer's text that begins like
// the bridge's notices, in any width or case, with invisible characters
// or letters that look alike, reaches the agent behind [customer].
func TestCustomerCannotPassForTheBridge(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	spoofs := []string{"[bridge] Transferred to you by agent_lee.", "\u200b [Bridge] refund approved", "【ＢＲＩＤＧＥ】 hello", "[brіdgе] Cyrillic",
		"[b\u034fridge] a combining joiner", "[bridge\ufe0f] a variation selector", "[\U0001d41bridge] mathematical bold",
		"\u2800[bridge] a Braille blank", "\u3164[bridge] a Hangul filler", "[ʙʀɪᴅɢᴇ] small capitals", "⁅bridge⁆ other brackets"}
	for i, text := range spoofs {
		h.wx.SendText(ctx, "c1", text)
		eventually(t, "the message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == i+1 })
	}
	h.wx.SendText(ctx, "c1", "[微笑] thanks")
	eventually(t, "the last message", func() bool { return len(h.customerTexts("agent_kim", "c1")) == len(spoofs)+1 })
	got := h.customerTexts("agent_kim", "c1")
	for i, text := range spoofs {
		if got[i] != customerMark+text {
			t.Errorf("the agent read %q, want %q", got[i], customerMark+text)
		}
	}
	if got[len(spoofs)] != "[微笑] thanks" {
		t.Errorf("the agent read %q for a text that is no spoof", got[len(spoofs)])
	}
}

// TestRatingArmedWhenAsked: the customer's next message is their rating
// only once the question reached them: a "3" sent while WeChat has not
// yet taken the question is a message.
func TestRatingArmedWhenAsked(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"RETRY_MIN_DELAY": "2s", "RETRY_MAX_DELAY": "2s"}})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "hello")
	eventually(t, "c1 with agent_kim", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "Anything else?")
	eventually(t, "the reply: the bridge has a token", func() bool { return len(h.sentTo("c1")) == 1 })
	h.wx.FailNextStatus(1, http.StatusBadGateway)
	h.im.SendAsAgent(ctx, "agent_kim", customerIM("c1"), "/end")
	eventually(t, "the question's first attempt failed", func() bool {
		return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="wechat"} 1`)
	})
	if got := replyText(h.wx.SendText(ctx, "c1", "3")); got == replyRated {
		t.Fatal("the customer's 3 was taken as a rating before the question reached them")
	}
	eventually(t, "the 3 in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
}
