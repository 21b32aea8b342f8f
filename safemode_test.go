package main

import (
	"context"
	"strings"
	"testing"

	"wechat-im-bridge/fakes"
)

// TestEncryptionModes plays follow, question and answer in each of the
// console's three modes, with the bridge holding the AES key (so it takes
// plaintext pushes too, as in compatible mode). The fake checks that the
// replies are encrypted as each mode requires.
func TestEncryptionModes(t *testing.T) {
	for _, mode := range []string{fakes.ModePlaintext, fakes.ModeCompatible, fakes.ModeSafe} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, harnessOptions{
				wechat: fakes.WeChatOptions{Mode: mode, EncodingAESKey: testAESKey},
				env:    map[string]string{"WECHAT_AES_KEY": testAESKey},
			})
			ctx := context.Background()
			if r := h.wx.Follow(ctx, customer); r.Reply == nil || r.Reply.Content != defaultWelcomeText {
				t.Fatalf("follow got %q, want the welcome", r.Body)
			}
			r := h.wx.SendText(ctx, customer, question)
			if r.Reply == nil || r.Reply.Content != defaultConnectingText {
				t.Fatalf("question got %q, want the connecting text", r.Body)
			}
			if encrypted := strings.Contains(r.Body, "<Encrypt>"); encrypted != (mode != fakes.ModePlaintext) {
				t.Errorf("reply %q: encrypted %v in %s mode", r.Body, encrypted, mode)
			}
			eventually(t, "the question in IM", func() bool { return len(h.im.Messages()) == 1 })
			if got := h.im.Messages()[0].Text; got != question {
				t.Errorf("agent read %q, want %q", got, question)
			}
			h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
			eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) == 1 })
		})
	}
}

// TestAESKeyRotation: after the operator changes the EncodingAESKey in the
// console, pushes made with either key are taken, and each reply is
// encrypted with the key its push used.
func TestAESKeyRotation(t *testing.T) {
	const newKey = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg"
	h := newHarness(t, harnessOptions{
		wechat: fakes.WeChatOptions{Mode: fakes.ModeSafe, EncodingAESKey: testAESKey},
		env:    map[string]string{"WECHAT_AES_KEY": newKey, "WECHAT_AES_KEY_PREVIOUS": testAESKey},
	})
	ctx := context.Background()
	if r := h.wx.SendText(ctx, customer, "with the old key"); r.Reply == nil {
		t.Fatalf("push with the previous key got %d %q", r.Status, r.Body)
	}
	if err := h.wx.SetEncryption(fakes.ModeSafe, newKey); err != nil {
		t.Fatal(err)
	}
	h.wx.Unfollow(ctx, customer)
	h.wx.Follow(ctx, customer)
	if r := h.wx.SendText(ctx, customer, "with the new key"); r.Reply == nil {
		t.Fatalf("push with the new key got %d %q", r.Status, r.Body)
	}
	eventually(t, "both messages in IM", func() bool { return len(h.im.Messages()) == 2 })

	// A key the bridge does not hold is refused.
	if err := h.wx.SetEncryption(fakes.ModeSafe, "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"); err != nil {
		t.Fatal(err)
	}
	if r := h.wx.SendText(ctx, customer, "with a stranger's key"); r.Status != 400 {
		t.Errorf("push with an unknown key got %d %q, want 400", r.Status, r.Body)
	}
}
