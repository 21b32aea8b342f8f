package main

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"

	"wechat-im-bridge/fakes"
)

// TestNoSecretInLogsOrAnswers runs the whole flow in safe mode at debug
// level, with failures of both vendors, refused input, and an IM that
// cannot be reached, and checks that no credential appears in the logs or
// in any answer the bridge gave.
func TestNoSecretInLogsOrAnswers(t *testing.T) {
	const cbToken = "callback-token-secret"
	h := newHarness(t, harnessOptions{
		wechat: fakes.WeChatOptions{Mode: fakes.ModeSafe, EncodingAESKey: testAESKey},
		im:     fakes.IMOptions{CallbackToken: cbToken},
		env:    map[string]string{"WECHAT_AES_KEY": testAESKey, "IM_CALLBACK_TOKEN": cbToken, "LOG_LEVEL": "debug"},
	})
	ctx := context.Background()
	var answers []string
	keep := func(r fakes.PushResult) { answers = append(answers, r.Body) }

	keep(h.wx.Follow(ctx, customer))
	h.im.FailNextStatus(1, http.StatusBadGateway)
	keep(h.wx.SendText(ctx, customer, question))
	eventually(t, "the question in IM", func() bool { return len(h.im.Messages()) == 1 })
	h.im.FailNext(1, 70001)
	keep(h.wx.SendText(ctx, customer, "second"))
	eventually(t, "the second message in IM", func() bool { return len(h.im.Messages()) == 2 })

	h.wx.ExpireToken()
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) == 1 })
	h.wx.FailNext(1, -1)
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "again")
	eventually(t, "the second answer in WeChat", func() bool { return len(h.wx.Sent()) == 2 })

	_, a := post(t, h.base+"/imcallback?"+signedCallback("wrong-token", cbAfterSendMsg, 0), `{}`)
	answers = append(answers, a)
	status, a := post(t, h.base+"/wechat?signature=bad&timestamp=1&nonce=2", `<xml/>`)
	answers = append(answers, a)
	if status != 403 {
		t.Errorf("bad push got %d", status)
	}

	// IM unreachable: Go's HTTP client writes the whole URL, usersig
	// included, into its error.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	h.env["IM_API_BASE"] = "http://" + ln.Addr().String()
	ln.Close()
	h.restart()
	keep(h.wx.SendText(ctx, customer, "third"))
	eventually(t, "a failed call to the unreachable IM", func() bool { return strings.Contains(h.logs.String(), "connection refused") })

	for _, cb := range h.im.Callbacks() {
		answers = append(answers, cb.Answer)
	}
	secrets := map[string]string{
		"AppSecret": h.wx.Options().AppSecret, "IM secret key": h.im.Options().SecretKey,
		"callback token": cbToken, "EncodingAESKey": testAESKey,
	}
	for i, r := range h.im.Requests() {
		if sig := r.Query.Get("usersig"); sig != "" {
			secrets["UserSig "+string(rune('a'+i%26))] = sig
		}
	}
	for _, r := range h.wx.RequestsTo("/cgi-bin/message/custom/send") {
		secrets["access_token "+r.Query.Get("access_token")[:20]] = r.Query.Get("access_token")
	}
	if len(secrets) < 7 {
		t.Fatalf("collected only %d secrets: the run did not exercise both clients", len(secrets))
	}
	logs := h.logs.String()
	for name, s := range secrets {
		if strings.Contains(logs, s) {
			t.Errorf("the logs hold the %s", name)
		}
		for _, a := range answers {
			if strings.Contains(a, s) {
				t.Errorf("an answer holds the %s: %q", name, a)
			}
		}
	}
	for _, marker := range []string{"usersig=", "access_token=", "secret="} {
		if strings.Contains(logs, marker) {
			t.Errorf("the logs hold %q", marker)
		}
	}
}
