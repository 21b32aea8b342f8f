package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// harness runs the bridge in-process with run, between a fake WeChat and a
// fake IM.
type harness struct {
	t    *testing.T
	wx   *fakes.WeChat
	im   *fakes.IM
	env  map[string]string
	base string // the running bridge's URL
	logs *syncBuffer

	stop func() error
}

// harnessOptions adjusts a harness before the bridge starts.
type harnessOptions struct {
	agents []string
	wechat fakes.WeChatOptions
	im     fakes.IMOptions
	env    map[string]string
}

// newHarness starts the fakes and a bridge configured for them.
func newHarness(t *testing.T, o harnessOptions) *harness {
	t.Helper()
	if o.agents == nil {
		o.agents = []string{"agent_kim"}
	}
	h := &harness{t: t, logs: &syncBuffer{}}
	h.wx = fakes.NewWeChat(t, o.wechat)
	o.im.Accounts = append(o.im.Accounts, o.agents...)
	h.im = fakes.NewIM(t, o.im)
	wo, imo := h.wx.Options(), h.im.Options()
	h.env = map[string]string{
		"LISTEN_ADDR":  "127.0.0.1:0",
		"WECHAT_TOKEN": wo.Token, "WECHAT_APPID": wo.AppID, "WECHAT_APPSECRET": wo.AppSecret,
		"WECHAT_API_BASE": h.wx.URL,
		"IM_SDKAPPID":     fmt.Sprint(imo.SDKAppID), "IM_SECRET_KEY": imo.SecretKey, "IM_ADMIN": imo.Admin,
		"IM_API_BASE": h.im.URL, "IM_AGENTS": strings.Join(o.agents, ","),
		"DATABASE_URL": "sqlite:" + filepath.Join(t.TempDir(), "bridge.db"),
	}
	for k, v := range o.env {
		h.env[k] = v
	}
	t.Cleanup(func() {
		if h.stop != nil {
			h.stop()
		}
		if t.Failed() {
			t.Logf("bridge logs:\n%s", h.logs.String())
		}
	})
	h.start()
	return h
}

// start runs the bridge and waits until it is healthy.
func (h *harness) start() {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	mark := h.logs.Len()
	go func() { done <- run(ctx, nil, func(k string) string { return h.env[k] }, io.Discard, h.logs) }()
	h.stop = func() error {
		cancel()
		h.stop = nil
		return <-done
	}
	addr := regexp.MustCompile(`msg=listening addr=(\S+)`)
	eventually(h.t, "the bridge to listen", func() bool { return addr.MatchString(h.logs.From(mark)) })
	h.base = "http://" + addr.FindStringSubmatch(h.logs.From(mark))[1]
	h.wx.SetTarget(h.base + "/wechat")
	h.im.SetCallbackURL(h.base + "/imcallback")
	eventually(h.t, "the bridge to be ready", func() bool {
		resp, err := http.Get(h.base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// restart stops the bridge and starts it again on the same database.
func (h *harness) restart() {
	h.t.Helper()
	if err := h.stop(); err != nil {
		h.t.Fatalf("bridge stopped with %v", err)
	}
	h.start()
}

// customerIM is the IM account of the customer openid.
func customerIM(openid string) string { return "wx_" + openid }

// messagesTo returns the IM messages delivered to account.
func (h *harness) messagesTo(account string) []fakes.Message {
	var out []fakes.Message
	for _, m := range h.im.Messages() {
		if m.To == account {
			out = append(out, m)
		}
	}
	return out
}

// sentTo returns the customer-service messages WeChat accepted for openid.
func (h *harness) sentTo(openid string) []fakes.CustomMessage {
	var out []fakes.CustomMessage
	for _, m := range h.wx.Sent() {
		if m.ToUser == openid {
			out = append(out, m)
		}
	}
	return out
}

// eventually polls cond every few milliseconds until it holds, and fails the
// test if it does not within ten seconds.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for the bridge's concurrent log writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Len()
}

// From returns what was written after the first n bytes.
func (b *syncBuffer) From(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()[n:]
}

// golden compares got with testdata/name, or rewrites it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file: %v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file:\ngot:\n%s\nwant:\n%s", name, got, want)
	}
}

// goldenJSON compares a JSON body, exactly as sent but indented, with the
// golden file, after replacing the values of the named fields (random or
// time-dependent) with a placeholder.
func goldenJSON(t *testing.T, name string, body []byte, vary ...string) {
	t.Helper()
	for _, k := range vary {
		re := regexp.MustCompile(`"` + k + `":(\d+|"[^"]*")`)
		if !re.Match(body) {
			t.Errorf("%s: field %s is missing", name, k)
		}
		body = re.ReplaceAll(body, []byte(`"`+k+`":"<varies>"`))
	}
	var out bytes.Buffer
	if err := json.Indent(&out, body, "", "  "); err != nil {
		t.Fatalf("%s: body is not JSON: %v\n%s", name, err, body)
	}
	out.WriteByte('\n')
	golden(t, name, out.Bytes())
}

func TestRunRejectsBadConfiguration(t *testing.T) {
	env := map[string]string{"IM_SECRET_KEY": "s3cr3t-im-key", "WECHAT_APPSECRET": "s3cr3t-app", "IM_SDKAPPID": "abc"}
	err := run(context.Background(), nil, func(k string) string { return env[k] }, io.Discard, io.Discard)
	if err == nil {
		t.Fatal("run started without WECHAT_TOKEN, WECHAT_APPID and IM_AGENTS")
	}
	for _, name := range []string{"WECHAT_TOKEN", "WECHAT_APPID", "IM_AGENTS", "IM_SDKAPPID"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s:\n%v", name, err)
		}
	}
	for _, secret := range []string{"s3cr3t-im-key", "s3cr3t-app"} {
		if strings.Contains(err.Error(), secret) {
			t.Errorf("error echoes a secret: %v", err)
		}
	}
}

func TestRunRejectsUnknownArguments(t *testing.T) {
	if err := run(context.Background(), []string{"serve"}, func(string) string { return "" }, io.Discard, io.Discard); err == nil {
		t.Fatal("run accepted an unknown argument")
	}
}

func TestDemo(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"demo"}, func(string) string { return "" }, &out, io.Discard); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	for _, want := range []string{demoQuestion, demoAnswer, "openim/sendmsg", "C2C.CallbackAfterSendMsg", "custom/send", "Done:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
