package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
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
	t    testing.TB
	wx   *fakes.WeChat
	im   *fakes.IM
	env  map[string]string
	base string // the running bridge's URL
	logs *syncBuffer

	stop       func() error
	clock      *fakeClock    // the bridge's and the fakes' clock, if the test moves it
	sweepEvery time.Duration // how often the desk sweeps, if not its default
}

// harnessOptions adjusts a harness before the bridge starts.
type harnessOptions struct {
	postgres bool // on a schema of its own in TEST_DATABASE_URL; skips without it
	external bool // the test starts the bridge itself
	agents   []string
	wechat   fakes.WeChatOptions
	im       fakes.IMOptions
	env      map[string]string
	// clock, if set, is the bridge's clock and the fakes', which the test
	// moves by hand.
	clock *fakeClock
	// sweepEvery, if set, is how often the desk sweeps.
	sweepEvery time.Duration
}

// newHarness starts the fakes and a bridge configured for them.
func newHarness(t testing.TB, o harnessOptions) *harness {
	t.Helper()
	if o.agents == nil {
		o.agents = []string{"agent_kim"}
	}
	h := &harness{t: t, logs: &syncBuffer{}, clock: o.clock, sweepEvery: o.sweepEvery}
	if o.clock != nil {
		// IM keeps the real time: a UserSig is made with it, whatever the
		// bridge's clock says. Its callbacks' RequestTime is then as far
		// from the bridge's clock as the test moves it.
		o.wechat.Now = o.clock.Now
		o.env = maps.Clone(o.env)
		if o.env == nil {
			o.env = map[string]string{}
		}
		o.env["IM_CALLBACK_MAX_SKEW"] = "100h"
	}
	db := "sqlite:" + filepath.Join(t.TempDir(), "bridge.db")
	if o.postgres {
		db = testPostgres(t)
	}
	h.wx = fakes.NewWeChat(t, o.wechat)
	if o.im.CallbackToken == "" && o.env["IM_CALLBACK_AUTH"] != "off" {
		o.im.CallbackToken = "harnesscbtoken" // callbacks are signed, as the bridge requires by default
	}
	o.im.Accounts = append(o.im.Accounts, o.agents...)
	if o.im.Online == nil {
		o.im.Online = o.agents // the agents' clients are logged in
	}
	h.im = fakes.NewIM(t, o.im)
	wo, imo := h.wx.Options(), h.im.Options()
	h.env = map[string]string{
		"LISTEN_ADDR":  "127.0.0.1:0",
		"WECHAT_TOKEN": wo.Token, "WECHAT_APPID": wo.AppID, "WECHAT_APPSECRET": wo.AppSecret,
		"WECHAT_API_BASE": h.wx.URL,
		"IM_SDKAPPID":     fmt.Sprint(imo.SDKAppID), "IM_SECRET_KEY": imo.SecretKey, "IM_ADMIN": imo.Admin,
		"IM_API_BASE": h.im.URL, "IM_AGENTS": strings.Join(o.agents, ","),
		"IM_CALLBACK_TOKEN": o.im.CallbackToken,
		"DATABASE_URL":      db,
		// The fakes serve media on loopback, where the bridge fetches
		// nothing it is not told to.
		"MEDIA_FETCH_ALLOW": strings.TrimPrefix(h.wx.URL, "http://") + "," + strings.TrimPrefix(h.im.URL, "http://"),
	}
	for k, v := range o.env {
		h.env[k] = v
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("bridge logs:\n%s", h.logs.String())
		}
	})
	if !o.external {
		h.start()
	}
	return h
}

// start runs the bridge, points the fakes at it, and waits until it is
// ready.
func (h *harness) start() {
	h.t.Helper()
	var now func() time.Time
	if h.clock != nil {
		now = h.clock.Now
	}
	h.base, h.stop = startBridgeClock(h.t, h.env, h.logs, now, h.sweepEvery)
	h.wx.SetTarget(h.base + "/wechat")
	h.im.SetCallbackURL(h.base + "/imcallback")
}

// startBridge runs a bridge in-process with run and env, its logs into logs,
// and waits until it is ready. It returns its URL and a function that stops
// it and returns run's error.
func startBridge(t testing.TB, env map[string]string, logs *syncBuffer) (base string, stop func() error) {
	t.Helper()
	return startBridgeClock(t, env, logs, nil, 0)
}

// startBridgeClock is startBridge with the bridge's clock now, if not nil:
// it serves as run does, with the configuration's clock set.
func startBridgeClock(t testing.TB, env map[string]string, logs *syncBuffer, now func() time.Time, sweepEvery time.Duration) (base string, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	mark := logs.Len()
	env = maps.Clone(env)
	getenv := mapEnv(env)
	go func() {
		if now == nil && sweepEvery == 0 {
			done <- run(ctx, nil, getenv, io.Discard, logs)
			return
		}
		cfg, err := loadConfig(getenv)
		if err != nil {
			done <- err
			return
		}
		cfg.clock, cfg.sweepEvery = now, sweepEvery
		ln, err := net.Listen("tcp", cfg.ListenAddr)
		if err != nil {
			done <- err
			return
		}
		done <- serve(ctx, cfg, ln, newLogger(cfg, logs))
	}()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-done })
		return err
	}
	t.Cleanup(func() { stop() })
	addr := regexp.MustCompile(`msg=listening addr=(\S+)`)
	eventually(t, "the bridge to listen", func() bool { return addr.MatchString(logs.From(mark)) })
	base = "http://" + addr.FindStringSubmatch(logs.From(mark))[1]
	eventually(t, "the bridge to be ready", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return base, stop
}

// testPostgres returns the URL of a fresh schema in the PostgreSQL database
// TEST_DATABASE_URL names, dropped when the test ends; without the variable
// the test is skipped.
func testPostgres(t testing.TB) string {
	t.Helper()
	base := os.Getenv("TEST_DATABASE_URL")
	if base == "" {
		t.Skip("TEST_DATABASE_URL is not set: skipping the PostgreSQL test (.ci/run sets it)")
	}
	db, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	schema := fmt.Sprintf("bridge_test_%d", time.Now().UnixNano())
	if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
		t.Fatalf("create schema in TEST_DATABASE_URL: %v", err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("pgx", base)
		if err != nil {
			return
		}
		defer db.Close()
		db.Exec("DROP SCHEMA " + schema + " CASCADE")
	})
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	return base + sep + "search_path=" + schema
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

// openStoreDB opens the bridge's SQLite file through a connection of the
// test's own, read-only unless writable. The caller closes it.
func (h *harness) openStoreDB(writable bool) *sql.DB {
	h.t.Helper()
	path, err := sqlitePath(h.env["DATABASE_URL"])
	if err != nil {
		h.t.Fatal(err)
	}
	mode := "mode=ro&"
	if writable {
		mode = ""
	}
	db, err := sql.Open("sqlite", "file:"+fileURIPath(filepath.ToSlash(path))+"?"+mode+"_pragma=busy_timeout(5000)")
	if err != nil {
		h.t.Fatal(err)
	}
	return db
}

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

// textsTo returns the texts of the IM messages delivered to account, in
// the order they arrived, joined by sep.
func (h *harness) textsTo(account, sep string) string {
	var texts []string
	for _, m := range h.messagesTo(account) {
		texts = append(texts, m.Text)
	}
	return strings.Join(texts, sep)
}

// bridgeNotice reports whether m is the bridge's word to an agent: from the
// admin, or marked inside a customer's conversation.
func bridgeNotice(m fakes.Message) bool {
	return m.From == "administrator" || strings.HasPrefix(m.Text, noticeMark)
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
func golden(t testing.TB, name string, got []byte) {
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
func goldenJSON(t testing.TB, name string, body []byte, vary ...string) {
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
	err := run(context.Background(), nil, mapEnv(env), io.Discard, io.Discard)
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
	if err := run(context.Background(), []string{"serve"}, mapEnv(nil), io.Discard, io.Discard); err == nil {
		t.Fatal("run accepted an unknown argument")
	}
}

func TestDemo(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"demo"}, mapEnv(nil), &out, io.Discard); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	for _, want := range []string{demoQuestion, demoAnswer, "openim/sendmsg", "C2C.CallbackAfterSendMsg", "custom/send",
		"number 1 in the queue", "State.StateChange (agent_lee Login", "/transfer agent_lee", "Transferred to you by agent_kim", "/end",
		"rated the conversation 5 of 5", "Done:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// burstOpenID is the openid of customer c of a burst.
func burstOpenID(c int) string { return fmt.Sprintf("o_burst_%d", c) }

// burst has customers write at once, each sending each messages in turn,
// "c<customer> m<i>".
func (h *harness) burst(customers, each int) {
	var wg sync.WaitGroup
	for c := range customers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				h.wx.SendText(context.Background(), burstOpenID(c), fmt.Sprintf("c%d m%02d", c, i))
			}
		}()
	}
	wg.Wait()
}

// checkBurst waits for a burst to reach IM and checks that each customer's
// messages arrived once each, in the order sent.
func (h *harness) checkBurst(customers, each int) {
	h.t.Helper()
	eventually(h.t, "the burst in IM", func() bool {
		n := 0
		for _, m := range h.im.Messages() {
			if strings.HasPrefix(m.From, customerIM("o_burst_")) {
				n++
			}
		}
		return n >= customers*each
	})
	for c := range customers {
		var got, want []string
		for i := range each {
			want = append(want, fmt.Sprintf("c%d m%02d", c, i))
		}
		for _, m := range h.im.Messages() {
			if m.From == customerIM(burstOpenID(c)) {
				got = append(got, m.Text)
			}
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			h.t.Errorf("customer %d: IM got %v, want %v", c, got, want)
		}
	}
}
