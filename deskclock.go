package main

// The desk's clock: agents' presence read from IM at start and every few
// minutes (State.StateChange tells of each change as it happens; a reading
// catches one IM did not send or the bridge missed), and every few seconds
// a sweep that closes idle conversations and gives waiting customers to
// free agents, as when business hours begin (Store.Sweep).

import (
	"cmp"
	"context"
	"log/slog"
	"maps"
	"slices"
	"time"
)

const (
	// sweepEvery is how often idle conversations and the queue are looked
	// at.
	sweepEvery = 2 * time.Second
	// presenceEvery is how often agents' presence is read from IM.
	presenceEvery = 5 * time.Minute
	// presenceRetry is how soon a failed reading is tried again.
	presenceRetry = 30 * time.Second
	// maxStatusQuery is how many accounts one query_online_status takes.
	maxStatusQuery = 500
)

// deskClock runs the desk's timed work.
type deskClock struct {
	store   *Store
	im      *IMClient
	worker  *Worker // woken when the sweep queues work
	metrics *metrics
	log     *slog.Logger
	now     func() time.Time
	agents  []string
	idle    time.Duration // SESSION_IDLE_TIMEOUT; 0: conversations never close by themselves
	// nextRead is when presence is read next: presenceEvery after a
	// reading, presenceRetry after a failed one, or at once when asked
	// (after a logout or a lost connection).
	nextRead time.Time
	asked    <-chan struct{}
	every    time.Duration // sweepEvery, or a test's
}

// readPresence records each agent's presence as IM gives it now. Only
// Online counts as online: an agent whose app was killed (PushOnline) is
// not at their desk. A reading is taken for an agent only if no word of
// IM's on them came since it was asked for (Store.ReadingTaken).
func (d *deskClock) readPresence(ctx context.Context) {
	d.nextRead = time.Now().Add(presenceRetry)
	events, err := d.store.PresenceEvents(ctx)
	if err != nil {
		d.log.Error("agents' presence not read", "err", err)
		return
	}
	status := map[string]string{}
	for batch := range slices.Chunk(d.agents, maxStatusQuery) {
		got, err := d.im.OnlineStatus(ctx, batch)
		if err != nil {
			d.log.Warn("agents' presence not read from IM; kept as last known", "err", err)
			return
		}
		maps.Copy(status, got)
	}
	online := 0
	for _, a := range d.agents {
		on := status[a] == "Online"
		if on {
			online++
		}
		assigned, err := d.store.ReadingTaken(ctx, a, on, events[a], d.now())
		if err != nil {
			d.log.Error("agent presence not recorded", "agent", a, "err", err)
			return
		}
		d.metrics.assigned(assigned)
	}
	d.worker.Notify()
	d.nextRead = time.Now().Add(presenceEvery)
	d.log.Info("agents' presence read from IM", "online", online, "agents", len(d.agents))
}

// Run sweeps every sweepEvery, and reads presence when it is due, until
// ctx is done. The reading at start is serve's, before the first push.
func (d *deskClock) Run(ctx context.Context) {
	tick := time.NewTicker(cmp.Or(d.every, sweepEvery))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-d.asked:
			d.nextRead = time.Time{}
		}
		if time.Now().After(d.nextRead) {
			d.readPresence(ctx)
		}
		sw, err := d.store.Sweep(ctx, d.idle, d.now())
		if err != nil {
			if ctx.Err() == nil {
				d.log.Error("desk sweep failed", "err", err)
			}
			continue
		}
		d.metrics.assigned(sw.Assigned)
		d.metrics.sweeps.Inc()
		if sw.Closed > 0 || sw.Requeued > 0 || len(sw.Assigned) > 0 {
			d.log.Info("desk swept", "idle_closed", sw.Closed, "requeued", sw.Requeued, "assigned", len(sw.Assigned))
			d.worker.Notify()
		}
	}
}
