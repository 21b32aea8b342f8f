package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
)

// One passing 503 from media/get, at the item's third attempt (the first two
// fetched fine and failed at IM), gives the photo up for good.
func TestZZOneFetchFailureGivesUp(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com",
		"RETRY_MIN_DELAY": "700ms", "RETRY_MAX_DELAY": "1s"}})
	ctx := context.Background()
	h.agentReady()
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "One moment.")
	eventually(t, "token", func() bool { return len(h.sentTo(customer)) == 1 })
	base := len(h.im.RequestsTo("/v4/openim/sendmsg"))
	mediaID, picURL := h.wx.AddMedia(testPNG(t, 3, 2), "image/png")
	h.im.FailNextStatus(2, http.StatusInternalServerError)
	h.wx.SendMessage(ctx, customer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
	eventually(t, "two IM failures", func() bool { return len(h.im.RequestsTo("/v4/openim/sendmsg")) == base+2 })
	h.wx.FailNextStatus(1, http.StatusServiceUnavailable)
	eventually(t, "delivered", func() bool { return len(h.customerTexts("agent_kim", customer)) == 2 })
	got := h.customerTexts("agent_kim", customer)[1]
	t.Logf("media/get calls: %d; agent read %q", len(h.wx.RequestsTo("/cgi-bin/media/get")), got)
	if strings.Contains(got, "not carried") {
		t.Errorf("a single passing fetch failure gave the photo up")
	}
}
