package main

// The delivery worker: the only code that calls a vendor. It takes due items
// from the outbox, one goroutine per lane so a lane keeps its order, and
// retries failures with backoff until they succeed or cannot.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Worker delivers the outbox.
type Worker struct {
	Store  *Store
	IM     *IMClient
	WeChat *WeChatClient
	Log    *slog.Logger
	Now    func() time.Time

	Lanes       int           // lanes delivered at once
	GiveUpAfter time.Duration // an item still failing this long after it was accepted is given up
	MaxBackoff  time.Duration // the longest wait between two attempts

	wake    chan struct{}
	running atomic.Bool
}

// newWorker returns a worker with the bridge's defaults.
func newWorker(st *Store, im *IMClient, wx *WeChatClient, log *slog.Logger, now func() time.Time) *Worker {
	return &Worker{
		Store: st, IM: im, WeChat: wx, Log: log, Now: now,
		Lanes:       16,
		GiveUpAfter: 48 * time.Hour,
		MaxBackoff:  5 * time.Minute,
		wake:        make(chan struct{}, 1),
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

// Run delivers until ctx is done, then waits for the lanes in flight. Work
// interrupted by the stop stays in the outbox for the next start.
func (w *Worker) Run(ctx context.Context) {
	w.running.Store(true)
	defer w.running.Store(false)

	var wg sync.WaitGroup
	defer wg.Wait()
	busy := map[string]bool{}
	done := make(chan string, w.Lanes)
	lastPrune := time.Time{}

	for {
		now := w.Now()
		if now.Sub(lastPrune) > time.Hour {
			if err := w.Store.PruneKeys(ctx, now.Add(-24*time.Hour)); err != nil && ctx.Err() == nil {
				w.Log.Error("prune keys failed", "err", err)
			}
			lastPrune = now
		}
		if free := w.Lanes - len(busy); free > 0 {
			items, err := w.Store.DueHeads(ctx, now, free, busy)
			if err != nil && ctx.Err() == nil {
				w.Log.Error("outbox read failed", "err", err)
			}
			for _, it := range items {
				busy[it.Lane] = true
				wg.Add(1)
				go func() {
					defer wg.Done()
					w.runLane(ctx, it)
					done <- it.Lane
				}()
			}
		}

		wait := time.Second
		if next, ok, err := w.Store.NextDue(ctx); err == nil && ok {
			wait = min(max(next.Sub(w.Now()), 10*time.Millisecond), 30*time.Second)
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			for len(busy) > 0 {
				delete(busy, <-done)
			}
			return
		case lane := <-done:
			delete(busy, lane)
		case <-w.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// runLane delivers lane from its head item on, in order, until the lane is
// empty, its head must wait for a retry, or it has had its share of turns.
func (w *Worker) runLane(ctx context.Context, it OutboxItem) {
	for range 64 {
		if !w.deliverItem(ctx, it) {
			return
		}
		next, ok, err := w.Store.LaneHead(ctx, it.Lane, w.Now())
		if err != nil {
			if ctx.Err() == nil {
				w.Log.Error("outbox read failed", "lane", it.Lane, "err", err)
			}
			return
		}
		if !ok {
			return
		}
		it = next
	}
}

// deliverItem makes one attempt at it and records the outcome. It reports
// whether the lane may go on to its next item.
func (w *Worker) deliverItem(ctx context.Context, it OutboxItem) bool {
	err := w.deliver(ctx, it.Delivery)
	now := w.Now()
	log := w.Log.With("id", it.ID, "kind", it.Delivery.Kind, "lane", it.Lane, "attempt", it.Attempts+1)
	var rerr error
	switch {
	case err == nil:
		rerr = w.Store.Delivered(ctx, it.ID, now)
		log.Info("delivered")
	case ctx.Err() != nil:
		return false // stopping: the item stays as it was, for the next start
	case permanent(err):
		rerr = w.Store.GiveUp(ctx, it.ID, err.Error(), now)
		log.Error("delivery failed for good", "err", err)
	case now.Sub(it.CreatedAt) >= w.GiveUpAfter:
		reason := fmt.Sprintf("still failing %s after it was accepted: %v", w.GiveUpAfter, err)
		rerr = w.Store.GiveUp(ctx, it.ID, reason, now)
		log.Error("delivery failed for good", "err", reason)
	default:
		next := now.Add(backoff(it.Attempts, w.MaxBackoff))
		if rerr = w.Store.RetryLater(ctx, it.ID, err.Error(), next, now); rerr == nil {
			log.Warn("delivery failed, will retry", "err", err, "retry_at", next)
		}
		return false
	}
	if rerr != nil {
		log.Error("outbox write failed", "err", rerr)
		return false
	}
	return true
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
// exponential from one second, capped, with jitter so that lanes failing
// together do not retry together.
func backoff(attempts int, ceiling time.Duration) time.Duration {
	d := ceiling
	if attempts < 20 {
		d = min(time.Second<<attempts, ceiling)
	}
	return d/2 + rand.N(d/2+1)
}
