package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Config is the bridge's whole configuration, read from the environment by
// loadConfig. Field comments name the variable each field comes from.
type Config struct {
	ListenAddr string // LISTEN_ADDR

	WeChatToken     string // WECHAT_TOKEN: the Token set in the WeChat console
	WeChatAppID     string // WECHAT_APPID
	WeChatAppSecret string // WECHAT_APPSECRET (secret)
	WeChatAESKey    string // WECHAT_AES_KEY: EncodingAESKey for safe and compatible modes (secret)
	// WECHAT_AES_KEY_PREVIOUS: the EncodingAESKey before the last change in
	// the console, also tried for decryption (secret).
	WeChatAESKeyPrevious string
	WeChatAPIBase        string // WECHAT_API_BASE
	// WECHAT_PUSH_MAX_SKEW: how far a push's signed timestamp may be from now.
	WeChatPushMaxSkew time.Duration

	IMSDKAppID      uint64   // IM_SDKAPPID
	IMSecretKey     string   // IM_SECRET_KEY (secret)
	IMAgents        []string // IM_AGENTS: agent UserIDs, in assignment order
	IMAdmin         string   // IM_ADMIN
	IMAPIBase       string   // IM_API_BASE
	IMCallbackToken string   // IM_CALLBACK_TOKEN (secret)
	// IM_CALLBACK_AUTH: on (the default) requires IM_CALLBACK_TOKEN and a
	// valid Sign on every callback; off takes unsigned callbacks.
	IMCallbackAuth bool
	IMUserPrefix   string // IM_USER_PREFIX: a customer's UserID is prefix + openid
	// IM_UNFOLLOW: what an unfollow does to the customer's IM account,
	// unfollowKeep (the default) or unfollowDelete.
	IMUnfollow string
	// IM_CALLBACK_MAX_SKEW: how far a signed callback's RequestTime may be from now.
	IMCallbackMaxSkew time.Duration

	// ADMIN_TOKEN (secret): the bearer token of /admin/; unset, /admin/ is 404.
	AdminToken string

	// PUBLIC_URL: the bridge's public base URL, under which IM clients
	// download media (GET /media/{id}); unset, media crosses as text.
	PublicURL string
	MediaDir  string // MEDIA_DIR: SQLite: where media is kept (default: "media" beside the database)
	// MEDIA_RETENTION: how long media is served, then removed.
	MediaRetention time.Duration
	// HISTORY_RETENTION: how long messages and closed conversations are
	// kept (prune.go); 0 keeps them.
	HistoryRetention time.Duration
	// MEDIA_FETCH_ALLOW: hosts ("host" or "host:port") media may be fetched
	// from whatever their address; every other host must be public.
	MediaFetchAllow []string
	// MEDIA_FETCH_TIMEOUT: how long the fetching of one message's media may
	// take; past it, the message crosses without the file.
	MediaFetchTimeout time.Duration

	DatabaseURL string // DATABASE_URL: sqlite:PATH or postgres://…
	// DATABASE_MAX_CONNS: the connections this instance opens to PostgreSQL.
	DatabaseMaxConns int

	// IM_RATE_LIMIT: at most this many calls a second to each IM API from
	// this instance, never above the API's documented limit; 0: no pacing.
	IMRateLimit      int
	IMDeliveryWindow time.Duration // IM_DELIVERY_WINDOW: how long a delivery to IM is retried
	// IM_DEDUP_WINDOW: how long IM drops a repeated sendmsg (120 s, sendmsg's
	// documentation); an attempt after an unanswered one older than this
	// looks in IM's history first.
	IMDedupWindow time.Duration
	RetryMinDelay time.Duration // RETRY_MIN_DELAY: the first wait before a retry
	RetryMaxDelay time.Duration // RETRY_MAX_DELAY: the longest wait before a retry
	VendorTimeout time.Duration // VENDOR_TIMEOUT: how long one call to WeChat or IM may take
	ShutdownGrace time.Duration // SHUTDOWN_GRACE: how long in-flight work may finish after SIGTERM

	WelcomeText    string // WELCOME_TEXT: passive reply to a follow
	ConnectingText string // CONNECTING_TEXT: passive reply to a conversation's first message
	// Desk: IM_AGENT_MAX_OPEN, BUSINESS_HOURS and BUSINESS_TIMEZONE,
	// SESSION_IDLE_TIMEOUT, and the texts the customer reads from the
	// bridge (QUEUED_TEXT and the others, desk.go).
	Desk Desk

	LogFormat string     // LOG_FORMAT: text or json
	LogLevel  slog.Level // LOG_LEVEL: debug, info, warn or error

	// clock is the bridge's clock, which tests move by hand (business
	// hours, idle conversations, WeChat's window); nil: time.Now.
	clock func() time.Time
	// sweepEvery, if set, is how often the desk's clock sweeps (sweepEvery
	// by default): the model test's sequences run faster.
	sweepEvery time.Duration
}

// Default texts for WELCOME_TEXT and CONNECTING_TEXT.
const (
	defaultWelcomeText    = "Welcome! Write to us here and one of our agents will answer you."
	defaultConnectingText = "Thank you for your message. We are connecting you to an agent; please wait a moment."
)

// imUserIDPattern is the charset the bridge accepts for IM UserIDs: IM takes
// printable ASCII up to 32 bytes, and Tencent recommends this safer subset.
var imUserIDPattern = regexp.MustCompile(`^[A-Za-z0-9_\-@.]{1,32}$`)

// aesKeyPattern is the charset of an EncodingAESKey.
var aesKeyPattern = regexp.MustCompile(`^[A-Za-z0-9]{43}$`)

// wechatTokenPattern is the rule the WeChat console applies to the Token.
var wechatTokenPattern = regexp.MustCompile(`^[A-Za-z0-9]{3,32}$`)

// env reads the environment and gathers what is wrong with it.
type env struct {
	lookup   func(string) (string, bool) // os.LookupEnv, or a test's
	problems []string
}

// getenv returns name's value, "" when it is not set.
func (e *env) getenv(name string) string {
	v, _ := e.lookup(name)
	return v
}

// mapEnv looks variables up in m, as os.LookupEnv does in the process's
// environment: for the demo and the tests.
func mapEnv(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

// bad records a problem.
func (e *env) bad(format string, args ...any) {
	e.problems = append(e.problems, fmt.Sprintf(format, args...))
}

// get returns name's value, trimmed, or def when it is empty.
// text is the text the customer reads that name sets, def if it is unset;
// set empty, the text is not sent.
func (e *env) text(name, def string) string {
	if v, set := e.lookup(name); set {
		return strings.TrimSpace(v)
	}
	return def
}

func (e *env) get(name, def string) string {
	if v := strings.TrimSpace(e.getenv(name)); v != "" {
		return v
	}
	return def
}

// required returns name's value, and records a problem when it is empty.
func (e *env) required(name string) string {
	v := e.get(name, "")
	if v == "" {
		e.bad("%s is required", name)
	}
	return v
}

// duration returns name's value as a positive duration, or def.
func (e *env) duration(name string, def time.Duration) time.Duration {
	v := e.get(name, "")
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		e.bad("%s must be a positive duration such as 1m or 90s, got %q", name, v)
	}
	return d
}

// minHistoryRetention is the shortest HISTORY_RETENTION: the quota and
// WeChat's 48-hour window are read from the customer's last message, and a
// delivery is retried for up to IM_DELIVERY_WINDOW, so a week keeps what
// the bridge still reads.
const minHistoryRetention = 7 * 24 * time.Hour

// retention returns name's value as a duration of at least
// minHistoryRetention, in days if it ends in d (180d), 0 if it is 0 (kept
// for ever), or def.
func (e *env) retention(name string, def time.Duration) time.Duration {
	v := e.get(name, "")
	if v == "" {
		return def
	}
	if v == "0" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if days, ok := strings.CutSuffix(v, "d"); ok {
		var n int
		n, err = strconv.Atoi(days)
		d = time.Duration(min(max(n, 0), 100_000)) * 24 * time.Hour
	}
	if err != nil || d < minHistoryRetention {
		e.bad("%s must be 0 (keep everything) or at least 7 days, as days (180d) or a duration (720h), got %q", name, v)
	}
	return d
}

// count returns name's value as a whole number of at least least, or def.
func (e *env) count(name string, def, least int, what string) int {
	v := e.get(name, "")
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < least {
		e.bad("%s must be %s, got %q", name, what, v)
	}
	return n
}

// What an unfollow does to the customer's IM account. keep works on every
// app: a paid app refuses to import a deleted UserID for three months
// (70399). delete frees the account, which a trial app, capped at 100
// accounts (70398), may need, and which it may import again at once.
const (
	unfollowKeep   = "keep"
	unfollowDelete = "delete"
)

// loadConfig reads and validates the configuration from lookup (as
// os.LookupEnv). Its error names every missing or malformed variable at
// once, and never includes a secret's value.
func loadConfig(lookup func(string) (string, bool)) (Config, error) {
	e := &env{lookup: lookup}
	c := Config{
		ListenAddr:           e.get("LISTEN_ADDR", ":8080"),
		WeChatToken:          e.required("WECHAT_TOKEN"),
		WeChatAppID:          e.required("WECHAT_APPID"),
		WeChatAppSecret:      e.required("WECHAT_APPSECRET"),
		WeChatAESKey:         e.get("WECHAT_AES_KEY", ""),
		WeChatAESKeyPrevious: e.get("WECHAT_AES_KEY_PREVIOUS", ""),
		WeChatAPIBase:        strings.TrimRight(e.get("WECHAT_API_BASE", "https://api.weixin.qq.com"), "/"),
		WeChatPushMaxSkew:    e.duration("WECHAT_PUSH_MAX_SKEW", 5*time.Minute),
		IMSecretKey:          e.required("IM_SECRET_KEY"),
		IMAdmin:              e.get("IM_ADMIN", "administrator"),
		IMAPIBase:            strings.TrimRight(e.get("IM_API_BASE", "https://console.tim.qq.com"), "/"),
		IMCallbackToken:      e.get("IM_CALLBACK_TOKEN", ""),
		IMCallbackMaxSkew:    e.duration("IM_CALLBACK_MAX_SKEW", time.Minute),
		IMUserPrefix:         e.get("IM_USER_PREFIX", "wx_"),
		IMUnfollow:           e.get("IM_UNFOLLOW", unfollowKeep),
		IMRateLimit:          e.count("IM_RATE_LIMIT", math.MaxInt32, 0, "a whole number of calls per second (0: no pacing)"),
		IMDeliveryWindow:     e.duration("IM_DELIVERY_WINDOW", 24*time.Hour),
		IMDedupWindow:        e.duration("IM_DEDUP_WINDOW", imDedupWindow),
		DatabaseURL:          e.get("DATABASE_URL", "sqlite:bridge.db"),
		PublicURL:            strings.TrimRight(e.get("PUBLIC_URL", ""), "/"),
		AdminToken:           e.get("ADMIN_TOKEN", ""),
		MediaDir:             e.get("MEDIA_DIR", ""),
		MediaRetention:       e.duration("MEDIA_RETENTION", 7*24*time.Hour),
		HistoryRetention:     e.retention("HISTORY_RETENTION", 180*24*time.Hour),
		MediaFetchTimeout:    e.duration("MEDIA_FETCH_TIMEOUT", 15*time.Second),
		DatabaseMaxConns:     e.count("DATABASE_MAX_CONNS", defaultPGConns, 1, "a whole number of connections, at least 1"),
		RetryMinDelay:        e.duration("RETRY_MIN_DELAY", time.Second),
		RetryMaxDelay:        e.duration("RETRY_MAX_DELAY", 5*time.Minute),
		VendorTimeout:        e.duration("VENDOR_TIMEOUT", 10*time.Second),
		ShutdownGrace:        e.duration("SHUTDOWN_GRACE", 10*time.Second),
		WelcomeText:          e.text("WELCOME_TEXT", defaultWelcomeText),
		ConnectingText:       e.text("CONNECTING_TEXT", defaultConnectingText),
		LogFormat:            e.get("LOG_FORMAT", "text"),
	}
	checkGeneral(e, &c)
	checkWeChat(e, &c)
	checkIM(e, &c)
	readDesk(e, &c)
	if len(e.problems) > 0 {
		slices.Sort(e.problems)
		return Config{}, errors.New("bad configuration:\n  " + strings.Join(e.problems, "\n  "))
	}
	return c, nil
}

// checkGeneral checks the store, the retries and the logs.
func checkGeneral(e *env, c *Config) {
	if c.RetryMaxDelay < c.RetryMinDelay {
		e.bad("RETRY_MAX_DELAY must not be shorter than RETRY_MIN_DELAY")
	}
	if e.get("DATABASE_MAX_CONNS", "") != "" && !isPostgresURL(c.DatabaseURL) {
		e.bad("DATABASE_MAX_CONNS applies to PostgreSQL only: on SQLite one writer does every write")
	}
	if _, err := sqlitePath(c.DatabaseURL); err != nil && !isPostgresURL(c.DatabaseURL) {
		e.bad("DATABASE_URL: want sqlite:PATH or postgres://…, got %q", redactDSN(c.DatabaseURL))
	}
	if err := c.LogLevel.UnmarshalText([]byte(e.get("LOG_LEVEL", "info"))); err != nil {
		e.bad("LOG_LEVEL must be debug, info, warn or error, got %q", e.getenv("LOG_LEVEL"))
	}
	if c.PublicURL != "" {
		checkBase(e, "PUBLIC_URL", c.PublicURL)
	}
	for _, h := range strings.Split(e.get("MEDIA_FETCH_ALLOW", ""), ",") {
		if h = strings.TrimSpace(h); h == "" {
			continue
		}
		if strings.ContainsAny(h, "/@?# ") {
			e.bad("MEDIA_FETCH_ALLOW: want host or host:port, comma-separated, got %q", h)
		}
		c.MediaFetchAllow = append(c.MediaFetchAllow, h)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		e.bad("LOG_FORMAT must be text or json, got %q", c.LogFormat)
	}
}

// checkWeChat checks the WeChat side's token, keys and API base.
func checkWeChat(e *env, c *Config) {
	if c.WeChatToken != "" && !wechatTokenPattern.MatchString(c.WeChatToken) {
		e.bad("WECHAT_TOKEN must be 3 to 32 letters or digits, as the WeChat console requires")
	}
	for _, k := range []struct{ name, value string }{{"WECHAT_AES_KEY", c.WeChatAESKey}, {"WECHAT_AES_KEY_PREVIOUS", c.WeChatAESKeyPrevious}} {
		if _, err := parseEncodingAESKey(k.value); k.value != "" && (err != nil || !aesKeyPattern.MatchString(k.value)) {
			e.bad("%s must be the 43-character EncodingAESKey from the WeChat console", k.name)
		}
	}
	if c.WeChatAESKeyPrevious != "" && c.WeChatAESKey == "" {
		e.bad("WECHAT_AES_KEY_PREVIOUS is set without WECHAT_AES_KEY")
	}
	checkBase(e, "WECHAT_API_BASE", c.WeChatAPIBase)
}

// checkIM reads and checks the IM side's app, accounts and API base.
func checkIM(e *env, c *Config) {
	if v := e.required("IM_SDKAPPID"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n == 0 {
			e.bad("IM_SDKAPPID must be a positive integer, got %q", v)
		}
		c.IMSDKAppID = n
	}
	if v := e.required("IM_AGENTS"); v != "" {
		seen := map[string]bool{}
		for _, a := range strings.Split(v, ",") {
			a = strings.TrimSpace(a)
			switch {
			case a == "":
				e.bad("IM_AGENTS has an empty entry")
			case !imUserIDPattern.MatchString(a):
				e.bad("IM_AGENTS entry %q is not a valid IM UserID", a)
			case seen[a]:
				e.bad("IM_AGENTS lists %q twice", a)
			default:
				seen[a] = true
				c.IMAgents = append(c.IMAgents, a)
			}
		}
	}
	if !imUserIDPattern.MatchString(c.IMAdmin) {
		e.bad("IM_ADMIN %q is not a valid IM UserID", c.IMAdmin)
	}
	if !regexp.MustCompile(`^[A-Za-z0-9_\-]{1,4}$`).MatchString(c.IMUserPrefix) {
		e.bad("IM_USER_PREFIX must be 1 to 4 of [A-Za-z0-9_-], so that prefix + a 28-character openid fits IM's 32 bytes")
	}
	for _, a := range c.IMAgents {
		if strings.HasPrefix(a, c.IMUserPrefix) || a == c.IMAdmin {
			e.bad("IM_AGENTS entry %q must not be IM_ADMIN nor start with IM_USER_PREFIX %q", a, c.IMUserPrefix)
		}
	}
	if c.IMUnfollow != unfollowKeep && c.IMUnfollow != unfollowDelete {
		e.bad("IM_UNFOLLOW must be keep or delete, got %q", c.IMUnfollow)
	}
	switch e.get("IM_CALLBACK_AUTH", "on") {
	case "on":
		c.IMCallbackAuth = true
		if c.IMCallbackToken == "" {
			e.bad("IM_CALLBACK_TOKEN is required: the token of callback authentication in the IM console (or IM_CALLBACK_AUTH=off to take unsigned callbacks)")
		}
	case "off":
	default:
		e.bad("IM_CALLBACK_AUTH must be on or off, got %q", e.getenv("IM_CALLBACK_AUTH"))
	}
	checkBase(e, "IM_API_BASE", c.IMAPIBase)
}

// readDesk reads the desk's rules and texts.
func readDesk(e *env, c *Config) {
	t := defaultDeskTexts
	for _, v := range []struct {
		name string
		text *string
	}{{"QUEUED_TEXT", &t.Queued}, {"OFFLINE_TEXT", &t.Offline}, {"AGENT_JOINED_TEXT", &t.Joined}, {"CLOSED_TEXT", &t.Closed},
		{"RATING_TEXT", &t.Rating}, {"RATED_TEXT", &t.Rated}, {"TRANSFER_TEXT", &t.Transfer}, {"IDLE_CLOSED_TEXT", &t.IdleClosed}} {
		*v.text = e.text(v.name, *v.text)
	}
	c.Desk = Desk{Agents: c.IMAgents, UserPrefix: c.IMUserPrefix, Texts: t,
		MaxOpen:    e.count("IM_AGENT_MAX_OPEN", 10, 0, "a whole number of conversations (0: no cap)"),
		AwayGrace:  e.duration("AGENT_AWAY_GRACE", 5*time.Minute),
		ReplyQuota: e.count("WECHAT_REPLY_QUOTA", messageQuota, 1, "a whole number of replies, at least 1")}
	switch v := e.get("SESSION_IDLE_TIMEOUT", "30m"); v {
	case "0", "off":
	default:
		c.Desk.IdleTimeout = e.duration("SESSION_IDLE_TIMEOUT", 30*time.Minute)
	}
	tz := e.get("BUSINESS_TIMEZONE", "Asia/Shanghai")
	loc, err := time.LoadLocation(tz)
	if err != nil {
		e.bad("BUSINESS_TIMEZONE must be an IANA time zone such as Asia/Shanghai, got %q", tz)
	}
	if v := e.get("BUSINESS_HOURS", ""); v != "" && loc != nil {
		if c.Desk.Hours, err = parseHours(v, loc); err != nil {
			e.bad("BUSINESS_HOURS: %v", err)
		}
	}
}

// checkBase checks that an API base is an http or https URL.
func checkBase(e *env, name, v string) {
	if u, err := url.Parse(v); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		e.bad("%s must be an http or https URL, got %q", name, v)
	}
}

// sqlitePath returns the file path of a DATABASE_URL of the form sqlite:PATH.
func sqlitePath(databaseURL string) (string, error) {
	path, ok := strings.CutPrefix(databaseURL, "sqlite:")
	if !ok || path == "" {
		return "", fmt.Errorf("want the form sqlite:PATH, got %q", redactDSN(databaseURL))
	}
	return path, nil
}

// redactDSN hides a password that a database URL may carry.
func redactDSN(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
			return u.String()
		}
	}
	return dsn
}
