package fakes

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tencentyun/tls-sig-api-v2-golang/tencentyun"
)

// recordingT collects what a fake reports, so tests can check that it
// fails loudly on unmodelled requests.
type recordingT struct {
	*testing.T
	mu   sync.Mutex
	errs []string
}

func (r *recordingT) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); defer c.mu.Unlock(); c.now = c.now.Add(d) }

// imCall posts body to the fake IM with the given query overrides and
// returns the answer's ErrorCode.
func imCall(t *testing.T, im *IM, command, body string, override url.Values) (int, map[string]any) {
	t.Helper()
	o := im.Options()
	sig, err := tencentyun.GenUserSig(int(o.SDKAppID), o.SecretKey, o.Admin, 3600)
	if err != nil {
		t.Fatal(err)
	}
	q := url.Values{"sdkappid": {fmt.Sprint(o.SDKAppID)}, "identifier": {o.Admin}, "usersig": {sig}, "random": {"42"}, "contenttype": {"json"}}
	for k, v := range override {
		if v[0] == "" {
			q.Del(k)
		} else {
			q[k] = v
		}
	}
	resp, err := http.Post(im.URL+"/v4/"+command+"?"+q.Encode(), "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HTTP status %d, IM always answers 200", resp.StatusCode)
	}
	var a map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		t.Fatal(err)
	}
	return int(a["ErrorCode"].(float64)), a
}

func TestIMChecksRequests(t *testing.T) {
	im := NewIM(t, IMOptions{Accounts: []string{"agent"}})
	o := im.Options()
	otherSig, _ := tencentyun.GenUserSig(int(o.SDKAppID), o.SecretKey, "agent", 3600)
	wrongKeySig, _ := tencentyun.GenUserSig(int(o.SDKAppID), "another-key", o.Admin, 3600)
	expiredSig, _ := tencentyun.GenUserSig(int(o.SDKAppID), o.SecretKey, o.Admin, -10)
	send := `{"To_Account":"agent","MsgRandom":1,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}`
	for _, tc := range []struct {
		name, command, body string
		q                   url.Values
		want                int
	}{
		{"no sdkappid", "openim/sendmsg", send, url.Values{"sdkappid": {""}}, 60012},
		{"other sdkappid", "openim/sendmsg", send, url.Values{"sdkappid": {"1400000002"}}, 70016},
		{"no usersig", "openim/sendmsg", send, url.Values{"usersig": {""}}, 70002},
		{"garbage usersig", "openim/sendmsg", send, url.Values{"usersig": {"abc"}}, 70003},
		{"usersig of another key", "openim/sendmsg", send, url.Values{"usersig": {wrongKeySig}}, 70009},
		{"expired usersig", "openim/sendmsg", send, url.Values{"usersig": {expiredSig}}, 70001},
		{"identifier not the usersig's", "openim/sendmsg", send, url.Values{"identifier": {"agent"}}, 70013},
		{"identifier not admin", "openim/sendmsg", send, url.Values{"identifier": {"agent"}, "usersig": {otherSig}}, 60010},
		{"random missing", "openim/sendmsg", send, url.Values{"random": {""}}, 60002},
		{"random over 32 bits", "openim/sendmsg", send, url.Values{"random": {"4294967296"}}, 60002},
		{"contenttype missing", "openim/sendmsg", send, url.Values{"contenttype": {""}}, 60002},
		{"empty body", "openim/sendmsg", "", nil, 90001},
		{"body not JSON", "im_open_login_svc/account_import", "{", nil, 60003},
		{"To_Account missing", "openim/sendmsg", `{"MsgRandom":1,"MsgBody":[]}`, nil, 90003},
		{"MsgRandom missing", "openim/sendmsg", `{"To_Account":"agent","MsgBody":[]}`, nil, 90005},
		{"MsgBody not an array", "openim/sendmsg", `{"To_Account":"agent","MsgRandom":1,"MsgBody":{}}`, nil, 90007},
		{"text element without Text", "openim/sendmsg", `{"To_Account":"agent","MsgRandom":1,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{}}]}`, nil, 90010},
		{"sender not imported", "openim/sendmsg", strings.Replace(send, `{`, `{"From_Account":"ghost",`, 1), nil, 90008},
		{"recipient not imported", "openim/sendmsg", strings.Replace(send, `"agent"`, `"ghost"`, 1), nil, 20003},
		{"MsgLifeTime over 7 days", "openim/sendmsg", strings.Replace(send, `{`, `{"MsgLifeTime":604801,`, 1), nil, 90026},
		{"UserID too long", "im_open_login_svc/account_import", `{"UserID":"` + strings.Repeat("a", 33) + `"}`, nil, 70402},
		{"good send", "openim/sendmsg", send, nil, 0},
		{"good import", "im_open_login_svc/account_import", `{"UserID":"wx_o1"}`, nil, 0},
		{"legacy Identifier import", "im_open_login_svc/account_import", `{"Identifier":"wx_o2"}`, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, a := imCall(t, im, tc.command, tc.body, tc.q); got != tc.want {
				t.Errorf("got ErrorCode %d (%v), want %d", got, a["ErrorInfo"], tc.want)
			}
		})
	}
}

func TestIMDropsRepeatedSendWithin120s(t *testing.T) {
	c := &clock{now: time.Now()}
	im := NewIM(t, IMOptions{Accounts: []string{"agent", "wx_o1"}, Now: c.Now})
	send := `{"From_Account":"wx_o1","To_Account":"agent","MsgSeq":7,"MsgRandom":9,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}`
	_, first := imCall(t, im, "openim/sendmsg", send, nil)
	_, again := imCall(t, im, "openim/sendmsg", send, nil)
	if len(im.Messages()) != 1 || first["MsgKey"] != again["MsgKey"] {
		t.Fatalf("got %d messages, keys %v and %v; want one message, the same key", len(im.Messages()), first["MsgKey"], again["MsgKey"])
	}
	c.Add(121 * time.Second)
	imCall(t, im, "openim/sendmsg", send, nil)
	if len(im.Messages()) != 2 {
		t.Errorf("got %d messages after 121 s, want 2", len(im.Messages()))
	}
}

func TestIMAccountDelete(t *testing.T) {
	im := NewIM(t, IMOptions{Accounts: []string{"wx_o1"}})
	code, a := imCall(t, im, "im_open_login_svc/account_delete", `{"DeleteItem":[{"UserID":"wx_o1"},{"UserID":"wx_o2"}]}`, nil)
	items, _ := json.Marshal(a["ResultItem"])
	if code != 0 || !strings.Contains(string(items), `"ResultCode":70107`) || im.Imported("wx_o1") {
		t.Errorf("got %d %s, want wx_o1 deleted and 70107 for wx_o2", code, items)
	}
}

func TestIMUnmodelledFailsLoudly(t *testing.T) {
	rt := &recordingT{T: t}
	im := NewIM(rt, IMOptions{})
	if code, _ := imCall(t, im, "group_open_http_svc/create_group", `{}`, nil); code != 60009 {
		t.Errorf("got %d, want 60009", code)
	}
	if len(rt.errs) != 1 {
		t.Errorf("the fake reported %v, want one unmodelled request", rt.errs)
	}
}

func TestIMCallbacksSigned(t *testing.T) {
	var got url.Values
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.URL.Query()
		io.WriteString(w, `{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}`)
	}))
	defer srv.Close()
	im := NewIM(t, IMOptions{Accounts: []string{"agent", "wx_o1"}, CallbackToken: "xxxxyyyy"})
	im.SetCallbackURL(srv.URL)
	if _, err := im.SendAsAgent(context.Background(), "agent", "wx_o1", "hi"); err != nil {
		t.Fatal(err)
	}
	if got.Get("Sign") != CallbackSign("xxxxyyyy", got.Get("RequestTime")) || got.Get("SdkAppid") != "1400000001" || got.Get("OptPlatform") != "Web" {
		t.Errorf("callback query %v lacks a valid Sign, SdkAppid or OptPlatform", got)
	}
	if CallbackSign("xxxxyyyy", "1669872112") != "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061" {
		t.Error("CallbackSign does not match the documented example")
	}
}

func wxPost(t *testing.T, wx *WeChat, path, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(wx.URL+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var a struct {
		ErrCode int    `json:"errcode"`
		ErrMsg  string `json:"errmsg"`
		Token   string `json:"access_token"`
	}
	json.NewDecoder(resp.Body).Decode(&a)
	return a.ErrCode, a.Token
}

func TestWeChatTokensAndWindow(t *testing.T) {
	c := &clock{now: time.Now()}
	wx := NewWeChat(t, WeChatOptions{Now: c.Now})
	o := wx.Options()
	cred := fmt.Sprintf(`{"grant_type":"client_credential","appid":%q,"secret":%q}`, o.AppID, o.AppSecret)
	if code, _ := wxPost(t, wx, "/cgi-bin/stable_token", strings.Replace(cred, o.AppSecret, "wrong", 1)); code != 40125 {
		t.Errorf("wrong secret: got %d, want 40125", code)
	}
	_, tok := wxPost(t, wx, "/cgi-bin/stable_token", cred)
	if _, tok2 := wxPost(t, wx, "/cgi-bin/stable_token", cred); tok2 != tok {
		t.Error("stable_token gave a new token while the old one had long to live")
	}
	send := func(token, openid string) int {
		code, _ := wxPost(t, wx, "/cgi-bin/message/custom/send?access_token="+token, fmt.Sprintf(`{"touser":%q,"msgtype":"text","text":{"content":"hi"}}`, openid))
		return code
	}
	if code := send(tok, "o_unknown"); code != 40003 {
		t.Errorf("unknown openid: got %d, want 40003", code)
	}
	wx.MessageXML("o1", "text", map[string]string{"Content": "hi"}) // the customer writes
	for i := range 5 {
		if code := send(tok, "o1"); code != 0 {
			t.Fatalf("reply %d: got %d, want 0", i+1, code)
		}
	}
	if code := send(tok, "o1"); code != 45047 {
		t.Errorf("sixth reply: got %d, want 45047", code)
	}
	wx.MessageXML("o1", "text", map[string]string{"Content": "again"})
	c.Add(48*time.Hour + time.Second)
	if code := send(tok, "o1"); code != 42001 {
		t.Errorf("after the token's life: got %d, want 42001", code)
	}
	_, tok = wxPost(t, wx, "/cgi-bin/stable_token", cred)
	if code := send(tok, "o1"); code != 45015 {
		t.Errorf("after 48 hours: got %d, want 45015", code)
	}
	if code := send("", "o1"); code != 41001 {
		t.Errorf("no token: got %d, want 41001", code)
	}
	wx.RevokeTokens()
	if code := send(tok, "o1"); code != 40001 {
		t.Errorf("revoked token: got %d, want 40001", code)
	}
}

func TestWeChatPushRetriesAndNotices(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.ReadAll(r.Body) // with the body read, the server notices the client leaving
		q := r.URL.Query()
		if q.Get("signature") != Sign("faketoken", q.Get("timestamp"), q.Get("nonce")) || q.Get("openid") != "o1" {
			t.Errorf("push query %v is not signed for o1", q)
		}
		if calls.Add(1) < 3 {
			select { // answer too late, as a stuck server would
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
			return
		}
		io.WriteString(w, "success")
	}))
	defer srv.Close()
	wx := NewWeChat(t, WeChatOptions{PushTimeout: 200 * time.Millisecond})
	wx.SetTarget(srv.URL)
	r := wx.SendText(context.Background(), "o1", "hi")
	if r.Attempts != 3 || r.Failed || r.Body != "success" {
		t.Errorf("got %+v, want success at the third attempt", r)
	}
	calls.Store(-10)
	if r := wx.SendText(context.Background(), "o1", "hi"); !r.Failed || r.Attempts != 3 || len(wx.Notices()) != 1 {
		t.Errorf("got %+v and notices %v, want three attempts and the customer shown the notice", r, wx.Notices())
	}
}

// TestIMRoamHistory: admin_getroammsg gives the messages of one
// conversation, both ways, within the time range, newest first, a page at a
// time, with recalled messages flagged; bad requests are refused.
func TestIMRoamHistory(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	im := NewIM(t, IMOptions{Accounts: []string{"agent", "cust", "other"}, Now: clk.Now})
	ctx := context.Background()
	var keys []string
	for i := range 5 {
		from, to := "agent", "cust"
		if i%2 == 1 {
			from, to = "cust", "agent"
		}
		body := fmt.Sprintf(`{"From_Account":%q,"To_Account":%q,"MsgRandom":%d,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"m%d"}}]}`, from, to, i+1, i)
		if code, a := imCall(t, im, "openim/sendmsg", body, nil); code != 0 {
			t.Fatalf("sendmsg: %v", a)
		}
		keys = append(keys, im.Messages()[i].MsgKey)
		clk.Add(time.Second)
	}
	if _, err := im.SendAsAgent(ctx, "agent", "other", "elsewhere"); err != nil { // another conversation
		t.Fatal(err)
	}
	im.Recall(keys[2])

	texts := func(a map[string]any) (out []string) {
		for _, m := range a["MsgList"].([]any) {
			m := m.(map[string]any)
			var body []struct{ MsgContent struct{ Text string } }
			b, _ := json.Marshal(m["MsgBody"])
			json.Unmarshal(b, &body)
			out = append(out, fmt.Sprintf("%s>%s:%s:%v", m["From_Account"], m["To_Account"], body[0].MsgContent.Text, m["MsgFlagBits"]))
		}
		return out
	}
	// Two a page, from the perspective of the customer, the older names.
	req := `{"From_Account":"cust","To_Account":"agent","MaxCnt":2,"MinTime":1700000001,"MaxTime":1700000004`
	var got []string
	for page := 0; ; page++ {
		code, a := imCall(t, im, "openim/admin_getroammsg", req+"}", nil)
		if code != 0 || page > 3 {
			t.Fatalf("page %d: %v", page, a)
		}
		got = append(got, texts(a)...)
		if a["Complete"].(float64) == 1 {
			break
		}
		req = fmt.Sprintf(`{"Operator_Account":"cust","Peer_Account":"agent","MaxCnt":2,"MinTime":1700000001,"MaxTime":%.0f,"LastMsgKey":%q`,
			a["LastMsgTime"], a["LastMsgKey"])
	}
	want := []string{"agent>cust:m4:0", "cust>agent:m3:0", "agent>cust:m2:8", "cust>agent:m1:0"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("history %q, want %q", got, want)
	}

	// A page ends near 13 KB, whatever MaxCnt says.
	clk.Add(time.Second) // after the short message to other
	long := strings.Repeat("x", 5000)
	for i := range 4 {
		body := fmt.Sprintf(`{"From_Account":"agent","To_Account":"other","MsgRandom":%d,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":%q}}]}`, 100+i, long)
		if code, a := imCall(t, im, "openim/sendmsg", body, nil); code != 0 {
			t.Fatalf("sendmsg: %v", a)
		}
	}
	code, a := imCall(t, im, "openim/admin_getroammsg", `{"Operator_Account":"agent","Peer_Account":"other","MaxCnt":100,"MinTime":0,"MaxTime":1800000000}`, nil)
	if code != 0 || a["MsgCnt"].(float64) != 2 || a["Complete"].(float64) != 0 {
		t.Errorf("large messages: MsgCnt %v Complete %v, want 2 and 0", a["MsgCnt"], a["Complete"])
	}

	for _, bad := range []string{
		`{"Operator_Account":"agent","MaxCnt":10,"MinTime":0,"MaxTime":1}`,
		`{"Operator_Account":"agent","Peer_Account":"cust","MinTime":0,"MaxTime":1}`,
		`{"Operator_Account":"agent","Peer_Account":"cust","MaxCnt":101,"MinTime":0,"MaxTime":1}`,
		`{"Operator_Account":"agent","Peer_Account":"cust","MaxCnt":10,"MinTime":5,"MaxTime":1}`,
		`{"Operator_Account":"agent","Peer_Account":"cust","MaxCnt":10,"MaxTime":1}`,
	} {
		if code, _ := imCall(t, im, "openim/admin_getroammsg", bad, nil); code != 90001 {
			t.Errorf("%s: ErrorCode %d, want 90001", bad, code)
		}
	}
}
