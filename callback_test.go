package main

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

func TestCallbackText(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		want string
	}{
		{"text", `[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hello"}}]`, "hello"},
		{"two texts", `[{"MsgType":"TIMTextElem","MsgContent":{"Text":"a"}},{"MsgType":"TIMTextElem","MsgContent":{"Text":"b"}}]`, "a\nb"},
		{"location", `[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"Store","Latitude":37.5,"Longitude":127}}]`, "Store\nhttps://uri.amap.com/marker?name=Store&position=127%2C37.5"},
		{"image", `[{"MsgType":"TIMImageElem","MsgContent":{"UUID":"u","ImageFormat":1,"ImageInfoArray":[{"Type":1,"Size":1,"Width":1,"Height":1,"URL":"https://img.example/1.jpg"}]}}]`, "[image] https://img.example/1.jpg"},
		{"file", `[{"MsgType":"TIMFileElem","MsgContent":{"Url":"https://f.example/a.pdf","FileName":"a.pdf","UUID":"u","FileSize":1,"Download_Flag":2}}]`, "[file] a.pdf https://f.example/a.pdf"},
		{"sound", `[{"MsgType":"TIMSoundElem","MsgContent":{"Url":"https://s.example/a.mp3","UUID":"u","Size":1,"Second":3,"Download_Flag":2}}]`, "[voice message] https://s.example/a.mp3"},
		{"video", `[{"MsgType":"TIMVideoFileElem","MsgContent":{"VideoUrl":"https://v.example/a.mp4"}}]`, "[video] https://v.example/a.mp4"},
		{"face", `[{"MsgType":"TIMFaceElem","MsgContent":{"Index":1,"Data":"smile"}}]`, "[sticker]"},
		{"custom with Desc", `[{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{}","Desc":"Order #12"}}]`, "Order #12"},
		{"unknown element", `[{"MsgType":"TIMRelayElem","MsgContent":{}}]`, "[RelayElem]"},
		{"empty", `[]`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body []MsgElem
			if err := json.Unmarshal([]byte(tc.body), &body); err != nil {
				t.Fatal(err)
			}
			if got := callbackText(body); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

// postCallback posts a callback to the bridge, signed with the bridge's
// IM_CALLBACK_TOKEN as IM's console signs it, and returns its status and
// answer.
func (h *harness) postCallback(query, body string) (int, string) {
	h.t.Helper()
	if tok := h.env["IM_CALLBACK_TOKEN"]; tok != "" {
		rt := strconv.FormatInt(time.Now().Unix(), 10)
		query += "&RequestTime=" + rt + "&Sign=" + fakes.CallbackSign(tok, rt)
	}
	return h.postRawCallback(query, body)
}

// postRawCallback posts a callback with query as it is, signed or not.
func (h *harness) postRawCallback(query, body string) (int, string) {
	h.t.Helper()
	resp, err := http.Post(h.base+"/imcallback?"+query, "application/json", strings.NewReader(body))
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestCallbacksThatForwardNothing: callbacks the bridge refuses or ignores
// get a deliberate answer and reach no customer; a repeated After callback
// (IM's retry) forwards once.
func TestCallbacksThatForwardNothing(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	h.wx.SendText(context.Background(), customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.im.Messages()) == 1 })

	const okQuery = "SdkAppid=1400000001&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=127.0.0.1&OptPlatform=Web"
	after := func(from, to string, result int, key string) string {
		b, _ := json.Marshal(map[string]any{"CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": from, "To_Account": to,
			"MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1700000000, "MsgKey": key, "SendMsgResult": result,
			"MsgBody": []MsgElem{{MsgType: "TIMTextElem", MsgContent: map[string]any{"Text": "should not arrive"}}}})
		return string(b)
	}
	for _, tc := range []struct {
		name, query, body string
		wantStatus        int
		wantAnswer        string
	}{
		{"wrong SdkAppid", strings.Replace(okQuery, "1400000001", "1400000002", 1), after("agent_kim", customerIM(customer), 0, "k1"), 403, "SdkAppid"},
		{"malformed JSON", okQuery, `{"From_Account":`, 400, "decode im callback"},
		{"oversized body", okQuery, `{"x":"` + strings.Repeat("a", maxCallbackBytes) + `"}`, 413, "too large"},
		{"sender is a customer account", okQuery, after(customerIM(customer), "agent_kim", 0, "k2"), 200, `"ActionStatus":"OK"`},
		{"sender is not an agent", okQuery, after("someone", customerIM(customer), 0, "k3"), 200, `"ActionStatus":"OK"`},
		{"recipient is not a customer", okQuery, after("agent_kim", "agent_lee", 0, "k4"), 200, `"ActionStatus":"OK"`},
		{"unknown customer", okQuery, after("agent_kim", customerIM("o_nobody"), 0, "k5"), 200, `"ActionStatus":"OK"`},
		{"message not delivered in IM", okQuery, after("agent_kim", customerIM(customer), 80001, "k6"), 200, `"ActionStatus":"OK"`},
		{"other command", strings.Replace(okQuery, "C2C.CallbackAfterSendMsg", "State.StateChange", 1), `{"CallbackCommand":"State.StateChange","Info":{"Action":"Login","To_Account":"agent_kim"}}`, 200, `"ActionStatus":"OK"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, answer := h.postCallback(tc.query, tc.body)
			if status != tc.wantStatus || !strings.Contains(answer, tc.wantAnswer) {
				t.Errorf("got %d %q, want %d with %q", status, answer, tc.wantStatus, tc.wantAnswer)
			}
			var env struct{ ActionStatus string }
			if err := json.Unmarshal([]byte(answer), &env); err != nil || env.ActionStatus == "" {
				t.Errorf("answer %q is not IM's JSON envelope", answer)
			}
		})
	}

	// IM retrying an After callback: the same MsgKey twice forwards once.
	good := after("agent_kim", customerIM(customer), 0, "k7")
	good = strings.Replace(good, "should not arrive", answer, 1)
	for range 2 {
		if status, _ := h.postCallback(okQuery, good); status != 200 {
			t.Fatalf("good callback got %d", status)
		}
	}
	eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) > 0 })
	h.im.SendAsAgent(context.Background(), "agent_kim", customerIM(customer), "last")
	eventually(t, "the last reply in WeChat", func() bool { return len(h.wx.Sent()) == 2 })
	if sent := h.wx.Sent(); sent[0].Text != answer || sent[1].Text != "last" {
		t.Errorf("WeChat got %q, %q; want the answer once, then the last reply", sent[0].Text, sent[1].Text)
	}
}

func TestValidCallbackSign(t *testing.T) {
	at := time.Unix(1669872112, 0)
	const docSign = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061" // IM's documented example
	for _, tc := range []struct {
		name, token, requestTime, sign string
		now                            time.Time
		want                           bool
	}{
		{"documented example", "xxxxyyyy", "1669872112", docSign, at, true},
		{"upper-case hex", "xxxxyyyy", "1669872112", strings.ToUpper(docSign), at, true},
		{"59 s old", "xxxxyyyy", "1669872112", docSign, at.Add(59 * time.Second), true},
		{"61 s old: a replay", "xxxxyyyy", "1669872112", docSign, at.Add(61 * time.Second), false},
		{"61 s ahead", "xxxxyyyy", "1669872112", docSign, at.Add(-61 * time.Second), false},
		{"another token", "xxxxyyyz", "1669872112", docSign, at, false},
		{"no sign", "xxxxyyyy", "1669872112", "", at, false},
		{"no time", "xxxxyyyy", "", docSign, at, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := validCallbackSign(tc.token, tc.requestTime, tc.sign, tc.now, time.Minute); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// TestSignedCallbacks: with IM_CALLBACK_TOKEN set, the fake's signed
// callbacks go through and an unsigned one is refused.
func TestSignedCallbacks(t *testing.T) {
	h := newHarness(t, harnessOptions{im: fakes.IMOptions{CallbackToken: "cbtoken123"}, env: map[string]string{"IM_CALLBACK_TOKEN": "cbtoken123"}})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
	eventually(t, "the answer in WeChat", func() bool { return len(h.wx.Sent()) == 1 })

	cb := h.im.Callbacks()[1]
	status, _ := h.postRawCallback("SdkAppid=1400000001&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json", strings.Replace(string(cb.Body), "_", "_9", 1))
	if status != http.StatusForbidden {
		t.Errorf("unsigned callback got %d, want 403", status)
	}
	if strings.Contains(h.logs.String(), "cbtoken123") {
		t.Error("the callback token is in the logs")
	}
}

// TestUnauthenticatedCallbacksWarned: without IM_CALLBACK_TOKEN the bridge
// refuses to start, unless IM_CALLBACK_AUTH=off says so; then it says
// once, at start-up, that callbacks are not authenticated, and takes them
// unsigned.
func TestUnauthenticatedCallbacksWarned(t *testing.T) {
	h := newHarness(t, harnessOptions{external: true})
	delete(h.env, "IM_CALLBACK_TOKEN")
	env := maps.Clone(h.env)
	err := run(context.Background(), nil, mapEnv(env), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "IM_CALLBACK_TOKEN is required") {
		t.Fatalf("without IM_CALLBACK_TOKEN run returned %v, want the token required", err)
	}

	off := newHarness(t, harnessOptions{env: map[string]string{"IM_CALLBACK_AUTH": "off"}})
	const warning = "IM callbacks are not authenticated"
	if n := strings.Count(off.logs.String(), warning); n != 1 {
		t.Errorf("the warning appears %d times, want once:\n%s", n, off.logs.String())
	}
	off.wx.Follow(context.Background(), "o_unsigned")
	eventually(t, "the customer's IM account", func() bool { return off.im.Imported("wx_o_unsigned") })
	if _, err := off.im.SendAsAgent(context.Background(), "agent_kim", "wx_o_unsigned", "unsigned, taken"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the unsigned reply in WeChat", func() bool { return len(off.sentTo("o_unsigned")) == 1 })

	signed := newHarness(t, harnessOptions{})
	if strings.Contains(signed.logs.String(), warning) {
		t.Error("the warning appears with IM_CALLBACK_TOKEN set")
	}
}
