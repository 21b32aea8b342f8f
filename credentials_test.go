package main

import (
	"context"
	"io"
	"strings"
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

// TestOneAppADatabase: a bridge of another Official Account and IM app
// does not start on a database that serves one (on PostgreSQL beside a
// running bridge; on SQLite after it stopped), naming both apps; the
// first one's messages flow on.
func TestOneAppADatabase(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		a := newHarness(t, harnessOptions{postgres: pg})
		b := newHarness(t, harnessOptions{external: true,
			wechat: fakes.WeChatOptions{AppID: "wx0second0app00", AppSecret: "second-app-secret-0123456789abcdef"},
			im:     fakes.IMOptions{SDKAppID: 1400000002, SecretKey: "second-im-secret-key-0123456789abcdef0123456789ab"}})
		b.env["DATABASE_URL"] = a.env["DATABASE_URL"]
		if !pg {
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
		}
		err := run(context.Background(), nil, mapEnv(b.env), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "serves WeChat app "+a.env["WECHAT_APPID"]) ||
			!strings.Contains(err.Error(), "this bridge WeChat app wx0second0app00 with IM app 1400000002") {
			t.Fatalf("a bridge of another app on the database: %v, want it refused, naming both apps", err)
		}
		if !pg {
			a.start()
		}
		a.wx.SendText(context.Background(), customer, question)
		eventually(t, "the question in IM", func() bool { return len(a.messagesTo("agent_kim")) == 1 })
		if n := len(b.im.Requests()) + len(b.wx.Requests()); n != 0 {
			t.Errorf("the refused bridge made %d calls to its vendors", n)
		}
	})
}
