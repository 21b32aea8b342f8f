// Package fakes has stand-ins for the WeChat Official Account API and the
// Tencent IM REST API, served by httptest on loopback, for the bridge's
// end-to-end tests and its offline demo.
//
// They are as strict as the real services as far as ../shared/protocol/
// documents them: they check credentials and signatures, answer with the
// vendors' envelopes and error codes, keep the state the real services keep
// (accounts, tokens, the reply window and quota, IM's duplicate window and
// history), and call back and push the way the vendors do. Every request is
// recorded, faults can be switched on, and any request they do not model
// fails the test. The rules, each with its source:
//
// WeChat (developers.weixin.qq.com, Official Account docs)
//   - custom/send: only within 48 h of the customer's last message (45015),
//     five replies a message, three within a minute of a follow or a menu
//     click unless a longer window is open (45047); a text of at
//     most 2,048 UTF-8 bytes (45002: WeChat gives no figure for custom/send;
//     2,048 is WeCom's documented limit and what reports of 45002 give).
//   - custom/typing: within 30 s of the customer's last message (45080); the
//     state lasts 15 s and is not sent again while it shows (45081); a bad
//     command is 45072; a message ends it.
//   - media/get (getMedia): a customer's media for three days, then 40007; a
//     video as {"video_url": …}. media/upload: image PNG/JPEG/GIF 10 MB, voice
//     AMR/MP3 2 MB, video MP4 10 MB, thumb JPEG 64 KB (40004 type, 40005
//     format, 40006 size); image, voice and video messages by their uploads.
//   - media/upload judges a file by its part's name as well as its bytes: a
//     name without the type's extension is 40005; a thumb's id is answered
//     as thumb_media_id, not media_id (SDK users' reports: easywechat #1931,
//     weixin4j #34, silenceper/wechat #14; ../shared/protocol/wechat.md,
//     Temporary media).
//
// Tencent IM (cloud.tencent.com/document/product/269)
//   - sendmsg (2282): a repeat of (sender, MsgSeq, MsgRandom, CRC32 of the
//     content) within 120 s is dropped and answered as the first; a body of
//     at most 12 KB (93000; the message-length page); content security
//     (80001, words set by SetSensitive); a recipient deleted is 90012, one
//     never imported 20003; history ordered by time, then MsgSeq within a
//     second; online-only messages kept in no history; each element's
//     required fields (message formats, 1047/33527): Text, Location, Face,
//     Custom, Image, Sound, VideoFile, File.
//   - Frequency (each API's page): sendmsg, admin_getroammsg,
//     account_import and query_online_status 200 calls a second,
//     account_delete and account_check 100; past it 60007.
//   - Accounts (1608, 36443, error codes 1671): a trial app holds at most 100
//     accounts (70398) and takes a deleted UserID again; a paid app refuses
//     a UserID deleted in the last three months (70399).
//   - Callbacks (1522): signed with the console's token, 2 s to answer,
//     After not made again. State.StateChange (2570) on an agent's Login
//     (Register), Logout (Unregister) or Disconnect (LinkClose), with
//     EventTime in ms.
//   - query_online_status (2566): 1 to 500 accounts; an account IM does
//     not have in ErrorList, 70107. Injected faults pass it by, so that a
//     test's faults meet the calls it means.
//   - Presence (2570, 2566, 3665): an agent may be logged in on several
//     devices; they are Online while any device is, PushOnline while none
//     is but a mobile app killed with offline push registered, else
//     Offline. State.StateChange does not say which device changed: an
//     agent who loses one of two gets a Disconnect while still Online.
//
// Not modelled: WeChat's permanent media, the multi-agent (kf) APIs, force_refresh's daily limit, daily API quotas and the IP allow-list;
// IM's groups, profiles, offline push, deleting messages from a history, a
// trial app's 1,000 messages a day, and console switches other than the
// callback token.
package fakes

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"
)

// T is the part of testing.TB the fakes use. The demo passes its own.
type T interface {
	Helper()
	Errorf(format string, args ...any)
	Cleanup(func())
}

// Standalone is a T for the fakes outside a test (the demo, the load
// generator): it keeps what they report, and runs their cleanups at Close.
type Standalone struct {
	mu       sync.Mutex
	errs     []string
	cleanups []func()
}

func (s *Standalone) Helper() {}

// Errorf keeps a problem the fakes report.
func (s *Standalone) Errorf(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.errs = append(s.errs, fmt.Sprintf(format, args...))
}

// Cleanup registers f to run at Close.
func (s *Standalone) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

// Errors returns the problems reported so far.
func (s *Standalone) Errors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.errs)
}

// Close runs the cleanups, the last registered first: the fakes stop.
func (s *Standalone) Close() {
	s.mu.Lock()
	cleanups := s.cleanups
	s.cleanups = nil
	s.mu.Unlock()
	for _, f := range slices.Backward(cleanups) {
		f()
	}
}

// Request is one request a fake received.
type Request struct {
	Method string
	Path   string
	Query  url.Values
	Body   []byte
	At     time.Time
}

// recorder keeps requests and the fault switches shared by both fakes.
type recorder struct {
	mu       sync.Mutex
	requests []Request

	failNext   int
	failCode   int // vendor error code to answer with, if failStatus is 0
	failStatus int // HTTP status to answer with
	delay      time.Duration
	hold       chan struct{}
}

// record stores r and returns its body.
func (rc *recorder) record(r *http.Request, now time.Time) []byte {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	rc.mu.Lock()
	rc.requests = append(rc.requests, Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.Query(), Body: body, At: now})
	rc.mu.Unlock()
	return body
}

// Requests returns a copy of every request received so far.
func (rc *recorder) Requests() []Request {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]Request(nil), rc.requests...)
}

// RequestsTo returns the requests received for path, in order.
func (rc *recorder) RequestsTo(path string) []Request {
	var out []Request
	for _, r := range rc.Requests() {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// FailNext makes the next n API requests fail with the vendor error code,
// answered the way the vendor answers it (HTTP 200 with the error in the
// body).
func (rc *recorder) FailNext(n, code int) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.failNext, rc.failCode, rc.failStatus = n, code, 0
}

// FailNextStatus makes the next n API requests answer with HTTP status.
func (rc *recorder) FailNextStatus(n, status int) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.failNext, rc.failCode, rc.failStatus = n, 0, status
}

// Delay makes every API request wait d before it is answered.
func (rc *recorder) Delay(d time.Duration) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	rc.delay = d
}

// Hold makes API requests wait, unanswered, until the returned function is
// called (or the request's client gives up).
func (rc *recorder) Hold() (release func()) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	ch := make(chan struct{})
	rc.hold = ch
	var once sync.Once
	return func() {
		once.Do(func() {
			rc.mu.Lock()
			if rc.hold == ch {
				rc.hold = nil
			}
			rc.mu.Unlock()
			close(ch)
		})
	}
}

// fault applies the delay and hold, then reports the injected failure the
// request must get, if any: status is an HTTP status, or code a vendor code.
func (rc *recorder) fault(r *http.Request) (status, code int, inject bool) {
	rc.mu.Lock()
	delay, hold := rc.delay, rc.hold
	rc.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-r.Context().Done():
		}
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
		}
		t.Stop()
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.failNext > 0 {
		rc.failNext--
		return rc.failStatus, rc.failCode, true
	}
	return 0, 0, false
}

// serveStored answers with a stored file, data of type ct, if there is one
// (ok), and 404 if not.
func serveStored(w http.ResponseWriter, r *http.Request, data []byte, ct string, ok bool) {
	if !ok {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", ct)
	w.Write(data)
}

// hop writes one line of the demo's narration, a message going from one
// party to another, if a tracer is set.
func hop(fn func(string), from, to, format string, args ...any) {
	if fn != nil {
		fn(fmt.Sprintf("%-9s → %-9s ", from, to) + fmt.Sprintf(format, args...))
	}
}

// compactJSON returns b with insignificant space removed, for traces.
func compactJSON(b []byte) string {
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return string(b)
	}
	return buf.String()
}

// WaitReady waits until the bridge at base answers /readyz with 200, for
// the demo and the load generator. It gives up when ctx ends or exited is
// closed: the bridge is gone.
func WaitReady(ctx context.Context, exited <-chan struct{}, base string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	return WaitFor(ctx, "the bridge at "+base+" to be ready", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// WaitFor polls cond until it holds or ctx ends.
func WaitFor(ctx context.Context, what string, cond func() bool) error {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
	return nil
}
