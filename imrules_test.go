package main

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
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
