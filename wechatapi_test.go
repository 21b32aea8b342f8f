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

// TestMediaDownloadOutlastsVendorTimeout: a customer's media that takes
// longer than VENDOR_TIMEOUT to download, but not MEDIA_FETCH_TIMEOUT, is
// fetched; one that takes longer than MEDIA_FETCH_TIMEOUT fails as the
// file's own failure, not as a vendor's to retry.
func TestMediaDownloadOutlastsVendorTimeout(t *testing.T) {
	wx := fakes.NewWeChat(t, fakes.WeChatOptions{})
	o := wx.Options()
	c := &WeChatClient{Base: wx.URL, AppID: o.AppID, AppSecret: o.AppSecret, HTTP: &http.Client{Timeout: 200 * time.Millisecond}, Now: time.Now}
	ctx := context.Background()
	if _, err := c.accessToken(ctx, ""); err != nil {
		t.Fatal(err)
	}
	mediaID, _ := wx.AddMedia([]byte("#!AMR\n"), "audio/amr")
	wx.Delay(400 * time.Millisecond)
	for _, c2 := range []struct {
		timeout time.Duration
		fileErr bool
	}{{2 * time.Second, false}, {100 * time.Millisecond, true}} {
		f := newFetcher(nil, c2.timeout, "")
		fctx, cancel := f.deadline(ctx)
		sp, err := c.FetchMedia(fctx, f, mediaID)
		cancel()
		_, isFile := fileFailure(err)
		switch {
		case c2.fileErr && !isFile:
			t.Errorf("MEDIA_FETCH_TIMEOUT %s: %v, want the file's own failure", c2.timeout, err)
		case !c2.fileErr && err != nil:
			t.Errorf("MEDIA_FETCH_TIMEOUT %s: %v, want the media fetched", c2.timeout, err)
		}
		if sp != nil {
			sp.Close()
		}
	}
}
