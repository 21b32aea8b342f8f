package main

// The delivery worker: the only code that calls a vendor. It claims due lane
// heads from the outbox, runs each lane in order in a goroutine of its own,
// and retries failures with backoff until they succeed, cannot, or run out
// of time; then they become dead letters and the agent is told.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
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
	Admin   string // IM_ADMIN, the sender of dead-letter notices

	Lanes          int           // lanes delivered at once
	Lease          time.Duration // how long a claimed item is held
	WeChatWindow   time.Duration // a reply still failing this long after acceptance is given up (the 48-hour window)
	IMWindow       time.Duration // likewise for deliveries to IM
	MinBackoff     time.Duration // the first wait between two attempts
	MaxBackoff     time.Duration // the longest wait between two attempts
	StopGrace      time.Duration // how long in-flight deliveries may finish after a stop
	owner          string        // this instance, in claims
	wake           chan struct{}
	running        atomic.Bool
	lastPruneMilli atomic.Int64
}

// newWorker returns a worker with the bridge's defaults.
func newWorker(st *Store, im *IMClient, wx *WeChatClient, log *slog.Logger, m *metrics, now func() time.Time) *Worker {
	id := make([]byte, 8)
	rand.Read(id)
	return &Worker{
		Store: st, IM: im, WeChat: wx, Log: log, Metrics: m, Now: now, Admin: im.Admin,
		Lanes:        32,
		Lease:        45 * time.Second,
		WeChatWindow: 48 * time.Hour,
		IMWindow:     24 * time.Hour,
		MinBackoff:   time.Second,
		MaxBackoff:   5 * time.Minute,
		StopGrace:    10 * time.Second,
		owner:        hex.EncodeToString(id),
		wake:         make(chan struct{}, 1),
	}
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
func (w *Worker) Run(ctx context.Context) {
	w.running.Store(true)
	defer w.running.Store(false)

	deliverCtx, cancelDeliveries := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelDeliveries()
	var wg sync.WaitGroup
	slots := make(chan struct{}, w.Lanes)
	done := make(chan struct{}, w.Lanes)

	for ctx.Err() == nil {
		w.pruneKeys(ctx)
		if free := w.Lanes - len(slots); free > 0 {
			items, err := w.Store.Claim(ctx, w.owner, w.Now(), w.Lease, free)
			if err != nil && ctx.Err() == nil {
				w.Log.Error("outbox claim failed", "err", err)
			}
			for _, it := range items {
				slots <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					w.runLane(deliverCtx, ctx, it)
					<-slots
					select {
					case done <- struct{}{}:
					default: // the loop has a wake-up pending already
					}
				}()
			}
		}
		wait := time.Second       // other instances add work too: look again now and then
		if len(slots) < w.Lanes { // with every slot busy, only a lane's end matters
			if next, ok, err := w.Store.NextDue(ctx); err == nil && ok {
				wait = min(max(next.Sub(w.Now()), 5*time.Millisecond), wait)
			}
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
		case <-done:
		case <-w.wake:
		case <-timer.C:
		}
		timer.Stop()
	}

	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(w.StopGrace):
		w.Log.Warn("stopping: deliveries still in flight are handed back")
		cancelDeliveries()
		<-finished
	}
	releaseCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.Store.Release(releaseCtx, w.owner); err != nil {
		w.Log.Error("outbox release failed", "err", err)
	}
}

// pruneKeys forgets day-old push and callback keys, once an hour.
func (w *Worker) pruneKeys(ctx context.Context) {
	now := w.Now()
	if now.UnixMilli()-w.lastPruneMilli.Load() < time.Hour.Milliseconds() {
		return
	}
	w.lastPruneMilli.Store(now.UnixMilli())
	if err := w.Store.PruneKeys(ctx, now.Add(-24*time.Hour)); err != nil && ctx.Err() == nil {
		w.Log.Error("prune keys failed", "err", err)
	}
}

// runLane delivers lane from its claimed head on, in order, until the lane
// is empty, its head must wait for a retry or is held elsewhere, the worker
// stops, or the lane has had its share of turns. Deliveries run under
// deliverCtx, which outlives stop by the grace period.
func (w *Worker) runLane(deliverCtx, stop context.Context, it OutboxItem) {
	for range 64 {
		next, ok := w.deliverItem(deliverCtx, it)
		if !ok {
			return
		}
		it = next
		if stop.Err() != nil {
			break // stopping: hand back the item just taken
		}
	}
	// Stopping, or its share of turns used: the lane goes back to the
	// common claim.
	if err := w.Store.ReleaseItem(deliverCtx, it.ID); err != nil && deliverCtx.Err() == nil {
		w.Log.Error("outbox release failed", "err", err)
	}
}

// deliverItem makes one attempt at it and records the outcome. When the
// lane may go on, it returns the lane's next item, already taken.
func (w *Worker) deliverItem(ctx context.Context, it OutboxItem) (OutboxItem, bool) {
	d := it.Delivery
	err := w.deliver(ctx, d)
	now := w.Now()
	tgt := target(d.Kind)
	log := w.Log.With("id", it.ID, "kind", d.Kind, "lane", it.Lane, "attempt", it.Attempts+1)
	window := w.IMWindow
	if d.Kind == deliverWeChat {
		window = w.WeChatWindow
	}
	var (
		next OutboxItem
		ok   bool
		rerr error
	)
	switch {
	case err == nil:
		next, ok, rerr = w.Store.DeliveredNext(ctx, it, w.owner, now, w.Lease)
		w.Metrics.deliveries.WithLabelValues(tgt, "delivered").Inc()
		w.Metrics.deliveryLatency.WithLabelValues(tgt).Observe(now.Sub(it.CreatedAt).Seconds())
		log.Debug("delivered")
	case ctx.Err() != nil:
		return OutboxItem{}, false // stopping: the item is handed back as it was
	case permanent(err) || now.Sub(it.CreatedAt) >= window:
		reason := err.Error()
		if !permanent(err) {
			reason = fmt.Sprintf("still failing %s after it was accepted: %v", window, err)
		}
		if rerr = w.Store.GiveUp(ctx, it, reason, w.notice(d, reason), now); rerr == nil {
			next, ok, rerr = w.Store.ClaimLaneHead(ctx, w.owner, it.Lane, now, w.Lease)
		}
		w.Metrics.deliveries.WithLabelValues(tgt, "dead").Inc()
		w.Metrics.deadLetters.WithLabelValues(tgt).Inc()
		log.Error("delivery failed for good", "err", reason)
	default:
		retryAt := now.Add(backoff(it.Attempts, w.MinBackoff, w.MaxBackoff))
		if rerr = w.Store.RetryLater(ctx, it.ID, err.Error(), retryAt, now); rerr == nil {
			w.Metrics.deliveries.WithLabelValues(tgt, "retry").Inc()
			w.Metrics.retries.WithLabelValues(tgt).Inc()
			log.Warn("delivery failed, will retry", "err", err, "retry_at", retryAt)
		}
	}
	if rerr != nil {
		if ctx.Err() == nil {
			log.Error("outbox write failed", "err", rerr)
		}
		return OutboxItem{}, false
	}
	return next, ok
}

// notice is the IM message that tells the agent of a conversation that a
// delivery in it was given up, or nil when there is no one to tell.
func (w *Worker) notice(d Delivery, reason string) *Delivery {
	var text string
	switch d.Kind {
	case deliverWeChat:
		text = fmt.Sprintf("Not delivered to WeChat customer %s: %q\nReason: %s", d.IMUser, d.Text, reason)
	case deliverIMSend:
		text = fmt.Sprintf("A message of WeChat customer %s could not reach you: %q\nReason: %s", d.IMUser, d.Text, reason)
	default:
		return nil // imports, deletions and notices themselves: logged and counted only
	}
	if d.Agent == "" {
		return nil
	}
	return &Delivery{Kind: deliverNotice, OpenID: d.OpenID, IMUser: d.IMUser, Agent: d.Agent, Text: text,
		MsgSeq: mrand.Uint32(), MsgRandom: mrand.Uint32()}
}

// deliver makes the vendor call d asks for.
func (w *Worker) deliver(ctx context.Context, d Delivery) error {
	switch d.Kind {
	case deliverIMImport:
		return w.IM.ImportAccount(ctx, d.IMUser)
	case deliverIMDelete:
		return w.IM.DeleteAccount(ctx, d.IMUser)
	case deliverIMSend:
		msg := textMessage(d.IMUser, d.Agent, d.Text, d.MsgSeq, d.MsgRandom)
		err := w.IM.Send(ctx, msg)
		if isIMCode(err, imErrNotImported, imErrFromNotFound) {
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
	case deliverNotice:
		return w.IM.Send(ctx, textMessage(w.Admin, d.Agent, d.Text, d.MsgSeq, d.MsgRandom))
	case deliverWeChat:
		return w.WeChat.SendText(ctx, d.OpenID, d.Text)
	}
	return permanentError{fmt.Errorf("unknown delivery kind %q", d.Kind)}
}

// permanentError marks an error a retry cannot fix.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

// permanent reports whether err is one no retry can fix.
func permanent(err error) bool {
	var pe permanentError
	var ie *IMError
	var we *WeChatError
	switch {
	case errors.As(err, &pe):
		return true
	case errors.As(err, &ie):
		return imPermanent[ie.Code]
	case errors.As(err, &we):
		return wechatPermanent[we.Code]
	}
	return false
}

// isIMCode reports whether err is an IM answer with one of codes.
func isIMCode(err error, codes ...int) bool {
	var ie *IMError
	if !errors.As(err, &ie) {
		return false
	}
	for _, c := range codes {
		if ie.Code == c {
			return true
		}
	}
	return false
}

// backoff is the wait before the attempt after attempts failures:
// exponential from floor, capped at ceiling, with jitter so that lanes
// failing together do not retry together.
func backoff(attempts int, floor, ceiling time.Duration) time.Duration {
	d := ceiling
	if attempts < 30 && floor<<attempts > 0 {
		d = min(floor<<attempts, ceiling)
	}
	return d/2 + mrand.N(d/2+1)
}
