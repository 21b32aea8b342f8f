package main

// The WeChat API client: a managed access_token (stable_token) and the
// customer-service message API.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// WeChatError is an errcode answer of the WeChat API.
type WeChatError struct {
	API  string
	Code int
	Msg  string
}

func (e *WeChatError) Error() string {
	return fmt.Sprintf("wechat %s: errcode %d: %s", e.API, e.Code, e.Msg)
}

// tokenErrors are the errcodes that mean the access_token is no longer good:
// 40001 invalid or superseded, 40014 malformed, 42001 expired.
var tokenErrors = map[int]bool{40001: true, 40014: true, 42001: true}

// wechatPermanent are the errcodes of custom/send a retry cannot fix, each
// with what it means for the agent who is told (WeChat's global return
// codes and the customer-service message page). Credential and permission
// errors are retried within the window, since an operator can fix them.
var wechatPermanent = map[int]string{
	40003: "WeChat does not know the customer's openid",
	45015: "the customer last wrote more than 48 hours ago, or unfollowed",
	45047: "the customer's reply quota is used up until they write again",
	45087: "WeChat blocks customer-service messages from this account",
	45002: "the text is longer than WeChat takes (2,048 bytes)",
	44002: "the message is empty",
	40008: "the message type is not valid",
	45008: "the message is malformed",
	40007: "the media is gone (WeChat keeps media three days)",
	40004: "WeChat does not take this kind of media",
	40005: "WeChat does not take this file type",
	40006: "the file is larger than WeChat takes",
	40113: "WeChat does not take this file type",
	45001: "the file is larger than WeChat takes",
}

// WeChatClient calls the WeChat Official Account API. It owns the
// access_token: it fetches it from /cgi-bin/stable_token, caches it until
// shortly before it expires, and never lets it out of its requests.
type WeChatClient struct {
	Base      string // e.g. https://api.weixin.qq.com
	AppID     string
	AppSecret string
	HTTP      *http.Client
	Now       func() time.Time
	// Shared, if set, shares the token among instances (Store.SharedCredential).
	Shared sharedCredential

	mu      sync.Mutex
	token   string
	refresh time.Time // when to fetch a new token
}

// accessToken returns the cached token, fetching one when there is none or
// it is due for renewal. stale, if not empty, is a token WeChat refused: it is
// dropped unless another caller has already replaced it.
func (c *WeChatClient) accessToken(ctx context.Context, stale string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if stale != "" && stale == c.token {
		c.token = ""
	}
	now := c.Now()
	if c.token != "" && now.Before(c.refresh) {
		return c.token, nil
	}
	fetch := func() (string, time.Time, error) {
		req := map[string]any{"grant_type": "client_credential", "appid": c.AppID, "secret": c.AppSecret, "force_refresh": false}
		var resp struct {
			AccessToken string `json:"access_token"`
			ExpiresIn   int64  `json:"expires_in"`
		}
		if err := c.post(ctx, "stable_token", "/cgi-bin/stable_token", nil, req, &resp); err != nil {
			return "", time.Time{}, err
		}
		if resp.AccessToken == "" || resp.ExpiresIn <= 0 {
			return "", time.Time{}, errors.New("wechat stable_token: answer has no access_token")
		}
		life := time.Duration(resp.ExpiresIn) * time.Second
		// WeChat renews a stable token in its last 5 minutes; ask again then.
		return resp.AccessToken, now.Add(life - min(5*time.Minute, life/2)), nil
	}
	var err error
	if c.Shared != nil {
		c.token, c.refresh, err = c.Shared(ctx, credentialName("wechat_access_token", c.AppID, c.AppSecret), stale, now, fetch)
	} else {
		c.token, c.refresh, err = fetch()
	}
	if err != nil {
		c.token = ""
		return "", err
	}
	return c.token, nil
}

// callWithToken posts body to path with the access_token. An answer saying
// the token is no longer good drops it, fetches a fresh one and tries once
// more.
func (c *WeChatClient) callWithToken(ctx context.Context, api, path string, body any) error {
	token, err := c.accessToken(ctx, "")
	if err != nil {
		return notCalled{err}
	}
	err = c.post(ctx, api, path, url.Values{"access_token": {token}}, body, nil)
	if e := (*WeChatError)(nil); errors.As(err, &e) && tokenErrors[e.Code] {
		if token, err = c.accessToken(ctx, token); err != nil {
			return err // the first call was refused: nothing was done
		}
		err = c.post(ctx, api, path, url.Values{"access_token": {token}}, body, nil)
	}
	return err
}

// post sends body as JSON and decodes the answer, turning a non-zero errcode
// into a *WeChatError.
func (c *WeChatClient) post(ctx context.Context, api, path string, query url.Values, body, resp any) error {
	b, err := marshalJSON(body)
	if err != nil {
		return fmt.Errorf("wechat %s: encode: %w", api, err)
	}
	u := c.Base + path
	if query != nil {
		u += "?" + query.Encode()
	}
	raw, err := postJSON(ctx, c.HTTP, "wechat "+api, u, b)
	if err != nil {
		return err
	}
	var env struct {
		ErrCode int    `json:"errcode"`
		ErrMsg  string `json:"errmsg"`
	}
	if err := json.Unmarshal(raw, &env); err != nil {
		return fmt.Errorf("wechat %s: decode answer: %w", api, err)
	}
	if env.ErrCode != 0 {
		return &WeChatError{API: api, Code: env.ErrCode, Msg: env.ErrMsg}
	}
	if resp != nil {
		if err := json.Unmarshal(raw, resp); err != nil {
			return fmt.Errorf("wechat %s: decode answer: %w", api, err)
		}
	}
	return nil
}

// customText is the body of a custom/send text message.
type customText struct {
	ToUser  string `json:"touser"`
	MsgType string `json:"msgtype"`
	Text    struct {
		Content string `json:"content"`
	} `json:"text"`
}

// SendText sends text to the customer openid as a customer-service message.
func (c *WeChatClient) SendText(ctx context.Context, openid, text string) error {
	m := customText{ToUser: openid, MsgType: "text"}
	m.Text.Content = text
	return c.callWithToken(ctx, "custom/send", "/cgi-bin/message/custom/send", m)
}

// maxMediaBytes bounds what the bridge fetches of a customer's media: WeChat
// takes images and videos of 10 MB at most.
const maxMediaBytes = 10 << 20

// FetchMedia spools a customer's media, at most maxMediaBytes, from
// /cgi-bin/media/get by its media_id; a video from the video_url that
// answers, through fetch, as every URL from outside. What concerns the file
// itself is a mediaError (fetch.go); WeChat's errcodes are *WeChatErrors.
func (c *WeChatClient) FetchMedia(ctx context.Context, fetch *fetcher, mediaID string) (*spool, error) {
	get := func(token string) (*spool, error) {
		q := url.Values{"access_token": {token}, "media_id": {mediaID}}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Base+"/cgi-bin/media/get?"+q.Encode(), nil)
		if err != nil {
			return nil, fmt.Errorf("wechat media/get: %w", redactErr(err))
		}
		// The download is bounded by MEDIA_FETCH_TIMEOUT, the caller's
		// deadline, not by VENDOR_TIMEOUT: a 10 MB file takes longer than
		// an API call.
		download := *c.HTTP
		download.Timeout = 0
		resp, err := download.Do(req)
		if err != nil {
			return nil, fetchFailed(ctx, "wechat media/get", err)
		}
		// A file, or an answer other than 200 (save judges its status),
		// or else JSON: an errcode, or where a video is.
		ct := resp.Header.Get("Content-Type")
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(ct, "application/json") && !strings.HasPrefix(ct, "text/plain") {
			return fetch.save(ctx, "wechat media/get", resp, maxMediaBytes)
		}
		defer resp.Body.Close()
		raw, err := readLimited(resp.Body, maxAnswerBytes)
		if err != nil {
			return nil, fetchFailed(ctx, "wechat media/get", err)
		}
		var env struct {
			ErrCode  int    `json:"errcode"`
			ErrMsg   string `json:"errmsg"`
			VideoURL string `json:"video_url"` // a video is fetched from where WeChat says
		}
		switch json.Unmarshal(raw, &env); {
		case env.ErrCode != 0:
			return nil, &WeChatError{API: "media/get", Code: env.ErrCode, Msg: env.ErrMsg}
		case env.VideoURL != "":
			return fetch.get(ctx, "wechat video_url", env.VideoURL, maxMediaBytes)
		}
		return nil, mediaError{why: "WeChat answered media/get with neither the file nor its video_url"}
	}
	token, err := c.accessToken(ctx, "")
	if err != nil {
		return nil, notCalled{err}
	}
	sp, err := get(token)
	if e := (*WeChatError)(nil); errors.As(err, &e) && tokenErrors[e.Code] {
		if token, err = c.accessToken(ctx, token); err != nil {
			return nil, err
		}
		sp, err = get(token)
	}
	return sp, err
}

// SendMedia sends the customer an image, voice or video message of what
// was uploaded (media_id, and a video's thumb_media_id).
func (c *WeChatClient) SendMedia(ctx context.Context, openid, msgType string, media map[string]string) error {
	m := map[string]any{"touser": openid, "msgtype": msgType, msgType: media}
	return c.callWithToken(ctx, "custom/send", "/cgi-bin/message/custom/send", m)
}

// uploadExt is the extension WeChat wants on an upload's file name, by the
// file's type: it judges a file by its name as well as by its bytes, and
// refuses a name without one (wechat.md, Temporary media).
var uploadExt = map[string]string{"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
	"audio/amr": ".amr", "audio/mpeg": ".mp3", "video/mp4": ".mp4"}

// Upload uploads the spooled file sp, of type ct, as temporary media of typ
// (image, voice, video, thumb) with /cgi-bin/media/upload, streamed from
// disk, and returns its media_id (a thumbnail's thumb_media_id). A token
// WeChat refuses is renewed, and the upload tried once more.
func (c *WeChatClient) Upload(ctx context.Context, typ, ct string, sp *spool) (string, error) {
	token, err := c.accessToken(ctx, "")
	if err != nil {
		return "", notCalled{err}
	}
	id, err := c.upload(ctx, token, typ, typ+uploadExt[ct], sp)
	if e := (*WeChatError)(nil); errors.As(err, &e) && tokenErrors[e.Code] {
		if token, err = c.accessToken(ctx, token); err != nil {
			return "", err
		}
		id, err = c.upload(ctx, token, typ, typ+uploadExt[ct], sp)
	}
	return id, err
}

// upload makes one media/upload call: a multipart form whose part "media"
// is the file, named filename.
func (c *WeChatClient) upload(ctx context.Context, token, typ, filename string, sp *spool) (string, error) {
	var head bytes.Buffer
	mw := multipart.NewWriter(&head)
	if _, err := mw.CreateFormFile("media", filename); err != nil {
		return "", fmt.Errorf("wechat media/upload: %w", err)
	}
	// The part's header, the file from disk, and the form's end, as
	// multipart.Writer.Close would write it.
	tail := "\r\n--" + mw.Boundary() + "--\r\n"
	body := io.MultiReader(bytes.NewReader(head.Bytes()), sp.reader(), strings.NewReader(tail))
	q := url.Values{"access_token": {token}, "type": {typ}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.Base+"/cgi-bin/media/upload?"+q.Encode(), body)
	if err != nil {
		return "", fmt.Errorf("wechat media/upload: %w", redactErr(err))
	}
	req.ContentLength = int64(head.Len()) + sp.size + int64(len(tail))
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return "", fmt.Errorf("wechat media/upload: %w", redactErr(err))
	}
	defer resp.Body.Close()
	raw, err := readLimited(resp.Body, maxAnswerBytes)
	if err != nil || resp.StatusCode != http.StatusOK {
		return "", &HTTPStatusError{Service: "wechat media/upload", Status: resp.StatusCode}
	}
	var ans struct {
		ErrCode      int    `json:"errcode"`
		ErrMsg       string `json:"errmsg"`
		MediaID      string `json:"media_id"`
		ThumbMediaID string `json:"thumb_media_id"` // a thumbnail's id is named so
	}
	switch json.Unmarshal(raw, &ans); {
	case ans.ErrCode != 0:
		return "", &WeChatError{API: "media/upload", Code: ans.ErrCode, Msg: ans.ErrMsg}
	case cmp.Or(ans.MediaID, ans.ThumbMediaID) == "":
		return "", errors.New("wechat media/upload: answer has no media_id")
	}
	return cmp.Or(ans.MediaID, ans.ThumbMediaID), nil
}

// Typing shows the customer that someone is typing (on), or stops showing
// it, with /cgi-bin/message/custom/typing.
func (c *WeChatClient) Typing(ctx context.Context, openid string, on bool) error {
	m := struct {
		ToUser  string `json:"touser"`
		Command string `json:"command"`
	}{openid, "CancelTyping"}
	if on {
		m.Command = "Typing"
	}
	return c.callWithToken(ctx, "custom/typing", "/cgi-bin/message/custom/typing", m)
}
