package fakes

// The WeChat API the bridge calls: access tokens and customer-service
// messages.

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"slices"
	"strings"
	"time"
)

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

// MaxCustomText is the most UTF-8 bytes WeChat takes in a customer-service
// text; past it custom/send answers 45002. WeChat publishes no figure for
// custom/send: 2,048 bytes is WeCom's documented text limit, and what
// public reports of 45002 give.
const MaxCustomText = 2048

// openAPICall records a call to a message API and checks its method and
// access_token, then applies any injected fault. It reports false when it
// has answered the call.
func (wx *WeChat) openAPICall(w http.ResponseWriter, r *http.Request) (now time.Time, body []byte, ok bool) {
	now = wx.opts.Now()
	body = wx.record(r, now)
	if r.Method != http.MethodPost {
		wx.t.Errorf("fake wechat: %s is POST only, got %s", r.URL.Path, r.Method)
		writeWeChatError(w, 43002, "require POST method")
		return now, nil, false
	}
	wx.mu.Lock()
	code, msg := wx.checkToken(r.URL.Query().Get("access_token"), now)
	wx.mu.Unlock()
	if code != 0 {
		writeWeChatError(w, code, msg)
		return now, nil, false
	}
	return now, body, !wx.injected(w, r)
}

// handleCustomSend serves POST /cgi-bin/message/custom/send for text, image,
// voice and video messages (by the media_id of an upload), enforcing the token, the customer's 48-hour window and its
// quota.
func (wx *WeChat) handleCustomSend(w http.ResponseWriter, r *http.Request) {
	now, body, ok := wx.openAPICall(w, r)
	if !ok {
		return
	}
	var m struct {
		ToUser  string `json:"touser"`
		MsgType string `json:"msgtype"`
		Text    *struct {
			Content string `json:"content"`
		} `json:"text"`
		Image *struct {
			MediaID string `json:"media_id"`
		} `json:"image"`
		Voice *struct {
			MediaID string `json:"media_id"`
		} `json:"voice"`
		Video *struct {
			MediaID      string `json:"media_id"`
			ThumbMediaID string `json:"thumb_media_id"`
		} `json:"video"`
	}
	if len(body) == 0 {
		writeWeChatError(w, 44002, "empty post data")
		return
	}
	if err := json.Unmarshal(body, &m); err != nil {
		writeWeChatError(w, 47001, "data format error")
		return
	}
	var text, mediaID string
	switch {
	case m.MsgType == "text" && (m.Text == nil || m.Text.Content == ""):
		writeWeChatError(w, 44003, "empty news data")
		return
	case m.MsgType == "text" && len(m.Text.Content) > MaxCustomText:
		writeWeChatError(w, 45002, "content size out of limit")
		return
	case m.MsgType == "text":
		text = m.Text.Content
	case m.MsgType == "image" && m.Image != nil && wx.uploaded(m.Image.MediaID, "image"):
		mediaID = m.Image.MediaID
	case m.MsgType == "voice" && m.Voice != nil && wx.uploaded(m.Voice.MediaID, "voice"):
		mediaID = m.Voice.MediaID
	case m.MsgType == "video" && m.Video != nil && wx.uploaded(m.Video.MediaID, "video") && wx.uploaded(m.Video.ThumbMediaID, "thumb"):
		mediaID = m.Video.MediaID
	case m.MsgType == "image" || m.MsgType == "voice" || m.MsgType == "video":
		writeWeChatError(w, 40007, "invalid media_id")
		return
	default:
		wx.t.Errorf("fake wechat: custom/send msgtype %q is not modelled", m.MsgType)
		writeWeChatError(w, 40008, "invalid message type")
		return
	}

	wx.mu.Lock()
	u, ok := wx.users[m.ToUser]
	code, msg := 0, "ok"
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
	u.typingUntil = time.Time{} // a message ends the typing state
	cm := CustomMessage{ToUser: m.ToUser, MsgType: m.MsgType, Text: text, MediaID: mediaID, Body: body, At: now}
	wx.sent = append(wx.sent, cm)
	wx.mu.Unlock()
	if wx.opts.OnSend != nil {
		wx.opts.OnSend(cm)
	}
	hop(wx.opts.Trace, "bridge", "WeChat", "custom/send to %s", m.ToUser)
	hop(wx.opts.Trace, "WeChat", "customer", "%s sees: %q", m.ToUser, cmp.Or(text, "an "+m.MsgType+" message"))
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

// Typing is a typing state WeChat showed a customer, or took away.
type Typing struct {
	ToUser  string
	Command string // Typing or CancelTyping
	At      time.Time
}

// Typings returns the typing commands WeChat accepted, in order.
func (wx *WeChat) Typings() []Typing {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	return append([]Typing(nil), wx.typings...)
}

// handleTyping serves POST /cgi-bin/message/custom/typing with WeChat's
// rules: only within 30 s of the customer's last message (45080); a typing
// state lasts 15 s and is not sent again while it shows (45081); a command
// other than Typing or CancelTyping is 45072.
func (wx *WeChat) handleTyping(w http.ResponseWriter, r *http.Request) {
	now, body, ok := wx.openAPICall(w, r)
	if !ok {
		return
	}
	var m struct {
		ToUser  string `json:"touser"`
		Command string `json:"command"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		writeWeChatError(w, 47001, "data format error")
		return
	}
	wx.mu.Lock()
	defer wx.mu.Unlock()
	u, ok := wx.users[m.ToUser]
	switch {
	case m.Command != "Typing" && m.Command != "CancelTyping":
		writeWeChatError(w, 45072, "command invalid")
		return
	case !ok:
		writeWeChatError(w, 40003, "invalid openid")
		return
	case now.Sub(u.lastWrote) > 30*time.Second:
		writeWeChatError(w, 45080, "has not sent message to user in 30 seconds")
		return
	case m.Command == "Typing" && now.Before(u.typingUntil):
		writeWeChatError(w, 45081, "already typing")
		return
	case m.Command == "Typing":
		u.typingUntil = now.Add(15 * time.Second)
	default:
		u.typingUntil = time.Time{}
	}
	wx.typings = append(wx.typings, Typing{ToUser: m.ToUser, Command: m.Command, At: now})
	writeWeChatError(w, 0, "ok")
}

// media is a customer's upload as WeChat keeps it.
type media struct {
	data        []byte
	contentType string
	at          time.Time
}

// mediaLife is how long WeChat keeps a customer's media for media/get.
const mediaLife = 3 * 24 * time.Hour

// AddMedia keeps data as a customer's upload, as WeChat does before it
// pushes an image, and returns its media_id and its PicUrl.
func (wx *WeChat) AddMedia(data []byte, contentType string) (mediaID, picURL string) {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	wx.nextMsg++
	mediaID = fmt.Sprintf("media_%d", wx.nextMsg)
	wx.media[mediaID] = media{data: data, contentType: contentType, at: wx.opts.Now()}
	return mediaID, wx.URL + "/mmbiz/" + mediaID
}

// handleMediaGet serves GET /cgi-bin/media/get: the media's bytes with its
// Content-Type, or for a video {"video_url": …}, for three days; an unknown
// or expired media_id is 40007, in a JSON body as WeChat answers errors.
func (wx *WeChat) handleMediaGet(w http.ResponseWriter, r *http.Request) {
	now := wx.opts.Now()
	wx.record(r, now)
	wx.mu.Lock()
	code, msg := wx.checkToken(r.URL.Query().Get("access_token"), now)
	m, ok := wx.media[r.URL.Query().Get("media_id")]
	wx.mu.Unlock()
	switch {
	case code != 0:
		writeWeChatError(w, code, msg)
	case wx.injected(w, r):
	case !ok || now.Sub(m.at) > mediaLife:
		writeWeChatError(w, 40007, "invalid media_id")
	case strings.HasPrefix(m.contentType, "video/"):
		// A video is not in the answer: WeChat says where to fetch it.
		writeJSON(w, map[string]any{"video_url": wx.URL + "/mmbiz/" + r.URL.Query().Get("media_id")})
	default:
		w.Header().Set("Content-Type", m.contentType)
		w.Write(m.data)
	}
}

// handlePicURL serves a pushed image's PicUrl.
func (wx *WeChat) handlePicURL(w http.ResponseWriter, r *http.Request) {
	wx.record(r, wx.opts.Now())
	wx.mu.Lock()
	m, ok := wx.media[r.PathValue("id")]
	wx.mu.Unlock()
	serveStored(w, r, m.data, m.contentType, ok)
}

// uploadLimits are what /cgi-bin/media/upload takes, by type: the most
// bytes, the formats, and the extensions a part's file name must end with
// (wechat.md: image 10 MB, PNG/JPEG/GIF; voice 2 MB, AMR/MP3; video 10 MB,
// MP4; thumb 64 KB, JPG).
var uploadLimits = map[string]struct {
	max   int
	types []string
	exts  []string
}{
	"image": {10 << 20, []string{"image/png", "image/jpeg", "image/gif"}, []string{".png", ".jpg", ".jpeg", ".gif"}},
	"voice": {2 << 20, []string{"audio/amr", "audio/mpeg"}, []string{".amr", ".mp3"}},
	"video": {10 << 20, []string{"video/mp4"}, []string{".mp4"}},
	"thumb": {64 << 10, []string{"image/jpeg"}, []string{".jpg", ".jpeg"}},
}

// Upload is a file the account uploaded as temporary media.
type Upload struct {
	MediaID, Type string
	Filename      string // the part's file name
	Data          []byte
}

// Uploads returns the temporary media uploaded, in order.
func (wx *WeChat) Uploads() []Upload {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	return append([]Upload(nil), wx.uploads...)
}

// uploaded reports whether mediaID is an upload of type typ.
func (wx *WeChat) uploaded(mediaID, typ string) bool {
	wx.mu.Lock()
	defer wx.mu.Unlock()
	for _, u := range wx.uploads {
		if u.MediaID == mediaID {
			return u.Type == typ
		}
	}
	return false
}

// handleUpload serves POST /cgi-bin/media/upload?type=…: a multipart form
// whose part "media" is the file. A type it does not know is 40004, a file
// not of its formats, or named without one of its extensions, 40005; one
// too large 40006. A thumbnail's id is answered as thumb_media_id.
func (wx *WeChat) handleUpload(w http.ResponseWriter, r *http.Request) {
	now := wx.opts.Now()
	wx.mu.Lock()
	code, msg := wx.checkToken(r.URL.Query().Get("access_token"), now)
	wx.mu.Unlock()
	if code != 0 {
		wx.record(r, now)
		writeWeChatError(w, code, msg)
		return
	}
	typ := r.URL.Query().Get("type")
	limit, known := uploadLimits[typ]
	f, fh, err := r.FormFile("media")
	wx.record(r, now)
	if wx.injected(w, r) {
		return
	}
	switch {
	case !known:
		writeWeChatError(w, 40004, "invalid media type")
		return
	case err != nil:
		writeWeChatError(w, 41005, "media data missing")
		return
	}
	data, _ := io.ReadAll(io.LimitReader(f, int64(limit.max)+1))
	switch {
	case len(data) > limit.max:
		writeWeChatError(w, 40006, "invalid meida size")
		return
	case !slices.Contains(limit.types, sniff(data)) || !slices.Contains(limit.exts, strings.ToLower(path.Ext(fh.Filename))):
		writeWeChatError(w, 40005, "invalid file type")
		return
	}
	wx.mu.Lock()
	wx.nextMsg++
	id := fmt.Sprintf("upload_%d", wx.nextMsg)
	wx.uploads = append(wx.uploads, Upload{MediaID: id, Type: typ, Filename: fh.Filename, Data: data})
	wx.mu.Unlock()
	hop(wx.opts.Trace, "bridge", "WeChat", "media/upload %s, %d bytes", typ, len(data))
	if typ == "thumb" {
		writeJSON(w, map[string]any{"type": typ, "thumb_media_id": id, "created_at": now.Unix()})
		return
	}
	writeJSON(w, map[string]any{"type": typ, "media_id": id, "created_at": now.Unix()})
}

// sniff is a file's type as WeChat judges it, by its first bytes.
func sniff(data []byte) string {
	switch {
	case bytes.HasPrefix(data, []byte("#!AMR")):
		return "audio/amr"
	case bytes.HasPrefix(data, []byte("ID3")) || len(data) > 1 && data[0] == 0xFF && data[1]&0xE0 == 0xE0:
		return "audio/mpeg"
	}
	return http.DetectContentType(data)
}
