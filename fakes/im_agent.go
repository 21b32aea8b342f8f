package fakes

// The agents' side of the fake IM: an agent's client sending a message, and
// the callbacks IM makes for it.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// SendAsAgent sends text from agent to the account to, as an IM client
// (OptPlatform Web) would: the Before callback may refuse it, then it is
// delivered and the After callback fires. Both callbacks are made before it
// returns.
func (im *IM) SendAsAgent(ctx context.Context, agent, to, text string) (Message, error) {
	hop(im.opts.Trace, "agent", "IM", "%s writes to %s: %q", agent, to, text)
	return im.SendElemsAsAgent(ctx, agent, to, false, map[string]any{"MsgType": "TIMTextElem", "MsgContent": map[string]any{"Text": text}})
}

// SendTypingAsAgent sends what TUIKit sends while an agent types (typing
// true) or stops: an online-only custom message, businessID
// user_typing_status.
func (im *IM) SendTypingAsAgent(ctx context.Context, agent, to string, typing bool) (Message, error) {
	status := 0
	if typing {
		status = 1
	}
	data := fmt.Sprintf(`{"businessID":"user_typing_status","typingStatus":%d,"version":1,"userAction":14,"actionParam":"EIMAMSG_InputStatus_%s"}`,
		status, map[bool]string{true: "Ing", false: "End"}[typing])
	return im.SendElemsAsAgent(ctx, agent, to, true, map[string]any{"MsgType": "TIMCustomElem", "MsgContent": map[string]any{"Data": data}})
}

// SendElemsAsAgent sends a message of the given elements from agent to the
// account to, as SendAsAgent does; an online-only message (onlineOnly) is
// delivered to clients online and kept in no history.
func (im *IM) SendElemsAsAgent(ctx context.Context, agent, to string, onlineOnly bool, elems ...map[string]any) (Message, error) {
	im.mu.Lock()
	okFrom, okTo := im.accounts[agent], im.accounts[to]
	im.mu.Unlock()
	switch {
	case !okFrom:
		return Message{}, fmt.Errorf("im: agent %s is not imported (70107)", agent)
	case !okTo:
		return Message{}, fmt.Errorf("im: recipient %s is not imported (20003)", to)
	}
	body, _ := json.Marshal(elems)
	var raw []json.RawMessage
	json.Unmarshal(body, &raw)
	text, err := checkBody(raw)
	if err != nil {
		return Message{}, fmt.Errorf("im: %v (90010)", err)
	}
	now := im.opts.Now()
	// A client numbers its messages: IM orders those of one second by MsgSeq.
	im.mu.Lock()
	if im.clientSeq == 0 {
		im.clientSeq = randUint32() >> 1
	}
	im.clientSeq++
	seq := im.clientSeq
	im.mu.Unlock()
	m := Message{From: agent, To: to, Text: text, Body: body, MsgSeq: seq, MsgRandom: randUint32(), MsgTime: now.Unix(), Platform: "Web",
		OnlineOnly: onlineOnly}
	m.MsgKey = fmt.Sprintf("%d_%d_%d", m.MsgSeq, m.MsgRandom, m.MsgTime)
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
	if m.OnlineOnly {
		base["OnlineOnlyFlag"] = 1
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
	if what := m.Text; what != "" {
		hop(im.opts.Trace, "IM", "inbox", "%s receives from %s: %q", m.To, m.From, what)
	} else {
		hop(im.opts.Trace, "IM", "inbox", "%s receives from %s: %s", m.To, m.From, compactJSON(m.Body))
	}
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
	signed := "unsigned"
	if im.opts.CallbackToken != "" {
		signed = "signed"
	}
	who := fmt.Sprintf("%s → %s", body["From_Account"], body["To_Account"])
	if info, ok := body["Info"].(map[string]any); ok {
		who = fmt.Sprintf("%s %s", info["To_Account"], info["Action"])
	}
	hop(im.opts.Trace, "IM", "bridge", "%s (%s, %s), answered %d", command, who, signed, res.Status)
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

// Login logs account's client in on the Web: IM fires State.StateChange
// (Action Login, Reason Register) and answers Online for it from then on.
func (im *IM) Login(ctx context.Context, account string) CallbackResult {
	return im.LoginOn(ctx, account, "Web")
}

// Logout logs account's Web client out (Action Logout, Reason Unregister).
func (im *IM) Logout(ctx context.Context, account string) CallbackResult {
	return im.LogoutOn(ctx, account, "Web")
}

// Disconnect drops the connection of account's Web client (Action
// Disconnect, Reason LinkClose: the app killed or the network gone).
func (im *IM) Disconnect(ctx context.Context, account string) CallbackResult {
	return im.DisconnectOn(ctx, account, "Web")
}

// LoginOn logs account in on a device of platform (Web, iOS, Android, …):
// an agent may be logged in on several at once, and is Online while any of
// them is.
func (im *IM) LoginOn(ctx context.Context, account, platform string) CallbackResult {
	return im.stateChange(ctx, account, platform, deviceOnline, "Login", "Register")
}

// LogoutOn logs account's client on platform out.
func (im *IM) LogoutOn(ctx context.Context, account, platform string) CallbackResult {
	return im.stateChange(ctx, account, platform, "", "Logout", "Unregister")
}

// DisconnectOn drops the connection of account's client on platform. The
// callback does not say which device it was: an agent still online on
// another is Online to query_online_status (tencent-im.md, 4.5).
func (im *IM) DisconnectOn(ctx context.Context, account, platform string) CallbackResult {
	return im.stateChange(ctx, account, platform, "", "Disconnect", "LinkClose")
}

// Background kills account's app on a mobile platform while it has offline
// push: IM reports the device PushOnline (269/3665) and sends a Disconnect.
func (im *IM) Background(ctx context.Context, account, platform string) CallbackResult {
	return im.stateChange(ctx, account, platform, devicePush, "Disconnect", "LinkClose")
}

// A device's state: online, or reachable by offline push only.
const (
	deviceOnline = "online"
	devicePush   = "push"
)

// stateChange records the state of account's device on platform ("" for
// gone) and fires State.StateChange, as 269/2570 shows it.
func (im *IM) stateChange(ctx context.Context, account, platform, state, action, reason string) CallbackResult {
	im.mu.Lock()
	if im.devices[account] == nil {
		im.devices[account] = map[string]string{}
	}
	if state == "" {
		delete(im.devices[account], platform)
	} else {
		im.devices[account][platform] = state
	}
	im.mu.Unlock()
	hop(im.opts.Trace, "agent", "IM", "%s: %s", account, action)
	cbPlatform := platform
	if platform == "iOS" {
		cbPlatform = "IOS" // as State.StateChange spells it
	}
	return im.callback(ctx, "State.StateChange", cbPlatform, map[string]any{
		"CallbackCommand": "State.StateChange", "EventTime": im.opts.Now().UnixMilli(),
		"Info": map[string]any{"Action": action, "To_Account": account, "Reason": reason},
	})
}

// status is account's presence as query_online_status answers it: Online
// while any device is, else PushOnline while a mobile one has offline push,
// else Offline. The caller holds im.mu.
func (im *IM) status(account string) string {
	status := "Offline"
	for _, st := range im.devices[account] {
		switch st {
		case deviceOnline:
			return "Online"
		case devicePush:
			status = "PushOnline"
		}
	}
	return status
}

// queryOnlineStatus answers openim/query_online_status (269/2566): 1 to 500
// accounts in To_Account; an account IM does not have is in ErrorList
// (70107).
func (im *IM) queryOnlineStatus(req map[string]json.RawMessage) imAnswer {
	var to []string
	if json.Unmarshal(req["To_Account"], &to) != nil || len(to) == 0 || len(to) > 500 {
		return imFail(70402, "To_Account must list 1 to 500 accounts")
	}
	im.mu.Lock()
	var results, errs []map[string]any
	for _, a := range to {
		if !im.accounts[a] {
			errs = append(errs, map[string]any{"To_Account": a, "ErrorCode": 70107})
			continue
		}
		results = append(results, map[string]any{"To_Account": a, "Status": im.status(a)})
	}
	im.mu.Unlock()
	if im.opts.OnStatusRead != nil {
		im.opts.OnStatusRead()
	}
	a := imOK()
	a["QueryResult"] = results
	if errs != nil {
		a["ErrorList"] = errs
	}
	return a
}

// Status is account's presence as query_online_status answers it: Online,
// PushOnline or Offline.
func (im *IM) Status(account string) string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.status(account)
}
