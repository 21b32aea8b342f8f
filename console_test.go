package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestConsoleInABrowser drives the teaching console in headless Chromium as
// a learner would: it plays the tutorial and finds the customer's Korean
// question in the agent's view, the answer in the customer's, and the
// sendmsg that carried it on the wire; writes as the customer and answers
// as the agent; makes IM fail and watches the outbox retry, then deliver;
// and switches WeChat to safe mode and finds the Encrypt envelope beside
// its plaintext. No secret reaches the page. With CONSOLE_SCREENSHOT set
// to a path, it saves a picture of the console there after the tutorial.
func TestConsoleInABrowser(t *testing.T) {
	chrome := findChromium()
	if chrome == "" && os.Getenv("CI") != "" {
		t.Fatal("Chromium is not installed, and CI runs the console's browser test: .ci/run installs it")
	}
	if chrome == "" {
		t.Skip("Chromium is not installed: the console's browser test needs it (Debian: apt-get install chromium; CI installs it)")
	}
	c, base := startConsole(t)
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chrome), chromedp.NoSandbox,
		chromedp.Flag("disable-gpu", true), chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.WindowSize(1600, 1000), chromedp.UserDataDir(t.TempDir()))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	// The first action starts the browser, which lives as long as its
	// context: the deadline is set after it.
	if err := chromedp.Do(bctx, chromedp.Navigate(base)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bctx, 3*time.Minute)
	defer cancel()
	b := &browser{t: t, ctx: ctx}

	b.run(chromedp.WaitVisible("#play"))
	b.waitJS("the URL verification on the wire", `wire().includes('GET /wechat: URL verification')`)
	b.run(chromedp.Click("#play"))
	b.waitJS("the tutorial's last step", `wire().includes('10. agent_lee ends the conversation') && !document.getElementById('play').disabled`)
	b.run(chromedp.Click(`[data-agent="`+demoSecondAgent+`"]`), chromedp.Click(`[data-peer="wx_`+demoCustomer+`"]`))
	b.waitJS("the rating in agent_lee's view", `text('#im-chat').includes('rated the conversation 5 of 5')`)
	if errs := b.eval(`[...document.querySelectorAll('#exchanges li.error')].map(li => li.textContent).join('; ')`); errs != "" {
		t.Errorf("the tutorial showed errors: %s", errs)
	}
	b.waitJS("the wire in the order the exchanges began", `[...document.querySelectorAll('#exchanges li')].every((li, i, all) =>
		i == 0 || +all[i-1].dataset.t <= +li.dataset.t)`)
	b.waitJS("a sentence and a source for every exchange", `[...document.querySelectorAll('#exchanges li.http')].every(li =>
		li.querySelector('.what').textContent.length > 40 && li.querySelector('.what a[href^="https://"]'))`)

	customerA := `[data-peer="wx_` + demoCustomer + `"]`
	b.run(chromedp.Click(`[data-agent="`+demoAgent+`"]`), chromedp.Click(customerA))
	b.waitJS("the question in agent_kim's view", fmt.Sprintf(`text('#im-chat').includes(%q)`, demoQuestion))
	b.run(chromedp.Click(`[data-customer="` + demoCustomer + `"]`))
	b.waitJS("the answer in the customer's chat", fmt.Sprintf(`text('#chat').includes(%q)`, demoAnswer))
	b.waitJS("the sendmsg payload on the wire", fmt.Sprintf(`exchange('openim/sendmsg', %q)`, demoQuestion))
	b.waitJS("the agent's photo uploaded, its multipart summarised", `exchange('POST /cgi-bin/media/upload', 'part "media": file ')`)
	b.waitJS("the agent's client fetching the customer's photo", `exchange('agent → bridge  GET /media/', '(image/png, ')`)
	if path := os.Getenv("CONSOLE_SCREENSHOT"); path != "" {
		b.eval(fmt.Sprintf(`(() => { const li = [...document.querySelectorAll('#exchanges li.http')].find(li =>
			li.querySelector('summary').textContent.includes('openim/sendmsg') && li.textContent.includes(%q));
			li.querySelector('details').open = true; li.scrollIntoView(); return ''; })()`, demoQuestion))
		png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
		if err == nil {
			err = os.WriteFile(path, png, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}

	// The customer writes; whichever agent has them answers.
	b.run(chromedp.SetValue("#customer-text", "사이즈 교환도 되나요?"), chromedp.Click("#customer-form button"))
	b.waitJS("the customer's new message with an agent", `findInAgents('사이즈 교환도 되나요?') !== ''`)
	agent, peer, _ := strings.Cut(b.eval(`findInAgents('사이즈 교환도 되나요?')`), "|")
	b.run(chromedp.Click(`[data-agent="`+agent+`"]`), chromedp.Click(`[data-peer="`+peer+`"]`),
		chromedp.SetValue("#agent-text", "네, 일주일 안에 가능합니다."), chromedp.Click("#agent-form button"))
	b.waitJS("the agent's answer in the customer's chat", `text('#chat').includes('네, 일주일 안에 가능합니다.')`)

	// A voice note and a location reach the agent as IM's own elements.
	b.run(chromedp.Click(`#customer [data-do="voice"]`), chromedp.Click(`#customer [data-do="location"]`))
	b.waitJS("the voice note and the location in the agent's view", `text('#im-chat').includes('🎤 voice note, 3 s') && text('#im-chat').includes('📍 Seoul City Hall')`)

	// The agent logs out and in with the buttons.
	b.run(chromedp.Click(`#logout`))
	b.waitJS("the agent offline", `text('#agent-status').endsWith('is Offline')`)
	b.run(chromedp.Click(`#login`))
	b.waitJS("the agent online", `text('#agent-status').endsWith('is Online')`)

	// IM fails: the message waits in the outbox, retried, and is
	// delivered when IM is back.
	b.run(chromedp.Click("#imfail"))
	b.waitJS("IM failing", `document.getElementById('imfail').checked`)
	b.run(chromedp.SetValue("#customer-text", "IM is down?"), chromedp.Click("#customer-form button"))
	b.waitJS("a retried item in the outbox", `[...document.querySelectorAll('#outbox-rows tr.pending')].some(r => r.textContent.includes('IM is down?') && +r.cells[4].textContent >= 2)`)
	b.run(chromedp.Click("#imfail"))
	b.waitJS("the item delivered", `[...document.querySelectorAll('#outbox-rows tr.done')].some(r => r.textContent.includes('IM is down?'))`)

	// Safe mode: the push's Encrypt envelope, and its plaintext beside it.
	b.run(chromedp.Click("#safe"))
	b.waitJS("safe mode", `document.getElementById('safe').checked`)
	b.run(chromedp.SetValue("#customer-text", "암호화된 메시지"), chromedp.Click("#customer-form button"))
	b.waitJS("the Encrypt envelope and its plaintext on the wire", `[...document.querySelectorAll('#exchanges li.http')].some(li =>
		li.querySelector('summary').textContent.includes('POST /wechat: text') && li.textContent.includes('<Encrypt><![CDATA[') &&
		li.querySelector('pre.inner') && li.querySelector('pre.inner').textContent.includes('암호화된 메시지') && li.textContent.includes('msg_signature = sha1'))`)

	page := b.eval(`document.body.textContent`)
	_, sec := c.current()
	for _, secret := range []string{"ACCESS_TOKEN_", "fake-app-secret", "fake-im-secret-key", "usersig=eJ", sec.WeChatToken, sec.AESKey, sec.IMCallbackToken} {
		if strings.Contains(page, secret) {
			t.Errorf("the page shows a secret (%.6s…)", secret)
		}
	}
	if sig := regexp.MustCompile(`[0-9a-f]{40,}`).FindString(page); sig != "" {
		t.Errorf("the page shows a whole signature: %s", sig)
	}
	if !strings.Contains(page, "signature = sha1") || !strings.Contains(page, "✓ matches") || strings.Contains(page, "✗") {
		t.Errorf("the page does not show each signature made from its inputs and matching")
	}
}

// browser is a page in Chromium and the helpers the test asks it with.
type browser struct {
	t   *testing.T
	ctx context.Context
}

// helpers are functions the test's expressions use.
const helpers = `
const text = (sel) => document.querySelector(sel).textContent;
const wire = () => text('#exchanges');
const exchange = (title, body) => [...document.querySelectorAll('#exchanges li.http')].some(li =>
	li.querySelector('summary').textContent.includes(title) && li.textContent.includes(body));
const findInAgents = (s) => {
	for (const a of document.querySelectorAll('[data-agent]')) {
		a.click();
		for (const c of document.querySelectorAll('#convs [data-peer]')) {
			c.click();
			if (text('#im-chat').includes(s)) return a.dataset.agent + '|' + c.dataset.peer;
		}
	}
	return '';
};
`

func (b *browser) run(steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.ctx, steps...); err != nil {
		b.t.Fatal(err)
	}
}

// eval is the string expression gives, the helpers in scope.
func (b *browser) eval(expression string) string {
	b.t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[string]("(() => {"+helpers+"return ("+expression+");})()"))
	if err != nil {
		b.t.Fatal(err)
	}
	return v
}

// waitJS polls expression until it is true, or fails at the test's deadline.
func (b *browser) waitJS(what, expression string) {
	b.t.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := chromedp.Run(b.ctx, chromedp.Evaluate[bool]("(() => {"+helpers+"return ("+expression+");})()"))
		if err == nil && ok {
			return
		}
		select {
		case <-b.ctx.Done():
			b.t.Fatalf("timed out waiting for %s (last error %v)", what, err)
		case <-tick.C:
		}
	}
}

// findChromium is the path of a Chromium or Chrome to drive, or "".
func findChromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// startConsole serves the console on a loopback port for the test's life,
// and returns it and its URL.
func startConsole(t *testing.T) (*console, string) { return startConsoleWith(t, consoleEnv) }

// startConsoleWith is startConsole for a console whose bridges take env.
func startConsoleWith(t *testing.T, env map[string]string) (*console, string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	c := newConsole(io.Discard, env)
	go func() { done <- c.runOn(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("console: %v", err)
		}
	})
	return c, "http://" + ln.Addr().String() + "/"
}

// TestConsolePageIsSmallAndSelfContained: the page, its script and its
// style weigh under 100 KB, and load nothing from elsewhere.
func TestConsolePageIsSmallAndSelfContained(t *testing.T) {
	_, base := startConsole(t)
	total := 0
	for _, path := range []string{"", "console.js", "console.css"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /%s: %d", path, resp.StatusCode)
		}
		total += len(b)
		for _, remote := range []string{`src="http`, `rel="stylesheet" href="http`, "@import", "url(http", "fetch('http"} {
			if strings.Contains(string(b), remote) {
				t.Errorf("/%s loads something from elsewhere (%s)", path, remote)
			}
		}
	}
	if total >= 100<<10 {
		t.Errorf("the page weighs %d bytes, want under 100 KB", total)
	}
	entries, _ := fs.ReadDir(consoleFiles, "console")
	if len(entries) != 3 {
		t.Errorf("console/ has %d files, want the page, one script and one style", len(entries))
	}
}

// TestConsoleShowsADeadLetter: with IM failing past its delivery window, the
// console's outbox shows the customer's message retried, then a dead
// letter; when IM is back, the agent reads the notice of it from the
// admin. Actions go in through POST /act, and the state comes out of the
// page's stream.
func TestConsoleShowsADeadLetter(t *testing.T) {
	env := map[string]string{"RETRY_MIN_DELAY": "200ms", "RETRY_MAX_DELAY": "500ms", "IM_DELIVERY_WINDOW": "3s"}
	_, base := startConsoleWith(t, env)
	s := watchConsole(t, base)
	s.act(consoleAction{Do: "follow", Who: demoCustomer})
	s.wait("the customer's account imported", func(st consoleState) bool {
		return len(st.Outbox) > 0 && st.Outbox[0].State == "done"
	})
	s.act(consoleAction{Do: "imfail", Text: "on"})
	s.act(consoleAction{Do: "write", Who: demoCustomer, Text: "Is anyone there?"})
	s.wait("the message retried", func(st consoleState) bool {
		o, ok := outboxItem(st, "Is anyone there?")
		return ok && o.State == "pending" && o.Attempts >= 2 && o.Error != ""
	})
	s.wait("the message a dead letter", func(st consoleState) bool {
		o, ok := outboxItem(st, "Is anyone there?")
		return ok && o.State == "failed"
	})
	s.act(consoleAction{Do: "imfail", Text: "off"})
	s.wait("the admin's notice to the agent", func(st consoleState) bool {
		for _, c := range st.Agents[0].Convs {
			for _, m := range c.Msgs {
				if c.Peer == "administrator" && strings.Contains(m.Text, "Is anyone there?") {
					return true
				}
			}
		}
		return false
	})

	// A reset starts a clean world: no chat, no outbox, IM answering.
	s.act(consoleAction{Do: "reset"})
	s.wait("a clean world", func(st consoleState) bool {
		return len(st.Customers[0].Chat) == 0 && len(st.Outbox) == 0 && !st.IMDown && len(st.Agents) == 2 && len(st.Agents[0].Convs) == 0
	})
}

// TestDemoWebCommand: `demo -web ADDR` prints the console's URL, serves the
// page there, and stops cleanly when asked.
func TestDemoWebCommand(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"demo", "-web", "127.0.0.1:0"}, mapEnv(nil), w, io.Discard) }()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, r)
	u := regexp.MustCompile(`http://127\.0\.0\.1:\d+/`).FindString(line)
	if u == "" {
		t.Fatalf("demo -web printed %q, want the console's URL", line)
	}
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "teaching console") {
		t.Errorf("GET %s: %d", u, resp.StatusCode)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("demo -web stopped with %v", err)
	}
}

// TestConsoleActsForItsPageOnly: /act takes one JSON action the console
// knows, for someone of its world, from its own page; anything else is
// refused and nothing happens.
func TestConsoleActsForItsPageOnly(t *testing.T) {
	c, base := startConsole(t)
	post := func(ctype, origin, body string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, base+"act", strings.NewReader(body))
		req.Header.Set("Content-Type", ctype)
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	own := strings.TrimSuffix(base, "/")
	if got := post("application/json", own, `{"do":"follow","who":"`+demoCustomer+`"}`); got != http.StatusAccepted {
		t.Fatalf("a follow: %d", got)
	}
	for deadline := time.Now().Add(30 * time.Second); !c.state(context.Background()).Customers[0].Followed; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the follow did not reach the console's customer")
		}
	}
	write := `{"do":"write","who":"` + demoCustomer + `","text":"hi"}`
	for _, tc := range []struct {
		name, ctype, origin, body string
		want                      int
	}{
		{"plain text, as a form of another site may post", "text/plain", "", write, http.StatusUnsupportedMediaType},
		{"another origin", "application/json", "http://evil.example", write, http.StatusForbidden},
		{"two values", "application/json", own, write + `{}`, http.StatusBadRequest},
		{"an unknown field", "application/json", own, `{"do":"write","who":"` + demoCustomer + `","text":"hi","x":1}`, http.StatusBadRequest},
		{"an unknown action", "application/json", own, `{"do":"nonsense"}`, http.StatusBadRequest},
		{"an unknown customer", "application/json", own, `{"do":"write","who":"o_nobody","text":"hi"}`, http.StatusBadRequest},
		{"an empty text", "application/json", own, `{"do":"write","who":"` + demoCustomer + `","text":" "}`, http.StatusBadRequest},
		{"an agent to an openid, not an IM account", "application/json", own, `{"do":"reply","who":"agent_kim","to":"` + demoCustomer + `","text":"hi"}`, http.StatusBadRequest},
		{"an agent of no one's", "application/json", own, `{"do":"login","who":"agent_nobody"}`, http.StatusBadRequest},
		{"a customer who does not follow", "application/json", own, `{"do":"write","who":"` + demoSecondCustomer + `","text":"hi"}`, http.StatusBadRequest},
		{"a second follow", "application/json", own, `{"do":"follow","who":"` + demoCustomer + `"}`, http.StatusBadRequest},
	} {
		if got := post(tc.ctype, tc.origin, tc.body); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
	if got := post("application/json", own, write); got != http.StatusAccepted {
		t.Fatalf("the page's own action: %d, want 202", got)
	}
	// Only that one reached WeChat: after the follow and its welcome, the
	// customer's chat holds it and the bridge's answer alone.
	var chat []chatLine
	for deadline := time.Now().Add(30 * time.Second); len(chat) < 4 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		chat = c.state(context.Background()).Customers[0].Chat
	}
	if len(chat) != 4 || chat[2].Text != "hi" || chat[3].From != "account" {
		t.Errorf("the customer's chat: %+v, want the follow, the welcome, their one message and the bridge's answer", chat)
	}

	// The console answers to its own names only: not to another site's
	// name rebound to its address.
	req, _ := http.NewRequest(http.MethodPost, base+"act", strings.NewReader(write))
	req.Host = "attacker.example"
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", "http://attacker.example")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("another host's name: %v %v, want 421", resp.Status, err)
	}
	// The bridge's own server never serves the console.
	c.mu.Lock()
	bridge := c.world.base
	c.mu.Unlock()
	for _, path := range []string{"/", "/console.js", "/console.css", "/events", "/act"} {
		resp, err := http.Get(bridge + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("the bridge answers GET %s with %d", path, resp.StatusCode)
		}
	}
}

func outboxItem(st consoleState, text string) (outboxView, bool) {
	for _, o := range st.Outbox {
		if o.Lane == "im:"+demoCustomer && strings.Contains(o.What, text) {
			return o, true
		}
	}
	return outboxView{}, false
}

// consoleStream is the console's stream as a page reads it: the latest
// state.
type consoleStream struct {
	t    *testing.T
	base string
	mu   sync.Mutex
	last consoleState
}

// watchConsole reads the console's stream at base for the test's life.
func watchConsole(t *testing.T, base string) *consoleStream {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	s := &consoleStream{t: t, base: base}
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 4<<20)
		event := ""
		for sc.Scan() {
			line := sc.Text()
			if e, ok := strings.CutPrefix(line, "event: "); ok {
				event = e
			} else if data, ok := strings.CutPrefix(line, "data: "); ok && event == "state" {
				var st consoleState
				if json.Unmarshal([]byte(data), &st) == nil {
					s.mu.Lock()
					s.last = st
					s.mu.Unlock()
				}
			}
		}
	}()
	return s
}

// act posts a, and checks the console answers status (202 by default).
func (s *consoleStream) act(a consoleAction, status ...int) {
	s.t.Helper()
	want := append(status, http.StatusAccepted)[0]
	b, _ := json.Marshal(a)
	resp, err := http.Post(s.base+"act", "application/json", bytes.NewReader(b))
	if err != nil {
		s.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != want {
		s.t.Fatalf("%s: %d, want %d", b, resp.StatusCode, want)
	}
}

// wait polls the latest state until cond holds, for at most a minute.
func (s *consoleStream) wait(what string, cond func(consoleState) bool) {
	s.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		s.mu.Lock()
		st := s.last
		s.mu.Unlock()
		if cond(st) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("timed out waiting for %s; last state %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
