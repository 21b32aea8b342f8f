package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestErrorsHoldNoCredentials: a transport error of either client names the
// endpoint but not the UserSig, access_token or secrets in its query.
func TestErrorsHoldNoCredentials(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused

	im := &IMClient{Base: dead, SDKAppID: 1400000001, SecretKey: "im-secret-key", Admin: "administrator",
		HTTP: http.DefaultClient, SigLifetime: time.Hour, Now: time.Now}
	sig, _ := im.userSig(context.Background(), "")
	imErr := im.Send(context.Background(), textMessage("wx_o1", "agent", "hi", 1, 2))

	wx := &WeChatClient{Base: dead, AppID: "wx1", AppSecret: "app-secret", HTTP: http.DefaultClient, Now: time.Now}
	wx.token, wx.refresh = "ACCESS_TOKEN_SECRET", time.Now().Add(time.Hour)
	wxErr := wx.SendText(context.Background(), "o1", "hi")

	for _, err := range []error{imErr, wxErr} {
		if err == nil {
			t.Fatal("a call to a closed port succeeded")
		}
		for _, secret := range []string{sig, "im-secret-key", "ACCESS_TOKEN_SECRET", "app-secret", "usersig=", "access_token="} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error %q holds %q", err, secret)
			}
		}
		var ne net.Error
		if !errors.As(err, &ne) {
			t.Errorf("error %q no longer wraps the network error", err)
		}
	}
}
