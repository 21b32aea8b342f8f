package main

// Recovering the agents' replies that no bridge took. IM makes each
// C2C.CallbackAfterSendMsg once and does not retry it (unless retries are
// enabled in its console): a reply an agent sends while no bridge answers
// /imcallback would never reach the customer. So a running bridge records a
// heartbeat in the store, and the next one to start reads IM's history of
// each open conversation (openim/admin_getroammsg) from a little before the
// last heartbeat until it started, and takes each of the agent's messages it
// has not taken yet, as if its callback had come. A message's callback and
// its history share its MsgKey, so a reply is taken once whichever way it
// comes.

import (
	"context"
	"errors"
	"slices"
	"time"
)

const (
	// callbacksHeartbeat names the heartbeat of the bridges taking IM's
	// callbacks (the heartbeats table).
	callbacksHeartbeat = "im_callbacks"
	// heartbeatEvery is how often a running bridge records it.
	heartbeatEvery = 10 * time.Second
	// recoveryMargin is how far before the last heartbeat recovery reads:
	// the callbacks in flight when the last bridge stopped or died, and the
	// clocks of IM and the bridge a little apart.
	recoveryMargin = 2 * heartbeatEvery
	// recoveryReach bounds how far back recovery reads: the keys of the
	// replies taken are kept a day (PruneKeys), and a reply older than
	// that could be taken twice. WeChat takes a customer-service message
	// only within 48 hours of the customer's last message anyway.
	recoveryReach = 23 * time.Hour
	// recoveryAttempts bounds the passes over the conversations whose
	// history IM did not give.
	recoveryAttempts = 8
)

// replyRecovery recovers the replies sent while no bridge took callbacks,
// then records the heartbeat while the bridge runs.
type replyRecovery struct {
	b          *bridge
	im         *IMClient
	minBackoff time.Duration // the first wait before another pass
	maxBackoff time.Duration
}

// Run recovers the replies of the last gap, if there was one, then records
// the heartbeat every heartbeatEvery until ctx is done, and once more
// then, unless recovery was still under way: the next start reads that gap
// again.
func (r *replyRecovery) Run(ctx context.Context) {
	log, st := r.b.log, r.b.store
	started := r.b.now()
	var last time.Time
	var found bool
	for attempt := 1; ; attempt++ {
		var err error
		if last, found, err = st.LastHeartbeat(ctx, callbacksHeartbeat); err == nil {
			break
		} else if ctx.Err() != nil {
			return
		}
		log.Error("reply recovery: heartbeat not read", "err", err)
		if !sleepCtx(ctx, r.backoff(attempt)) {
			return
		}
	}
	if found {
		if !r.recoverGap(ctx, last.Add(-recoveryMargin), started) {
			return
		}
	}
	beat := func(ctx context.Context) {
		if err := st.Heartbeat(ctx, callbacksHeartbeat, r.b.now()); err != nil && ctx.Err() == nil {
			log.Error("heartbeat not recorded", "err", err)
		}
	}
	beat(ctx)
	ticker := time.NewTicker(heartbeatEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			beat(ctx)
		case <-ctx.Done():
			// The HTTP server has stopped: callbacks were taken until now.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			beat(ctx)
			cancel()
			return
		}
	}
}

// recoverGap takes the agents' replies sent from from to to in the open
// conversations, trying the conversations IM did not answer for again, a
// few times. It reports false if ctx ended first.
func (r *replyRecovery) recoverGap(ctx context.Context, from, to time.Time) bool {
	log := r.b.log
	if earliest := to.Add(-recoveryReach); from.Before(earliest) {
		log.Error("reply recovery: the bridge was away too long; replies sent before this are not recovered",
			"not_recovered_from", from, "until", earliest)
		from = earliest
	}
	var convs []Conversation
	for attempt := 1; ; attempt++ {
		var err error
		if convs, err = r.b.store.OpenConversations(ctx); err == nil {
			break
		} else if ctx.Err() != nil {
			return false
		}
		log.Error("reply recovery: conversations not read", "err", err)
		if !sleepCtx(ctx, r.backoff(attempt)) {
			return false
		}
	}
	// Replies are taken only from configured agents, as callbacks are.
	convs = slices.DeleteFunc(convs, func(c Conversation) bool { return !slices.Contains(r.b.cfg.IMAgents, c.Agent) })
	recovered, pending := 0, convs
	var lastErr error
	for attempt := 1; len(pending) > 0 && attempt <= recoveryAttempts; attempt++ {
		if attempt > 1 && !sleepCtx(ctx, r.backoff(attempt-1)) {
			return false
		}
		var failed []Conversation
		for _, c := range pending {
			n, err := r.recoverConversation(ctx, c, from, to)
			if ctx.Err() != nil {
				return false
			}
			recovered += n
			if err != nil {
				failed, lastErr = append(failed, c), err
			}
		}
		pending = failed
	}
	if len(pending) > 0 {
		// Told, not hidden: these conversations' replies of the gap may be
		// lost, and the agents can read them in IM.
		r.b.metrics.callbacks.WithLabelValues("unrecovered").Add(float64(len(pending)))
		log.Error("reply recovery gave up: replies agents sent in these conversations while no bridge answered may not reach the customers",
			"conversations", len(pending), "from", from, "to", to, "err", lastErr)
	}
	log.Info("reply recovery done", "recovered", recovered, "conversations", len(convs), "from", from, "to", to)
	return true
}

// recoverConversation takes the replies c's agent sent to its customer
// from from to to, oldest first, that were not taken yet, and returns how
// many it took.
func (r *replyRecovery) recoverConversation(ctx context.Context, c Conversation, from, to time.Time) (int, error) {
	customer := r.b.cfg.IMUserPrefix + c.OpenID
	// Whole seconds, as IM keeps them: the range takes in both ends.
	msgs, err := r.im.History(ctx, c.Agent, customer, from.Unix(), to.Add(time.Second-1).Unix())
	if err != nil {
		return 0, err
	}
	n := 0
	for _, m := range msgs {
		if m.From_Account != c.Agent || m.To_Account != customer || m.MsgFlagBits&roamRecalled != 0 {
			continue
		}
		text := callbackText(m.MsgBody)
		if text == "" || m.MsgKey == "" {
			continue
		}
		d := Delivery{Kind: deliverWeChat, OpenID: c.OpenID, IMUser: customer, Agent: c.Agent, Text: text}
		dup, err := r.b.store.AcceptReply(ctx, callbackKey(IMCallback{MsgKey: m.MsgKey}), d, r.b.now())
		switch {
		case errors.Is(err, errUnknownCustomer):
			return n, nil
		case err != nil:
			return n, err
		case !dup:
			n++
			r.b.metrics.callbacks.WithLabelValues("recovered").Inc()
			r.b.log.Info("agent reply recovered", "agent", c.Agent, "msg_time", time.Unix(m.MsgTimeStamp, 0))
			r.b.worker.Notify()
		}
	}
	return n, nil
}

// backoff is the wait before attempt+1.
func (r *replyRecovery) backoff(attempt int) time.Duration {
	d := r.minBackoff
	for range attempt - 1 {
		if d >= r.maxBackoff {
			break
		}
		d *= 2
	}
	return min(d, r.maxBackoff)
}
