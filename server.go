package main

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// maxPushBytes bounds a WeChat push; real pushes are a few KiB.
const maxPushBytes = 64 << 10

// bridge holds what the HTTP handlers need. Handlers never call a vendor:
// they commit work to the store and wake the worker.
type bridge struct {
	cfg    Config
	store  *Store
	worker *Worker
	log    *slog.Logger
	now    func() time.Time
}

// routes registers the bridge's whole HTTP surface.
func (b *bridge) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /wechat", b.handleVerify())
	mux.Handle("POST /wechat", b.handlePush())
	mux.Handle("POST /imcallback", b.handleIMCallback())
	mux.Handle("GET /healthz", b.handleHealth())
	return mux
}

// handleVerify answers WeChat's URL verification: the echostr, exactly, when
// the signature is right.
func (b *bridge) handleVerify() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if !validWeChatSignature(b.cfg.WeChatToken, q.Get("timestamp"), q.Get("nonce"), q.Get("signature")) {
			b.log.Warn("wechat verification refused", "reason", "bad signature")
			http.Error(w, "invalid signature", http.StatusForbidden)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte(q.Get("echostr")))
	})
}

// handlePush takes a message or event from WeChat: it checks the signature,
// decodes the push, commits what it asks for, and answers at once with a
// passive reply or "success". The worker forwards it to IM afterwards.
func (b *bridge) handlePush() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if !validWeChatSignature(b.cfg.WeChatToken, q.Get("timestamp"), q.Get("nonce"), q.Get("signature")) {
			b.refusePush(w, http.StatusForbidden, "invalid signature")
			return
		}
		if et := q.Get("encrypt_type"); et != "" && et != "raw" {
			b.refusePush(w, http.StatusBadRequest, "encrypted pushes are not supported: set the WeChat console to plaintext mode")
			return
		}
		body, err := readLimited(r.Body, maxPushBytes)
		if errors.Is(err, errTooLarge) {
			b.refusePush(w, http.StatusRequestEntityTooLarge, "push too large")
			return
		} else if err != nil {
			b.refusePush(w, http.StatusBadRequest, "cannot read body")
			return
		}
		push, err := decodePush(body)
		if err != nil {
			b.refusePush(w, http.StatusBadRequest, err.Error())
			return
		}

		in := b.inbound(push)
		if in.Action == actNone {
			writeSuccess(w)
			return
		}
		acc, err := b.store.AcceptPush(r.Context(), in, b.now())
		if err != nil {
			// WeChat retries a push that is not answered in time: failing
			// loudly here loses nothing.
			b.log.Error("push not accepted", "err", err)
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		if !acc.Duplicate {
			b.worker.Notify()
		}
		b.log.Info("push accepted", "type", push.MsgType, "event", push.Event, "duplicate", acc.Duplicate)
		switch acc.Reply {
		case replyWelcome:
			writeXML(w, encodeTextReply(push, b.cfg.WelcomeText, b.now().Unix()))
		case replyConnecting:
			writeXML(w, encodeTextReply(push, b.cfg.ConnectingText, b.now().Unix()))
		default:
			writeSuccess(w)
		}
	})
}

// inbound decides what a push asks of the bridge.
func (b *bridge) inbound(p Push) Inbound {
	in := Inbound{
		Key:       pushKey(p),
		OpenID:    p.FromUserName,
		IMUser:    b.cfg.IMUserPrefix + p.FromUserName,
		Agents:    b.cfg.IMAgents,
		NewRandom: rand.Uint32,
	}
	switch {
	case p.MsgType == msgEvent && p.Event == eventSubscribe:
		in.Action = actFollow
	case p.MsgType == msgEvent && p.Event == eventUnsubscribe:
		in.Action = actUnfollow
	case isMessageType(p.MsgType):
		in.Action, in.Text = actMessage, readableText(p)
	}
	return in
}

// refusePush answers a push the bridge will not take, and logs why.
func (b *bridge) refusePush(w http.ResponseWriter, status int, reason string) {
	b.log.Warn("wechat push refused", "status", status, "reason", reason)
	http.Error(w, reason, status)
}

// writeSuccess answers a push with "success": WeChat shows nothing and does
// not retry.
func writeSuccess(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("success"))
}

func writeXML(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.Write(b)
}

// handleHealth answers 200 once the store answers and the worker runs.
func (b *bridge) handleHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		var problems []string
		if err := b.store.Ping(ctx); err != nil {
			problems = append(problems, "store does not answer")
		}
		if !b.worker.Running() {
			problems = append(problems, "delivery worker is not running")
		}
		if len(problems) > 0 {
			http.Error(w, strings.Join(problems, "; "), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
}
