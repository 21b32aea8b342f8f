package main

import (
	"context"
	"runtime/debug"
	rmetrics "runtime/metrics"
	"time"
)

// When the garbage collector runs.
//
// Under load the bridge keeps a live heap of 3 – 20 MB and allocates about
// 7 KB a push. With Go's default, GOGC=100, the collector runs each time the
// heap has doubled: 7 – 35 times a second at 17,000 pushes a second. Each run
// takes one of two processors for 1 – 2 ms, and the pushes that arrive then
// wait longer. So, unless GOGC or GOMEMLIMIT is set, the bridge lets its
// memory grow to heapFloor before it collects, or to twice its live heap once
// that is larger: as often as GOGC=100 with a large heap, far less often with
// a small one. In the paced load run its peak memory is 48 – 49 MB, against
// 52 with GOGC=100.

// heapFloor is how far the bridge's memory grows before the collector runs
// while its live heap is under half of it.
const heapFloor = 32 << 20

// gcLimit is the memory limit for a live heap of live bytes.
func gcLimit(live uint64) int64 {
	return max(heapFloor, 2*int64(live))
}

// setByOperator reports whether getenv has GOGC or GOMEMLIMIT: the collector
// is then the operator's to set, and Go has set it so.
func setByOperator(getenv func(string) string) bool {
	return getenv("GOGC") != "" || getenv("GOMEMLIMIT") != ""
}

// collectLessOften applies the policy above until ctx is done, unless the
// operator set the collector.
func collectLessOften(ctx context.Context, getenv func(string) string) {
	if setByOperator(getenv) {
		return
	}
	debug.SetMemoryLimit(heapFloor)
	debug.SetGCPercent(-1)
	go followLiveHeap(ctx, time.Second)
}

// followLiveHeap sets the memory limit for the live heap that the last
// collection measured, every interval until ctx is done. Between two
// readings the heap can outgrow the limit; the collector then runs more often
// until the next one, never with more than half the CPU (Go's own cap for a
// memory limit).
func followLiveHeap(ctx context.Context, interval time.Duration) {
	live := []rmetrics.Sample{{Name: "/gc/heap/live:bytes"}}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			rmetrics.Read(live)
			debug.SetMemoryLimit(gcLimit(live[0].Value.Uint64()))
		}
	}
}

// quietCollector keeps the load generator's collector out of the waits it
// measures, unless getenv has GOGC or GOMEMLIMIT. The generator stands in for
// WeChat's servers, which do not share the bridge's cores; with Go's default
// it collects about five times a second during a run, 2 – 10 ms each time, and
// every answer that arrives meanwhile is timed late. With the collector off
// until the process holds 1 GiB, it runs about once in ten seconds at 20,000
// pushes a second (about 3.5 KB allocated a push).
func quietCollector(getenv func(string) string) {
	if setByOperator(getenv) {
		return
	}
	debug.SetMemoryLimit(1 << 30)
	debug.SetGCPercent(-1)
}
