package main

// Recovering the agents' replies that no bridge took. IM makes each
// C2C.CallbackAfterSendMsg once and does not retry it (unless retries are
// enabled in its console): a reply an agent sends while no bridge answers
// /imcallback would never reach the customer. So a running bridge records a
// heartbeat in the store, and the next one to start reads IM's history of
// each open conversation (openim/admin_getroammsg) from a little before the
// last heartbeat, and takes each of the agent's messages it has not taken
// yet, as if its callback had come. A message's callback and its history
// share its MsgKey, so a reply is taken once whichever way it comes.
//
// Until its history is read, a conversation's new replies are committed to
// deferred_replies rather than the outbox, so that they do not go ahead of the
// replies of the gap: its sweep moves each to the outbox in its place among
// the history's replies, or after them (Store.TakeHistory).
//
// A callback the bridge could not commit (the store failed) is answered 500,
// and IM does not make it again either: its conversation is read back the
// same way once the store works again (retake).

import (
	"context"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	store      *Store
	im         *IMClient
	worker     *Worker // woken when replies reach the outbox
	metrics    *metrics
	log        *slog.Logger
	now        func() time.Time
	agents     []string      // IM_AGENTS: replies are taken only from them
	userPrefix string        // IM_USER_PREFIX
	minBackoff time.Duration // the first wait before another pass
	maxBackoff time.Duration

	gap  bool      // a heartbeat was found: there is a gap to read back
	from time.Time // where the gap starts
	mu   sync.Mutex
	// The gap's conversations: those open with an agent at the start,
	// sorted by customer, each its customer's openid and its agent's
	// place in IM_AGENTS (about 60 bytes). Their sweeps begin a page at a
	// time, in this order; begun is how many have begun. A reply to a
	// conversation whose sweep has not begun waits for it (sweepFor).
	gapConvs []gapConv
	begun    int
	sweeps   map[string]*sweep // by openid: the sweeps begun and not done, and the retakes
	wake     chan struct{}     // a retake was asked for
}

// gapConv is a conversation of the gap.
type gapConv struct {
	openid string
	agent  int // its index in IM_AGENTS
}

// recoveryPage is how many conversations the gap's sweeps read at a time
// (a variable, for tests).
var recoveryPage = 500

// sweep is the recovery of one conversation, held in memory from when its
// page begins until it is done.
type sweep struct {
	Conversation       // its Agent is one of IM_AGENTS' strings, not a copy
	from         int64 // its history is read from then (Unix seconds)
	retake       bool  // asked for by a callback that failed, not by a gap (changed under the recovery's mu)
	done         atomic.Bool
	reading      atomic.Bool // its history is being read: a reply sent meanwhile may be missing from it
	again        atomic.Bool // a callback failed while it was read: read it again before it is done
	mu           sync.Mutex  // held while a reply is deferred, and while what was read of its history is taken
}

// prepare reads the last heartbeat and, after a gap, the conversations
// open with an agent, whose history is to be read: those open now, even if
// they close or change hands before their sweep. It runs before the bridge
// takes callbacks, so that none goes ahead of its conversation's sweep.
func (r *replyRecovery) prepare(ctx context.Context) error {
	last, found, err := r.store.LastHeartbeat(ctx, callbacksHeartbeat)
	if err != nil || !found {
		return err
	}
	r.gap, r.from = true, last.Add(-recoveryMargin)
	if earliest := r.now().Add(-recoveryReach); r.from.Before(earliest) {
		r.log.Error("reply recovery: the bridge was away too long; replies sent before this are not recovered",
			"not_recovered_from", r.from, "until", earliest)
		r.from = earliest
	}
	r.sweeps, r.gapConvs = map[string]*sweep{}, nil
	for after := int64(0); ; {
		page, err := r.store.OpenConversations(ctx, after, math.MaxInt64, 1000)
		if err != nil {
			return err
		}
		for _, c := range page {
			// Replies are taken only from configured agents, as callbacks are.
			if i := slices.Index(r.agents, c.Agent); i >= 0 {
				r.gapConvs = append(r.gapConvs, gapConv{c.OpenID, i})
			}
		}
		if len(page) < 1000 {
			break
		}
		after = page[len(page)-1].ID
	}
	slices.SortFunc(r.gapConvs, func(a, b gapConv) int { return strings.Compare(a.openid, b.openid) })
	return nil
}

// gapSweep returns the gap's sweep of c.
func (r *replyRecovery) gapSweep(c gapConv) *sweep {
	return &sweep{Conversation: Conversation{OpenID: c.openid, Agent: r.agents[c.agent]}, from: r.from.Unix()}
}

// sweepFor returns the sweep a reply to openid must wait for: one begun or
// asked for, or a new one if the customer's conversation is one of the
// gap's whose sweep has not begun; nil if none.
func (r *replyRecovery) sweepFor(openid string) *sweep {
	r.mu.Lock()
	defer r.mu.Unlock()
	if sw := r.sweeps[openid]; sw != nil {
		return sw
	}
	i, found := slices.BinarySearchFunc(r.gapConvs, openid, func(c gapConv, id string) int { return strings.Compare(c.openid, id) })
	if !found || i < r.begun {
		return nil
	}
	sw := r.gapSweep(r.gapConvs[i])
	r.sweeps[openid] = sw // its page takes it up
	return sw
}

// deferReply commits a reply that came by callback to deferred_replies,
// for its conversation's sweep, if that has yet to run; deferred reports
// whether it did, and duplicate whether the reply's key was taken before.
func (r *replyRecovery) deferReply(ctx context.Context, openid, key string, d Delivery) (deferred, duplicate bool, err error) {
	if r == nil {
		return false, false, nil
	}
	sw := r.sweepFor(openid)
	if sw == nil {
		return false, false, nil
	}
	sw.mu.Lock() // waits while its sweep takes what it read
	defer sw.mu.Unlock()
	if sw.done.Load() || sw.Agent != d.Agent {
		return false, false, nil
	}
	duplicate, err = r.store.DeferReply(ctx, key, d, r.now())
	return err == nil, duplicate, err
}

// retake asks for the conversation's replies since a little before msgTime
// to be read back from IM's history: the callback of the agent's reply sent
// then could not be committed. Until that has run, the conversation's new
// replies are deferred behind it, and no heartbeat is recorded, so that if this
// bridge stops first the next start reads the gap that holds the reply.
func (r *replyRecovery) retake(openid, agent string, msgTime time.Time) {
	if r == nil {
		return
	}
	at := r.now()
	if msgTime.Before(at) && msgTime.After(at.Add(-recoveryReach)) {
		at = msgTime // IM's clock, a little apart from this one: the margin covers it
	}
	from := at.Add(-recoveryMargin).Unix()
	r.mu.Lock()
	if r.begun < len(r.gapConvs) {
		from = min(from, r.from.Unix()) // the gap's sweep may not have begun: this reads it
	}
	if r.sweeps == nil {
		r.sweeps = map[string]*sweep{}
	}
	if sw := r.sweeps[openid]; sw == nil || sw.done.Load() || sw.Agent != agent {
		r.sweeps[openid] = &sweep{Conversation: Conversation{OpenID: openid, Agent: agent}, from: from, retake: true}
	} else {
		if sw.retake && from < sw.from {
			sw.from = from
		} // else the gap's sweep reads from before
		if sw.reading.Load() {
			sw.again.Store(true) // what it is reading may lack the reply
		}
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// retakeAll reads back the conversations retake asked for, and reports
// whether some could not be read yet.
func (r *replyRecovery) retakeAll(ctx context.Context) (pending bool) {
	r.mu.Lock()
	var todo []*sweep
	for _, sw := range r.sweeps {
		if sw.retake && !sw.done.Load() {
			todo = append(todo, sw)
		}
	}
	r.mu.Unlock()
	for _, sw := range todo {
		if _, err := r.recoverConversation(ctx, sw, false); err != nil {
			if ctx.Err() == nil {
				r.log.Error("replies not read back yet", "agent", sw.Agent, "err", err)
			}
			pending = true
			continue
		}
		r.mu.Lock()
		if r.sweeps[sw.OpenID] == sw && sw.done.Load() {
			delete(r.sweeps, sw.OpenID)
		}
		r.mu.Unlock()
	}
	return pending
}

// retaking reports whether a retake is still to run.
func (r *replyRecovery) retaking() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, sw := range r.sweeps {
		if sw.retake {
			return true
		}
	}
	return false
}

// Run recovers the replies of the gap, if there was one, then records the
// heartbeat every heartbeatEvery until ctx is done, and once more then,
// unless recovery was still under way: the next start reads that gap
// again. Meanwhile it runs the retakes asked for, again after a backoff
// while they fail.
func (r *replyRecovery) Run(ctx context.Context) {
	if r.gap && !r.recoverGap(ctx) {
		return
	}
	beat := func(ctx context.Context) {
		if r.retaking() {
			return // the gap since the last heartbeat holds a reply still to read back
		}
		if err := r.store.Heartbeat(ctx, callbacksHeartbeat, r.now()); err != nil && ctx.Err() == nil {
			r.log.Error("heartbeat not recorded", "err", err)
		}
	}
	beat(ctx)
	ticker := time.NewTicker(heartbeatEvery)
	defer ticker.Stop()
	var retry <-chan time.Time // when to run the failed retakes again
	failures := 0
	for {
		select {
		case <-r.wake:
			failures, retry = 0, time.After(0)
		case <-retry:
			retry = nil
			if r.retakeAll(ctx) {
				retry = time.After(backoff(failures, r.minBackoff, r.maxBackoff))
				failures++
			}
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

// recoverGap reads each conversation's history from the gap's start until
// the moment it reads it, a page of conversations at a time, and takes the
// replies not taken yet, then those deferred for it; it reads the histories
// IM did not give again, a few times. It reports false if ctx ended first.
func (r *replyRecovery) recoverGap(ctx context.Context) bool {
	log := r.log
	recovered := 0
	var pending []*sweep // the sweeps that failed
	var lastErr error
	run := func(sw *sweep, last bool) {
		n, err := r.recoverConversation(ctx, sw, last)
		recovered += n
		if err != nil {
			pending, lastErr = append(pending, sw), err
			return
		}
		r.mu.Lock()
		if r.sweeps[sw.OpenID] == sw && sw.done.Load() {
			delete(r.sweeps, sw.OpenID)
		}
		r.mu.Unlock()
	}
	total, ok := r.sweepPages(ctx, run)
	if !ok {
		return false
	}
	for attempt := 2; len(pending) > 0 && attempt <= recoveryAttempts; attempt++ {
		if !sleepCtx(ctx, backoff(attempt-2, r.minBackoff, r.maxBackoff)) {
			return false
		}
		failed := pending
		pending = nil
		for _, sw := range failed {
			if run(sw, attempt == recoveryAttempts); ctx.Err() != nil {
				return false
			}
		}
	}
	if len(pending) > 0 {
		// Told, not hidden: these conversations' replies of the gap may be
		// lost, and the agents can read them in IM.
		r.metrics.callbacks.WithLabelValues("unrecovered").Add(float64(len(pending)))
		log.Error("reply recovery gave up: replies agents sent in these conversations while no bridge answered may not reach the customers",
			"conversations", len(pending), "from", r.from, "err", lastErr)
	}
	r.mu.Lock()
	for id, sw := range r.sweeps {
		if !sw.retake {
			delete(r.sweeps, id)
		}
	}
	r.mu.Unlock()
	if !r.releaseLeftovers(ctx) {
		return false
	}
	log.Info("reply recovery done", "recovered", recovered, "conversations", total, "from", r.from)
	return true
}

// sweepPages runs the gap's sweeps, a page of conversations at a time,
// each once, and returns how many it ran; false if ctx ended first.
func (r *replyRecovery) sweepPages(ctx context.Context, run func(*sweep, bool)) (total int, ok bool) {
	for {
		var todo []*sweep
		r.mu.Lock()
		end := min(r.begun+recoveryPage, len(r.gapConvs))
		for _, c := range r.gapConvs[r.begun:end] {
			sw := r.sweeps[c.openid]
			if sw == nil {
				sw = r.gapSweep(c)
				r.sweeps[c.openid] = sw
			}
			if !sw.retake && !sw.done.Load() { // a retake reads from the gap's start itself
				todo = append(todo, sw)
			}
		}
		r.begun = end
		done := end == len(r.gapConvs)
		if done {
			r.gapConvs, r.begun = nil, 0 // the rest are in sweeps
		}
		r.mu.Unlock()
		total += len(todo)
		for _, sw := range todo {
			if run(sw, false); ctx.Err() != nil {
				return total, false
			}
		}
		if done {
			return total, true
		}
	}
}

// releaseLeftovers moves the replies an earlier run deferred for
// conversations not read this time (closed since, or their agent gone from
// IM_AGENTS) to the outbox; false if ctx ended first.
func (r *replyRecovery) releaseLeftovers(ctx context.Context) bool {
	for attempt := 1; ; attempt++ {
		_, err := r.store.TakeHistory(ctx, "", nil, r.now())
		if err == nil {
			r.worker.Notify()
			return true
		}
		if ctx.Err() != nil || !sleepCtx(ctx, backoff(attempt-1, r.minBackoff, r.maxBackoff)) {
			return false
		}
		r.log.Error("reply recovery: deferred replies not released", "err", err)
	}
}

// recoverConversation takes the replies sw's agent sent to its customer
// since the gap's start that were not taken yet, oldest first, each
// deferred one in its place, then moves those deferred for it since the history was
// read, and returns how many it recovered. On its last attempt it moves
// the deferred ones even if the history failed: better out of order than late.
func (r *replyRecovery) recoverConversation(ctx context.Context, sw *sweep, last bool) (int, error) {
	customer := r.userPrefix + sw.OpenID
	// Whole seconds, as IM keeps them: the range takes in both ends. The
	// callbacks that come meanwhile are deferred, not kept waiting on IM.
	sw.reading.Store(true)
	msgs, err := r.im.History(ctx, sw.Agent, customer, sw.from, r.now().Unix()+1)
	if err != nil && !last {
		return 0, err
	}
	var replies []Reply
	for _, m := range msgs {
		if m.From_Account != sw.Agent || m.To_Account != customer || m.MsgFlagBits&roamRecalled != 0 {
			continue
		}
		if m.MsgKey == "" {
			continue
		}
		if _, _, ok := parseCommand(m.MsgBody); ok {
			// A command is never the customer's to read; one typed while
			// no bridge answered is not run (the agent types it again).
			continue
		}
		for i, d := range replyParts(m.MsgBody) { // as the callback takes them
			d.Kind, d.OpenID, d.IMUser, d.Agent = deliverWeChat, sw.OpenID, customer, sw.Agent
			replies = append(replies, Reply{Key: partKey(callbackKey(IMCallback{MsgKey: m.MsgKey}), i), D: d})
		}
	}
	sw.mu.Lock()
	defer sw.mu.Unlock()
	n, terr := r.store.TakeHistory(ctx, sw.OpenID, replies, r.now())
	if terr != nil {
		return 0, terr
	}
	r.worker.Notify()
	if n > 0 {
		r.metrics.callbacks.WithLabelValues("recovered").Add(float64(n))
		r.log.Info("agent replies recovered", "agent", sw.Agent, "replies", n)
	}
	if sw.again.Swap(false) {
		// A callback failed while the history was read: it becomes a
		// retake, read again before the heartbeat moves on.
		r.mu.Lock()
		sw.retake = true
		r.mu.Unlock()
		select {
		case r.wake <- struct{}{}:
		default:
		}
		return n, err
	}
	sw.done.Store(true)
	return n, err
}
