package main

// The Tencent IM third-party callback: an agent's reply arrives here as
// C2C.CallbackAfterSendMsg and is queued for WeChat's custom/send, or run
// if it is a command (commands.go); an agent's login and logout arrive as
// State.StateChange.

import (
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// maxCallbackBytes bounds an IM callback body; a text message is at most
// 12 KB, and a message may hold several elements.
const maxCallbackBytes = 256 << 10

// Callback commands the bridge knows.
const (
	cbAfterSendMsg  = "C2C.CallbackAfterSendMsg"
	cbBeforeSendMsg = "C2C.CallbackBeforeSendMsg"
	cbStateChange   = "State.StateChange"
)

// IMCallback is the body of a C2C message callback or of State.StateChange.
// Field names are IM's.
type IMCallback struct {
	CallbackCommand string
	From_Account    string
	To_Account      string
	MsgSeq          uint32
	MsgRandom       uint32
	MsgTime         int64
	MsgKey          string
	MsgBody         []MsgElem
	SendMsgResult   int
	OnlineOnlyFlag  int // 1: sent to clients online only, such as TUIKit's typing indicator
	// State.StateChange: who logged in, out or lost their connection, and
	// when (Unix ms).
	Info struct {
		Action     string // Login, Logout or Disconnect
		To_Account string
		Reason     string
	}
	EventTime int64
}

// validCallbackSign reports whether sign is hex(sha256(token+requestTime)),
// compared in constant time, with requestTime within maxSkew of now.
func validCallbackSign(token, requestTime, sign string, now time.Time, maxSkew time.Duration) bool {
	sec, err := strconv.ParseInt(requestTime, 10, 64)
	if err != nil {
		return false
	}
	if d := now.Sub(time.Unix(sec, 0)); d > maxSkew || d < -maxSkew {
		return false
	}
	sum := sha256.Sum256([]byte(token + requestTime))
	want := hex.EncodeToString(sum[:])
	return subtle.ConstantTimeCompare([]byte(want), []byte(strings.ToLower(sign))) == 1
}

// decodeCallback parses a callback body.
func decodeCallback(body []byte) (IMCallback, error) {
	var cb IMCallback
	if err := json.Unmarshal(body, &cb); err != nil {
		return IMCallback{}, fmt.Errorf("decode im callback: %w", err)
	}
	return cb, nil
}

// callbackKey identifies an IM message across callback retries.
func callbackKey(cb IMCallback) string {
	if cb.MsgKey != "" {
		return "im:" + cb.MsgKey
	}
	return fmt.Sprintf("im:%s:%d_%d_%d", cb.From_Account, cb.MsgSeq, cb.MsgRandom, cb.MsgTime)
}

// handleIMCallback takes IM's callbacks. An agent's message to a customer is
// committed to the outbox, then IM gets its answer; everything else is
// answered and left alone.
func (b *bridge) handleIMCallback() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		cb, refused := b.openCallback(r, q)
		if refused != nil {
			b.refuseCallback(w, refused.status, refused.reason)
			return
		}
		var outcome string
		var err error
		switch cmp.Or(q.Get("CallbackCommand"), cb.CallbackCommand) {
		case cbAfterSendMsg:
			outcome, err = b.takeReply(r.Context(), cb)
		case cbStateChange:
			outcome, err = b.takePresence(r.Context(), cb)
		default:
			b.metrics.callbacks.WithLabelValues("ignored").Inc()
			writeIMAnswer(w, http.StatusOK, 0, "") // Before: allow; others: nothing to do
			return
		}
		if err != nil {
			b.metrics.callbacks.WithLabelValues("failed").Inc()
			b.log.Error("callback not accepted", "err", err)
			writeIMAnswer(w, http.StatusInternalServerError, 1, "internal error")
			return
		}
		b.metrics.callbacks.WithLabelValues(outcome).Inc()
		writeIMAnswer(w, http.StatusOK, 0, "")
	})
}

// openCallback checks a callback's SdkAppid and Sign, reads its body and
// decodes it, or returns why it is refused.
func (b *bridge) openCallback(r *http.Request, q url.Values) (IMCallback, *refusal) {
	if q.Get("SdkAppid") != strconv.FormatUint(b.cfg.IMSDKAppID, 10) {
		return IMCallback{}, &refusal{http.StatusForbidden, "SdkAppid does not match IM_SDKAPPID"}
	}
	if b.cfg.IMCallbackAuth && !validCallbackSign(b.cfg.IMCallbackToken, q.Get("RequestTime"), q.Get("Sign"), b.now(), b.cfg.IMCallbackMaxSkew) {
		return IMCallback{}, &refusal{http.StatusForbidden, "Sign or RequestTime is wrong"}
	}
	body, err := readLimited(r.Body, maxCallbackBytes)
	if errors.Is(err, errTooLarge) {
		return IMCallback{}, &refusal{http.StatusRequestEntityTooLarge, "callback too large"}
	} else if err != nil {
		return IMCallback{}, &refusal{http.StatusBadRequest, "cannot read body"}
	}
	cb, err := decodeCallback(body)
	if err != nil {
		return IMCallback{}, &refusal{http.StatusBadRequest, err.Error()}
	}
	return cb, nil
}

// takeReply commits an agent's message to a customer, and returns the
// callback's outcome for the metrics. Messages from customer accounts are
// the bridge's own sends and are never sent back to WeChat.
func (b *bridge) takeReply(ctx context.Context, cb IMCallback) (outcome string, err error) {
	openid, isCustomer := strings.CutPrefix(cb.To_Account, b.cfg.IMUserPrefix)
	switch {
	case strings.HasPrefix(cb.From_Account, b.cfg.IMUserPrefix):
		// The bridge's own send, or a customer's account used elsewhere.
		b.log.Debug("im callback ignored", "reason", "sender is a customer account")
		return "ignored", nil
	case !slices.Contains(b.cfg.IMAgents, cb.From_Account) || !isCustomer || openid == "":
		b.log.Info("im callback ignored", "reason", "not an agent writing to a customer")
		return "ignored", nil
	case cb.SendMsgResult != 0:
		b.log.Info("im callback ignored", "reason", "message was not delivered in IM", "result", cb.SendMsgResult)
		return "ignored", nil
	}
	if on, ok := typingState(cb.MsgBody); ok {
		b.worker.ShowTyping(openid, on) // typing.go
		return "typing", nil
	}
	if name, arg, ok := parseCommand(cb.MsgBody); ok {
		return b.takeCommand(ctx, cb, Command{Agent: cb.From_Account, OpenID: openid, Name: name, Arg: arg})
	}
	parts := replyParts(cb.MsgBody) // elems.go
	switch {
	case cb.OnlineOnlyFlag == 1:
		b.log.Debug("im callback ignored", "reason", "online-only message")
		return "ignored", nil
	case len(parts) == 0:
		b.log.Info("im callback ignored", "reason", "message has no text form")
		return "ignored", nil
	}
	var deferred, dup bool
	for i, d := range parts {
		d.Kind, d.OpenID, d.IMUser, d.Agent = deliverWeChat, openid, cb.To_Account, cb.From_Account
		key := partKey(callbackKey(cb), i)
		// While its conversation's replies of a gap are still to be read
		// back, it is deferred, to go after them (recover.go).
		if deferred, dup, err = b.recovery.deferReply(ctx, openid, key, d); !deferred && err == nil {
			var t Taken
			t, err = b.store.AcceptReply(ctx, key, d, b.now())
			dup = t.Duplicate
			if t.FirstReply > 0 {
				b.metrics.firstReply.Observe(t.FirstReply.Seconds())
			}
		}
		if err != nil {
			break
		}
	}
	switch {
	case errors.Is(err, errUnknownCustomer):
		b.log.Warn("im callback ignored", "reason", "no such customer", "to", cb.To_Account)
		return "ignored", nil
	case err != nil:
		// IM will not make this callback again: the reply is read back
		// from its history once the store works (recover.go).
		b.recovery.retake(openid, cb.From_Account, time.Unix(cb.MsgTime, 0))
		return "", err
	case dup:
		return "duplicate", nil
	case deferred:
		return "deferred", nil
	}
	b.worker.Notify()
	b.log.Debug("agent reply accepted", "agent", cb.From_Account)
	return "forwarded", nil
}

// takeCommand runs an agent's command (commands.go) and returns the
// callback's outcome.
func (b *bridge) takeCommand(ctx context.Context, cb IMCallback, c Command) (string, error) {
	done, err := b.store.AcceptCommand(ctx, callbackKey(cb), c, b.now())
	switch {
	case errors.Is(err, errUnknownCustomer):
		b.log.Warn("im callback ignored", "reason", "no such customer", "to", cb.To_Account)
		return "ignored", nil
	case err != nil:
		return "", err
	case done.Duplicate:
		return "duplicate", nil
	}
	b.metrics.assigned(done.Assigned)
	b.worker.Notify()
	b.log.Info("agent command", "agent", c.Agent, "command", c.Name)
	return "command", nil
}

// takePresence records an agent's login, logout or lost connection; an
// agent coming online takes waiting customers (presence.go). After a
// logout or a lost connection the desk's clock reads the agent's presence
// again.
func (b *bridge) takePresence(ctx context.Context, cb IMCallback) (string, error) {
	agent := cb.Info.To_Account
	if !slices.Contains(b.cfg.IMAgents, agent) {
		return "ignored", nil
	}
	switch cb.Info.Action {
	case "Login", "Logout", "Disconnect":
	default:
		return "ignored", nil
	}
	at := b.now()
	if cb.EventTime > 0 {
		at = time.UnixMilli(cb.EventTime)
	}
	assigned, err := b.store.PresenceEvent(ctx, agent, cb.Info.Action, at, b.now())
	if err != nil {
		return "", err
	}
	if cb.Info.Action != "Login" {
		// The word does not say which device: a reading tells whether
		// another is still online (deskclock.go).
		select {
		case b.readPresence <- struct{}{}:
		default:
		}
	}
	b.metrics.assigned(assigned)
	if len(assigned) > 0 {
		b.worker.Notify()
	}
	b.log.Info("agent presence", "agent", agent, "action", cb.Info.Action, "took", len(assigned))
	return "presence", nil
}

// refuseCallback answers a callback the bridge will not take, and logs why.
func (b *bridge) refuseCallback(w http.ResponseWriter, status int, reason string) {
	b.metrics.callbacks.WithLabelValues("refused").Inc()
	b.log.Warn("im callback refused", "status", status, "reason", reason)
	writeIMAnswer(w, status, 1, reason)
}

// writeIMAnswer writes the answer IM expects from a callback.
func writeIMAnswer(w http.ResponseWriter, status, code int, info string) {
	action := "OK"
	if code != 0 {
		action = "FAIL"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(struct {
		ActionStatus string
		ErrorCode    int
		ErrorInfo    string
	}{action, code, info})
	w.Write(b)
}
