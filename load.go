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
	chaos := fs.Bool("chaos", false, "kill and restart the bridge while the pushes run, make IM fail by turns, and send unanswered pushes again")
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
	if *chaos && (*imRate > 0 || !*forwards) {
		return errors.New("load: -chaos delivers while the pushes run, and checks every forward: not with -im-rate or -forwards=false")
	}

	dt := &demoT{}
	defer dt.close()
	var (
		mu       sync.Mutex
		answered = map[int64]time.Time{} // message seq → when WeChat got its answer
		arrived  = map[int64]time.Time{} // message seq → when it reached IM
		dupes    int
	)
	agents := []string{"agent_1", "agent_2", "agent_3", "agent_4"}
	im := fakes.NewIM(dt, fakes.IMOptions{Accounts: agents, RateLimit: -1, OnMessage: func(m fakes.Message) {
		seq, err := strconv.ParseInt(strings.TrimPrefix(m.Text, "load "), 10, 64)
		if err != nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if _, ok := arrived[seq]; ok {
			dupes++
			return
		}
		arrived[seq] = m.Received
	}})
	wx := fakes.NewWeChat(dt, fakes.WeChatOptions{})
	dir, err := os.MkdirTemp("", "wechat-im-bridge-load-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if *database == "" {
		*database = "sqlite:" + filepath.Join(dir, "bridge.db")
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := ln.Addr().String()
	ln.Close()
	wo, imo := wx.Options(), im.Options()
	env := []string{
		"LISTEN_ADDR=" + addr, "DATABASE_URL=" + *database, "LOG_LEVEL=warn", "PATH=" + os.Getenv("PATH"),
		"WECHAT_TOKEN=" + wo.Token, "WECHAT_APPID=" + wo.AppID, "WECHAT_APPSECRET=" + wo.AppSecret, "WECHAT_API_BASE=" + wx.URL,
		"IM_SDKAPPID=" + fmt.Sprint(imo.SDKAppID), "IM_SECRET_KEY=" + imo.SecretKey, "IM_API_BASE=" + im.URL,
		"IM_AGENTS=" + strings.Join(agents, ","), "IM_CALLBACK_TOKEN=unused-in-load",
	}
	if *chaos {
		// Calls held past a second time out; retries come soon, and the
		// retries' warnings stay out of the report.
		env = append(env, "VENDOR_TIMEOUT=1s", "RETRY_MIN_DELAY=50ms", "RETRY_MAX_DELAY=1s")
		env[slices.Index(env, "LOG_LEVEL=warn")] = "LOG_LEVEL=error"
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
	base := "http://" + addr
	// startBridge runs the bridge, pacing its IM calls at rate a second
	// (0: unpaced), and returns once it is ready.
	startBridge := func(rate int) (*exec.Cmd, error) {
		cmd := exec.Command(exe)
		cmd.Env = append(env, "IM_RATE_LIMIT="+strconv.Itoa(rate))
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		if err := waitReady(ctx, base); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, err
		}
		return cmd, nil
	}
	cmd, err := startBridge(*imRate)
	if err != nil {
		return err
	}
	defer func() {
		if cmd != nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	paced := "unpaced"
	if *imRate > 0 {
		paced = fmt.Sprintf("paced at %d/s", *imRate)
	}
	what := fmt.Sprintf("%s, IM calls %s", strings.SplitN(*database, ":", 2)[0], paced)
	if *other != "" {
		what = "in its place " + *other
	}
	fmt.Fprintf(stdout, "load: %d connections, %d customers, %s, bridge pid %d on %s (%s), %d CPUs\n",
		*conns, *customers, *duration, cmd.Process.Pid, addr, what, runtime.NumCPU())

	var (
		seq      atomic.Int64
		nonces   atomic.Int64
		failures atomic.Int64 // pushes never answered 200
		resent   atomic.Int64 // pushes sent again after no answer (-chaos)
		waitsMu  sync.Mutex
		waits    []time.Duration
		// up is closed while the bridge serves; a restart puts an open one
		// in its place before the kill, so a push that failed waits for it.
		up atomic.Pointer[chan struct{}]
	)
	serving := make(chan struct{})
	close(serving)
	up.Store(&serving)
	stop := time.Now().Add(*duration)
	giveUp := stop.Add(30 * time.Second) // a push still unanswered then is a failure
	start := time.Now()
	var wg sync.WaitGroup
	for c := range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pc := &pushConn{addr: addr}
			defer pc.close()
			var mine []time.Duration
			type answer struct {
				n  int64
				at time.Time
			}
			var got []answer
			for i := 0; time.Now().Before(stop) && ctx.Err() == nil; i++ {
				n := seq.Add(1)
				openid := fmt.Sprintf("o_load_%06d", (c+i*(*conns))%*customers)
				created := strconv.FormatInt(time.Now().Unix(), 10)
				body := fmt.Sprintf("<xml><ToUserName><![CDATA[%s]]></ToUserName><FromUserName><![CDATA[%s]]></FromUserName>"+
					"<CreateTime>%s</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[load %d]]></Content><MsgId>%d</MsgId></xml>",
					wo.OAID, openid, created, n, 6000000000000000000+n)
				// WeChat signs each attempt anew; the body, and so the
				// push's key, stays the same.
				for attempt := 1; ; attempt++ {
					ts, nonce := strconv.FormatInt(time.Now().Unix(), 10), strconv.FormatInt(nonces.Add(1), 10)
					q := url.Values{"signature": {fakes.Sign(wo.Token, ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}, "openid": {openid}}
					t0 := time.Now()
					status, err := pc.post("/wechat?"+q.Encode(), body)
					t1 := time.Now()
					if err == nil && status == http.StatusOK {
						mine = append(mine, t1.Sub(t0))
						got = append(got, answer{n, t1})
						break
					}
					if !*chaos || attempt == 100 || t1.After(giveUp) || ctx.Err() != nil {
						failures.Add(1)
						break
					}
					resent.Add(1)
					select { // the bridge is back, if it was down
					case <-*up.Load():
					case <-ctx.Done():
					}
				}
			}
			waitsMu.Lock()
			waits = append(waits, mine...)
			waitsMu.Unlock()
			mu.Lock()
			for _, a := range got {
				answered[a.n] = a.at
			}
			mu.Unlock()
		}()
	}
	var kills, imFaults int
	if *chaos {
		faultsDone := make(chan struct{})
		go func() {
			defer close(faultsDone)
			imFaults = imChaos(ctx, im, stop)
		}()
		for i := 1; i <= chaosKills && ctx.Err() == nil; i++ {
			select {
			case <-time.After(time.Until(start.Add(*duration * time.Duration(i) / (chaosKills + 1)))):
			case <-ctx.Done():
				continue
			}
			down := make(chan struct{})
			up.Store(&down)
			cmd.Process.Kill()
			cmd.Wait()
			next, err := startBridge(0)
			close(down)
			if err != nil {
				cmd = nil
				wg.Wait()
				return fmt.Errorf("load: restart after a kill: %w", err)
			}
			cmd = next
			kills++
		}
		<-faultsDone
	}
	wg.Wait()
	elapsed := time.Since(start)

	mu.Lock()
	accepted, early := len(answered), len(arrived)
	mu.Unlock()
	peak := peakMemory(cmd.Process.Pid)
	drainStart := time.Now()
	if *imRate > 0 {
		// The backlog is delivered by a new bridge on the same database,
		// unpaced: the first one stops, handing back what it holds.
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if cmd, err = startBridge(0); err != nil {
			return fmt.Errorf("load: restart for the backlog: %w", err)
		}
	}
	if *forwards {
		drainCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
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
	}
	drained := time.Since(drainStart)
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()

	mu.Lock()
	defer mu.Unlock()
	var delivery []time.Duration
	lost := 0
	for n, at := range answered {
		if got, ok := arrived[n]; ok {
			// Under -chaos a push may reach IM before the answer to its
			// last attempt: an earlier attempt was committed, its answer
			// lost to a kill.
			delivery = append(delivery, max(got.Sub(at), 0))
		} else if *forwards {
			lost++
		}
	}
	slices.Sort(waits)
	slices.Sort(delivery)
	fmt.Fprintf(stdout, "pushes answered 200:   %d in %.1fs = %.0f pushes/s (%d failed)\n", accepted, elapsed.Seconds(), float64(accepted)/elapsed.Seconds(), failures.Load())
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
			kills, imFaults, resent.Load())
	}
	fmt.Fprintf(stdout, "forwards lost:         %d; duplicated: %d\n", lost, dupes)
	fmt.Fprintf(stdout, "bridge peak memory:    %s (VmHWM)\n", peak)
	if lost > 0 || failures.Load() > 0 {
		return fmt.Errorf("load: %d forwards lost, %d pushes failed", lost, failures.Load())
	}
	if dupes > 0 && *other == "" {
		// IM drops a repeated MsgSeq and MsgRandom: a duplicate means the
		// bridge sent one message as two.
		return fmt.Errorf("load: %d forwards duplicated", dupes)
	}
	return nil
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

// peakMemory reads a process's peak resident set size from /proc.
func peakMemory(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}
