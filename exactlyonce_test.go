package main

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"wechat-im-bridge/fakes"
)

// exactlyOnceHarness is a bridge whose calls time out fast and whose
// retries come after IM's deduplication, shortened to one second, has
// ended: each retry of an unanswered sendmsg must ask IM's history first.
func exactlyOnceHarness(t *testing.T) *harness {
	return newHarness(t, harnessOptions{im: fakes.IMOptions{DedupWindow: 1e9}, env: map[string]string{
		"IM_DEDUP_WINDOW": "1s", "VENDOR_TIMEOUT": "300ms", "RETRY_MIN_DELAY": "2s", "RETRY_MAX_DELAY": "2s"}})
}

// TestUnansweredSendFoundInHistory: IM carries out a sendmsg whose answer
// never comes (the bridge's call times out); the retry, past IM's
// deduplication, finds the message in the conversation's history and
// records it delivered: the agent sees it once.
func TestUnansweredSendFoundInHistory(t *testing.T) {
	h := exactlyOnceHarness(t)
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	release := h.im.Hold()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the attempt timed out", func() bool { return strings.Contains(h.logs.String(), "delivery failed, will retry") })
	release() // IM carries the call out, with nobody reading its answer
	eventually(t, "the message found in IM's history", func() bool {
		return strings.Contains(h.metricsText(), `bridge_uncertain_attempts_total{outcome="found",target="im"} 1`)
	})
	if n := len(h.messagesTo("agent_kim")); n != 1 {
		t.Errorf("the agent received the message %d times, want once", n)
	}
	if n := len(h.im.RequestsTo("/v4/openim/sendmsg")); n != 1 {
		t.Errorf("got %d sendmsg calls, want the one IM carried out", n)
	}
}

// TestUnansweredSendAbsentFromHistory: a sendmsg that failed without an
// answer IM can be trusted on (HTTP 502) and that IM did not carry out is
// looked for, not found, and sent again: the agent sees it once.
func TestUnansweredSendAbsentFromHistory(t *testing.T) {
	h := exactlyOnceHarness(t)
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	h.im.FailNextStatus(1, http.StatusBadGateway)
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the message in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	if m := h.metricsText(); !strings.Contains(m, `bridge_uncertain_attempts_total{outcome="absent",target="im"} 1`) {
		t.Errorf("the retry did not look in IM's history first:\n%s", grepLines(m, "uncertain"))
	}
}

// TestUnansweredReplyCounted: custom/send has no key to drop a repeat by
// and no history to ask, so a reply whose answer never came is sent again,
// and counted: the customer may read it twice, as the README says.
func TestUnansweredReplyCounted(t *testing.T) {
	h := exactlyOnceHarness(t)
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "first") // the access_token is fetched
	eventually(t, "the first reply", func() bool { return len(h.sentTo(customer)) == 1 })
	release := h.wx.Hold()
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the attempt timed out", func() bool { return strings.Contains(h.logs.String(), "delivery failed, will retry") })
	release()
	eventually(t, "the reply sent again", func() bool { return len(h.sentTo(customer)) == 3 })
	if s := h.sentTo(customer); s[1].Text != answer || s[2].Text != answer {
		t.Errorf("the customer read %q and %q, want the answer twice", s[1].Text, s[2].Text)
	}
	if m := h.metricsText(); !strings.Contains(m, `bridge_uncertain_attempts_total{outcome="resent",target="wechat"} 1`) {
		t.Errorf("the resend is not counted:\n%s", grepLines(m, "uncertain"))
	}
}

// grepLines returns the lines of s that hold sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestUnansweredNoticeFoundInHistory: a notice to an agent is looked for in
// IM's history as a customer's message is, when its attempt went
// unanswered and the retry comes past IM's deduplication.
func TestUnansweredNoticeFoundInHistory(t *testing.T) {
	h := exactlyOnceHarness(t)
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	release := h.im.Hold()                                           // the notice's sendmsg will go unanswered
	h.wx.FailNext(1, 45047)                                          // the reply ends as a dead letter: the agent is told
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer) // callbacks are not held
	eventually(t, "the notice's attempt timed out", func() bool { return strings.Contains(h.logs.String(), "kind=im_notice") })
	release()
	eventually(t, "the notice found in IM's history", func() bool {
		return strings.Contains(h.metricsText(), `bridge_uncertain_attempts_total{outcome="found",target="im"} 1`)
	})
	var notices int
	for _, m := range h.messagesTo("agent_kim") {
		if bridgeNotice(m) {
			notices++
		}
	}
	if notices != 1 {
		t.Errorf("the agent was told %d times, want once", notices)
	}
}
