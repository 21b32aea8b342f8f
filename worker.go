package main

// The delivery worker: the code that calls the vendors (besides recovery,
// which reads IM's history). It claims due lane heads from the outbox, runs
// each lane in order in a goroutine of its own, and retries failures with
// backoff until they succeed, cannot, or run out of time; then they become
// dead letters and the agent is told.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Worker delivers the outbox.
type Worker struct {
	Store   *Store
	IM      *IMClient
	WeChat  *WeChatClient
	Log     *slog.Logger
	Metrics *metrics
	Now     func() time.Time
	Admin   string   // IM_ADMIN, the sender of dead-letter notices
	Agents  []string // IM_AGENTS: who is told when an agent's account is gone
	// IMDedup is how long IM drops a repeated sendmsg (IM_DEDUP_WINDOW).
	IMDedup time.Duration
	// PublicURL (PUBLIC_URL), if set, is where IM clients download the
	// media the worker fetches (media.go); MediaRetention says how long it
	// is kept. Fetch fetches every URL that came from outside (fetch.go).
	PublicURL      string
	MediaRetention time.Duration
	// HistoryRetention (HISTORY_RETENTION) is how long messages and closed
	// conversations are kept; 0 keeps them.
	HistoryRetention time.Duration
	Fetch            *fetcher
	typing           typingStates // the typing states shown (typing.go)

	Lanes          int           // lanes delivered at once
	Lease          time.Duration // how long a claimed item is held
	WeChatWindow   time.Duration // a reply still failing this long after acceptance is given up (the 48-hour window)
	IMWindow       time.Duration // likewise for deliveries to IM
	MinBackoff     time.Duration // the first wait between two attempts
	MaxBackoff     time.Duration // the longest wait between two attempts
	StopGrace      time.Duration // how long in-flight deliveries may finish after a stop
	owner          string        // this instance, in claims
	epoch          time.Time     // when the worker was made
	aliveSince     atomic.Int64  // when the last recorded liveness was asked, in ns since epoch (heartbeat.go)
	liveMu         sync.Mutex
	lapse          context.Context    // done once this instance's liveness lapsed, cutting its attempts
	lapsed         context.CancelFunc // cancels lapse
	wake           chan struct{}
	running        atomic.Bool
	lastPruneMilli atomic.Int64
}

// newWorker returns a worker with the bridge's defaults.
func newWorker(st *Store, im *IMClient, wx *WeChatClient, log *slog.Logger, m *metrics, now func() time.Time) *Worker {
	id := make([]byte, 8)
	rand.Read(id)
	w := &Worker{
		Store: st, IM: im, WeChat: wx, Log: log, Metrics: m, Now: now, Admin: im.Admin, IMDedup: imDedupWindow,
		Lanes:        32,
		Lease:        45 * time.Second,
		WeChatWindow: 48 * time.Hour,
		IMWindow:     24 * time.Hour,
		MinBackoff:   time.Second,
		MaxBackoff:   5 * time.Minute,
		StopGrace:    10 * time.Second,
		owner:        hex.EncodeToString(id),
		epoch:        time.Now(),
		wake:         make(chan struct{}, 1),
	}
	w.aliveSince.Store(-int64(deadAfter)) // not alive until its liveness is recorded
	return w
}

// Notify tells the worker that new work was committed. It never blocks.
func (w *Worker) Notify() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Running reports whether the worker's loop is running.
func (w *Worker) Running() bool { return w.running.Load() }

// Run delivers until ctx is done. Then it claims nothing more, lets the
// deliveries in flight finish for up to StopGrace, cancels the rest, and
// hands back what it still holds, so another instance (or the next start)
// takes it at once.
//
// Each claimed item is delivered in a goroutine of its own. Delivered items
// are recorded together, many in one write, by the completer; the next item
// of a lane becomes its head then, and the next claim takes it.
func (w *Worker) Run(ctx context.Context) {
	w.running.Store(true)
	defer w.running.Store(false)

	deliverCtx, cancelDeliveries := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelDeliveries()
	var wg sync.WaitGroup
	slots := make(chan struct{}, w.Lanes)       // one per item held, until its outcome is recorded
	done := make(chan struct{}, 1)              // an outcome was recorded: look for work again
	delivered := make(chan OutboxItem, w.Lanes) // never full: at most Lanes items are held
	freed := func(n int) {
		for range n {
			<-slots
		}
		select {
		case done <- struct{}{}:
		default: // the loop has a wake-up pending already
		}
	}
	completerDone := make(chan struct{})
	go func() {
		defer close(completerDone)
		w.complete(deliverCtx, delivered, freed)
	}()
	// Liveness is recorded until the work held is handed back, even after
	// ctx ends: others would take the claims of the deliveries finishing.
	liveCtx, stopBeats := context.WithCancel(context.WithoutCancel(ctx))
	beats := make(chan struct{})
	w.beat(liveCtx, true)
	go func() { defer close(beats); w.keepAlive(liveCtx) }()

	for ctx.Err() == nil {
		w.prune(ctx)
		free := w.Lanes - len(slots)
		var items []OutboxItem
		if free > 0 && w.alive() {
			var err error
			items, err = w.Store.Claim(ctx, w.owner, w.Now(), w.Lease, free)
			if err != nil && ctx.Err() == nil {
				w.Log.Error("outbox claim failed", "err", err)
			}
			for _, it := range items {
				slots <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					if w.deliverItem(deliverCtx, it) {
						delivered <- it
					} else {
						freed(1)
					}
				}()
			}
		}
		w.sleep(ctx, len(items) < free, done)
	}

	finished := make(chan struct{})
	go func() { wg.Wait(); close(delivered); <-completerDone; close(finished) }()
	select {
	case <-finished:
	case <-time.After(w.StopGrace):
		w.Log.Warn("stopping: deliveries still in flight are handed back")
		cancelDeliveries()
		<-finished
	}
	w.release(func() { stopBeats(); <-beats })
}

// sleep waits until ctx is done, an outcome is recorded (done), the
// handlers add work (wake), or, when nothing more is due now (idle), the
// next item is due; a second at most, as other instances add work too.
func (w *Worker) sleep(ctx context.Context, idle bool, done <-chan struct{}) {
	wait := time.Second
	if idle {
		if next, ok, err := w.Store.NextDue(ctx); err == nil && ok {
			wait = min(max(next.Sub(w.Now()), 5*time.Millisecond), wait)
		}
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-ctx.Done():
	case <-done:
	case <-w.wake:
	case <-timer.C:
	}
}

// release hands back the items the worker still holds, then stops its
// liveness (stopBeats) and forgets the instance. Should the hand-back fail,
// its claims are free once it is no longer seen.
func (w *Worker) release(stopBeats func()) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := w.Store.Release(ctx, w.owner)
	stopBeats()
	if err != nil {
		w.Log.Error("outbox release failed", "err", err)
		return
	}
	if err := w.Store.Gone(ctx, w.owner); err != nil {
		w.Log.Error("instance not forgotten", "err", err)
	}
}

// keepAlive records that this instance runs, every aliveEvery until ctx is
// done (heartbeat.go).
func (w *Worker) keepAlive(ctx context.Context) {
	ticker := time.NewTicker(aliveEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			if w.beat(ctx, false); !w.alive() {
				w.cutAttempts()
			}
		}
	}
}

// cutAttempts cancels the attempts in flight: this instance's liveness
// lapsed, and others may take its claims and make them again.
func (w *Worker) cutAttempts() {
	w.liveMu.Lock()
	defer w.liveMu.Unlock()
	if w.lapse != nil && w.lapse.Err() == nil {
		w.lapsed()
		w.Log.Error("liveness not recorded for too long: attempts in flight are cut off, and no work is taken until it is")
	}
}

// liveness returns the context an attempt starting now runs under: done if
// this instance's liveness lapses (cutAttempts).
func (w *Worker) liveness() context.Context {
	w.liveMu.Lock()
	defer w.liveMu.Unlock()
	if w.lapse == nil || w.lapse.Err() != nil && w.alive() {
		w.lapse, w.lapsed = context.WithCancel(context.Background())
	}
	return w.lapse
}

// beat records this instance's liveness once, or fails within aliveEvery:
// a write that hangs must not keep the instance from seeing it lapse.
func (w *Worker) beat(ctx context.Context, first bool) {
	asked := time.Since(w.epoch)
	ctx, cancel := context.WithTimeout(ctx, aliveEvery)
	defer cancel()
	if err := w.Store.Alive(ctx, w.owner, first); err != nil {
		if ctx.Err() == nil {
			w.Log.Error("liveness not recorded", "err", err)
		}
		return
	}
	w.aliveSince.Store(int64(asked))
}

// alive reports whether others still see this instance running, with room
// for the attempt a claim starts: past deadAfter since its last recorded
// liveness, they take its claims. Until then it claims nothing.
func (w *Worker) alive() bool {
	return time.Since(w.epoch)-time.Duration(w.aliveSince.Load()) < deadAfter-2*aliveEvery
}

// complete records the items that arrive on delivered as done, all that
// wait in one write, until delivered is closed; freed is told how many
// items each write settled.
func (w *Worker) complete(ctx context.Context, delivered <-chan OutboxItem, freed func(int)) {
	for it := range delivered {
		batch := gather(it, delivered, maxBatch)
		// Should the write fail, the items stay held until their lease
		// ends and are delivered again: IM drops a repeated sendmsg within
		// 120 s, WeChat may show a reply twice (docs/DELIVERY.md: at least once).
		switch err := w.Store.Delivered(ctx, batch, w.Now()); {
		case errors.Is(err, errNotHeld):
			// Their leases ran out before this: the newer claims deliver
			// them again, and IM drops a repeated sendmsg within 120 s.
			w.Log.Warn("delivered items were no longer held by their claims", "err", err)
		case err != nil && ctx.Err() == nil:
			w.Log.Error("outbox write failed", "err", err, "items", len(batch))
		}
		freed(len(batch))
	}
}

// attempt calls the vendor for it within its claim, and returns the
// outcome; made is false if the claim ran out first, the item left to a
// newer one. An item that cannot be read is not tried: its error is the
// outcome.
func (w *Worker) attempt(ctx context.Context, it OutboxItem) (made bool, err error) {
	if it.Unreadable != nil {
		return true, it.Unreadable
	}
	// The attempt ends a tenth of a lease before its claim does, so that no
	// other instance's claim of the item overlaps a call of this one, and
	// the outcome is written while the claim holds.
	budget := time.UnixMilli(it.claimedUntil).Sub(w.Now()) - w.Lease/10
	if budget <= 0 {
		w.Log.Warn("claim ran out before its attempt began; the item is left to a newer claim", "id", it.ID)
		return false, nil
	}
	attemptCtx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	live := w.liveness()
	stop := context.AfterFunc(live, cancel) // others may take the claim: stop calling
	defer stop()
	err = w.deliver(attemptCtx, it)
	switch {
	case err != nil && live.Err() != nil:
		err = fmt.Errorf("attempt cut off: this instance's liveness was not recorded: %w", err)
	case err != nil && attemptCtx.Err() != nil && ctx.Err() == nil:
		err = fmt.Errorf("attempt cut off after %s, before its claim ran out: %w", budget.Round(time.Millisecond), err)
	}
	return true, err
}

// deliverItem makes one attempt at it. It reports true when it was
// delivered (the completer records that); a failure it records itself, as
// a retry or a dead letter.
func (w *Worker) deliverItem(ctx context.Context, it OutboxItem) bool {
	d := it.Delivery
	made, err := w.attempt(ctx, it)
	if !made {
		return false
	}
	now := w.Now()
	tgt := target(d.Kind)
	log := w.Log.With("id", it.ID, "kind", d.Kind, "lane", it.Lane, "attempt", it.Attempts+1)
	window := w.IMWindow
	if d.Kind == deliverWeChat {
		window = w.WeChatWindow
	}
	var rerr error
	switch {
	case err == nil:
		if d.RatingConv != 0 {
			if err := w.Store.ArmRating(ctx, d.OpenID, d.RatingConv); err != nil {
				log.Error("rating not armed: the customer's next message is a message", "err", err)
			}
		}
		w.Metrics.deliveries.WithLabelValues(tgt, "delivered").Inc()
		w.Metrics.deliveryLatency.WithLabelValues(tgt).Observe(now.Sub(it.CreatedAt).Seconds())
		log.Debug("delivered")
		return true
	case ctx.Err() != nil:
		return false // stopping: the item is handed back as it was
	case errors.Is(err, errParked):
		log.Debug("parked with its conversation in the queue")
		return false // Recipient finished the item
	case permanent(err) || now.Sub(it.CreatedAt) >= window:
		reason := explain(err)
		if !permanent(err) {
			reason = fmt.Sprintf("still failing %s after it was accepted: %v", window, err)
		}
		if rerr = w.Store.GiveUp(ctx, it, reason, w.notice(d, reason, err), now); rerr == nil {
			w.Metrics.deliveries.WithLabelValues(tgt, "dead").Inc()
			w.Metrics.deadLetters.WithLabelValues(tgt).Inc()
			log.Error("delivery failed for good", "err", reason)
		}
	default:
		retryAt := now.Add(backoff(it.Attempts, w.MinBackoff, w.MaxBackoff))
		if rerr = w.Store.RetryLater(ctx, it, err.Error(), uncertain(err), retryAt, now); rerr == nil {
			w.Metrics.deliveries.WithLabelValues(tgt, "retry").Inc()
			w.Metrics.retries.WithLabelValues(tgt).Inc()
			log.Warn("delivery failed, will retry", "err", err, "retry_at", retryAt)
		}
	}
	switch {
	case errors.Is(rerr, errNotHeld):
		// This instance outran its lease, and another took the item.
		log.Warn("attempt failed; its outcome is left to the newer claim", "err", err)
	case rerr != nil && ctx.Err() == nil:
		log.Error("outbox write failed", "err", rerr)
	}
	return false
}

// deliver makes the vendor call the item asks for.
func (w *Worker) deliver(ctx context.Context, it OutboxItem) error {
	d := it.Delivery
	switch d.Kind {
	case deliverIMImport:
		return w.IM.ImportAccount(ctx, d.IMUser)
	case deliverIMDelete:
		return w.IM.DeleteAccount(ctx, d.IMUser)
	case deliverIMSend, deliverNotice:
		// A notice with the customer's account is written in their
		// conversation; one without comes from the admin (failures.go).
		from := d.IMUser
		if from == "" {
			from = w.Admin
		}
		if d.Kind == deliverIMSend {
			agent, err := w.Store.Recipient(ctx, it) // recipient.go
			if err != nil {
				return err
			}
			d.Agent, it.Delivery.Agent = agent, agent
		}
		msg := textMessage(from, d.Agent, d.Text, d.MsgSeq, d.MsgRandom)
		if len(d.Elems) > 0 {
			msg.MsgBody = d.Elems
		}
		if sent, err := w.sentBefore(ctx, it, msg); sent || err != nil {
			return err
		}
		if d.Media != nil && w.PublicURL != "" {
			if err := w.carryMedia(ctx, it, &msg); err != nil { // mediacross.go
				return err
			}
		}
		if d.Kind == deliverIMSend {
			for _, e := range msg.MsgBody {
				if t, ok := e.MsgContent["Text"].(string); ok && e.MsgType == "TIMTextElem" {
					e.MsgContent["Text"] = unmistakable(t) // elems.go
				}
			}
		}
		err := w.IM.Send(ctx, msg)
		if isIMCode(err, imErrNotImported, imErrFromNotFound) && from == d.IMUser {
			// The customer's account is missing (deleted, or never imported):
			// import it and try once more. Failing again, it cannot succeed.
			if ierr := w.IM.ImportAccount(ctx, d.IMUser); ierr != nil {
				return ierr
			}
			if err = w.IM.Send(ctx, msg); isIMCode(err, imErrNotImported, imErrFromNotFound) {
				return permanentError{fmt.Errorf("%w (after importing %s; is agent %s imported?)", err, d.IMUser, d.Agent)}
			}
		}
		return err
	case deliverWeChat:
		if it.triedAt != 0 {
			// custom/send has no key to drop a repeat by, nor a history to
			// ask: an earlier attempt may have reached the customer.
			w.Metrics.uncertain.WithLabelValues("wechat", "resent").Inc()
		}
		if d.Media != nil {
			return w.sendMedia(ctx, it) // mediacross.go
		}
		return w.WeChat.SendText(ctx, d.OpenID, d.Text)
	}
	return permanentError{fmt.Errorf("unknown delivery kind %q", d.Kind)}
}

// sentBefore reports whether IM already has msg, when an earlier attempt at
// it had no known outcome and was made so long ago that IM would no longer
// drop a repeat: it looks for the message's MsgSeq and MsgRandom in the
// conversation's history. Within IM's deduplication it asks nothing.
func (w *Worker) sentBefore(ctx context.Context, it OutboxItem, msg SendMsg) (bool, error) {
	if it.triedAt == 0 || w.Now().Sub(time.UnixMilli(it.triedAt)) < w.IMDedup*3/4 {
		return false, nil
	}
	// A minute either side: IM's clock and this one a little apart.
	msgs, err := w.IM.History(ctx, msg.From_Account, msg.To_Account, it.triedAt/1000-60, w.Now().Unix()+60)
	if err != nil {
		return false, fmt.Errorf("looking for an earlier attempt in IM's history: %w", err)
	}
	for _, m := range msgs {
		if m.From_Account == msg.From_Account && m.MsgSeq == msg.MsgSeq && m.MsgRandom == msg.MsgRandom {
			w.Metrics.uncertain.WithLabelValues("im", "found").Inc()
			return true, nil
		}
	}
	w.Metrics.uncertain.WithLabelValues("im", "absent").Inc()
	return false, nil
}
