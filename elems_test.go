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
