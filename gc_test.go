package main

import (
	"context"
	"math"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

// keepGC restores the collector's settings when the test ends: they belong
// to the whole test process.
func keepGC(t *testing.T) {
	percent := debug.SetGCPercent(100)
	debug.SetGCPercent(percent)
	limit := debug.SetMemoryLimit(-1)
	t.Cleanup(func() {
		debug.SetGCPercent(percent)
		debug.SetMemoryLimit(limit)
	})
}

func TestGCLimit(t *testing.T) {
	for _, tc := range []struct {
		live uint64
		want int64
	}{
		{0, heapFloor},
		{10 << 20, heapFloor},
		{heapFloor / 2, heapFloor},
		{40 << 20, 80 << 20},
	} {
		if got := gcLimit(tc.live); got != tc.want {
			t.Errorf("gcLimit(%d) = %d, want %d", tc.live, got, tc.want)
		}
	}
}

// TestCollectLessOften: with neither GOGC nor GOMEMLIMIT set, the collector
// waits for the heap floor; with either set, the bridge leaves it alone.
func TestCollectLessOften(t *testing.T) {
	keepGC(t)
	for _, env := range []map[string]string{{"GOGC": "50"}, {"GOMEMLIMIT": "100MiB"}} {
		debug.SetGCPercent(100)
		debug.SetMemoryLimit(math.MaxInt64)
		ctx, cancel := context.WithCancel(t.Context())
		collectLessOften(ctx, func(k string) string { return env[k] })
		cancel()
		if p, l := debug.SetGCPercent(100), debug.SetMemoryLimit(-1); p != 100 || l != math.MaxInt64 {
			t.Errorf("with %v: GOGC %d and limit %d, want the runtime's own 100 and none", env, p, l)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	collectLessOften(ctx, func(string) string { return "" })
	if p, l := debug.SetGCPercent(-1), debug.SetMemoryLimit(-1); p != -1 || l != heapFloor {
		t.Errorf("GOGC %d and limit %d, want off and %d", p, l, heapFloor)
	}
}

// TestFollowLiveHeap: once the live heap outgrows half the floor, the limit
// follows it, so the collector runs as often as with GOGC=100 and not
// continually.
func TestFollowLiveHeap(t *testing.T) {
	keepGC(t)
	debug.SetMemoryLimit(heapFloor)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { followLiveHeap(ctx, 5*time.Millisecond); close(done) }()
	defer func() { cancel(); <-done }()

	live := make([]byte, heapFloor) // the heap now holds at least the floor
	for i := range live {
		live[i] = 1
	}
	runtime.GC()
	eventually(t, "the limit to follow a live heap over the floor", func() bool { return debug.SetMemoryLimit(-1) >= 2*heapFloor })
	runtime.KeepAlive(live)
}

// TestSpareProcessor: one processor more than Go's choice, the same however
// often it is called (each in-process bridge of the tests calls it), and
// nothing when GOMAXPROCS is set.
func TestSpareProcessor(t *testing.T) {
	prev := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })
	runtime.SetDefaultGOMAXPROCS()
	chosen := runtime.GOMAXPROCS(0)
	for range 2 {
		if n := spareProcessor(func(string) string { return "" }); n != chosen+1 || runtime.GOMAXPROCS(0) != chosen+1 {
			t.Errorf("spareProcessor set %d, runtime has %d; want %d", n, runtime.GOMAXPROCS(0), chosen+1)
		}
	}
	runtime.GOMAXPROCS(3)
	if n := spareProcessor(func(k string) string { return map[string]string{"GOMAXPROCS": "3"}[k] }); n != 0 || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("with GOMAXPROCS=3 set: spareProcessor set %d, runtime has %d; want it left at 3", n, runtime.GOMAXPROCS(0))
	}
}
