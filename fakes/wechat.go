package fakes

import (
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// WeChatOptions configures a fake WeChat. Zero fields take the defaults.
type WeChatOptions struct {
	AppID     string // default wx0123456789abcdef
	AppSecret string // default fake-app-secret-0123456789abcdef
	Token     string // the Token pushes are signed with; default faketoken
	OAID      string // the Official Account's original ID; default gh_0fake0bridge

	// Mode is the console's message encryption mode: ModePlaintext (the
	// default), ModeCompatible or ModeSafe. The last two need EncodingAESKey.
	Mode           string
	EncodingAESKey string

	TokenTTL        time.Duration // access_token lifetime; default 7200 s
	QuotaPerMessage int           // custom/send replies allowed per customer message; default 5
	PushTimeout     time.Duration // how long WeChat waits for a push's answer; default 5 s
	PushAttempts    int           // deliveries of one push in all; default 3
	Now             func() time.Time
	Trace           func(string) // narration for the demo
	// OnSend, if set, is called with each customer-service message as it
	// is accepted.
	OnSend func(CustomMessage)
}

// WeChat is a fake of the WeChat Official Account platform: its API
// (stable_token, token, custom/send) and the pushes it makes to the
// developer's URL.
type WeChat struct {
	recorder
	URL  string
	t    T
	opts WeChatOptions
	srv  *httptest.Server

	mu       sync.Mutex
	stable   issued               // the current stable token
	tokens   map[string]issued    // every token issued, stable or not
	revoked  map[string]bool      // tokens superseded by force_refresh or a newer /cgi-bin/token
	users    map[string]*customer // by openid
	sent     []CustomMessage
	notices  []string // what customers were shown instead of a reply
	nextMsg  int64
	target   string
	key      []byte // the AES key of the current EncodingAESKey
	pushHTTP *http.Client
}

type issued struct {
	token   string
	expires time.Time
}

// customer is WeChat's ledger for one follower: the window in which the
// account may send customer-service messages, and how many remain.
type customer struct {
	followed    bool
	windowUntil time.Time
	quota       int
}

// CustomMessage is a customer-service message WeChat accepted.
type CustomMessage struct {
	ToUser  string
	MsgType string
	Text    string
	Body    []byte // the JSON as sent
	At      time.Time
}

// Message encryption modes, as the WeChat console names them.
const (
	ModePlaintext  = "plaintext"  // 明文模式
	ModeCompatible = "compatible" // 兼容模式: plaintext fields and Encrypt
	ModeSafe       = "safe"       // 安全模式: Encrypt only
)

// NewWeChat starts a fake WeChat and stops it when t's test ends.
func NewWeChat(t T, opts WeChatOptions) *WeChat {
	t.Helper()
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&opts.AppID, "wx0123456789abcdef")
	def(&opts.AppSecret, "fake-app-secret-0123456789abcdef")
	def(&opts.Token, "faketoken")
	def(&opts.OAID, "gh_0fake0bridge")
	if opts.TokenTTL == 0 {
		opts.TokenTTL = 7200 * time.Second
	}
	if opts.QuotaPerMessage == 0 {
		opts.QuotaPerMessage = 5
	}
	if opts.PushTimeout == 0 {
		opts.PushTimeout = 5 * time.Second
	}
	if opts.PushAttempts == 0 {
		opts.PushAttempts = 3
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Mode == "" {
		opts.Mode = ModePlaintext
	}
	wx := &WeChat{
		t: t, opts: opts,
		tokens:   map[string]issued{},
		revoked:  map[string]bool{},
		users:    map[string]*customer{},
		nextMsg:  24000000000000000,
		pushHTTP: &http.Client{Timeout: opts.PushTimeout},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/cgi-bin/stable_token", wx.handleStableToken)
	mux.HandleFunc("/cgi-bin/token", wx.handleToken)
	mux.HandleFunc("/cgi-bin/message/custom/send", wx.handleCustomSend)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		wx.record(r, wx.opts.Now())
		wx.t.Errorf("fake wechat: unmodelled request %s %s", r.Method, r.URL.Path)
		writeWeChatError(w, 40066, "invalid url")
	})
	wx.srv = httptest.NewServer(mux)
	wx.URL = wx.srv.URL
	t.Cleanup(wx.srv.Close)
	if err := wx.SetEncryption(opts.Mode, opts.EncodingAESKey); err != nil {
		t.Errorf("fake wechat: %v", err)
	}
	return wx
}

// SetEncryption changes the message encryption mode and EncodingAESKey, as
// the operator does in the console; pushes from then on use them.
func (wx *WeChat) SetEncryption(mode, encodingAESKey string) error {
	var key []byte
	switch mode {
	case ModePlaintext:
	case ModeCompatible, ModeSafe:
		var err error
		if key, err = aesKey(encodingAESKey); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown encryption mode %q", mode)
	}
	wx.mu.Lock()
	defer wx.mu.Unlock()
	wx.opts.Mode, wx.opts.EncodingAESKey, wx.key = mode, encodingAESKey, key
	return nil
}

// Options returns the fake's settings, defaults filled in.
func (wx *WeChat) Options() WeChatOptions {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	return wx.opts
}

// SetTarget sets the developer URL pushes go to (the bridge's POST /wechat).
func (wx *WeChat) SetTarget(pushURL string) {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	wx.target = pushURL
}

// Sent returns the customer-service messages WeChat accepted, in order.
func (wx *WeChat) Sent() []CustomMessage {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	return slices.Clone(wx.sent)
}

// Notices returns what customers were shown because a push was not
// answered properly ("该公众号暂时无法提供服务，请稍后再试").
func (wx *WeChat) Notices() []string {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	return slices.Clone(wx.notices)
}

// ExpireToken ends the life of every access_token issued so far: the next
// API call with one gets 42001, and stable_token issues a new one.
func (wx *WeChat) ExpireToken() {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	past := wx.opts.Now().Add(-time.Second)
	for k, v := range wx.tokens {
		v.expires = past
		wx.tokens[k] = v
	}
	wx.stable.expires = past
}

// RevokeTokens invalidates every access_token issued so far, as a
// force_refresh elsewhere would: the next API call with one gets 40001.
func (wx *WeChat) RevokeTokens() {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	for k := range wx.tokens {
		wx.revoked[k] = true
	}
	wx.stable = issued{}
}

func newToken() string {
	b := make([]byte, 48)
	rand.Read(b)
	return "ACCESS_TOKEN_" + hex.EncodeToString(b)
}

// handleStableToken serves POST /cgi-bin/stable_token: JSON only; the same
// token while it has more than 5 minutes to live, a new one after that (the
// old one good until it expires); force_refresh revokes the old one.
func (wx *WeChat) handleStableToken(w http.ResponseWriter, r *http.Request) {
	now := wx.opts.Now()
	body := wx.record(r, now)
	if r.Method != http.MethodPost {
		wx.t.Errorf("fake wechat: stable_token is POST only, got %s", r.Method)
		writeWeChatError(w, 43002, "require POST method")
		return
	}
	if wx.injected(w, r) {
		return
	}
	var req struct {
		GrantType    string `json:"grant_type"`
		AppID        string `json:"appid"`
		Secret       string `json:"secret"`
		ForceRefresh bool   `json:"force_refresh"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		writeWeChatError(w, 47001, "data format error")
		return
	}
	switch {
	case req.GrantType != "client_credential":
		writeWeChatError(w, 40002, "invalid grant_type")
		return
	case req.AppID != wx.opts.AppID:
		writeWeChatError(w, 40013, "invalid appid")
		return
	case req.Secret != wx.opts.AppSecret:
		writeWeChatError(w, 40125, "invalid appsecret")
		return
	}
	wx.mu.Lock()
	if req.ForceRefresh && wx.stable.token != "" {
		wx.revoked[wx.stable.token] = true
		wx.stable = issued{}
	}
	if wx.stable.token == "" || !now.Before(wx.stable.expires.Add(-5*time.Minute)) {
		wx.stable = issued{token: newToken(), expires: now.Add(wx.opts.TokenTTL)}
		wx.tokens[wx.stable.token] = wx.stable
	}
	tok := wx.stable
	wx.mu.Unlock()
	writeJSON(w, map[string]any{"access_token": tok.token, "expires_in": int64(tok.expires.Sub(now) / time.Second)})
}

// handleToken serves GET /cgi-bin/token: a new token every call; the
// previous one stays good for 5 minutes.
func (wx *WeChat) handleToken(w http.ResponseWriter, r *http.Request) {
	now := wx.opts.Now()
	wx.record(r, now)
	if r.Method != http.MethodGet {
		wx.t.Errorf("fake wechat: token is GET only, got %s", r.Method)
		writeWeChatError(w, 43001, "require GET method")
		return
	}
	if wx.injected(w, r) {
		return
	}
	q := r.URL.Query()
	switch {
	case q.Get("grant_type") != "client_credential":
		writeWeChatError(w, 40002, "invalid grant_type")
		return
	case q.Get("appid") != wx.opts.AppID:
		writeWeChatError(w, 40013, "invalid appid")
		return
	case q.Get("secret") != wx.opts.AppSecret:
		writeWeChatError(w, 40125, "invalid appsecret")
		return
	}
	wx.mu.Lock()
	for k, v := range wx.tokens {
		if k != wx.stable.token && v.expires.After(now.Add(5*time.Minute)) {
			v.expires = now.Add(5 * time.Minute)
			wx.tokens[k] = v
		}
	}
	tok := issued{token: newToken(), expires: now.Add(wx.opts.TokenTTL)}
	wx.tokens[tok.token] = tok
	wx.mu.Unlock()
	writeJSON(w, map[string]any{"access_token": tok.token, "expires_in": int64(wx.opts.TokenTTL / time.Second)})
}

// checkToken returns the errcode an access_token earns, 0 if it is good.
// The caller holds wx.mu.
func (wx *WeChat) checkToken(token string, now time.Time) (int, string) {
	tok, ok := wx.tokens[token]
	switch {
	case token == "":
		return 41001, "access_token missing"
	case wx.revoked[token] || !ok:
		return 40001, "invalid credential, access_token is invalid or not latest"
	case !now.Before(tok.expires):
		return 42001, "access_token expired"
	}
	return 0, ""
}

// handleCustomSend serves POST /cgi-bin/message/custom/send for text
// messages, enforcing the token, the customer's 48-hour window and its
// quota.
func (wx *WeChat) handleCustomSend(w http.ResponseWriter, r *http.Request) {
	now := wx.opts.Now()
	body := wx.record(r, now)
	if r.Method != http.MethodPost {
		wx.t.Errorf("fake wechat: custom/send is POST only, got %s", r.Method)
		writeWeChatError(w, 43002, "require POST method")
		return
	}
	wx.mu.Lock()
	code, msg := wx.checkToken(r.URL.Query().Get("access_token"), now)
	wx.mu.Unlock()
	if code != 0 {
		writeWeChatError(w, code, msg)
		return
	}
	if wx.injected(w, r) {
		return
	}
	var m struct {
		ToUser  string `json:"touser"`
		MsgType string `json:"msgtype"`
		Text    *struct {
			Content string `json:"content"`
		} `json:"text"`
	}
	if len(body) == 0 {
		writeWeChatError(w, 44002, "empty post data")
		return
	}
	if err := json.Unmarshal(body, &m); err != nil {
		writeWeChatError(w, 47001, "data format error")
		return
	}
	if m.MsgType != "text" {
		wx.t.Errorf("fake wechat: custom/send msgtype %q is not modelled", m.MsgType)
		writeWeChatError(w, 40008, "invalid message type")
		return
	}
	if m.Text == nil || m.Text.Content == "" {
		writeWeChatError(w, 44003, "empty news data")
		return
	}

	wx.mu.Lock()
	u, ok := wx.users[m.ToUser]
	code, msg = 0, "ok"
	switch {
	case !ok:
		code, msg = 40003, "invalid openid"
	case !u.followed || !now.Before(u.windowUntil):
		code, msg = 45015, "response out of time limit or subscription is canceled"
	case u.quota <= 0:
		code, msg = 45047, "out of response count limit"
	}
	if code != 0 {
		wx.mu.Unlock()
		writeWeChatError(w, code, msg)
		return
	}
	u.quota--
	cm := CustomMessage{ToUser: m.ToUser, MsgType: m.MsgType, Text: m.Text.Content, Body: body, At: now}
	wx.sent = append(wx.sent, cm)
	wx.mu.Unlock()
	if wx.opts.OnSend != nil {
		wx.opts.OnSend(cm)
	}
	hop(wx.opts.Trace, "bridge", "WeChat", "custom/send to %s", m.ToUser)
	hop(wx.opts.Trace, "WeChat", "customer", "%s sees: %q", m.ToUser, m.Text.Content)
	writeWeChatError(w, 0, "ok")
}

// injected answers r with an injected fault, if one is due.
func (wx *WeChat) injected(w http.ResponseWriter, r *http.Request) bool {
	status, code, ok := wx.fault(r)
	switch {
	case !ok:
		return false
	case status != 0:
		http.Error(w, http.StatusText(status), status)
	default:
		writeWeChatError(w, code, "injected fault")
	}
	return true
}

func writeWeChatError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, map[string]any{"errcode": code, "errmsg": msg})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json; encoding=utf-8")
	json.NewEncoder(w).Encode(v)
}

// PushResult is how the developer's URL answered a push.
type PushResult struct {
	Status int    // HTTP status of the last attempt, 0 if none answered
	Body   string // body of the last attempt
	// ContentType is the last attempt's Content-Type header.
	ContentType string
	Attempts    int
	Reply       *Reply // the passive reply, if the answer was one
	// Failed is set when the customer was shown WeChat's "service
	// unavailable" notice: no valid answer within the attempts.
	Failed bool
}

// Reply is a passive text reply.
type Reply struct {
	ToUserName   string
	FromUserName string
	CreateTime   int64
	MsgType      string
	Content      string
}

// Follow pushes a subscribe event from openid. It opens a one-minute window
// of three customer-service messages.
func (wx *WeChat) Follow(ctx context.Context, openid string) PushResult {
	wx.mu.Lock()
	u := wx.user(openid)
	u.followed = true
	now := wx.opts.Now()
	if u.windowUntil.Before(now.Add(time.Minute)) {
		u.windowUntil, u.quota = now.Add(time.Minute), 3
	}
	wx.mu.Unlock()
	hop(wx.opts.Trace, "customer", "WeChat", "%s follows the Official Account", openid)
	return wx.Push(ctx, wx.EventXML(openid, "subscribe", ""))
}

// Unfollow pushes an unsubscribe event from openid; the account may no
// longer send them messages.
func (wx *WeChat) Unfollow(ctx context.Context, openid string) PushResult {
	wx.mu.Lock()
	wx.user(openid).followed = false
	wx.mu.Unlock()
	hop(wx.opts.Trace, "customer", "WeChat", "%s unfollows", openid)
	return wx.Push(ctx, wx.EventXML(openid, "unsubscribe", ""))
}

// SendText pushes a text message from openid, who must follow the account.
// It opens the 48-hour window for customer-service replies.
func (wx *WeChat) SendText(ctx context.Context, openid, text string) PushResult {
	hop(wx.opts.Trace, "customer", "WeChat", "%s writes: %q", openid, text)
	return wx.Push(ctx, wx.MessageXML(openid, "text", map[string]string{"Content": text}))
}

// SendMessage pushes a message of msgType from openid with the given extra
// fields (e.g. PicUrl and MediaId for an image).
func (wx *WeChat) SendMessage(ctx context.Context, openid, msgType string, fields map[string]string) PushResult {
	return wx.Push(ctx, wx.MessageXML(openid, msgType, fields))
}

// user returns openid's ledger, creating it. The caller holds wx.mu.
func (wx *WeChat) user(openid string) *customer {
	u, ok := wx.users[openid]
	if !ok {
		u = &customer{}
		wx.users[openid] = u
	}
	return u
}

// MessageXML builds a customer message push the way WeChat writes it, with
// a fresh MsgId, and records the message in openid's window: 48 hours with
// the reply quota.
func (wx *WeChat) MessageXML(openid, msgType string, fields map[string]string) []byte {
	wx.mu.Lock()
	wx.nextMsg++
	id := wx.nextMsg
	wx.wrote(openid)
	wx.mu.Unlock()
	fields = withField(fields, "MsgId", strconv.FormatInt(id, 10))
	return wx.pushXML(openid, msgType, fields)
}

// Wrote records in openid's ledger that the customer wrote to the Official
// Account, as MessageXML does, for a push built elsewhere (the load
// generator builds its own).
func (wx *WeChat) Wrote(openid string) {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	wx.wrote(openid)
}

// wrote opens openid's 48-hour window with a fresh reply quota. The caller
// holds wx.mu.
func (wx *WeChat) wrote(openid string) {
	u := wx.user(openid)
	u.followed = true
	u.windowUntil, u.quota = wx.opts.Now().Add(48*time.Hour), wx.opts.QuotaPerMessage
}

// EventXML builds an event push. eventKey may be empty.
func (wx *WeChat) EventXML(openid, event, eventKey string) []byte {
	f := map[string]string{"Event": event}
	if eventKey != "" {
		f["EventKey"] = eventKey
	}
	return wx.pushXML(openid, "event", f)
}

func withField(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for kk, vv := range m {
		out[kk] = vv
	}
	return out
}

// pushXML writes a push: the common header, then the fields in name order,
// strings as CDATA and numbers bare, one element a line as WeChat does.
func (wx *WeChat) pushXML(openid, msgType string, fields map[string]string) []byte {
	var b strings.Builder
	b.WriteString("<xml>\n")
	fmt.Fprintf(&b, "<ToUserName><![CDATA[%s]]></ToUserName>\n", wx.opts.OAID)
	fmt.Fprintf(&b, "<FromUserName><![CDATA[%s]]></FromUserName>\n", openid)
	fmt.Fprintf(&b, "<CreateTime>%d</CreateTime>\n", wx.opts.Now().Unix())
	fmt.Fprintf(&b, "<MsgType><![CDATA[%s]]></MsgType>\n", msgType)
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := fields[k]
		if _, err := strconv.ParseFloat(v, 64); err == nil && k != "Content" {
			fmt.Fprintf(&b, "<%s>%s</%s>\n", k, v, k)
		} else {
			fmt.Fprintf(&b, "<%s><![CDATA[%s]]></%s>\n", k, strings.ReplaceAll(v, "]]>", "]]]]><![CDATA[>"), k)
		}
	}
	b.WriteString("</xml>")
	return []byte(b.String())
}

// Sign returns the signature WeChat puts on a push or verification request
// (token, timestamp, nonce), or the msg_signature of an encrypted push or
// reply when the Encrypt text is given too.
func Sign(token, timestamp, nonce string, encrypt ...string) string {
	s := append([]string{token, timestamp, nonce}, encrypt...)
	slices.Sort(s)
	sum := sha1.Sum([]byte(strings.Join(s, "")))
	return hex.EncodeToString(sum[:])
}

// Push delivers body to the target as WeChat does: signed, with the sender's
// openid in the query, encrypted in compatible and safe modes, waiting
// PushTimeout for an answer and trying again up to PushAttempts deliveries
// in all, each signed anew. It checks the answer as WeChat does: "success",
// an empty body or a passive reply addressed to the sender (plaintext in
// plaintext mode, encrypted in safe mode, either in compatible mode);
// anything else shows the customer WeChat's notice.
func (wx *WeChat) Push(ctx context.Context, body []byte) PushResult {
	var hdr struct {
		FromUserName string
		MsgType      string
	}
	xml.Unmarshal(body, &hdr)
	wx.mu.Lock()
	target, mode, key := wx.target, wx.opts.Mode, wx.key
	wx.mu.Unlock()
	if target == "" {
		wx.t.Errorf("fake wechat: Push before SetTarget")
		return PushResult{Failed: true}
	}
	var encrypt string
	if mode != ModePlaintext {
		encrypt = encryptMsg(key, wx.opts.AppID, body)
		if mode == ModeSafe {
			body = []byte(fmt.Sprintf("<xml>\n<ToUserName><![CDATA[%s]]></ToUserName>\n<Encrypt><![CDATA[%s]]></Encrypt>\n</xml>", wx.opts.OAID, encrypt))
		} else {
			body = []byte(strings.Replace(string(body), "</xml>", "<Encrypt><![CDATA["+encrypt+"]]></Encrypt>\n</xml>", 1))
		}
	}
	var res PushResult
	for res.Attempts < wx.opts.PushAttempts {
		res.Attempts++
		ts := strconv.FormatInt(wx.opts.Now().Unix(), 10)
		nonce := strconv.FormatUint(uint64(randUint32()), 10)
		q := url.Values{"signature": {Sign(wx.opts.Token, ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}, "openid": {hdr.FromUserName}}
		if encrypt != "" {
			q.Set("encrypt_type", "aes")
			q.Set("msg_signature", Sign(wx.opts.Token, ts, nonce, encrypt))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, target+"?"+q.Encode(), strings.NewReader(string(body)))
		if err != nil {
			wx.t.Errorf("fake wechat: %v", err)
			return PushResult{Failed: true}
		}
		req.Header.Set("Content-Type", "text/xml")
		hop(wx.opts.Trace, "WeChat", "bridge", "POST /wechat (%s, signed, %s, attempt %d)", hdr.MsgType, mode, res.Attempts)
		resp, err := wx.pushHTTP.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			continue // no answer in time: WeChat drops the connection and tries again
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		res.Status, res.Body, res.ContentType = resp.StatusCode, string(b), resp.Header.Get("Content-Type")
		if resp.StatusCode != http.StatusOK {
			continue
		}
		if res.Body == "" || res.Body == "success" {
			hop(wx.opts.Trace, "bridge", "WeChat", "%q", res.Body)
			return res
		}
		reply, err := wx.checkReply(b, hdr.FromUserName, mode, key)
		if err != nil {
			wx.t.Errorf("fake wechat: bad passive reply: %v\n%s", err, b)
			break
		}
		res.Reply = reply
		hop(wx.opts.Trace, "bridge", "WeChat", "passive reply %q", reply.Content)
		hop(wx.opts.Trace, "WeChat", "customer", "%s sees: %q", hdr.FromUserName, reply.Content)
		return res
	}
	res.Failed = true
	wx.mu.Lock()
	wx.notices = append(wx.notices, "该公众号暂时无法提供服务，请稍后再试")
	wx.mu.Unlock()
	return res
}

// openReply returns the plaintext reply inside an encrypted one, after
// checking its MsgSignature, TimeStamp (seconds), padding and appid.
func (wx *WeChat) openReply(b []byte, key []byte) ([]byte, error) {
	var env struct {
		Encrypt      string
		MsgSignature string
		TimeStamp    string
		Nonce        string
	}
	if err := xml.Unmarshal(b, &env); err != nil {
		return nil, err
	}
	if env.MsgSignature != Sign(wx.opts.Token, env.TimeStamp, env.Nonce, env.Encrypt) {
		return nil, errors.New("MsgSignature does not sign TimeStamp, Nonce and Encrypt")
	}
	ts, err := strconv.ParseInt(env.TimeStamp, 10, 64)
	if err != nil || ts <= 0 || ts > 1<<32 {
		return nil, fmt.Errorf("TimeStamp %q is not a time in seconds", env.TimeStamp)
	}
	return decryptMsg(key, wx.opts.AppID, env.Encrypt)
}

// checkReply parses a passive reply and checks it is addressed as WeChat
// requires, and encrypted as the mode requires.
func (wx *WeChat) checkReply(b []byte, openid, mode string, key []byte) (*Reply, error) {
	encrypted := strings.Contains(string(b), "<Encrypt>")
	switch {
	case encrypted && mode == ModePlaintext:
		return nil, errors.New("encrypted reply in plaintext mode")
	case !encrypted && mode == ModeSafe:
		return nil, errors.New("plaintext reply in safe mode")
	case encrypted:
		var err error
		if b, err = wx.openReply(b, key); err != nil {
			return nil, fmt.Errorf("encrypted reply: %w", err)
		}
	}
	var r Reply
	if err := xml.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	switch {
	case r.ToUserName != openid:
		return nil, fmt.Errorf("ToUserName %q, want the sender %q", r.ToUserName, openid)
	case r.FromUserName != wx.opts.OAID:
		return nil, fmt.Errorf("FromUserName %q, want the account %q", r.FromUserName, wx.opts.OAID)
	case r.CreateTime <= 0:
		return nil, errors.New("CreateTime missing")
	case r.MsgType != "text":
		return nil, fmt.Errorf("MsgType %q is not modelled", r.MsgType)
	case r.Content == "":
		return nil, errors.New("text reply without Content")
	}
	return &r, nil
}
