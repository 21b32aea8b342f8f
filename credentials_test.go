package main

import (
	"context"
	"testing"

	"wechat-im-bridge/fakes"
)

// TestKeyRotationOnSharedStore: on one PostgreSQL database, a bridge
// restarted with a new IM_SECRET_KEY (the console's key rotated) sends the
// next message at once: the UserSig is shared under the key it was made
// with, and a refused one is renewed.
func TestKeyRotationOnSharedStore(t *testing.T) {
	h := newHarness(t, harnessOptions{postgres: true})
	ctx := context.Background()
	h.wx.SendText(ctx, "c1", "before the rotation")
	eventually(t, "the first message in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 1 })
	h.im.RotateKey("rotated-im-secret-key-0123456789abcdef0123456789abcdef")
	h.env["IM_SECRET_KEY"] = "rotated-im-secret-key-0123456789abcdef0123456789abcdef"
	h.restart()
	h.wx.SendText(ctx, "c1", "after the rotation")
	eventually(t, "the next message in IM", func() bool { return len(h.customerTexts("agent_kim", "c1")) == 2 })
}

// TestTwoAppsOneDatabase: two bridges of two Official Accounts and two IM
// apps on one PostgreSQL database each use their own access_token and
// UserSig: messages and replies flow in both, none crosses.
func TestTwoAppsOneDatabase(t *testing.T) {
	a := newHarness(t, harnessOptions{postgres: true})
	b := newHarness(t, harnessOptions{external: true,
		wechat: fakes.WeChatOptions{AppID: "wx0second0app00", AppSecret: "second-app-secret-0123456789abcdef"},
		im:     fakes.IMOptions{SDKAppID: 1400000002, SecretKey: "second-im-secret-key-0123456789abcdef0123456789ab"}})
	b.env["DATABASE_URL"] = a.env["DATABASE_URL"]
	b.start()
	ctx := context.Background()
	for i, h := range []*harness{a, b, a, b} {
		c := []string{"oa_customer", "ob_customer"}[i%2] // openids are an Official Account's own
		n := len(h.customerTexts("agent_kim", c))
		h.wx.SendText(ctx, c, "hello")
		eventually(t, "the message in IM", func() bool { return len(h.customerTexts("agent_kim", c)) == n+1 })
		m := len(h.sentTo(c))
		h.im.SendAsAgent(ctx, "agent_kim", customerIM(c), "an answer")
		eventually(t, "the answer in WeChat", func() bool { return len(h.sentTo(c)) == m+1 })
	}
}
