package main

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// maxPushBytes bounds a WeChat push; real pushes are a few KiB.
const maxPushBytes = 64 << 10

// bridge holds what the HTTP handlers need. Handlers never call a vendor:
// they commit work to the store and wake the worker.
type bridge struct {
	cfg     Config
	store   *Store
	worker  *Worker
	metrics *metrics
	// aesKeys are the current and previous EncodingAESKeys, decoded.
	aesKeys [][]byte
	// recovery, if set, holds the replies of the conversations whose
	// history it has yet to read back (recover.go).
	recovery *replyRecovery
	// readPresence asks the desk's clock for a reading of the agents'
	// presence soon (deskclock.go); it never blocks the handler.
	readPresence chan struct{}
	log          *slog.Logger
	now          func() time.Time
}

// routes registers the bridge's whole HTTP surface.
func (b *bridge) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /wechat", b.handleVerify())
	mux.Handle("POST /wechat", b.metrics.timed("wechat", b.handlePush()))
	mux.Handle("POST /imcallback", b.metrics.timed("imcallback", b.handleIMCallback()))
	mux.Handle("GET /media/{id}", b.handleMedia())
	mux.Handle("GET /admin/deadletters", b.admin(b.handleDeadLetters))
	mux.Handle("POST /admin/deadletters/{id}/retry", b.admin(b.handleRetryDeadLetter))
	mux.Handle("GET /admin/customers/{openid}/messages", b.admin(b.handleCustomerMessages))
	mux.Handle("GET /healthz", b.handleHealth())
	mux.Handle("GET /readyz", b.handleReady())
	mux.Handle("GET /metrics", b.metrics.handler())
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

// handlePush takes a message or event from WeChat: it opens the push
// (signature, freshness, size, decryption, XML), commits what it asks for,
// and answers at once with a passive reply (encrypted if the push was) or
// "success". The worker forwards it to IM afterwards.
func (b *bridge) handlePush() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		push, key, refused := b.openPush(r, q)
		if refused != nil {
			b.refusePush(w, refused.status, refused.reason)
			return
		}
		in := b.inbound(push)
		if in.Action == actNone {
			b.metrics.pushes.WithLabelValues(pushType(push), "ignored").Inc()
			writeSuccess(w) // nothing to do, nothing stored
			return
		}
		in.SigKey = "sig:" + q.Get("timestamp") + ":" + q.Get("nonce") + ":" + strings.ToLower(q.Get("signature")) + ":" + q.Get("msg_signature")
		acc, err := b.store.AcceptPush(r.Context(), in, b.now())
		if errors.Is(err, errReplay) {
			b.refusePush(w, http.StatusForbidden, "signed query already used for another push")
			return
		} else if err != nil {
			// WeChat retries a push that is not answered in time: failing
			// loudly here loses nothing.
			b.metrics.pushes.WithLabelValues(pushType(push), "failed").Inc()
			b.log.Error("push not accepted", "err", err)
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		outcome := "duplicate"
		if !acc.Duplicate {
			outcome = "accepted"
			b.metrics.assigned(acc.Assigned)
			if acc.Rating > 0 {
				b.metrics.ratings.WithLabelValues(strconv.Itoa(acc.Rating)).Inc()
			}
			b.worker.Notify()
		}
		b.metrics.pushes.WithLabelValues(pushType(push), outcome).Inc()
		if b.log.Enabled(r.Context(), slog.LevelDebug) { // its arguments would cost every push
			b.log.Debug("push accepted", "type", push.MsgType, "event", push.Event, "duplicate", acc.Duplicate, "encrypted", key != nil)
		}
		b.answerPush(w, push, acc.Reply, key, q.Get("nonce"))
	})
}

// refusal is why a push or callback is refused, and the status it gets.
type refusal struct {
	status int
	reason string
}

// openPush checks a push's signature and timestamp, reads its body,
// decrypts it in safe or compatible mode, and decodes it. It returns the
// AES key the push was encrypted with (nil for plaintext), or why the push
// is refused.
func (b *bridge) openPush(r *http.Request, q url.Values) (Push, []byte, *refusal) {
	timestamp, nonce := q.Get("timestamp"), q.Get("nonce")
	if !validWeChatSignature(b.cfg.WeChatToken, timestamp, nonce, q.Get("signature")) {
		return Push{}, nil, &refusal{http.StatusForbidden, "invalid signature"}
	}
	if !b.fresh(timestamp) {
		return Push{}, nil, &refusal{http.StatusForbidden, "timestamp too far from now: a replay, or a clock out of sync"}
	}
	body, err := readLimited(r.Body, maxPushBytes)
	if errors.Is(err, errTooLarge) {
		return Push{}, nil, &refusal{http.StatusRequestEntityTooLarge, "push too large"}
	} else if err != nil {
		return Push{}, nil, &refusal{http.StatusBadRequest, "cannot read body"}
	}
	var key []byte
	switch q.Get("encrypt_type") {
	case "", "raw":
	case "aes":
		env, err := decodeEncryptedPush(body)
		if err != nil {
			return Push{}, nil, &refusal{http.StatusBadRequest, err.Error()}
		}
		if !validMsgSignature(b.cfg.WeChatToken, timestamp, nonce, env.Encrypt, q.Get("msg_signature")) {
			return Push{}, nil, &refusal{http.StatusForbidden, "invalid msg_signature"}
		}
		if body, key, err = b.decrypt(env.Encrypt); err != nil {
			return Push{}, nil, &refusal{http.StatusBadRequest, err.Error()}
		}
	default:
		return Push{}, nil, &refusal{http.StatusBadRequest, "unknown encrypt_type"}
	}
	push, err := decodePush(body)
	if err != nil {
		return Push{}, nil, &refusal{http.StatusBadRequest, err.Error()}
	}
	return push, key, nil
}

// answerPush answers a push with the passive reply its outcome asks for,
// encrypted with key if the push was, or "success".
func (b *bridge) answerPush(w http.ResponseWriter, push Push, reply string, key []byte, nonce string) {
	text := ""
	switch reply {
	case replyWelcome:
		text = b.cfg.WelcomeText
	case replyConnecting:
		text = b.cfg.ConnectingText
	case replyOffline:
		text = b.cfg.Desk.Texts.Offline
	case replyRated:
		text = b.cfg.Desk.Texts.Rated
	}
	if pos, ok := strings.CutPrefix(reply, replyQueued); ok {
		n, _ := strconv.Atoi(pos)
		text = b.cfg.Desk.Texts.queuedText(n)
	}
	if text == "" {
		writeSuccess(w)
		return
	}
	out := encodeTextReply(push, text, b.now().Unix())
	if key != nil {
		var err error
		if out, err = encryptReply(key, b.cfg.WeChatAppID, b.cfg.WeChatToken, out, b.now().Unix(), nonce); err != nil {
			b.log.Error("reply not encrypted", "err", err)
			writeSuccess(w) // the work is committed: answer without the text
			return
		}
	}
	writeXML(w, out)
}

// fresh reports whether a push's signed timestamp is within
// WECHAT_PUSH_MAX_SKEW of now.
func (b *bridge) fresh(timestamp string) bool {
	sec, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return false
	}
	d := b.now().Sub(time.Unix(sec, 0))
	return d <= b.cfg.WeChatPushMaxSkew && d >= -b.cfg.WeChatPushMaxSkew
}

// decrypt opens an encrypted push with the current EncodingAESKey, then the
// previous one, and returns the key that worked: the reply is encrypted with
// it, as WeChat asks during a key change.
func (b *bridge) decrypt(encrypt string) ([]byte, []byte, error) {
	if len(b.aesKeys) == 0 {
		return nil, nil, errors.New("encrypted push, but WECHAT_AES_KEY is not set")
	}
	var err error
	for _, key := range b.aesKeys {
		var msg []byte
		if msg, err = wechatDecrypt(key, b.cfg.WeChatAppID, encrypt); err == nil {
			return msg, key, nil
		}
	}
	return nil, nil, err
}

// inbound decides what a push asks of the bridge.
func (b *bridge) inbound(p Push) Inbound {
	in := Inbound{
		Key:       pushKey(p),
		OpenID:    p.FromUserName,
		IMUser:    b.cfg.IMUserPrefix + p.FromUserName,
		NewRandom: rand.Uint32,
		// An account deleted on a paid app cannot be imported again for
		// three months (70399), so by default it is kept.
		DeleteAccount: b.cfg.IMUnfollow == unfollowDelete,
	}
	switch {
	case p.MsgType == msgEvent && p.Event == eventSubscribe:
		in.Action = actFollow
	case p.MsgType == msgEvent && p.Event == eventUnsubscribe:
		in.Action = actUnfollow
	case p.MsgType == msgEvent && quotaEvents[p.Event]:
		in.Action = actEvent
	case isMessageType(p.MsgType):
		in.Action, in.Text, in.Elems = actMessage, readableText(p), pushElems(p)
		if p.MediaID != "" && b.cfg.PublicURL != "" { // image, voice, video, shortvideo: fetched by the worker
			in.Media = &PushMedia{Type: p.MsgType, MediaID: p.MediaID, PicURL: p.PicURL, Recognition: p.Recognition,
				ThumbMediaID: p.ThumbMediaID, Keep: newMediaID()}
			if p.ThumbMediaID != "" {
				in.Media.KeepThumb = newMediaID()
			}
		}
	}
	return in
}

// pushType is a push's type as metrics label it: the message type or the
// event, from the known set only, so a stranger cannot make up labels.
func pushType(p Push) string {
	switch {
	case isMessageType(p.MsgType):
		return p.MsgType
	case p.MsgType != msgEvent:
		return "other"
	}
	switch p.Event {
	case eventSubscribe, eventUnsubscribe, "SCAN", "LOCATION", "CLICK", "VIEW":
		return "event_" + p.Event
	}
	return "event_other"
}

// refusePush answers a push the bridge will not take, and logs why.
func (b *bridge) refusePush(w http.ResponseWriter, status int, reason string) {
	b.metrics.pushes.WithLabelValues("unknown", "refused").Inc()
	b.log.Warn("wechat push refused", "status", status, "reason", reason)
	http.Error(w, reason, status)
}

// writeSuccess answers a push with "success": WeChat shows nothing and does
// not retry. The answer's Content-Type, text/plain; charset=utf-8, is the one
// net/http sniffs from it: setting it would cost each answer an entry in a
// header map of its own (about 350 bytes).
func writeSuccess(w http.ResponseWriter) {
	w.Write(success)
}

var success = []byte("success")

func writeXML(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.Write(b)
}

// handleHealth answers 200 while the process lives.
func (b *bridge) handleHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
}

// handleReady answers 200 once the store answers and the worker runs, 503
// otherwise: a load balancer sends traffic only to a ready instance.
func (b *bridge) handleReady() http.Handler {
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
