package fakes

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
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
	// RateLimit is the calls per second each API takes before it answers
	// 60007, as IM's default frequency limit; default 200, negative: none.
	RateLimit int
	Now       func() time.Time
	Trace     func(string) // narration for the demo
	// OnMessage, if set, is called with each message as it is delivered.
	OnMessage func(Message)
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
	messages    []Message
	recent      map[string]recentSend // sendmsg dedup: key → first send
	callbackURL string
	callbacks   []CallbackResult
	cbHTTP      *http.Client
	lastSweep   time.Time          // when recent was last swept
	unread      map[string]int     // messages delivered to each account
	buckets     map[string]*bucket // rate limit, by command
	limited     int                // requests answered 60007
	clientSeq   uint32             // MsgSeq of the agents' clients' last message
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
	if opts.RateLimit == 0 {
		opts.RateLimit = 200
	}
	im := &IM{
		buckets: map[string]*bucket{},
		unread:  map[string]int{},
		t:       t, opts: opts,
		accounts: map[string]bool{opts.Admin: true},
		recent:   map[string]recentSend{},
		cbHTTP:   &http.Client{Timeout: 2 * time.Second}, // IM waits 2 s for a callback
	}
	for _, a := range opts.Accounts {
		im.accounts[a] = true
	}
	im.srv = httptest.NewServer(http.HandlerFunc(im.serve))
	im.URL = im.srv.URL
	t.Cleanup(im.srv.Close)
	return im
}

// Options returns the fake's settings, defaults filled in.
func (im *IM) Options() IMOptions { return im.opts }

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
	if status, code, inject := im.fault(r); inject {
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
	default:
		im.t.Errorf("fake im: unmodelled command %s", command)
		a = imFail(60009, "bad request resource")
	}
	writeJSON(w, a)
}

// allow takes a token from command's bucket, counting a refusal.
func (im *IM) allow(command string) bool {
	if im.opts.RateLimit < 0 {
		return true
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	now := time.Now() // rate limits are about real time, whatever the fake's clock
	b, ok := im.buckets[command]
	if !ok {
		b = &bucket{tokens: float64(im.opts.RateLimit), last: now}
		im.buckets[command] = b
	}
	b.tokens = min(float64(im.opts.RateLimit), b.tokens+now.Sub(b.last).Seconds()*float64(im.opts.RateLimit))
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
	if err := tencentyun.VerifyUserSig(im.opts.SDKAppID, im.opts.SecretKey, id, sig, now); err != nil {
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
	im.mu.Lock()
	im.accounts[id] = true
	im.mu.Unlock()
	return imOK()
}

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

// sendMsg serves openim/sendmsg: it validates the message as IM does, drops
// a repeat of the same (sender, MsgSeq, MsgRandom, content) within 120 s,
// delivers it and fires the callbacks the message does not forbid.
func (im *IM) sendMsg(ctx context.Context, req map[string]json.RawMessage, now time.Time) imAnswer {
	var to, from string
	if json.Unmarshal(req["To_Account"], &to) != nil || to == "" {
		return imFail(90003, "Invalid format of To_Account")
	}
	var random uint32
	if json.Unmarshal(req["MsgRandom"], &random) != nil {
		return imFail(90005, "MsgRandom is missing or not an integer")
	}
	var body []json.RawMessage
	if json.Unmarshal(req["MsgBody"], &body) != nil || len(body) == 0 {
		return imFail(90007, "MsgBody is not an array")
	}
	text, err := checkBody(body)
	if err != nil {
		return imFail(90010, err.Error())
	}
	var seq uint32
	if raw, ok := req["MsgSeq"]; ok && json.Unmarshal(raw, &seq) != nil {
		return imFail(90010, "MsgSeq is not a 32-bit unsigned integer")
	}
	if seq == 0 {
		seq = randUint32()
	}
	if raw, ok := req["MsgLifeTime"]; ok {
		var life int64
		if json.Unmarshal(raw, &life) != nil || life < 0 || life > 604800 {
			return imFail(90026, "MsgLifeTime is invalid")
		}
	}
	var forbid []string
	if raw, ok := req["ForbidCallbackControl"]; ok && json.Unmarshal(raw, &forbid) != nil {
		return imFail(90010, "ForbidCallbackControl is not an array of strings")
	}
	from = im.opts.Admin
	if raw, ok := req["From_Account"]; ok {
		if json.Unmarshal(raw, &from) != nil || from == "" {
			return imFail(90008, "From_Account is invalid")
		}
	}

	im.mu.Lock()
	switch {
	case !im.accounts[from]:
		im.mu.Unlock()
		return imFail(90008, "From_Account is not imported")
	case !im.accounts[to]:
		im.mu.Unlock()
		return imFail(20003, "To_Account is invalid or not imported")
	}
	key := fmt.Sprintf("%s|%d|%d|%08x", from, seq, random, crc32.ChecksumIEEE(req["MsgBody"]))
	if now.Sub(im.lastSweep) > 10*time.Second {
		for k, v := range im.recent {
			if now.Sub(v.at) > 120*time.Second {
				delete(im.recent, k)
			}
		}
		im.lastSweep = now
	}
	if prev, dup := im.recent[key]; dup && now.Sub(prev.at) <= 120*time.Second {
		im.mu.Unlock()
		a := imOK()
		a["MsgTime"], a["MsgKey"] = prev.time, prev.msgKey
		return a
	}
	m := Message{From: from, To: to, Text: text, Body: req["MsgBody"], MsgSeq: seq, MsgRandom: random,
		MsgTime: now.Unix(), Platform: "RESTAPI"}
	m.MsgKey = fmt.Sprintf("%d_%d_%d", seq, random, m.MsgTime)
	im.recent[key] = recentSend{at: now, msgKey: m.MsgKey, time: m.MsgTime}
	im.mu.Unlock()

	if err := im.deliver(ctx, m, !slices.Contains(forbid, "ForbidBeforeSendMsgCallback"), !slices.Contains(forbid, "ForbidAfterSendMsgCallback")); err != nil {
		return imFail(20006, err.Error())
	}
	a := imOK()
	a["MsgTime"], a["MsgKey"] = m.MsgTime, m.MsgKey
	return a
}

// Limits of openim/admin_getroammsg: the messages a page may hold, the
// size of a page's MsgList (IM stops near 13 KB and says Complete 0), and
// how long the history is kept (roaming storage, 7 days by default).
const (
	roamMaxCnt    = 100
	roamPageBytes = 13 << 10
	roamKeep      = 7 * 24 * time.Hour
)

// getRoamMsg serves openim/admin_getroammsg: the history of the one-to-one
// conversation between two accounts, both directions, sent from MinTime to
// MaxTime (Unix seconds, both included), newest first, a page at a time. A
// page ends after MaxCnt messages or about 13 KB; its LastMsgTime and
// LastMsgKey are its oldest message's, and the next page is asked for with
// MaxTime set to LastMsgTime and LastMsgKey given. The accounts are named
// Operator_Account and Peer_Account (From_Account and To_Account in
// earlier versions of IM's documentation, still taken).
func (im *IM) getRoamMsg(req map[string]json.RawMessage, now time.Time) imAnswer {
	var operator, peer string
	opRaw, peerRaw := req["Operator_Account"], req["Peer_Account"]
	if opRaw == nil && peerRaw == nil {
		opRaw, peerRaw = req["From_Account"], req["To_Account"]
	}
	if json.Unmarshal(opRaw, &operator) != nil || operator == "" || json.Unmarshal(peerRaw, &peer) != nil || peer == "" {
		return imFail(90001, "Operator_Account and Peer_Account are required")
	}
	var maxCnt int
	var minTime, maxTime int64
	if json.Unmarshal(req["MaxCnt"], &maxCnt) != nil || maxCnt < 1 || maxCnt > roamMaxCnt {
		return imFail(90001, fmt.Sprintf("MaxCnt must be an integer from 1 to %d", roamMaxCnt))
	}
	if json.Unmarshal(req["MinTime"], &minTime) != nil || json.Unmarshal(req["MaxTime"], &maxTime) != nil || minTime < 0 || minTime > maxTime {
		return imFail(90001, "MinTime and MaxTime must be Unix times, MinTime not after MaxTime")
	}
	var lastKey string
	if raw, ok := req["LastMsgKey"]; ok && json.Unmarshal(raw, &lastKey) != nil {
		return imFail(90001, "LastMsgKey is not a string")
	}

	im.mu.Lock()
	var history []Message // newest first
	for i := len(im.messages) - 1; i >= 0; i-- {
		m := im.messages[i]
		between := m.From == operator && m.To == peer || m.From == peer && m.To == operator
		if between && m.MsgTime >= minTime && m.MsgTime <= maxTime && now.Sub(time.Unix(m.MsgTime, 0)) <= roamKeep {
			history = append(history, m)
		}
	}
	im.mu.Unlock()
	// IM orders a conversation by time, and the messages of one second by
	// MsgSeq.
	slices.SortStableFunc(history, func(a, b Message) int {
		return cmp.Or(cmp.Compare(b.MsgTime, a.MsgTime), cmp.Compare(b.MsgSeq, a.MsgSeq))
	})
	if lastKey != "" {
		if i := slices.IndexFunc(history, func(m Message) bool { return m.MsgKey == lastKey }); i >= 0 {
			history = history[i+1:]
		}
	}
	var page []map[string]any
	size := 0
	for _, m := range history {
		flags := 0
		if m.Recalled {
			flags = 8
		}
		item := map[string]any{
			"From_Account": m.From, "To_Account": m.To, "MsgSeq": m.MsgSeq, "MsgRandom": m.MsgRandom,
			"MsgTimeStamp": m.MsgTime, "MsgFlagBits": flags, "IsPeerRead": 0, "MsgKey": m.MsgKey,
			"MsgBody": m.Body, "CloudCustomData": "",
		}
		b, _ := json.Marshal(item)
		if len(page) == maxCnt || len(page) > 0 && size+len(b) > roamPageBytes {
			break
		}
		page, size = append(page, item), size+len(b)
	}
	a := imOK()
	a["Complete"], a["MsgCnt"], a["MsgList"] = 1, len(page), page
	if len(page) < len(history) {
		a["Complete"] = 0
	}
	if len(page) > 0 {
		last := page[len(page)-1]
		a["LastMsgTime"], a["LastMsgKey"] = last["MsgTimeStamp"], last["MsgKey"]
	}
	return a
}

// Recall marks the message msgKey withdrawn, as admin_msgwithdraw or the
// sender's client does: it stays in the history with MsgFlagBits 8.
func (im *IM) Recall(msgKey string) bool {
	im.mu.Lock()
	defer im.mu.Unlock()
	for i := range im.messages {
		if im.messages[i].MsgKey == msgKey {
			im.messages[i].Recalled = true
			return true
		}
	}
	return false
}

// checkBody checks each element as IM does and returns the text of the
// text elements.
func checkBody(body []json.RawMessage) (string, error) {
	var texts []string
	customs := 0
	for i, raw := range body {
		var e struct {
			MsgType    string
			MsgContent map[string]any
		}
		if json.Unmarshal(raw, &e) != nil || e.MsgContent == nil {
			return "", fmt.Errorf("MsgBody[%d] is not a message element", i)
		}
		switch e.MsgType {
		case "TIMTextElem":
			t, ok := e.MsgContent["Text"].(string)
			if !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMTextElem needs Text", i)
			}
			texts = append(texts, t)
		case "TIMCustomElem":
			if customs++; customs > 1 {
				return "", errors.New("only one TIMCustomElem per message")
			}
			if _, ok := e.MsgContent["Data"].(string); !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMCustomElem needs Data", i)
			}
		case "TIMLocationElem":
			_, okLat := e.MsgContent["Latitude"].(float64)
			_, okLng := e.MsgContent["Longitude"].(float64)
			if !okLat || !okLng {
				return "", fmt.Errorf("MsgBody[%d]: TIMLocationElem needs numeric Latitude and Longitude", i)
			}
		case "TIMFaceElem":
			if _, ok := e.MsgContent["Index"].(float64); !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMFaceElem needs Index", i)
			}
		default:
			return "", fmt.Errorf("MsgBody[%d]: MsgType %q is not modelled by the fake", i, e.MsgType)
		}
	}
	return strings.Join(texts, "\n"), nil
}

// SendAsAgent sends text from agent to the account to, as an IM client
// (OptPlatform Web) would: the Before callback may refuse it, then it is
// delivered and the After callback fires. Both callbacks are made before it
// returns.
func (im *IM) SendAsAgent(ctx context.Context, agent, to, text string) (Message, error) {
	im.mu.Lock()
	okFrom, okTo := im.accounts[agent], im.accounts[to]
	im.mu.Unlock()
	switch {
	case !okFrom:
		return Message{}, fmt.Errorf("im: agent %s is not imported (70107)", agent)
	case !okTo:
		return Message{}, fmt.Errorf("im: recipient %s is not imported (20003)", to)
	}
	body, _ := json.Marshal([]map[string]any{{"MsgType": "TIMTextElem", "MsgContent": map[string]any{"Text": text}}})
	now := im.opts.Now()
	// A client numbers its messages: IM orders those of one second by MsgSeq.
	im.mu.Lock()
	if im.clientSeq == 0 {
		im.clientSeq = randUint32() >> 1
	}
	im.clientSeq++
	seq := im.clientSeq
	im.mu.Unlock()
	m := Message{From: agent, To: to, Text: text, Body: body, MsgSeq: seq, MsgRandom: randUint32(), MsgTime: now.Unix(), Platform: "Web"}
	m.MsgKey = fmt.Sprintf("%d_%d_%d", m.MsgSeq, m.MsgRandom, m.MsgTime)
	hop(im.opts.Trace, "agent", "IM", "%s writes to %s: %q", agent, to, text)
	if err := im.deliver(ctx, m, true, true); err != nil {
		return Message{}, err
	}
	return m, nil
}

// deliver fires the Before callback (whose answer may refuse the message),
// stores the message, then fires the After callback.
func (im *IM) deliver(ctx context.Context, m Message, before, after bool) error {
	base := map[string]any{
		"From_Account": m.From, "To_Account": m.To, "MsgSeq": m.MsgSeq, "MsgRandom": m.MsgRandom,
		"MsgTime": m.MsgTime, "MsgKey": m.MsgKey, "OnlineOnlyFlag": 0, "MsgBody": m.Body, "CloudCustomData": "",
	}
	if before {
		base["CallbackCommand"] = "C2C.CallbackBeforeSendMsg"
		res := im.callback(ctx, "C2C.CallbackBeforeSendMsg", m.Platform, base)
		var ans struct{ ErrorCode int }
		if res.Err == nil && json.Unmarshal([]byte(res.Answer), &ans) == nil {
			switch {
			case ans.ErrorCode == 1:
				return errors.New("message refused by C2C.CallbackBeforeSendMsg")
			case ans.ErrorCode == 2:
				return nil // dropped silently: the sender sees success
			case ans.ErrorCode >= 120001 && ans.ErrorCode <= 130000:
				return fmt.Errorf("message refused by C2C.CallbackBeforeSendMsg with %d", ans.ErrorCode)
			}
		}
		// On a failed or timed-out Before callback IM delivers by default.
	}
	im.mu.Lock()
	m.Received = time.Now()
	im.messages = append(im.messages, m)
	im.unread[m.To]++
	unread := im.unread[m.To]
	im.mu.Unlock()
	if im.opts.OnMessage != nil {
		im.opts.OnMessage(m)
	}
	hop(im.opts.Trace, "IM", "inbox", "%s receives from %s: %q", m.To, m.From, m.Text)
	if after {
		base["CallbackCommand"] = "C2C.CallbackAfterSendMsg"
		base["SendMsgResult"], base["ErrorInfo"], base["UnreadMsgNum"] = 0, "send msg succeed", unread
		im.callback(ctx, "C2C.CallbackAfterSendMsg", m.Platform, base)
	}
	return nil
}

// callback posts one callback to the callback URL, as IM does: command and
// app in the query, signed when a token is set, 2 s to answer.
func (im *IM) callback(ctx context.Context, command, platform string, body map[string]any) CallbackResult {
	im.mu.Lock()
	target := im.callbackURL
	im.mu.Unlock()
	if target == "" {
		return CallbackResult{Command: command, Err: errors.New("no callback URL")}
	}
	q := url.Values{
		"SdkAppid": {strconv.FormatUint(im.opts.SDKAppID, 10)}, "CallbackCommand": {command},
		"contenttype": {"json"}, "ClientIP": {"127.0.0.1"}, "OptPlatform": {platform},
	}
	if im.opts.CallbackToken != "" {
		rt := strconv.FormatInt(im.opts.Now().Unix(), 10)
		q.Set("RequestTime", rt)
		q.Set("Sign", CallbackSign(im.opts.CallbackToken, rt))
	}
	b, _ := json.Marshal(body)
	res := CallbackResult{Command: command, Body: b}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target+"?"+q.Encode(), bytes.NewReader(b))
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
		var resp *http.Response
		if resp, err = im.cbHTTP.Do(req); err == nil {
			ans, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			res.Status, res.Answer = resp.StatusCode, string(ans)
			var env struct{ ActionStatus *string }
			if resp.StatusCode != http.StatusOK || json.Unmarshal(ans, &env) != nil || env.ActionStatus == nil {
				err = fmt.Errorf("callback answered %d %q: IM counts it as failed", resp.StatusCode, ans)
			}
		}
	}
	res.Err = err
	hop(im.opts.Trace, "IM", "bridge", "%s (%s → %s), answered %d", command, body["From_Account"], body["To_Account"], res.Status)
	im.mu.Lock()
	im.callbacks = append(im.callbacks, res)
	im.mu.Unlock()
	return res
}

// CallbackSign is the Sign of an authenticated callback:
// lowercase hex of sha256(token + RequestTime).
func CallbackSign(token, requestTime string) string {
	sum := sha256.Sum256([]byte(token + requestTime))
	return hex.EncodeToString(sum[:])
}

func randUint32() uint32 {
	var b [4]byte
	rand.Read(b[:])
	return binary.BigEndian.Uint32(b[:])
}
