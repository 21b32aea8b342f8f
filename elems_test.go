package main

import (
	"context"
	"encoding/json"
	"testing"
)

// TestLocationCrossesNatively: a customer's location reaches the agent as a
// TIMLocationElem with WeChat's label and coordinates, exactly, which any IM
// client shows as a map pin.
func TestLocationCrossesNatively(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	fields := map[string]string{"Location_X": "31.230416", "Location_Y": "121.473701", "Scale": "15", "Label": "上海市人民广场"}
	if r := h.wx.SendMessage(ctx, customer, "location", fields); r.Status != 200 {
		t.Fatalf("push answered %d", r.Status)
	}
	eventually(t, "the location in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	sends := h.im.RequestsTo("/v4/openim/sendmsg")
	goldenJSON(t, "im_sendmsg_location.json", sends[0].Body, "MsgSeq", "MsgRandom")
	var m SendMsg
	if err := json.Unmarshal(sends[0].Body, &m); err != nil {
		t.Fatal(err)
	}
	c := m.MsgBody[0].MsgContent
	if m.MsgBody[0].MsgType != "TIMLocationElem" || c["Desc"] != "上海市人民广场" || c["Latitude"] != 31.230416 || c["Longitude"] != 121.473701 {
		t.Errorf("IM got %+v, want the label and coordinates exactly", m.MsgBody)
	}
}

// TestAgentLocationReachesCustomerAsMapLink: an agent's location reaches the
// customer as the place's name and a link that opens a map marked there.
func TestAgentLocationReachesCustomerAsMapLink(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, map[string]any{"MsgType": "TIMLocationElem",
		"MsgContent": map[string]any{"Desc": "上海市人民广场", "Latitude": 31.230416, "Longitude": 121.473701}})
	eventually(t, "the place in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
	want := "上海市人民广场\nhttps://uri.amap.com/marker?name=%E4%B8%8A%E6%B5%B7%E5%B8%82%E4%BA%BA%E6%B0%91%E5%B9%BF%E5%9C%BA&position=121.473701%2C31.230416"
	if got := h.sentTo(customer)[0].Text; got != want {
		t.Errorf("the customer read %q, want %q", got, want)
	}
}
