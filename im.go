package main

// The Tencent IM REST client: UserSig, the request envelope, and the calls
// the bridge makes (account_import, account_delete, openim/sendmsg, and
// openim/admin_getroammsg to recover replies, recover.go).

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/tencentyun/tls-sig-api-v2-golang/tencentyun"
)

// IMError is an error answer of the IM REST API.
type IMError struct {
	Command string // service/command, e.g. openim/sendmsg
	Code    int
	Info    string
}

func (e *IMError) Error() string {
	return fmt.Sprintf("im %s: error %d: %s", e.Command, e.Code, e.Info)
}

// IM error codes the bridge acts on.
const (
	imErrSigExpired      = 70001 // UserSig expired: renew it
	imErrNotImported     = 20003 // sender or recipient not imported
	imErrFromNotFound    = 90008 // From_Account missing or not imported
	imErrAccountNotFound = 70107 // account_delete of an account that does not exist
	imErrContentSecurity = 80001 // the text hit IM's content security
)

// imPermanent lists IM codes a retry cannot fix, each with what it means
// for the agent who is told (the error-code table, 269/1671; sendmsg,
// 269/2282; account_import, 269/1608). 20003 and 90008 are permanent only
// after an import (see Worker.deliver); credential and permission errors
// are not, since an operator can fix the configuration while the item waits.
var imPermanent = map[int]string{
	90001: "IM could not parse the request",
	90003: "the recipient is not a valid UserID",
	90005: "MsgRandom is missing",
	90007: "the message body is not an array",
	90010: "the message does not match IM's message format",
	90026: "the message's lifetime is invalid",
	93000: "the message is longer than IM takes (12 KB)",
	80001: "IM's content security refused the text",
	20006: "the app's before-send callback refused the message",
	90012: "the agent's account does not exist in IM",
	90048: "the agent's account does not exist in IM",
	70398: "the IM app holds as many accounts as it may (a trial app: 100): upgrade it, or set IM_UNFOLLOW=delete so that unfollowers free theirs",
	70399: "IM does not import a UserID deleted in the last three months on a paid app: set IM_UNFOLLOW=keep",
	70402: "IM refused the account's parameters",
}

// imDedupWindow is how long IM drops a repeat of a sendmsg with the same
// sender, MsgSeq, MsgRandom and content (sendmsg's documentation, 269/2282).
const imDedupWindow = 120 * time.Second

// imMaybeDone lists the codes with which IM says it failed inside, after
// the request reached it: the message may have been delivered all the same.
var imMaybeDone = map[int]bool{91000: true, 70169: true, 60008: true}

// imAgentGone lists the codes that say the agent's account is gone: their
// notice goes to another agent.
var imAgentGone = map[int]bool{90012: true, 90048: true}

// IMClient calls the Tencent IM REST API as the admin account. It owns the
// admin's UserSig and never lets it out of its requests.
type IMClient struct {
	Base      string // e.g. https://console.tim.qq.com
	SDKAppID  uint64
	SecretKey string
	Admin     string
	HTTP      *http.Client
	// SigLifetime bounds a UserSig's validity; it is renewed at 80% of it.
	SigLifetime time.Duration
	Now         func() time.Time
	// Shared, if set, shares the UserSig among instances (Store.SharedCredential).
	Shared sharedCredential
	// RatePerAPI caps the calls per second to each API, below its
	// documented limit (imAPILimits); 0 means no pacing at all.
	RatePerAPI int

	mu        sync.Mutex
	sig       string
	sigExpiry time.Time // when to renew sig
	limiters  map[string]*rateLimiter
}

// userSig returns the cached admin UserSig, making a new one when the cache
// is empty, past 80% of its lifetime, or equal to stale (one IM refused).
func (c *IMClient) userSig(ctx context.Context, stale string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.Now()
	if stale != "" && stale == c.sig {
		c.sig = ""
	}
	if c.sig != "" && now.Before(c.sigExpiry) {
		return c.sig, nil
	}
	gen := func() (string, time.Time, error) {
		sig, err := tencentyun.GenUserSig(int(c.SDKAppID), c.SecretKey, c.Admin, int(c.SigLifetime/time.Second))
		if err != nil {
			return "", time.Time{}, errors.New("generate usersig failed") // the library's error may quote its input
		}
		return sig, now.Add(c.SigLifetime * 8 / 10), nil
	}
	var err error
	if c.Shared != nil {
		name := credentialName("im_usersig", fmt.Sprintf("%d/%s", c.SDKAppID, c.Admin), c.SecretKey)
		c.sig, c.sigExpiry, err = c.Shared(ctx, name, stale, now, gen)
	} else {
		c.sig, c.sigExpiry, err = gen()
	}
	if err != nil {
		c.sig = ""
		return "", err
	}
	return c.sig, nil
}

// imAPILimits are the calls a second IM takes from an app, by API, by
// default (a paid package raises them; IM_RATE_LIMIT lowers them): each
// API's documentation, "最高调用频率" / "请求频率限制": sendmsg 269/2282,
// account_import 269/1608, account_delete 269/36443, account_check
// 269/38417, admin_getroammsg 269/42794. An API not listed is paced at
// the lowest of them.
var imAPILimits = map[string]int{
	"openim/sendmsg":                   200,
	"openim/admin_getroammsg":          200,
	"im_open_login_svc/account_import": 200,
	"im_open_login_svc/account_delete": 100,
	"im_open_login_svc/account_check":  100,
	"openim/query_online_status":       200,
}

// minIMAPILimit paces the APIs imAPILimits does not list.
const minIMAPILimit = 100

// limiter returns the rate limiter of an API, or nil when calls are not
// paced.
func (c *IMClient) limiter(command string) *rateLimiter {
	if c.RatePerAPI <= 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.limiters == nil {
		c.limiters = map[string]*rateLimiter{}
	}
	l, ok := c.limiters[command]
	if !ok {
		l = newRateLimiter(min(cmp.Or(imAPILimits[command], minIMAPILimit), c.RatePerAPI))
		c.limiters[command] = l
	}
	return l
}

// sigRefused are the codes of an answer refusing the UserSig (error codes,
// 269/1671: expired, empty, unreadable, not this key's, not this admin's,
// not this app's): the UserSig is renewed and the call made once more.
var sigRefused = map[int]bool{imErrSigExpired: true, 70002: true, 70003: true, 70009: true, 70013: true, 70014: true}

// call posts req to v4/command and decodes the answer into resp. An answer
// refusing the UserSig renews it, and the call is made once more.
func (c *IMClient) call(ctx context.Context, command string, req, resp any) error {
	body, err := marshalJSON(req)
	if err != nil {
		return fmt.Errorf("im %s: encode: %w", command, err)
	}
	sig, err := c.userSig(ctx, "")
	if err != nil {
		return fmt.Errorf("im %s: %w", command, err)
	}
	err = c.post(ctx, command, body, resp, sig)
	if e := (*IMError)(nil); errors.As(err, &e) && sigRefused[e.Code] {
		if sig, err = c.userSig(ctx, sig); err != nil {
			return fmt.Errorf("im %s: %w", command, err)
		}
		err = c.post(ctx, command, body, resp, sig)
	}
	return err
}

func (c *IMClient) post(ctx context.Context, command string, body []byte, resp any, sig string) error {
	if l := c.limiter(command); l != nil {
		if err := l.Wait(ctx); err != nil {
			return fmt.Errorf("im %s: %w", command, err)
		}
	}
	q := url.Values{
		"sdkappid":    {strconv.FormatUint(c.SDKAppID, 10)},
		"identifier":  {c.Admin},
		"usersig":     {sig},
		"random":      {strconv.FormatUint(uint64(rand.Uint32()), 10)},
		"contenttype": {"json"},
	}
	raw, err := postJSON(ctx, c.HTTP, "im "+command, c.Base+"/v4/"+command+"?"+q.Encode(), body)
	if err != nil {
		return err
	}
	var env struct {
		ActionStatus string
		ErrorCode    int
		ErrorInfo    string
	}
	if err := json.Unmarshal(raw, &env); err != nil {
		return fmt.Errorf("im %s: decode answer: %w", command, err)
	}
	if env.ErrorCode != 0 || env.ActionStatus != "OK" {
		return &IMError{Command: command, Code: env.ErrorCode, Info: env.ErrorInfo}
	}
	if resp != nil {
		if err := json.Unmarshal(raw, resp); err != nil {
			return fmt.Errorf("im %s: decode answer: %w", command, err)
		}
	}
	return nil
}

// ImportAccount creates the IM account userID (idempotent at IM).
func (c *IMClient) ImportAccount(ctx context.Context, userID string) error {
	return c.call(ctx, "im_open_login_svc/account_import", map[string]string{"UserID": userID}, nil)
}

// DeleteAccount deletes the IM account userID; an account that does not
// exist counts as deleted.
func (c *IMClient) DeleteAccount(ctx context.Context, userID string) error {
	var resp struct {
		ResultItem []struct {
			ResultCode int
			ResultInfo string
			UserID     string
		}
	}
	req := map[string]any{"DeleteItem": []map[string]string{{"UserID": userID}}}
	if err := c.call(ctx, "im_open_login_svc/account_delete", req, &resp); err != nil {
		return err
	}
	for _, r := range resp.ResultItem {
		if r.ResultCode != 0 && r.ResultCode != imErrAccountNotFound {
			return &IMError{Command: "im_open_login_svc/account_delete", Code: r.ResultCode, Info: r.ResultInfo}
		}
	}
	return nil
}

// MsgElem is one element of an IM message body.
type MsgElem struct {
	MsgType    string         `json:"MsgType"`
	MsgContent map[string]any `json:"MsgContent"`
}

// SendMsg is the body of openim/sendmsg.
type SendMsg struct {
	SyncOtherMachine      int       `json:"SyncOtherMachine"`
	From_Account          string    `json:"From_Account"`
	To_Account            string    `json:"To_Account"`
	MsgSeq                uint32    `json:"MsgSeq"`
	MsgRandom             uint32    `json:"MsgRandom"`
	ForbidCallbackControl []string  `json:"ForbidCallbackControl"`
	MsgBody               []MsgElem `json:"MsgBody"`
}

// forbidCallbacks keeps the bridge's own sends from coming back to it.
var forbidCallbacks = []string{"ForbidBeforeSendMsgCallback", "ForbidAfterSendMsgCallback"}

// textMessage is a sendmsg from one account to another holding one text
// element. SyncOtherMachine 1 stores it in the sender's roaming history, so
// the customer's account holds the whole conversation.
func textMessage(from, to, text string, seq, random uint32) SendMsg {
	return SendMsg{
		SyncOtherMachine:      1,
		From_Account:          from,
		To_Account:            to,
		MsgSeq:                seq,
		MsgRandom:             random,
		ForbidCallbackControl: forbidCallbacks,
		MsgBody:               []MsgElem{{MsgType: "TIMTextElem", MsgContent: map[string]any{"Text": text}}},
	}
}

// Send posts msg with openim/sendmsg.
func (c *IMClient) Send(ctx context.Context, msg SendMsg) error {
	return c.call(ctx, "openim/sendmsg", msg, nil)
}

// RoamMsg is one message of a one-to-one conversation's history in IM.
type RoamMsg struct {
	From_Account string
	To_Account   string
	MsgSeq       uint32
	MsgRandom    uint32
	MsgTimeStamp int64
	MsgFlagBits  int // 8: recalled
	MsgKey       string
	MsgBody      []MsgElem
}

// roamRecalled is the flag of a recalled message in MsgFlagBits.
const roamRecalled = 8

// maxHistoryPages bounds the pages History reads of one conversation.
const maxHistoryPages = 100

// History returns the messages between operator and peer, both ways, sent
// from minTime to maxTime (Unix seconds, both included), oldest first. It
// reads IM's pages (openim/admin_getroammsg, newest first, at most 100
// messages or about 13 KB each) until IM says the range is complete.
func (c *IMClient) History(ctx context.Context, operator, peer string, minTime, maxTime int64) ([]RoamMsg, error) {
	type request struct {
		Operator_Account string
		Peer_Account     string
		MaxCnt           int
		MinTime          int64
		MaxTime          int64
		LastMsgKey       string `json:",omitempty"`
	}
	req := request{Operator_Account: operator, Peer_Account: peer, MaxCnt: 100, MinTime: minTime, MaxTime: maxTime}
	var msgs []RoamMsg
	for range maxHistoryPages {
		var resp struct {
			Complete    int
			LastMsgTime int64
			LastMsgKey  string
			MsgList     []RoamMsg
		}
		if err := c.call(ctx, "openim/admin_getroammsg", req, &resp); err != nil {
			return nil, err
		}
		msgs = append(msgs, resp.MsgList...)
		if resp.Complete == 1 || len(resp.MsgList) == 0 {
			slices.SortStableFunc(msgs, func(a, b RoamMsg) int {
				return cmp.Or(cmp.Compare(a.MsgTimeStamp, b.MsgTimeStamp), cmp.Compare(a.MsgSeq, b.MsgSeq))
			})
			return msgs, nil
		}
		req.MaxTime, req.LastMsgKey = resp.LastMsgTime, resp.LastMsgKey
	}
	return nil, fmt.Errorf("im openim/admin_getroammsg: more than %d pages of history", maxHistoryPages)
}

// OnlineStatus returns IM's word on each of accounts (at most 500):
// Online, PushOnline (the app in the background: offline, but reached by
// push) or Offline (openim/query_online_status).
func (c *IMClient) OnlineStatus(ctx context.Context, accounts []string) (map[string]string, error) {
	var resp struct {
		QueryResult []struct {
			To_Account string
			Status     string
		}
	}
	req := struct {
		To_Account []string
	}{accounts}
	if err := c.call(ctx, "openim/query_online_status", req, &resp); err != nil {
		return nil, err
	}
	out := make(map[string]string, len(resp.QueryResult))
	for _, r := range resp.QueryResult {
		out[r.To_Account] = r.Status
	}
	return out, nil
}
