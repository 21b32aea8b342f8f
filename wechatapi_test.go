package main

import (
	"context"
	"net/http"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// TestAccessTokenCachedUntilNearExpiry: one stable_token call serves every
// send until the token is within five minutes of expiring.
func TestAccessTokenCachedUntilNearExpiry(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	wx := fakes.NewWeChat(t, fakes.WeChatOptions{Now: clock.Now})
	o := wx.Options()
	c := &WeChatClient{Base: wx.URL, AppID: o.AppID, AppSecret: o.AppSecret, HTTP: http.DefaultClient, Now: clock.Now}
	wx.MessageXML("o1", "text", map[string]string{"Content": "hi"}) // opens the reply window

	ctx := context.Background()
	for range 3 {
		if err := c.SendText(ctx, "o1", "hi"); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(wx.RequestsTo("/cgi-bin/stable_token")); n != 1 {
		t.Errorf("got %d stable_token calls for three sends, want 1", n)
	}
	clock.Advance(7200*time.Second - 4*time.Minute)
	if err := c.SendText(ctx, "o1", "hi"); err != nil {
		t.Fatal(err)
	}
	if n := len(wx.RequestsTo("/cgi-bin/stable_token")); n != 2 {
		t.Errorf("got %d stable_token calls, want 2 once the token is near its end", n)
	}
}
