package fakes

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tencentyun/tls-sig-api-v2-golang/tencentyun"
)

// IMOptions configures a fake Tencent IM app. Zero fields take the defaults.
type IMOptions struct {
	SDKAppID  uint64 // default 1400000001
	SecretKey string // default fake-im-secret-key-0123456789abcdef0123456789abcdef
	Admin     string // default administrator
	// Accounts are imported before the fake starts (the agents, usually).
	Accounts []string
	// CallbackToken, if set, signs callbacks as the console's
	// authentication switch does: Sign=hex(sha256(token+RequestTime)).
	CallbackToken string
	// Trial makes the app a trial (体验版) app: it holds at most 100
	// accounts, the admin's included (account_import answers 70398), and
	// takes a deleted UserID again at once. Otherwise it is a paid app,
	// which refuses to import a UserID deleted in the last three months
	// (70399). Both: the error-code table, 269/1671; account_delete, 269/36443.
	Trial bool
	// DedupWindow is how long a repeated sendmsg is dropped; default 120 s,
	// IM's. Tests shorten it to stand for minutes.
	DedupWindow time.Duration
	// RateLimit is the calls per second every API takes before it answers
	// 60007; default: each API's own documented limit (apiLimits);
	// negative: none.
	RateLimit int
	// Online are the accounts logged in when the fake starts (the agents'
	// clients, usually); Login and Logout change them.
	Online []string
	Now    func() time.Time
	Trace  func(string) // narration for the demo
	// Wire, if set, is handed every request between IM and the bridge
	// (wire.go).
	Wire func(Exchange)
	// OnMessage, if set, is called with each message as it is delivered.
	OnMessage func(Message)
	// OnStatusRead, if set, is called after query_online_status has read
	// the accounts' presence and before it answers: what a test does
	// there happens while the answer is on its way.
	OnStatusRead func()
}

// IM is a fake Tencent IM app: the REST API the bridge calls as admin, the
// third-party callbacks IM makes, and agents sending from IM clients.
type IM struct {
	recorder
	URL  string
	t    T
	opts IMOptions
	srv  *httptest.Server

	mu          sync.Mutex
	accounts    map[string]bool
	deleted     map[string]time.Time // when each deleted account was deleted
	sensitive   []string             // words content security refuses (80001)
	files       map[string]file      // what agents' clients uploaded, by id
	messages    []Message
	recent      map[string]recentSend // sendmsg dedup: key → first send
	callbackURL string
	callbacks   []CallbackResult
	cbHTTP      *http.Client
	lastSweep   time.Time                    // when recent was last swept
	unread      map[string]int               // messages delivered to each account
	buckets     map[string]*bucket           // rate limit, by command
	limited     int                          // requests answered 60007
	clientSeq   uint32                       // MsgSeq of the agents' clients' last message
	devices     map[string]map[string]string // account → platform → device state (im_agent.go)
}

// bucket is a token bucket: RateLimit tokens, refilled at RateLimit a second.
type bucket struct {
	tokens float64
	last   time.Time
}

// Message is a one-to-one message IM delivered.
type Message struct {
	From, To  string
	Text      string          // the text elements, joined
	Body      json.RawMessage // MsgBody as sent
	MsgSeq    uint32
	MsgRandom uint32
	MsgKey    string
	MsgTime   int64
	Platform  string // RESTAPI for sendmsg, Web for an agent's client
	Received  time.Time
	Recalled  bool // withdrawn since: MsgFlagBits 8 in the history
	// OnlineOnly: sent to clients online only (OnlineOnlyFlag 1), kept in
	// no history.
	OnlineOnly bool
}

type recentSend struct {
	at     time.Time
	msgKey string
	time   int64
}

// CallbackResult is one callback IM made and how it was answered.
type CallbackResult struct {
	Command string
	Body    []byte
	Status  int
	Answer  string
	Err     error
}

// NewIM starts a fake IM app and stops it when t's test ends.
func NewIM(t T, opts IMOptions) *IM {
	t.Helper()
	if opts.SDKAppID == 0 {
		opts.SDKAppID = 1400000001
	}
	if opts.SecretKey == "" {
		opts.SecretKey = "fake-im-secret-key-0123456789abcdef0123456789abcdef"
	}
	if opts.Admin == "" {
		opts.Admin = "administrator"
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.DedupWindow == 0 {
		opts.DedupWindow = 120 * time.Second
	}
	im := &IM{
		deleted: map[string]time.Time{},
		files:   map[string]file{},
		buckets: map[string]*bucket{},
		unread:  map[string]int{},
		t:       t, opts: opts,
		accounts: map[string]bool{opts.Admin: true},
		recent:   map[string]recentSend{},
		cbHTTP:   WiredClient(opts.Wire, "IM", "bridge", 2*time.Second), // IM waits 2 s for a callback
	}
	for _, a := range opts.Accounts {
		im.accounts[a] = true
	}
	im.devices = map[string]map[string]string{}
	for _, a := range opts.Online {
		im.devices[a] = map[string]string{"Web": deviceOnline}
	}
	im.srv = httptest.NewServer(wired(opts.Wire, "bridge", "IM", http.HandlerFunc(im.serve)))
	im.URL = im.srv.URL
	t.Cleanup(im.srv.Close)
	return im
}

// Options returns the fake's settings, defaults filled in.
func (im *IM) Options() IMOptions {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.opts
}

// SetCallbackURL sets the third-party callback URL (the bridge's
// POST /imcallback); with none set, IM makes no callbacks.
func (im *IM) SetCallbackURL(u string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	im.callbackURL = u
}

// Imported reports whether the account exists.
func (im *IM) Imported(userID string) bool {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.accounts[userID]
}

// Messages returns the messages delivered so far, in order.
func (im *IM) Messages() []Message {
	im.mu.Lock()
	defer im.mu.Unlock()
	return slices.Clone(im.messages)
}

// file is what an agent's client uploaded to IM's storage.
type file struct {
	data        []byte
	contentType string
}

// AddFile keeps data as an agent's client uploads a picture or a file to
// IM's storage before it sends it, and returns the URL an element carries.
func (im *IM) AddFile(data []byte, contentType string) string {
	im.mu.Lock()
	defer im.mu.Unlock()
	id := fmt.Sprintf("f%d", len(im.files)+1)
	im.files[id] = file{data: data, contentType: contentType}
	return im.URL + "/files/" + id
}

// serveFile serves a file AddFile kept, as IM's storage does.
func (im *IM) serveFile(w http.ResponseWriter, r *http.Request, id string) {
	im.mu.Lock()
	f, ok := im.files[id]
	im.mu.Unlock()
	serveStored(w, r, f.data, f.contentType, ok)
}

// RotateKey changes the app's secret key, as the console's: a UserSig made
// with the old key is refused from then on (70009).
func (im *IM) RotateKey(key string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	im.opts.SecretKey = key
}

// SetSensitive makes IM's content security refuse texts holding any of
// words: sendmsg answers 80001.
func (im *IM) SetSensitive(words ...string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	im.sensitive = words
}

// Remove deletes account userID as an administrator does in IM's console.
func (im *IM) Remove(userID string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	delete(im.accounts, userID)
	im.deleted[userID] = im.opts.Now()
}

// Conversation returns the messages between accounts a and b as IM's
// clients and history show them: by time, and the messages of one second
// by MsgSeq (IM's documentation of sendmsg and importmsg).
func (im *IM) Conversation(a, b string) []Message {
	var out []Message
	for _, m := range im.Messages() {
		if m.From == a && m.To == b || m.From == b && m.To == a {
			out = append(out, m)
		}
	}
	slices.SortStableFunc(out, func(x, y Message) int {
		return cmp.Or(cmp.Compare(x.MsgTime, y.MsgTime), cmp.Compare(x.MsgSeq, y.MsgSeq))
	})
	return out
}

// Callbacks returns the callbacks made so far, in order.
func (im *IM) Callbacks() []CallbackResult {
	im.mu.Lock()
	defer im.mu.Unlock()
	return slices.Clone(im.callbacks)
}

// imAnswer is IM's response envelope plus any fields of the API.
type imAnswer map[string]any

func imFail(code int, info string) imAnswer {
	return imAnswer{"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info}
}

func imOK() imAnswer { return imAnswer{"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""} }

// serve handles POST /v4/{service}/{command}. Like IM, it answers HTTP 200
// with the result in the body, whatever the error.
func (im *IM) serve(w http.ResponseWriter, r *http.Request) {
	if id, ok := strings.CutPrefix(r.URL.Path, "/files/"); ok && r.Method == http.MethodGet {
		im.serveFile(w, r, id)
		return
	}
	now := im.opts.Now()
	body := im.record(r, now)
	command, ok := strings.CutPrefix(r.URL.Path, "/v4/")
	if !ok || r.Method != http.MethodPost {
		im.t.Errorf("fake im: unmodelled request %s %s", r.Method, r.URL.Path)
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	if a := im.checkQuery(r.URL.Query(), now); a != nil {
		writeJSON(w, a)
		return
	}
	if !im.allow(command) {
		writeJSON(w, imFail(60007, "REST API call frequency limit exceeded"))
		return
	}
	// Injected faults are the message APIs' (presence readings pass).
	if status, code, inject := im.faultFor(r, command); inject {
		if status != 0 {
			http.Error(w, http.StatusText(status), status)
		} else {
			writeJSON(w, imFail(code, "injected fault"))
		}
		return
	}
	parseCode := 60003
	if strings.HasPrefix(command, "openim/") {
		parseCode = 90001
	}
	var req map[string]json.RawMessage
	if len(bytes.TrimSpace(body)) == 0 || json.Unmarshal(body, &req) != nil {
		writeJSON(w, imFail(parseCode, "Fail to Parse json data of body, Please check it"))
		return
	}
	var a imAnswer
	switch command {
	case "im_open_login_svc/account_import":
		hop(im.opts.Trace, "bridge", "IM", "account_import %s", compactJSON(body))
		a = im.accountImport(req)
	case "im_open_login_svc/account_delete":
		a = im.accountDelete(req)
	case "im_open_login_svc/account_check":
		a = im.accountCheck(req)
	case "openim/sendmsg":
		hop(im.opts.Trace, "bridge", "IM", "openim/sendmsg %s", compactJSON(body))
		a = im.sendMsg(r.Context(), req, now)
	case "openim/admin_getroammsg":
		hop(im.opts.Trace, "bridge", "IM", "openim/admin_getroammsg %s", compactJSON(body))
		a = im.getRoamMsg(req, now)
	case "openim/query_online_status":
		a = im.queryOnlineStatus(req)
	default:
		im.t.Errorf("fake im: unmodelled command %s", command)
		a = imFail(60009, "bad request resource")
	}
	writeJSON(w, a)
}

// faultFor is fault for the APIs faults are injected in: all but
// query_online_status, so that a test's faults meet the calls it means.
func (im *IM) faultFor(r *http.Request, command string) (status, code int, inject bool) {
	if command == "openim/query_online_status" {
		return 0, 0, false
	}
	return im.fault(r)
}

// apiLimits are the calls a second IM takes from an app by default, by API,
// as each API's documentation gives them ("最高调用频率"): sendmsg 269/2282,
// admin_getroammsg 269/42794, account_import 269/1608, account_delete
// 269/36443, account_check 269/38417. Past it IM answers 60007.
var apiLimits = map[string]int{
	"openim/sendmsg":                   200,
	"openim/admin_getroammsg":          200,
	"im_open_login_svc/account_import": 200,
	"im_open_login_svc/account_delete": 100,
	"im_open_login_svc/account_check":  100,
	"openim/query_online_status":       200, // 269/2566
}

// allow takes a token from command's bucket, counting a refusal.
func (im *IM) allow(command string) bool {
	if im.opts.RateLimit < 0 {
		return true
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	now := time.Now() // rate limits are about real time, whatever the fake's clock
	limit := float64(cmp.Or(im.opts.RateLimit, apiLimits[command], 100))
	b, ok := im.buckets[command]
	if !ok {
		b = &bucket{tokens: limit, last: now}
		im.buckets[command] = b
	}
	b.tokens = min(limit, b.tokens+now.Sub(b.last).Seconds()*limit)
	b.last = now
	if b.tokens < 1 {
		im.limited++
		return false
	}
	b.tokens--
	return true
}

// Limited returns how many requests were answered 60007 (rate limit).
func (im *IM) Limited() int {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.limited
}

// checkQuery checks the common query parameters and the admin's UserSig.
func (im *IM) checkQuery(q url.Values, now time.Time) imAnswer {
	sdk := q.Get("sdkappid")
	if sdk == "" {
		return imFail(60012, "sdkappid missing")
	}
	if n, err := strconv.ParseUint(sdk, 10, 64); err != nil || n != im.opts.SDKAppID {
		return imFail(70016, "key not found, check sdkappid and data center")
	}
	if q.Get("contenttype") != "json" {
		return imFail(60002, "HTTP parse error: contenttype must be json")
	}
	if _, err := strconv.ParseUint(q.Get("random"), 10, 32); err != nil {
		return imFail(60002, "HTTP parse error: random must be a 32-bit unsigned integer")
	}
	id, sig := q.Get("identifier"), q.Get("usersig")
	if sig == "" {
		return imFail(70002, "usersig is empty")
	}
	im.mu.Lock()
	key := im.opts.SecretKey // RotateKey may change it
	im.mu.Unlock()
	if err := tencentyun.VerifyUserSig(im.opts.SDKAppID, key, id, sig, now); err != nil {
		switch {
		case errors.Is(err, tencentyun.ErrExpired):
			return imFail(70001, "usersig expired")
		case errors.Is(err, tencentyun.ErrIdentifierNotMatch):
			return imFail(70013, "identifier does not match usersig")
		case errors.Is(err, tencentyun.ErrSdkAppIDNotMatch):
			return imFail(70014, "sdkappid does not match usersig")
		case errors.Is(err, tencentyun.ErrSigNotMatch):
			return imFail(70009, "usersig verification failed")
		}
		return imFail(70003, "usersig parse failed")
	}
	if id != im.opts.Admin {
		return imFail(60010, "requires App admin permission")
	}
	return nil
}

// validUserID is IM's rule: printable ASCII, at most 32 bytes.
func validUserID(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for _, c := range []byte(s) {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

func (im *IM) accountImport(req map[string]json.RawMessage) imAnswer {
	var id string
	raw, ok := req["UserID"]
	if !ok {
		raw = req["Identifier"] // older docs and SDKs
	}
	if json.Unmarshal(raw, &id) != nil || !validUserID(id) {
		return imFail(70402, "invalid parameters: UserID")
	}
	now := im.opts.Now()
	im.mu.Lock()
	defer im.mu.Unlock()
	switch at, deleted := im.deleted[id]; {
	case im.accounts[id]:
		return imOK() // importing again changes nothing
	case !im.opts.Trial && deleted && now.Sub(at) < reimportBar:
		return imFail(70399, "the account was deleted; it cannot be imported again for three months")
	case im.opts.Trial && len(im.accounts) >= trialAccounts:
		return imFail(70398, "the number of accounts exceeds the limit of a trial app")
	}
	im.accounts[id] = true
	return imOK()
}

// A trial app's cap on accounts, and how long a paid app bars a deleted
// UserID.
const (
	trialAccounts = 100
	reimportBar   = 90 * 24 * time.Hour
)

func (im *IM) accountDelete(req map[string]json.RawMessage) imAnswer {
	var items []struct{ UserID string }
	if json.Unmarshal(req["DeleteItem"], &items) != nil || len(items) == 0 || len(items) > 100 {
		return imFail(70402, "invalid parameters: DeleteItem")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	var results []map[string]any
	for _, it := range items {
		if !im.accounts[it.UserID] {
			results = append(results, map[string]any{"ResultCode": 70107, "ResultInfo": "Err_TLS_PT_Open_Login_Account_Not_Exist", "UserID": it.UserID})
			continue
		}
		delete(im.accounts, it.UserID)
		im.deleted[it.UserID] = im.opts.Now()
		results = append(results, map[string]any{"ResultCode": 0, "ResultInfo": "", "UserID": it.UserID})
	}
	a := imOK()
	a["ResultItem"] = results
	return a
}

func (im *IM) accountCheck(req map[string]json.RawMessage) imAnswer {
	var items []struct{ UserID string }
	if json.Unmarshal(req["CheckItem"], &items) != nil || len(items) == 0 || len(items) > 100 {
		return imFail(70402, "invalid parameters: CheckItem")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	var results []map[string]any
	for _, it := range items {
		status := "NotImported"
		if im.accounts[it.UserID] {
			status = "Imported"
		}
		results = append(results, map[string]any{"UserID": it.UserID, "ResultCode": 0, "ResultInfo": "", "AccountStatus": status})
	}
	a := imOK()
	a["ResultItem"] = results
	return a
}
