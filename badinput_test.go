package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// storeSnapshot counts the rows of every table of the bridge's store,
// through a connection of its own.
func (h *harness) storeSnapshot() string {
	h.t.Helper()
	db := h.openStoreDB(false)
	defer db.Close()
	var parts []string
	for _, q := range []string{
		"SELECT COUNT(*) FROM customers", "SELECT COUNT(*) FROM conversations WHERE closed_at IS NULL",
		"SELECT COUNT(*) FROM seen_keys", "SELECT COUNT(*) FROM outbox",
	} {
		var n int
		if err := db.QueryRow(q).Scan(&n); err != nil {
			h.t.Fatal(err)
		}
		parts = append(parts, fmt.Sprintf("%s: %d", strings.TrimPrefix(q, "SELECT COUNT(*) FROM "), n))
	}
	return strings.Join(parts, ", ")
}

// signedQuery is a push query signed now with the harness's token.
func (h *harness) signedQuery(at time.Time, extra ...string) url.Values {
	ts, nonce := strconv.FormatInt(at.Unix(), 10), strconv.FormatInt(at.UnixNano()%1e9, 10)
	q := url.Values{"signature": {fakes.Sign(h.wx.Options().Token, ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return q
}

// encryptedQuery builds the query and safe-mode body of an encrypted push
// whose Encrypt text is given.
func (h *harness) encryptedQuery(encrypt string) (url.Values, string) {
	q := h.signedQuery(time.Now(), "encrypt_type", "aes")
	q.Set("msg_signature", fakes.Sign(h.wx.Options().Token, q.Get("timestamp"), q.Get("nonce"), encrypt))
	return q, "<xml><ToUserName><![CDATA[gh_0fake0bridge]]></ToUserName><Encrypt><![CDATA[" + encrypt + "]]></Encrypt></xml>"
}

// signedCallback is a callback query signed now, or at the given offset.
func signedCallback(token, command string, skew time.Duration) string {
	rt := strconv.FormatInt(time.Now().Add(skew).Unix(), 10)
	return url.Values{"SdkAppid": {"1400000001"}, "CallbackCommand": {command}, "contenttype": {"json"}, "ClientIP": {"127.0.0.1"},
		"OptPlatform": {"Web"}, "RequestTime": {rt}, "Sign": {fakes.CallbackSign(token, rt)}}.Encode()
}

const testAESKey = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

// TestBadInput is the table in README.md: each bad request gets its
// deliberate answer, forwards nothing, leaves the store unchanged, and
// leaves the bridge healthy.
func TestBadInput(t *testing.T) {
	const cbToken = "cbtoken123"
	h := newHarness(t, harnessOptions{
		im:  fakes.IMOptions{CallbackToken: cbToken},
		env: map[string]string{"WECHAT_AES_KEY": testAESKey, "IM_CALLBACK_TOKEN": cbToken},
	})
	ctx := context.Background()
	key, _ := parseEncodingAESKey(testAESKey)
	appID := h.wx.Options().AppID
	good := string(h.wx.MessageXML(customer, "text", map[string]string{"Content": question}))

	// A push accepted before the table: its signed query, replayed with
	// another body, must be refused.
	used := h.signedQuery(time.Now())
	if status, body := post(t, h.base+"/wechat?"+used.Encode(), good); status != 200 {
		t.Fatalf("setup push got %d %q", status, body)
	}
	eventually(t, "the setup message in IM", func() bool { return len(h.im.Messages()) == 1 })
	before := h.storeSnapshot()
	imCalls, wxCalls := len(h.im.Requests()), len(h.wx.Requests())

	encrypted := func(t *testing.T, appID string, msg []byte) string {
		s, err := wechatEncrypt(key, appID, []byte("0123456789abcdef"), msg)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	badPadding := func(t *testing.T) string {
		plain := []byte(strings.Repeat("x", 64))
		plain[63] = 40 // a pad length over 32
		ct, err := cbcEncrypt(key, plain)
		if err != nil {
			t.Fatal(err)
		}
		return base64.StdEncoding.EncodeToString(ct)
	}
	// Another message: other text and MsgId, as a forger would send.
	other := strings.Replace(strings.Replace(good, question, "forged text", 1), "<MsgId>", "<MsgId>9", 1)
	after := `{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"%s","To_Account":"%s","MsgKey":"%s","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"forged"}}]}`

	for _, tc := range []struct {
		name       string
		method     string
		path       string
		query      func(t *testing.T) (url.Values, string) // query and body
		wantStatus int
	}{
		{"push with wrong signature", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			q := h.signedQuery(time.Now())
			q.Set("signature", strings.Repeat("0", 40))
			return q, good
		}, 403},
		{"push without signature", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			q := h.signedQuery(time.Now())
			q.Del("signature")
			return q, good
		}, 403},
		{"URL verification with wrong signature", "GET", "/wechat", func(t *testing.T) (url.Values, string) {
			q := h.signedQuery(time.Now(), "echostr", "123")
			q.Set("nonce", "1")
			return q, ""
		}, 403},
		{"push signed 10 minutes ago", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now().Add(-10 * time.Minute)), good
		}, 403},
		{"replayed signed query with another body", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return used, other
		}, 403},
		{"the same push again (a retry, or a replay of it)", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return used, good
		}, 200},
		{"wrong method on /wechat", "PUT", "/wechat", func(t *testing.T) (url.Values, string) { return h.signedQuery(time.Now()), good }, 405},
		{"wrong method on /imcallback", "GET", "/imcallback", func(t *testing.T) (url.Values, string) { return nil, "" }, 405},
		{"wrong method on /healthz", "POST", "/healthz", func(t *testing.T) (url.Values, string) { return nil, "" }, 405},
		{"unknown path", "POST", "/wechat/extra", func(t *testing.T) (url.Values, string) { return h.signedQuery(time.Now()), good }, 404},
		{"empty body", "POST", "/wechat", func(t *testing.T) (url.Values, string) { return h.signedQuery(time.Now()), "" }, 400},
		{"body over 64 KiB", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now()), "<xml>" + strings.Repeat("a", maxPushBytes) + "</xml>"
		}, 413},
		{"malformed XML", "POST", "/wechat", func(t *testing.T) (url.Values, string) { return h.signedQuery(time.Now()), good[:40] }, 400},
		{"XML with DOCTYPE and entities", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now()), `<!DOCTYPE xml [<!ENTITY e "boom">]>` + strings.Replace(good, question, "&e;", 1)
		}, 400},
		{"unknown MsgType", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now()), strings.Replace(good, "[text]", "[hologram]", 1)
		}, 200},
		{"unknown Event", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now()), string(h.wx.EventXML(customer, "teleport", ""))
		}, 200},
		{"push without FromUserName", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now()), strings.Replace(good, customer, "", 1)
		}, 400},
		{"message without MsgId", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			i, j := strings.Index(good, "<MsgId>"), strings.Index(good, "</MsgId>")
			return h.signedQuery(time.Now()), good[:i] + good[j+len("</MsgId>"):]
		}, 400},
		{"unknown encrypt_type", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.signedQuery(time.Now(), "encrypt_type", "rot13"), good
		}, 400},
		{"encrypted push with wrong msg_signature", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			q, body := h.encryptedQuery(encrypted(t, appID, []byte(good)))
			q.Set("msg_signature", strings.Repeat("1", 40))
			return q, body
		}, 403},
		{"encrypted push for another appid", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.encryptedQuery(encrypted(t, "wx0000000000000000", []byte(good)))
		}, 400},
		{"encrypted push with wrong padding", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			return h.encryptedQuery(badPadding(t))
		}, 400},
		{"encrypted push without Encrypt", "POST", "/wechat", func(t *testing.T) (url.Values, string) {
			q, _ := h.encryptedQuery("")
			return q, good
		}, 400},
		{"callback with wrong SdkAppid", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			q.Set("SdkAppid", "1400000002")
			return q, fmt.Sprintf(after, "agent_kim", customerIM(customer), "k1")
		}, 403},
		{"callback with wrong Sign", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback("another-token", cbAfterSendMsg, 0))
			return q, fmt.Sprintf(after, "agent_kim", customerIM(customer), "k2")
		}, 403},
		{"callback without Sign", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			q.Del("Sign")
			return q, fmt.Sprintf(after, "agent_kim", customerIM(customer), "k3")
		}, 403},
		{"callback signed 2 minutes ago", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, -2*time.Minute))
			return q, fmt.Sprintf(after, "agent_kim", customerIM(customer), "k4")
		}, 403},
		{"malformed callback JSON", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			return q, `{"From_Account":`
		}, 400},
		{"callback over 256 KiB", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			return q, `{"x":"` + strings.Repeat("a", maxCallbackBytes) + `"}`
		}, 413},
		{"unknown CallbackCommand", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, "Group.CallbackAfterNewMemberJoin", 0))
			return q, `{"CallbackCommand":"Group.CallbackAfterNewMemberJoin","GroupId":"g1"}`
		}, 200},
		{"callback from neither an agent nor a customer", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			return q, fmt.Sprintf(after, "stranger", customerIM(customer), "k5")
		}, 200},
		{"callback from a customer account", "POST", "/imcallback", func(t *testing.T) (url.Values, string) {
			q, _ := url.ParseQuery(signedCallback(cbToken, cbAfterSendMsg, 0))
			return q, fmt.Sprintf(after, customerIM(customer), "agent_kim", "k6")
		}, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, body := tc.query(t)
			req, _ := http.NewRequest(tc.method, h.base+tc.path+"?"+q.Encode(), strings.NewReader(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.wantStatus {
				t.Errorf("got status %d, want %d", resp.StatusCode, tc.wantStatus)
			}
			if got := h.storeSnapshot(); got != before {
				t.Errorf("the store changed: %s, was %s", got, before)
			}
		})
	}

	// Nothing reached either vendor, and the bridge still works.
	if n, m := len(h.im.Requests()), len(h.wx.Requests()); n != imCalls || m != wxCalls {
		t.Errorf("the vendors got %d and %d more calls, want none", n-imCalls, m-wxCalls)
	}
	h.wx.SendText(ctx, customer, "still here")
	eventually(t, "a good message after the bad ones", func() bool { return len(h.im.Messages()) == 2 })
	if got := h.im.Messages()[1].Text; got != "still here" {
		t.Errorf("IM got %q, want the good message", got)
	}
}

// post posts body to u and returns the status and the answer's body.
func post(t testing.TB, u, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(u, "text/xml", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestEncryptedPushWithoutKey: a bridge in plaintext mode refuses an
// encrypted push with a clear reason.
func TestEncryptedPushWithoutKey(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	key, _ := parseEncodingAESKey(testAESKey)
	enc, _ := wechatEncrypt(key, h.wx.Options().AppID, []byte("0123456789abcdef"), h.wx.MessageXML(customer, "text", map[string]string{"Content": "hi"}))
	q, body := h.encryptedQuery(enc)
	if status, _ := post(t, h.base+"/wechat?"+q.Encode(), body); status != 400 {
		t.Errorf("got %d, want 400", status)
	}
	if !strings.Contains(h.logs.String(), "WECHAT_AES_KEY is not set") {
		t.Errorf("the log does not say why:\n%s", h.logs.String())
	}
}
