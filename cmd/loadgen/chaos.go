package main

import (
	"context"
	"net/http"
	"time"
	"wechat-im-bridge/fakes"
)

// chaosKills is how many times -chaos kills the bridge, evenly over the run.
const chaosKills = 3

// imChaos makes im fail by turns until stop, one fault every 250 ms: HTTP
// 502, the busy codes 70169 and 60007 (each for the next ten calls), and all
// calls held for 1.5 s, past the bridge's one-second time-out, then carried
// out with nobody reading the answer. It returns how many faults it set.
func imChaos(ctx context.Context, im *fakes.IM, stop time.Time) int {
	faults := []func(){
		func() { im.FailNextStatus(10, http.StatusBadGateway) },
		func() { im.FailNext(10, 70169) },
		func() { im.FailNext(10, 60007) },
		func() {
			release := im.Hold()
			defer release()
			select {
			case <-time.After(1500 * time.Millisecond):
			case <-ctx.Done():
			}
		},
	}
	n := 0
	for ; time.Now().Before(stop) && ctx.Err() == nil; n++ {
		faults[n%len(faults)]()
		select {
		case <-time.After(250 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	im.FailNext(0, 0)
	return n
}
