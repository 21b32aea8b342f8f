package fakes

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
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
	// Wire, if set, is handed every request between WeChat and the bridge
	// (wire.go).
	Wire func(Exchange)
	// OnPush, if set, is called with each push, as it was before any
	// encryption, when it is made (res nil) and when it is answered.
	OnPush func(openid string, push []byte, res *PushResult)
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
	typings  []Typing
	media    map[string]media // by media_id: what customers sent
	uploads  []Upload         // temporary media the account uploaded
	notices  []string         // what customers were shown instead of a reply
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
	lastWrote   time.Time // the customer's last message or follow
	typingUntil time.Time // the typing state shown, until then
}

// CustomMessage is a customer-service message WeChat accepted.
type CustomMessage struct {
	ToUser  string
	MsgType string
	Text    string
	MediaID string // an image's upload
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
		media:    map[string]media{},
		nextMsg:  24000000000000000,
		pushHTTP: WiredClient(opts.Wire, "WeChat", "bridge", opts.PushTimeout),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/cgi-bin/stable_token", wx.handleStableToken)
	mux.HandleFunc("/cgi-bin/token", wx.handleToken)
	mux.HandleFunc("/cgi-bin/message/custom/send", wx.handleCustomSend)
	mux.HandleFunc("/cgi-bin/message/custom/typing", wx.handleTyping)
	mux.HandleFunc("GET /cgi-bin/media/get", wx.handleMediaGet)
	mux.HandleFunc("POST /cgi-bin/media/upload", wx.handleUpload)
	mux.HandleFunc("GET /mmbiz/{id}", wx.handlePicURL)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		wx.record(r, wx.opts.Now())
		wx.t.Errorf("fake wechat: unmodelled request %s %s", r.Method, r.URL.Path)
		writeWeChatError(w, 40066, "invalid url")
	})
	wx.srv = httptest.NewServer(wired(opts.Wire, "bridge", "WeChat", mux))
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
