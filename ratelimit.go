package main

import (
	"context"
	"sync"
	"time"
)

// rateLimiter spaces calls evenly, at most perSecond a second, so the
// bridge stays under a vendor's rate limit instead of running into it.
type rateLimiter struct {
	mu       sync.Mutex
	interval time.Duration
	next     time.Time // the earliest time the next call may go
}

func newRateLimiter(perSecond int) *rateLimiter {
	return &rateLimiter{interval: time.Second / time.Duration(perSecond)}
}

// Wait blocks until the caller may make its call, or ctx ends.
func (l *rateLimiter) Wait(ctx context.Context) error {
	l.mu.Lock()
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	wait := l.next.Sub(now)
	l.next = l.next.Add(l.interval)
	l.mu.Unlock()
	if wait <= 0 || sleepCtx(ctx, wait) {
		return nil
	}
	return ctx.Err()
}

// sleepCtx waits for d, and reports false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
