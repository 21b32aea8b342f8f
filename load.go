package main

// "wechat-im-bridge load" measures the bridge under load, on loopback only:
// it starts fake WeChat and IM servers in this process, runs the bridge as a
// separate process (this same binary), pushes signed text messages from many
// customers at it over several connections for a fixed time, waits for every
// accepted message to reach IM, and reports throughput, WeChat's wait,
// delivery latency, lost forwards and the bridge's peak memory.
//
// With -im-rate N the bridge paces its IM calls at N a second, as it must
// against the real IM (200 by default), so the messages pile up in the
// outbox while the pushes run. Then the bridge is stopped, and a new one on
// the same database, unpaced, delivers the backlog: a forward is lost only
// if neither delivers it.
//
// With -chaos the run is a trial of the promise to lose nothing: the bridge
// is killed (SIGKILL) and restarted on the same database three times while
// the pushes run, IM fails on purpose by turns (HTTP 502, busy codes, calls
// held past the bridge's time-out and then carried out), and a push left
// without an answer is sent again, as WeChat does, until it gets one. Every
// answered message must reach IM exactly once.
//
// With -replies the agents answer every message, and every answer must
// reach WeChat (loadreplies.go).

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"wechat-im-bridge/fakes"
)

// runLoad runs the load generator; args are its flags.
func runLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	duration := fs.Duration("duration", 10*time.Second, "how long to push")
	conns := fs.Int("connections", 32, "concurrent connections pushing")
	customers := fs.Int("customers", 1000, "distinct customers writing")
	database := fs.String("database", "", "DATABASE_URL for the bridge (default: SQLite in a temporary folder)")
	imRate := fs.Int("im-rate", 0, "IM calls a second the bridge makes while the pushes run (IM_RATE_LIMIT; 0: unpaced)")
	other := fs.String("bridge", "", "a program to run in the bridge's place, with its environment (the reference in loadref/)")
	forwards := fs.Bool("forwards", true, "with -bridge: the program forwards each message to IM (false for an empty handler, whose pushes reach no one)")
	instances := fs.Int("instances", 1, "bridges on one PostgreSQL database (-database postgres://…), the connections spread over them")
	chaos := fs.Bool("chaos", false, "kill and restart the bridge while the pushes run, make IM fail by turns, and send unanswered pushes again")
	replies := fs.Bool("replies", false, "agents answer each message that reaches IM, from IM clients, and every answer must reach WeChat")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *duration <= 0 || *duration > 10*time.Minute || *conns < 1 || *conns > 1024 || *customers < 1 || *imRate < 0 {
		return errors.New("load: -duration must be in (0, 10m], -connections in [1, 1024], -customers at least 1, -im-rate at least 0")
	}
	if *other != "" && *imRate > 0 {
		return errors.New("load: -im-rate needs the bridge itself, which can stop and hand its backlog to a restarted one")
	}
	if !*forwards && *other == "" {
		return errors.New("load: -forwards=false is for a program run with -bridge: the bridge itself forwards every message")
	}
	if *instances < 1 || *instances > 8 {
		return errors.New("load: -instances must be in [1, 8]")
	}
	if *instances > 1 && (*other != "" || !isPostgresURL(*database)) {
		return errors.New("load: -instances runs several bridges, which share one PostgreSQL: it needs -database postgres://… and not -bridge")
	}
	if *replies && *other != "" {
		return errors.New("load: -replies needs the bridge itself, which takes IM's callbacks")
	}
	if *chaos && (*imRate > 0 || !*forwards) {
		return errors.New("load: -chaos delivers while the pushes run, and checks every forward: not with -im-rate or -forwards=false")
	}

	dt := &demoT{}
	defer dt.close()
	var (
		mu       sync.Mutex
		answered = map[int64]time.Time{} // message seq → when WeChat got its answer
		arrived  = map[int64]arrival{}   // message seq → its receipt in IM
		dupes    int
	)
	agents := []string{"agent_1", "agent_2", "agent_3", "agent_4"}
	var trial atomic.Pointer[replyTrial] // with -replies
	im := fakes.NewIM(dt, fakes.IMOptions{Accounts: agents, RateLimit: -1, CallbackToken: loadCallbackToken, OnMessage: func(m fakes.Message) {
		seq, err := strconv.ParseInt(strings.TrimPrefix(m.Text, "load "), 10, 64)
		if err != nil {
			return
		}
		mu.Lock()
		_, dup := arrived[seq]
		if dup {
			dupes++
		} else {
			arrived[seq] = arrival{m.Received, len(arrived)}
		}
		mu.Unlock()
		if rt := trial.Load(); rt != nil && !dup {
			rt.answer(m, seq) // may wait for the agents' clients
		}
	}})
	wx := fakes.NewWeChat(dt, fakes.WeChatOptions{
		// Every message is answered, and the answers may trail their
		// messages: WeChat's five replies a message is not what is measured.
		QuotaPerMessage: 1 << 30,
		OnSend: func(m fakes.CustomMessage) {
			if rt := trial.Load(); rt != nil {
				rt.delivered(m)
			}
		}})
	dir, err := os.MkdirTemp("", "wechat-im-bridge-load-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if *database == "" {
		*database = "sqlite:" + filepath.Join(dir, "bridge.db")
	}

	wo, imo := wx.Options(), im.Options()
	logLevel := "warn"
	if *chaos {
		logLevel = "error" // the retries' warnings stay out of the report
	}
	env := []string{
		"DATABASE_URL=" + *database, "LOG_LEVEL=" + logLevel, "PATH=" + os.Getenv("PATH"),
		"WECHAT_TOKEN=" + wo.Token, "WECHAT_APPID=" + wo.AppID, "WECHAT_APPSECRET=" + wo.AppSecret, "WECHAT_API_BASE=" + wx.URL,
		"IM_SDKAPPID=" + fmt.Sprint(imo.SDKAppID), "IM_SECRET_KEY=" + imo.SecretKey, "IM_API_BASE=" + im.URL,
		"IM_AGENTS=" + strings.Join(agents, ","), "IM_CALLBACK_TOKEN=" + loadCallbackToken,
	}
	if *chaos {
		// Calls held past a second time out, and retries come soon.
		env = append(env, "VENDOR_TIMEOUT=1s", "RETRY_MIN_DELAY=50ms", "RETRY_MAX_DELAY=1s")
	}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LOADREF_") {
			env = append(env, kv)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if *other != "" {
		exe = *other
	}
	f, err := newFleet(exe, env, stderr, *instances)
	if err != nil {
		return err
	}
	defer f.endAll(syscall.SIGKILL)
	var rt *replyTrial
	if *replies {
		trialCtx, cancel := context.WithCancel(ctx)
		rt = newReplyTrial(trialCtx, wx, im, "wx_")
		defer rt.close()
		defer cancel() // first: a run that ends early sends no more answers
		trial.Store(rt)
		im.SetCallbackURL("http://" + f.addrs[0] + "/imcallback")
	}
	for i := range *instances {
		if err := f.start(ctx, i, *imRate); err != nil {
			return err
		}
	}
	paced := "unpaced"
	if *imRate > 0 {
		paced = fmt.Sprintf("paced at %d/s", *imRate)
	}
	what := fmt.Sprintf("%s, IM calls %s", strings.SplitN(*database, ":", 2)[0], paced)
	if *other != "" {
		what = "in its place " + *other
	}
	fmt.Fprintf(stdout, "load: %d connections, %d customers, %s, %s (%s), %d CPUs\n",
		*conns, *customers, *duration, f, what, runtime.NumCPU())

	stop := time.Now().Add(*duration)
	ps := &pushers{
		addrs: f.addrs, token: wo.Token, oa: wo.OAID, conns: *conns, customers: *customers, resend: *chaos,
		stop: stop, giveUp: stop.Add(30 * time.Second),
	}
	serving := make(chan struct{})
	close(serving)
	ps.up.Store(&serving)
	var (
		waits  []time.Duration
		pushed []answeredPush
	)
	start := time.Now()
	var wg sync.WaitGroup
	for c := range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, got := ps.run(ctx, c)
			mu.Lock()
			defer mu.Unlock()
			waits = append(waits, w...)
			for _, a := range got {
				answered[a.n] = a.answer
			}
			pushed = append(pushed, got...)
		}()
	}
	var kills, imFaults int
	faultsDone := make(chan struct{})
	if *chaos {
		go func() {
			defer close(faultsDone)
			imFaults = imChaos(ctx, im, stop)
		}()
		for i := range chaosKills {
			select {
			case <-time.After(time.Until(start.Add(*duration * time.Duration(i+1) / (chaosKills + 1)))):
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
			down := make(chan struct{})
			ps.up.Store(&down)
			victim := i % *instances
			f.end(victim, syscall.SIGKILL)
			err := f.start(ctx, victim, 0)
			close(down)
			if err != nil {
				wg.Wait()
				return fmt.Errorf("load: restart after a kill: %w", err)
			}
			kills++
		}
	} else {
		close(faultsDone)
	}
	wg.Wait()
	elapsed := time.Since(start)
	<-faultsDone // a fault set just before stop may run on a moment

	mu.Lock()
	accepted, early := len(answered), len(arrived)
	mu.Unlock()
	peak, spent := f.peakMemory(), f.usage()
	drainStart := time.Now()
	if *imRate > 0 {
		// The backlog is delivered by a new bridge on the same database,
		// unpaced: the first ones stop, handing back what they hold.
		f.endAll(syscall.SIGTERM)
		if err := f.start(ctx, 0, 0); err != nil {
			return fmt.Errorf("load: restart for the backlog: %w", err)
		}
	}
	if *forwards {
		// Lanes are delivered one message at a time: a run of few
		// customers drains slowly. What is still missing then is lost.
		drainCtx, cancel := context.WithTimeout(ctx, max(2*time.Minute, *duration*6))
		defer cancel()
		waitFor(drainCtx, "every message in IM", func() bool {
			mu.Lock()
			defer mu.Unlock()
			for n := range answered {
				if _, ok := arrived[n]; !ok {
					return false
				}
			}
			return true
		})
		if rt != nil {
			rt.close() // the answers to every message are sent
			waitFor(drainCtx, "every answer in WeChat", rt.allDelivered)
		}
	}
	drained := time.Since(drainStart)
	f.endAll(syscall.SIGTERM)

	mu.Lock()
	defer mu.Unlock()
	var delivery []time.Duration
	lost := 0
	for n, at := range answered {
		if got, ok := arrived[n]; ok {
			// Under -chaos a push may reach IM before the answer to its
			// last attempt: an earlier attempt was committed, its answer
			// lost to a kill.
			delivery = append(delivery, max(got.at.Sub(at), 0))
		} else if *forwards {
			lost++
		}
	}
	disordered := outOfOrder(pushed, arrived)
	slices.Sort(waits)
	slices.Sort(delivery)
	failures := ps.failures.Load()
	fmt.Fprintf(stdout, "pushes answered 200:   %d in %.1fs = %.0f pushes/s (%d failed)\n", accepted, elapsed.Seconds(), float64(accepted)/elapsed.Seconds(), failures)
	fmt.Fprintf(stdout, "WeChat's wait:         p50 %s, p99 %s, max %s\n", pct(waits, 50), pct(waits, 99), pct(waits, 100))
	switch {
	case !*forwards:
		fmt.Fprintf(stdout, "delivery to IM:        none expected: the program forwards nothing (%d forwards)\n", len(delivery))
	case *other != "":
		fmt.Fprintf(stdout, "delivery to IM:        inside the handler, before WeChat's answer (%d forwards)\n", len(delivery))
	case *imRate > 0:
		fmt.Fprintf(stdout, "delivery to IM:        %d during the pushes (paced at %d/s), the other %d by a restarted, unpaced bridge in %.1fs\n",
			early, *imRate, accepted-early, drained.Seconds())
	default:
		fmt.Fprintf(stdout, "delivery to IM:        p50 %s, p99 %s, max %s (from WeChat's answer to IM's receipt)\n", pct(delivery, 50), pct(delivery, 99), pct(delivery, 100))
	}
	if *chaos {
		fmt.Fprintf(stdout, "chaos:                 %d kills (SIGKILL, restarted on the same database), %d IM faults in turn, %d pushes sent again after no answer\n",
			kills, imFaults, ps.resent.Load())
	}
	fmt.Fprintf(stdout, "forwards lost:         %d; duplicated: %d; out of order: %d\n", lost, dupes, disordered)
	var answersLost, answersDuplicated, answersDisordered int
	if rt != nil {
		answersLost, answersDuplicated, answersDisordered = rt.report(stdout)
	}
	which := "VmHWM"
	if kills > 0 {
		which = "VmHWM, since the last restart"
	}
	fmt.Fprintf(stdout, "bridge peak memory:    %s (%s)\n", peak, which)
	switch {
	case kills > 0:
		fmt.Fprintf(stdout, "bridge CPU and disk:   not told: /proc knows only the bridges running since the last restart\n")
	case !spent.known:
		fmt.Fprintf(stdout, "bridge CPU and disk:   unknown (no /proc to read)\n")
	case accepted == 0:
		fmt.Fprintf(stdout, "bridge CPU and disk:   none a push: no push was answered\n")
	default:
		fmt.Fprintf(stdout, "bridge CPU and disk:   %.1f µs of CPU and %.2f KB written a push answered, until the pushes stopped (/proc)\n",
			float64(spent.cpu.Microseconds())/float64(accepted), float64(spent.written)/1024/float64(accepted))
	}
	if lost > 0 || failures > 0 {
		return fmt.Errorf("load: %d forwards lost, %d pushes failed", lost, failures)
	}
	// WeChat keeps no key of the messages it is sent: killed after a send and
	// before recording it, the bridge sends it again (README: at least once).
	if answersLost > 0 || answersDisordered > 0 || answersDuplicated > 0 && !*chaos {
		return fmt.Errorf("load: %d answers lost, %d duplicated, %d customers' answers out of order", answersLost, answersDuplicated, answersDisordered)
	}
	if (dupes > 0 || disordered > 0) && *other == "" {
		// IM drops a repeated MsgSeq and MsgRandom, so a duplicate means
		// the bridge sent one message as two.
		return fmt.Errorf("load: %d forwards duplicated, %d out of order", dupes, disordered)
	}
	return nil
}

// pushers is what the pushing connections of a load run share.
type pushers struct {
	addrs            []string // the bridges' addresses
	token, oa        string   // WECHAT_TOKEN, and the Official Account's ID
	conns, customers int
	resend           bool      // send a push left without an answer again (-chaos)
	stop, giveUp     time.Time // when to push no more; when to stop resending

	seq, nonces atomic.Int64
	failures    atomic.Int64 // pushes never answered 200
	resent      atomic.Int64 // pushes sent again after no answer
	// up is closed while the bridges serve; a restart puts an open one in
	// its place before the kill, so a push that failed waits for it.
	up atomic.Pointer[chan struct{}]
}

// run is connection c, until stop: it pushes signed text messages from its
// share of the customers, one at a time, and returns WeChat's wait for each
// and the pushes answered.
func (ps *pushers) run(ctx context.Context, c int) (waits []time.Duration, got []answeredPush) {
	inst := c % len(ps.addrs)
	pc := &pushConn{addr: ps.addrs[inst]}
	defer pc.close()
	for i := 0; time.Now().Before(ps.stop) && ctx.Err() == nil; i++ {
		n := ps.seq.Add(1)
		openid := fmt.Sprintf("o_load_%06d", (c+i*ps.conns)%ps.customers)
		created := strconv.FormatInt(time.Now().Unix(), 10)
		body := fmt.Sprintf("<xml><ToUserName><![CDATA[%s]]></ToUserName><FromUserName><![CDATA[%s]]></FromUserName>"+
			"<CreateTime>%s</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[load %d]]></Content><MsgId>%d</MsgId></xml>",
			ps.oa, openid, created, n, 6000000000000000000+n)
		// WeChat signs each attempt anew; the body, and so the push's key,
		// stays the same. Any attempt may be the one committed, so the push
		// counts as sent from the first.
		first := time.Now()
		for attempt := 1; ; attempt++ {
			ts, nonce := strconv.FormatInt(time.Now().Unix(), 10), strconv.FormatInt(ps.nonces.Add(1), 10)
			q := url.Values{"signature": {fakes.Sign(ps.token, ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}, "openid": {openid}}
			t0 := time.Now()
			status, err := pc.post("/wechat?"+q.Encode(), body)
			t1 := time.Now()
			if err == nil && status == http.StatusOK {
				waits = append(waits, t1.Sub(t0))
				got = append(got, answeredPush{n, openid, first, t1})
				break
			}
			if !ps.resend || attempt == 100 || t1.After(ps.giveUp) || ctx.Err() != nil {
				ps.failures.Add(1)
				break
			}
			ps.resent.Add(1)
			if len(ps.addrs) > 1 {
				// The load balancer sends the retry to another instance.
				pc.close()
				inst = (inst + 1) % len(ps.addrs)
				pc.addr = ps.addrs[inst]
				continue
			}
			select { // the bridge is back, if it was down
			case <-*ps.up.Load():
			case <-ctx.Done():
			}
		}
	}
	return waits, got
}

// answeredPush is a push that was answered 200: its message number, its
// customer, when its first attempt was sent and when it was answered.
type answeredPush struct {
	n            int64
	openid       string
	sent, answer time.Time
}

// arrival is a message's receipt in IM: when, and its place among all the
// receipts.
type arrival struct {
	at   time.Time
	rank int
}

// outOfOrder counts the messages that reached IM before a message of the
// same customer that had been answered before they were sent: the bridge
// had committed that one first, so the customer's lane must deliver it
// first.
func outOfOrder(pushes []answeredPush, arrived map[int64]arrival) int {
	byCustomer := map[string][]answeredPush{}
	for _, p := range pushes {
		if _, ok := arrived[p.n]; ok {
			byCustomer[p.openid] = append(byCustomer[p.openid], p)
		}
	}
	n := 0
	for _, ps := range byCustomer {
		bySent := slices.SortedFunc(slices.Values(ps), func(a, b answeredPush) int { return a.sent.Compare(b.sent) })
		byAnswer := slices.SortedFunc(slices.Values(ps), func(a, b answeredPush) int { return a.answer.Compare(b.answer) })
		latest, j := -1, 0 // the latest arrival among the pushes answered so far
		for _, p := range bySent {
			for ; j < len(byAnswer) && byAnswer[j].answer.Before(p.sent); j++ {
				latest = max(latest, arrived[byAnswer[j].n].rank)
			}
			if arrived[p.n].rank < latest {
				n++
			}
		}
	}
	return n
}

// fleet is the bridge processes of a load run, each on a loopback address
// of its own, all with one environment.
type fleet struct {
	exe    string
	env    []string
	stderr io.Writer
	addrs  []string
	procs  []*process // nil where none runs
}

// process is a running bridge; exited is closed once it has exited.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

// newFleet picks n free loopback addresses for bridges to run exe on.
func newFleet(exe string, env []string, stderr io.Writer, n int) (*fleet, error) {
	f := &fleet{exe: exe, env: env, stderr: stderr, procs: make([]*process, n)}
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		f.addrs = append(f.addrs, ln.Addr().String())
		ln.Close()
	}
	return f, nil
}

// start runs bridge i, pacing its IM calls at rate a second (0: unpaced),
// and returns once it is ready, or once it has exited or 30 s have passed.
func (f *fleet) start(ctx context.Context, i, rate int) error {
	cmd := exec.Command(f.exe)
	cmd.Env = append(slices.Clip(f.env), "LISTEN_ADDR="+f.addrs[i], "IM_RATE_LIMIT="+strconv.Itoa(rate))
	cmd.Stderr = f.stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	f.procs[i] = p
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := waitReady(ctx, p.exited, "http://"+f.addrs[i]); err != nil {
		select {
		case <-p.exited:
			f.procs[i] = nil
			return fmt.Errorf("load: %s exited before it was ready (%s)", f.exe, p.cmd.ProcessState)
		default:
			f.end(i, syscall.SIGKILL)
			return fmt.Errorf("load: %s on %s: %w", f.exe, f.addrs[i], err)
		}
	}
	return nil
}

// end stops bridge i with sig (SIGKILL; SIGTERM to let it hand back its
// work) and waits until it has exited.
func (f *fleet) end(i int, sig os.Signal) {
	if p := f.procs[i]; p != nil {
		p.cmd.Process.Signal(sig)
		<-p.exited
		f.procs[i] = nil
	}
}

// endAll stops every bridge with sig.
func (f *fleet) endAll(sig os.Signal) {
	for i := range f.procs {
		f.end(i, sig)
	}
}

// peakMemory returns the largest peak resident set of the running bridges.
func (f *fleet) peakMemory() string {
	peak := -1
	for _, p := range f.procs {
		if p != nil {
			peak = max(peak, peakKB(p.cmd.Process.Pid))
		}
	}
	if peak < 0 {
		return "unknown"
	}
	return fmt.Sprintf("%d kB", peak)
}

// usage is what processes have spent: CPU time, user and system, and the
// bytes they sent to storage; known is false where /proc could not tell.
type usage struct {
	cpu     time.Duration
	written int64
	known   bool
}

// usage adds up what the running bridges have spent so far.
func (f *fleet) usage() usage {
	u := usage{known: true}
	for _, p := range f.procs {
		if p == nil {
			continue
		}
		pu := procUsage(p.cmd.Process.Pid)
		if !pu.known {
			return usage{}
		}
		u.cpu += pu.cpu
		u.written += pu.written
	}
	return u
}

// procUsage reads what a process has spent from /proc: its CPU time from
// the utime and stime fields of stat, in the clock ticks of 1/100 s Linux
// counts them in for user space, and write_bytes from io.
func procUsage(pid int) usage {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return usage{}
	}
	// The fields after the command, in parentheses, whose name may hold
	// spaces and parentheses: state is the first, utime the 12th, stime
	// the 13th.
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 {
		return usage{}
	}
	fields := strings.Fields(string(stat[end+1:]))
	if len(fields) < 13 {
		return usage{}
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	ioStats, err3 := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err1 != nil || err2 != nil || err3 != nil {
		return usage{}
	}
	for _, line := range strings.Split(string(ioStats), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes:"); ok {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return usage{cpu: time.Duration(utime+stime) * 10 * time.Millisecond, written: n, known: true}
			}
		}
	}
	return usage{}
}

// String names the running bridges, for the report.
func (f *fleet) String() string {
	var each []string
	for i, p := range f.procs {
		if p != nil {
			each = append(each, fmt.Sprintf("pid %d on %s", p.cmd.Process.Pid, f.addrs[i]))
		}
	}
	if len(each) == 1 {
		return "bridge " + each[0]
	}
	return fmt.Sprintf("%d bridges: %s", len(each), strings.Join(each, ", "))
}

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

// pushConn is one keep-alive HTTP/1.1 connection to the bridge. It speaks
// just enough of the protocol for a POST and its answer, as wrk does, so
// that the load generator takes little of the CPU it shares with the
// bridge; a net/http client costs several times more a request.
type pushConn struct {
	addr string
	conn net.Conn
	r    *bufio.Reader
	buf  []byte
}

// post sends body to path and returns the answer's status, having read the
// answer whole. On any error the connection is closed; the next post dials
// again.
func (p *pushConn) post(path, body string) (status int, err error) {
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	if p.conn == nil {
		if p.conn, err = net.Dial("tcp", p.addr); err != nil {
			return 0, err
		}
		p.r = bufio.NewReader(p.conn)
	}
	p.conn.SetDeadline(time.Now().Add(10 * time.Second))
	p.buf = fmt.Appendf(p.buf[:0], "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s",
		path, p.addr, len(body), body)
	if _, err := p.conn.Write(p.buf); err != nil {
		return 0, err
	}
	line, err := p.r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	length, keep := -1, true
	for {
		line, err := p.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		h := bytes.TrimRight(line, "\r\n")
		if len(h) == 0 {
			break
		}
		name, value, _ := bytes.Cut(h, []byte(":"))
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil {
				return 0, fmt.Errorf("bad Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			return 0, fmt.Errorf("answer with Transfer-Encoding %q: not spoken here", value)
		case bytes.EqualFold(name, []byte("Connection")) && bytes.EqualFold(value, []byte("close")):
			keep = false
		}
	}
	if length < 0 {
		return 0, errors.New("answer without Content-Length")
	}
	if _, err := p.r.Discard(length); err != nil {
		return 0, err
	}
	if !keep {
		p.close()
	}
	return status, nil
}

func (p *pushConn) close() {
	if p.conn != nil {
		p.conn.Close()
		p.conn, p.r = nil, nil
	}
}

// pct returns the p-th percentile of sorted durations, rounded.
func pct(sorted []time.Duration, p int) string {
	if len(sorted) == 0 {
		return "n/a"
	}
	i := min(len(sorted)-1, len(sorted)*p/100)
	return sorted[i].Round(10 * time.Microsecond).String()
}

// peakKB reads a process's peak resident set size, in kB, from /proc; -1
// if it cannot.
func peakKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			if kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))); err == nil {
				return kb
			}
		}
	}
	return -1
}
