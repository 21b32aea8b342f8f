package fakes

// WeChat pushing to the bridge, as it does for a customer: messages and
// events, signed and, in safe mode, encrypted; the passive replies checked.

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

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
	wx.interacted(u)
	wx.mu.Unlock()
	hop(wx.opts.Trace, "customer", "WeChat", "%s follows the Official Account", openid)
	return wx.Push(ctx, wx.EventXML(openid, "subscribe", ""))
}

// Click pushes a menu click (a CLICK event with key) from openid, a
// follower. Like a follow, it opens a one-minute window of three
// customer-service messages, unless a longer one is open.
func (wx *WeChat) Click(ctx context.Context, openid, key string) PushResult {
	wx.mu.Lock()
	wx.interacted(wx.user(openid))
	wx.mu.Unlock()
	hop(wx.opts.Trace, "customer", "WeChat", "%s clicks menu %s", openid, key)
	return wx.Push(ctx, wx.EventXML(openid, "CLICK", key))
}

// interacted opens the window of three customer-service messages a
// minute that a follow, a menu click or a QR scan opens, unless one that
// ends later is open. The caller holds wx.mu.
func (wx *WeChat) interacted(u *customer) {
	now := wx.opts.Now()
	u.lastWrote = now
	if u.windowUntil.Before(now.Add(time.Minute)) {
		u.windowUntil, u.quota = now.Add(time.Minute), 3
	}
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
	u.lastWrote = wx.opts.Now()
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
	if wx.opts.OnPush == nil {
		return wx.push(ctx, body, hdr.FromUserName, hdr.MsgType)
	}
	wx.opts.OnPush(hdr.FromUserName, body, nil)
	res := wx.push(ctx, body, hdr.FromUserName, hdr.MsgType)
	wx.opts.OnPush(hdr.FromUserName, body, &res)
	return res
}

// push is Push after the push's sender and type are read.
func (wx *WeChat) push(ctx context.Context, body []byte, openid, msgType string) PushResult {
	hdr := struct{ FromUserName, MsgType string }{openid, msgType}
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

// Verify makes the request WeChat makes when the operator saves the server
// URL in the console: a signed GET whose echostr the developer must echo.
// It reports whether the answer was the echostr.
func (wx *WeChat) Verify(ctx context.Context) error {
	wx.mu.Lock()
	target := wx.target
	wx.mu.Unlock()
	ts := strconv.FormatInt(wx.opts.Now().Unix(), 10)
	nonce := strconv.FormatUint(uint64(randUint32()), 10)
	echo := strconv.FormatUint(uint64(randUint32())<<20|uint64(randUint32()), 10)
	q := url.Values{"signature": {Sign(wx.opts.Token, ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}, "echostr": {echo}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	hop(wx.opts.Trace, "WeChat", "bridge", "GET /wechat (URL verification)")
	resp, err := wx.pushHTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	if resp.StatusCode != http.StatusOK || string(b) != echo {
		return fmt.Errorf("URL verification answered %d %q, want the echostr", resp.StatusCode, b)
	}
	return nil
}
