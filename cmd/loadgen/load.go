package main

// A load run in its phases: set up the fakes and the bridges, push, drain,
// report.

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"wechat-im-bridge/fakes"
)

// loadAgents are the agents of a load run.
var loadAgents = []string{"agent_1", "agent_2", "agent_3", "agent_4"}

// trial is one load run: the fakes, the bridges, and what reached IM.
type trial struct {
	o     options
	ft    *fakes.Standalone
	wx    *fakes.WeChat
	im    *fakes.IM
	dir   string
	fleet *fleet
	rt    *replyTrial // with -replies
	// stopReplies ends the agents' clients: a run that ends early sends
	// no more answers.
	stopReplies context.CancelFunc

	mu       sync.Mutex
	answered map[int64]time.Time // message seq → when WeChat got its answer
	arrived  map[int64]arrival   // message seq → its receipt in IM
	dupes    int
	pushed   []answeredPush
	waits    []time.Duration
}

// outcome is what the push and drain phases measured.
type outcome struct {
	elapsed, drained time.Duration
	kills, imFaults  int
	accepted, early  int
	failures, resent int64
	peak             string
	spent            usage
	// PostgreSQL's CPU time while the pushes ran (its server and every
	// backend of it), when the bridge runs on a PostgreSQL of this machine.
	pgCPU   time.Duration
	pgKnown bool
}

// runLoad runs the load generator; args are its flags.
func runLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseOptions(args, stderr)
	if err != nil {
		return err
	}
	t, err := newTrial(ctx, o, stderr)
	if t != nil {
		defer t.close()
	}
	if err != nil {
		return err
	}
	if o.media > 0 {
		return t.runMedia(ctx, stdout)
	}
	fmt.Fprintf(stdout, "load: %d connections, %d customers, %s, %s (%s), %d CPUs\n",
		o.conns, o.customers, o.duration, t.fleet, t.describe(), runtime.NumCPU())
	out, err := t.push(ctx)
	if err != nil {
		return err
	}
	if err := t.drain(ctx, &out); err != nil {
		return err
	}
	return t.report(stdout, out)
}

// newTrial starts the fakes and the bridges. The trial it returns, even
// with an error, must be closed.
func newTrial(ctx context.Context, o options, stderr io.Writer) (*trial, error) {
	t := &trial{o: o, ft: &fakes.Standalone{}, answered: map[int64]time.Time{}, arrived: map[int64]arrival{}}
	t.im = fakes.NewIM(t.ft, fakes.IMOptions{Accounts: loadAgents, Online: loadAgents, RateLimit: -1, CallbackToken: loadCallbackToken,
		DedupWindow: o.imDedup, OnMessage: t.inIM})
	t.wx = fakes.NewWeChat(t.ft, fakes.WeChatOptions{
		// Every message is answered, and the answers may trail their
		// messages: WeChat's five replies a message is not what is measured.
		QuotaPerMessage: 1 << 30,
		OnSend: func(m fakes.CustomMessage) {
			if t.rt != nil {
				t.rt.delivered(m)
			}
		}})
	var err error
	if t.dir, err = os.MkdirTemp("", "wechat-im-bridge-load-"); err != nil {
		return t, err
	}
	if t.o.database == "" {
		t.o.database = "sqlite:" + filepath.Join(t.dir, "bridge.db")
	}
	exe, err := t.program()
	if err != nil {
		return t, err
	}
	if t.fleet, err = newFleet(exe, t.env(), stderr, o.instances); err != nil {
		return t, err
	}
	if o.media > 0 {
		t.fleet.env = append(t.fleet.env, t.mediaEnv(t.fleet.addrs[0])...)
	}
	if o.replies {
		// Set before the bridges start, and read only after: no lock.
		var rctx context.Context
		rctx, t.stopReplies = context.WithCancel(ctx)
		t.rt = newReplyTrial(rctx, t.wx, t.im, "wx_")
		t.im.SetCallbackURL("http://" + t.fleet.addrs[0] + "/imcallback")
	}
	for i := range o.instances {
		if err := t.fleet.start(ctx, i, o.imRate); err != nil {
			return t, err
		}
	}
	return t, nil
}

// program returns the program to run as the bridge: -bridge's, -exe's, or
// the bridge built from this module.
func (t *trial) program() (string, error) {
	switch {
	case t.o.other != "":
		return t.o.other, nil
	case t.o.exe != "":
		return t.o.exe, nil
	}
	exe := filepath.Join(t.dir, "wechat-im-bridge")
	if out, err := exec.Command("go", "build", "-o", exe, "wechat-im-bridge").CombinedOutput(); err != nil {
		return "", fmt.Errorf("load: go build the bridge (run from inside its module): %v\n%s", err, out)
	}
	return exe, nil
}

// env is the bridges' environment: the fakes' credentials and addresses.
func (t *trial) env() []string {
	wo, imo := t.wx.Options(), t.im.Options()
	logLevel := "warn"
	if t.o.chaos {
		logLevel = "error" // the retries' warnings stay out of the report
	}
	env := []string{
		"DATABASE_URL=" + t.o.database, "LOG_LEVEL=" + logLevel, "PATH=" + os.Getenv("PATH"),
		"WECHAT_TOKEN=" + wo.Token, "WECHAT_APPID=" + wo.AppID, "WECHAT_APPSECRET=" + wo.AppSecret, "WECHAT_API_BASE=" + t.wx.URL,
		"IM_SDKAPPID=" + fmt.Sprint(imo.SDKAppID), "IM_SECRET_KEY=" + imo.SecretKey, "IM_API_BASE=" + t.im.URL,
		"IM_AGENTS=" + strings.Join(loadAgents, ","), "IM_AGENT_MAX_OPEN=0", "WECHAT_REPLY_QUOTA=1000000000", "IM_CALLBACK_TOKEN=" + loadCallbackToken,
		"IM_DEDUP_WINDOW=" + t.o.imDedup.String(),
	}
	if t.o.chaos {
		// Calls held past a second time out, and retries come soon.
		env = append(env, "VENDOR_TIMEOUT=1s", "RETRY_MIN_DELAY=50ms", "RETRY_MAX_DELAY=1s")
	}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LOADREF_") {
			env = append(env, kv)
		}
	}
	return append(env, t.o.env...)
}

// describe names the store and pacing, or the program in the bridge's place.
func (t *trial) describe() string {
	if !t.o.itselfRuns {
		return "in its place " + t.o.other
	}
	paced := "unpaced"
	if t.o.imRate > 0 {
		paced = fmt.Sprintf("paced at %d/s", t.o.imRate)
	}
	return fmt.Sprintf("%s, IM calls %s", strings.SplitN(t.o.database, ":", 2)[0], paced)
}

// inIM records a message's receipt in IM, and has its agent answer it with
// -replies.
func (t *trial) inIM(m fakes.Message) {
	seq, err := strconv.ParseInt(strings.TrimPrefix(m.Text, "load "), 10, 64)
	if err != nil {
		return
	}
	t.mu.Lock()
	_, dup := t.arrived[seq]
	if dup {
		t.dupes++
	} else {
		t.arrived[seq] = arrival{m.Received, len(t.arrived)}
	}
	t.mu.Unlock()
	if t.rt != nil && !dup {
		t.rt.answer(m, seq) // may wait for the agents' clients
	}
}

// close stops the bridges, the agents' clients and the fakes, and removes
// the run's folder.
func (t *trial) close() {
	if t.fleet != nil {
		t.fleet.endAll(syscall.SIGKILL)
	}
	if t.rt != nil {
		t.stopReplies()
		t.rt.close()
	}
	t.ft.Close()
	if t.dir != "" {
		os.RemoveAll(t.dir)
	}
}

// push pushes from every connection until the run's time is up; under
// -chaos it kills and restarts the bridges meanwhile and makes IM fail.
func (t *trial) push(ctx context.Context) (outcome, error) {
	wo := t.wx.Options()
	stop := time.Now().Add(t.o.duration)
	ps := &pushers{
		addrs: t.fleet.addrs, token: wo.Token, oa: wo.OAID, conns: t.o.conns, customers: t.o.customers, resend: t.o.chaos,
		stop: stop, giveUp: stop.Add(30 * time.Second),
		msgIDs: 6_000_000_000_000_000_000 + time.Now().UnixMilli()%1_000_000_000_000*1_000_000,
	}
	serving := make(chan struct{})
	close(serving)
	ps.up.Store(&serving)
	var server int
	var pgBefore time.Duration
	pgKnown := t.o.itselfRuns && t.o.localPostgres()
	if pgKnown {
		server, pgKnown = postmasterOf(ctx, t.o.database)
	}
	if pgKnown {
		pgBefore, pgKnown = serverCPU(server)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for c := range t.o.conns {
		wg.Go(func() {
			w, got := ps.run(ctx, c)
			t.mu.Lock()
			defer t.mu.Unlock()
			t.waits = append(t.waits, w...)
			for _, a := range got {
				t.answered[a.n] = a.answer
			}
			t.pushed = append(t.pushed, got...)
		})
	}
	var out outcome
	faultsDone := make(chan struct{})
	if t.o.chaos {
		go func() {
			defer close(faultsDone)
			out.imFaults = imChaos(ctx, t.im, stop)
		}()
		kills, err := t.killByTurns(ctx, ps, start)
		out.kills = kills
		if err != nil {
			wg.Wait()
			return out, err
		}
	} else {
		close(faultsDone)
	}
	wg.Wait()
	out.elapsed = time.Since(start)
	<-faultsDone // a fault set just before stop may run on a moment
	out.failures, out.resent = ps.failures.Load(), ps.resent.Load()
	t.mu.Lock()
	out.accepted, out.early = len(t.answered), len(t.arrived)
	t.mu.Unlock()
	out.peak, out.spent = t.fleet.peakMemory(), t.fleet.usage()
	if pgKnown {
		pgAfter, ok := serverCPU(server)
		out.pgCPU, out.pgKnown = pgAfter-pgBefore, ok
	}
	return out, nil
}

// killByTurns kills a bridge (SIGKILL) and restarts it on the same
// database chaosKills times, evenly over the run, and returns how many
// times it did.
func (t *trial) killByTurns(ctx context.Context, ps *pushers, start time.Time) (int, error) {
	kills := 0
	for i := range chaosKills {
		select {
		case <-time.After(time.Until(start.Add(t.o.duration * time.Duration(i+1) / (chaosKills + 1)))):
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		down := make(chan struct{})
		ps.up.Store(&down)
		victim := i % t.o.instances
		t.fleet.end(victim, syscall.SIGKILL)
		err := t.fleet.start(ctx, victim, 0)
		close(down)
		if err != nil {
			return kills, fmt.Errorf("load: restart after a kill: %w", err)
		}
		kills++
	}
	return kills, nil
}

// drain waits until every answered message is in IM, and with -replies
// every answer in WeChat; with -im-rate a new, unpaced bridge on the same
// database delivers the backlog. What is still missing then is lost.
func (t *trial) drain(ctx context.Context, out *outcome) error {
	start := time.Now()
	defer func() {
		out.drained = time.Since(start)
		t.fleet.endAll(syscall.SIGTERM)
	}()
	if t.o.imRate > 0 {
		// The first ones stop, handing back what they hold.
		t.fleet.endAll(syscall.SIGTERM)
		if err := t.fleet.start(ctx, 0, 0); err != nil {
			return fmt.Errorf("load: restart for the backlog: %w", err)
		}
	}
	if !t.o.forwards {
		return nil
	}
	// Lanes are delivered one message at a time: a run of few customers,
	// or a bigger backlog, drains slowly. The wait lasts while messages
	// and answers still arrive.
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	arrived := func() int {
		t.mu.Lock()
		defer t.mu.Unlock()
		return len(t.arrived)
	}
	whileArriving(ctx, arrived, func() bool {
		t.mu.Lock()
		defer t.mu.Unlock()
		for n := range t.answered {
			if _, ok := t.arrived[n]; !ok {
				return false
			}
		}
		return true
	})
	if t.rt != nil {
		t.rt.close() // the answers to every message are sent
		whileArriving(ctx, t.rt.deliveredCount, t.rt.allDelivered)
	}
	return nil
}

// stall is how long the wait for a run's messages and answers lasts once
// none arrives.
const stall = time.Minute

// whileArriving waits until done, or until ctx ends, or until arrived (a
// count of what has arrived) stays the same for stall.
func whileArriving(ctx context.Context, arrived func() int, done func() bool) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	last, since := arrived(), time.Now()
	for !done() {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if n := arrived(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) > stall {
			return
		}
	}
}

// report prints what the run measured, and fails it on anything lost,
// duplicated or out of order.
func (t *trial) report(w io.Writer, out outcome) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var delivery []time.Duration
	lost := 0
	for n, at := range t.answered {
		if got, ok := t.arrived[n]; ok {
			// Under -chaos a push may reach IM before the answer to its
			// last attempt: an earlier attempt was committed, its answer
			// lost to a kill.
			delivery = append(delivery, max(got.at.Sub(at), 0))
		} else if t.o.forwards {
			lost++
		}
	}
	disordered := outOfOrder(t.pushed, t.arrived)
	slices.Sort(t.waits)
	slices.Sort(delivery)
	fmt.Fprintf(w, "pushes answered 200:   %d in %.1fs = %.0f pushes/s (%d failed)\n", out.accepted, out.elapsed.Seconds(),
		float64(out.accepted)/out.elapsed.Seconds(), out.failures)
	fmt.Fprintf(w, "WeChat's wait:         p50 %s, p99 %s, max %s\n", pct(t.waits, 50), pct(t.waits, 99), pct(t.waits, 100))
	switch {
	case !t.o.forwards:
		fmt.Fprintf(w, "delivery to IM:        none expected: the program forwards nothing (%d forwards)\n", len(delivery))
	case !t.o.itselfRuns:
		fmt.Fprintf(w, "delivery to IM:        inside the handler, before WeChat's answer (%d forwards)\n", len(delivery))
	case t.o.imRate > 0:
		fmt.Fprintf(w, "delivery to IM:        %d during the pushes (paced at %d/s), the other %d by a restarted, unpaced bridge in %.1fs\n",
			out.early, t.o.imRate, out.accepted-out.early, out.drained.Seconds())
	default:
		fmt.Fprintf(w, "delivery to IM:        p50 %s, p99 %s, max %s (from WeChat's answer to IM's receipt)\n",
			pct(delivery, 50), pct(delivery, 99), pct(delivery, 100))
	}
	if t.o.chaos {
		fmt.Fprintf(w, "chaos:                 %d kills (SIGKILL, restarted on the same database), %d IM faults in turn, %d pushes sent again after no answer\n",
			out.kills, out.imFaults, out.resent)
	}
	fmt.Fprintf(w, "forwards lost:         %d; duplicated: %d; out of order: %d\n", lost, t.dupes, disordered)
	var answersLost, answersDuplicated, answersDisordered int
	if t.rt != nil {
		answersLost, answersDuplicated, answersDisordered = t.rt.report(w)
	}
	reportUsage(w, out)
	if lost > 0 || out.failures > 0 {
		return fmt.Errorf("load: %d forwards lost, %d pushes failed", lost, out.failures)
	}
	// WeChat keeps no key of the messages it is sent: killed after a send and
	// before recording it, the bridge sends it again (docs/DELIVERY.md: at least once).
	if answersLost > 0 || answersDisordered > 0 || answersDuplicated > 0 && !t.o.chaos {
		return fmt.Errorf("load: %d answers lost, %d duplicated, %d customers' answers out of order", answersLost, answersDuplicated, answersDisordered)
	}
	if (t.dupes > 0 || disordered > 0) && t.o.itselfRuns {
		// IM drops a repeated MsgSeq and MsgRandom, so a duplicate means
		// the bridge sent one message as two.
		return fmt.Errorf("load: %d forwards duplicated, %d out of order", t.dupes, disordered)
	}
	return nil
}

// reportUsage prints the bridges' peak memory, and their CPU and disk a
// push.
func reportUsage(w io.Writer, out outcome) {
	which := "VmHWM"
	if out.kills > 0 {
		which = "VmHWM, since the last restart"
	}
	fmt.Fprintf(w, "bridge peak memory:    %s (%s)\n", out.peak, which)
	switch {
	case out.kills > 0:
		fmt.Fprintf(w, "bridge CPU and disk:   not told: /proc knows only the bridges running since the last restart\n")
	case !out.spent.known:
		fmt.Fprintf(w, "bridge CPU and disk:   unknown (no /proc to read)\n")
	case out.accepted == 0:
		fmt.Fprintf(w, "bridge CPU and disk:   none a push: no push was answered\n")
	default:
		fmt.Fprintf(w, "bridge CPU and disk:   %.1f µs of CPU and %.2f KB written a push answered, until the pushes stopped (/proc)\n",
			float64(out.spent.cpu.Microseconds())/float64(out.accepted), float64(out.spent.written)/1024/float64(out.accepted))
		if out.pgKnown {
			fmt.Fprintf(w, "PostgreSQL's CPU:      %.1f µs a push answered, while the pushes ran (its server and backends, /proc)\n",
				float64(out.pgCPU.Microseconds())/float64(out.accepted))
		}
	}
}
