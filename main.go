// Command wechat-im-bridge lets a company answer the customers of its WeChat
// Official Account from Tencent Cloud IM.
//
// WeChat pushes each customer message to POST /wechat; the bridge commits it
// and answers at once, and its worker sends it into IM as a one-to-one
// message from the customer's own IM account to their agent. An agent's reply
// reaches POST /imcallback as C2C.CallbackAfterSendMsg, and the worker sends
// it to the customer with WeChat's customer-service message API.
//
// "wechat-im-bridge" serves with its configuration from the environment;
// "wechat-im-bridge demo" plays the whole flow offline against fake WeChat and
// IM servers; "demo -web" serves the same world to a browser (console.go). The load generator is a command of its own (cmd/loadgen).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	if err := run(ctx, os.Args[1:], os.LookupEnv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// defaultMemoryLimit is the heap's soft limit unless GOMEMLIMIT sets
// another ("off": none): as the heap nears it, the garbage collector runs
// sooner rather than let a burst's garbage double the heap, so a small VM
// keeps the process under 64 MB with a backlog of 70,000 customers'
// messages (docs/MEMORY.md). A heap whose live data exceeds it grows all the
// same, collected more often.
const defaultMemoryLimit = 40 << 20

// run is the whole program: "demo" plays the offline demo, "demo -web [ADDR]"
// serves the teaching console, no argument serves until ctx is done.
func run(ctx context.Context, args []string, lookupEnv func(string) (string, bool), stdout, stderr io.Writer) error {
	switch {
	case len(args) == 1 && args[0] == "demo":
		return runDemo(ctx, stdout, stderr)
	case len(args) >= 2 && len(args) <= 3 && args[0] == "demo" && args[1] == "-web":
		addr := consoleAddr
		if len(args) == 3 {
			addr = args[2]
		}
		return runConsole(ctx, addr, stdout, stderr)
	case len(args) > 0:
		return fmt.Errorf("usage: wechat-im-bridge [demo [-web [ADDR]]] (unknown arguments %q)", args)
	}
	cfg, err := loadConfig(lookupEnv)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return serve(ctx, cfg, ln, log)
}

// newLogger returns the logger LOG_FORMAT and LOG_LEVEL ask for.
func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// serve runs the bridge on ln until ctx is done: it opens the store, reads
// back the replies of a gap (recover.go) and the agents' presence
// (deskclock.go), starts the delivery worker, the desk's clock and the HTTP
// server, and on the way out stops taking requests, lets the worker
// finish its in-flight calls, and closes the store.
func serve(ctx context.Context, cfg Config, ln net.Listener, log *slog.Logger) error {
	defer ln.Close()
	st, err := openStore(ctx, cfg.DatabaseURL, storeOptions{PGConns: cfg.DatabaseMaxConns, PushWindow: pushWindow(cfg.WeChatPushMaxSkew),
		MediaDir: cfg.MediaDir})
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.BindApp(ctx, fmt.Sprintf("WeChat app %s with IM app %d", cfg.WeChatAppID, cfg.IMSDKAppID)); err != nil {
		return err
	}
	b, recovery, desk, err := newBridge(cfg, st, log)
	if err != nil {
		return err
	}
	// What is to be read back is known before the first callback is taken.
	if err := recovery.prepare(ctx); err != nil {
		return fmt.Errorf("reply recovery: %w", err)
	}
	// Who is online decides the first assignments.
	desk.readPresence(ctx)

	// The worker and recovery outlive ctx: they stop after the server.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	var work sync.WaitGroup
	work.Go(func() { b.worker.Run(workCtx) })
	work.Go(func() { recovery.Run(workCtx) })
	work.Go(func() { desk.Run(workCtx) })

	srv := &http.Server{
		Handler:           b.routes(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	if !cfg.IMCallbackAuth {
		log.Warn("IM callbacks are not authenticated (IM_CALLBACK_AUTH=off): anyone who can reach /imcallback can send customers messages")
	}
	if cfg.PublicURL == "" {
		log.Info("media crosses as text: set PUBLIC_URL for images to reach IM as images")
	}
	log.Info("listening", "addr", ln.Addr().String(), "agents", len(cfg.IMAgents))

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}
	// Stop taking requests (those in flight are answered), then let the
	// worker finish or hand back its deliveries.
	log.Info("stopping")
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	if serr := srv.Shutdown(shutCtx); serr != nil && err == nil {
		err = serr
	}
	stopWork()
	work.Wait()
	log.Info("stopped")
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// newBridge wires the bridge on st: the vendor clients, the worker, the
// handlers, the recovery of replies a gap left, and the desk's clock.
func newBridge(cfg Config, st *Store, log *slog.Logger) (*bridge, *replyRecovery, *deskClock, error) {
	now := time.Now
	if cfg.clock != nil {
		now = cfg.clock
	}
	httpc := &http.Client{
		Timeout:   cfg.VendorTimeout, // IM's backend gives up after 3 s; WeChat's API is as quick
		Transport: &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second},
	}
	im := &IMClient{Base: cfg.IMAPIBase, SDKAppID: cfg.IMSDKAppID, SecretKey: cfg.IMSecretKey, Admin: cfg.IMAdmin,
		HTTP: httpc, SigLifetime: 24 * time.Hour, Now: now, Shared: st.SharedCredential, RatePerAPI: cfg.IMRateLimit}
	wx := &WeChatClient{Base: cfg.WeChatAPIBase, AppID: cfg.WeChatAppID, AppSecret: cfg.WeChatAppSecret, HTTP: httpc, Now: now,
		Shared: st.SharedCredential}
	m := newMetrics(st)
	worker := newWorker(st, im, wx, log, m, now)
	worker.IMWindow, worker.MinBackoff, worker.MaxBackoff = cfg.IMDeliveryWindow, cfg.RetryMinDelay, cfg.RetryMaxDelay
	worker.StopGrace, worker.Agents, worker.IMDedup = cfg.ShutdownGrace, cfg.IMAgents, cfg.IMDedupWindow
	worker.PublicURL, worker.MediaRetention, worker.HistoryRetention = cfg.PublicURL, cfg.MediaRetention, cfg.HistoryRetention
	worker.Fetch = newFetcher(cfg.MediaFetchAllow, cfg.MediaFetchTimeout, st.mediaDir)
	// A claimed item is held long enough for the calls one delivery may make
	// (a token or account fetched first, then the call, then once more),
	// after its media is fetched.
	worker.Lease = 4*cfg.VendorTimeout + cfg.MediaFetchTimeout + 2*time.Second
	recovery := &replyRecovery{store: st, im: im, worker: worker, metrics: m, log: log, now: now, wake: make(chan struct{}, 1),
		agents: cfg.IMAgents, userPrefix: cfg.IMUserPrefix, minBackoff: cfg.RetryMinDelay, maxBackoff: cfg.RetryMaxDelay}
	b := &bridge{cfg: cfg, store: st, worker: worker, recovery: recovery, metrics: m, log: log, now: now}
	for _, k := range []string{cfg.WeChatAESKey, cfg.WeChatAESKeyPrevious} {
		if k != "" {
			key, err := parseEncodingAESKey(k)
			if err != nil {
				return nil, nil, nil, fmt.Errorf("WECHAT_AES_KEY: %w", err) // loadConfig checked it; never reached
			}
			b.aesKeys = append(b.aesKeys, key)
		}
	}
	st.SetDesk(&cfg.Desk)
	b.readPresence = make(chan struct{}, 1)
	desk := &deskClock{store: st, im: im, worker: worker, metrics: m, log: log, now: now, agents: cfg.IMAgents, idle: cfg.Desk.IdleTimeout,
		asked: b.readPresence, every: cfg.sweepEvery}
	return b, recovery, desk, nil
}
