package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

func TestUserSigRenewedBeforeItExpires(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	c := &IMClient{SDKAppID: 1400000001, SecretKey: "k", Admin: "administrator", SigLifetime: 10 * time.Hour, Now: clock.Now}
	if _, err := c.userSig(context.Background(), ""); err != nil {
		t.Fatal(err)
	}
	first := c.sigExpiry
	clock.Advance(7 * time.Hour)
	c.userSig(context.Background(), "")
	if c.sigExpiry != first {
		t.Error("the UserSig was renewed at 70% of its life")
	}
	clock.Advance(time.Hour + time.Second)
	c.userSig(context.Background(), "")
	if !c.sigExpiry.After(first) {
		t.Error("the UserSig was not renewed past 80% of its life")
	}
}

// History follows IM's pages, of MaxCnt messages or about 13 KB, to the end
// of the range, and returns the messages oldest first: within one second in
// the order of their MsgSeq, as the agent's client numbered them.
func TestHistoryReadsEveryPage(t *testing.T) {
	ctx := context.Background()
	start := time.Now().Truncate(time.Second)
	clk := &fakeClock{now: start}
	im := fakes.NewIM(t, fakes.IMOptions{Accounts: []string{"agent", "wx_c"}, Now: clk.Now})
	var want []string
	for i := range 230 {
		text := fmt.Sprintf("m%03d", i)
		if i%50 == 7 {
			text += strings.Repeat(" long", 1500) // pages end near 13 KB too
		}
		if _, err := im.SendAsAgent(ctx, "agent", "wx_c", text); err != nil {
			t.Fatal(err)
		}
		want = append(want, text[:4])
		if i%3 == 0 { // three messages a second, mostly
			clk.Advance(time.Second)
		}
	}
	o := im.Options()
	c := &IMClient{Base: im.URL, SDKAppID: o.SDKAppID, SecretKey: o.SecretKey, Admin: o.Admin, HTTP: http.DefaultClient,
		SigLifetime: time.Hour, Now: clk.Now}
	msgs, err := c.History(ctx, "agent", "wx_c", start.Unix(), clk.Now().Unix())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range msgs {
		got = append(got, callbackText(m.MsgBody)[:4])
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("history:\n%v\nwant:\n%v", got, want)
	}
	if pages := len(im.RequestsTo("/v4/openim/admin_getroammsg")); pages < 4 {
		t.Errorf("%d pages for 230 messages, some of 7 KB; want 4 or more", pages)
	}
}
