package main

import (
	"context"
	"runtime"
	"runtime/debug"
	rmetrics "runtime/metrics"
	"time"
)

// The Go runtime's settings for the bridge and the load generator: when the
// garbage collector runs, and how many processors the scheduler has.

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

// spareProcessor gives the scheduler one processor more than Go chose (the
// cores, or the container's CPU limit), unless getenv has GOMAXPROCS. It is
// for SQLite, whose writer waits in fsync once a batch: Go's sysmon takes a
// processor from a thread that waits in a system call when other
// goroutines need one, and when the fsync returns the writer waits again,
// for a processor. With one to spare the writer keeps its own through the
// fsync and goes on at once. In the paced load run, in alternating pairs:
// 11 of 13 pairs gained, median +5%, under the goal machine's emulated
// capacity, and median +4.7% at full speed (SPEED.md). Called again, it
// sets the same. It returns the processors set, or 0 when it left them
// alone.
func spareProcessor(getenv func(string) string) int {
	if getenv("GOMAXPROCS") != "" {
		return 0
	}
	runtime.SetDefaultGOMAXPROCS()
	n := runtime.GOMAXPROCS(0) + 1
	runtime.GOMAXPROCS(n)
	return n
}
