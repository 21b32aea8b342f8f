package main

// The teaching console: `go run . demo -web` serves the demo's offline world
// to a browser, on a listener of its own (the bridge's server never serves
// it). The page (console/) shows the customer in a WeChat-like chat, the
// agents in an IM-like view, and between them the wire: every HTTP request
// between WeChat, the bridge and IM with its answer (consolewire.go). The
// learner acts on either side; each action runs here against the fakes, as
// the customer's WeChat or the agent's IM client would, and the page is
// told of what changed by Server-Sent Events.

import (
	"context"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"mime"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"wechat-im-bridge/fakes"
)

//go:embed console
var consoleFiles embed.FS

// consoleAddr is where the console listens unless -web names another.
const consoleAddr = "127.0.0.1:8090"

// consoleEnv is the console world's configuration on top of the demo's:
// retries and IM's delivery window short enough to watch them end.
var consoleEnv = map[string]string{"RETRY_MIN_DELAY": "1s", "RETRY_MAX_DELAY": "4s", "IM_DELIVERY_WINDOW": "20s"}

// maxWire is how many exchanges the console keeps of one world.
const maxWire = 400

// runConsole serves the console on addr until ctx is done.
func runConsole(ctx context.Context, addr string, stdout, stderr io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	fmt.Fprintf(stdout, "wechat-im-bridge console: open http://%s/ in a browser (Ctrl-C stops it)\n", ln.Addr())
	return serveConsole(ctx, ln, stderr)
}

// serveConsole starts a world and serves the console on ln until ctx is done.
func serveConsole(ctx context.Context, ln net.Listener, stderr io.Writer) error {
	return newConsole(stderr, consoleEnv).runOn(ctx, ln)
}

// console is the demo world the page shows and what it has seen of it.
type console struct {
	log  *slog.Logger
	env  map[string]string // the bridge's configuration on top of the demo's
	pace time.Duration     // the tutorial's pause at each step
	ctx  context.Context   // the console's life
	// hosts, if set, are the Host headers the console answers: its own
	// loopback names, so that no other site's name rebound to 127.0.0.1
	// reaches it.
	hosts []string
	act   sync.Mutex // one action at a time; a reset waits for the one under way
	// queued counts the actions started and not done.
	queued atomic.Int32

	mu       sync.Mutex
	world    *demoWorld
	db       *sql.DB            // the bridge's database, read only: its outbox and queue
	stop     context.CancelFunc // ends the world's actions
	wctx     context.Context
	gen      int // the world's number: hooks of an older world are ignored
	seq      int
	wire     []wireEntry
	chats    map[string][]chatLine // what each customer sees, by openid
	followed map[string]bool
	secrets  wireSecrets // the world's, to open and check what the wire shows
	safe     bool
	imDown   bool
	playing  bool
	changed  chan struct{} // closed and replaced at each change
}

// newConsole is a console whose worlds' bridges take env on top of the
// demo's configuration, and log their errors to stderr.
func newConsole(stderr io.Writer, env map[string]string) *console {
	return &console{log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError})),
		env: env, pace: 1500 * time.Millisecond, changed: make(chan struct{})}
}

// runOn starts a world and serves the console on ln until ctx is done.
func (c *console) runOn(ctx context.Context, ln net.Listener) error {
	c.ctx = ctx
	if addr, ok := ln.Addr().(*net.TCPAddr); ok && addr.IP.IsLoopback() {
		port := strconv.Itoa(addr.Port)
		c.hosts = []string{"127.0.0.1:" + port, "localhost:" + port, "[::1]:" + port}
	}
	defer c.shut()
	if err := c.reset(ctx); err != nil {
		ln.Close()
		return err
	}
	srv := &http.Server{Handler: c.routes(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// reset replaces the world by a new one, after the action under way.
func (c *console) reset(ctx context.Context) error {
	c.interrupt()
	c.act.Lock()
	defer c.act.Unlock()
	c.closeWorld()
	c.mu.Lock()
	c.gen++
	gen := c.gen
	c.wire, c.chats, c.followed = nil, map[string][]chatLine{}, map[string]bool{}
	c.safe, c.imDown, c.playing = false, false, false
	sec := wireSecrets{WeChatToken: randomToken(), AppID: "wx0123456789abcdef", AESKey: newEncodingAESKey(), IMCallbackToken: randomToken()}
	c.secrets = sec
	c.touch()
	c.mu.Unlock()

	env := map[string]string{"WECHAT_AES_KEY": sec.AESKey}
	maps.Copy(env, c.env)
	w, err := startWorld(ctx,
		fakes.WeChatOptions{Token: sec.WeChatToken, AppID: sec.AppID, EncodingAESKey: sec.AESKey,
			Wire: c.onWire(gen), OnPush: c.onPush(gen), OnSend: c.onSend(gen)},
		fakes.IMOptions{CallbackToken: sec.IMCallbackToken, Wire: c.onWire(gen)}, env, c.log)
	if err != nil {
		return err
	}
	path, _ := sqlitePath(w.cfg.DatabaseURL)
	db, err := sql.Open("sqlite", "file:"+fileURIPath(filepath.ToSlash(path))+"?mode=ro&_pragma=busy_timeout(1000)")
	if err != nil {
		w.close()
		return err
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	c.mu.Lock()
	c.world, c.db, c.wctx, c.stop = w, db, wctx, stop
	c.touch()
	c.mu.Unlock()
	// The operator saves the URL in WeChat's console first: WeChat checks
	// it with a signed GET whose echostr the bridge must echo.
	if err := w.wx.Verify(ctx); err != nil {
		c.note(gen, "error", err.Error())
	}
	return nil
}

// shut ends the action under way and stops the world, for good.
func (c *console) shut() {
	c.interrupt()
	c.act.Lock()
	defer c.act.Unlock()
	c.closeWorld()
}

// interrupt ends the world's actions: the one under way returns soon.
func (c *console) interrupt() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stop != nil {
		c.stop()
	}
}

// closeWorld stops the world. c.act is held.
func (c *console) closeWorld() {
	c.mu.Lock()
	w, db := c.world, c.db
	c.world, c.db, c.stop = nil, nil, nil
	c.mu.Unlock()
	if db != nil {
		db.Close()
	}
	if w != nil {
		if err := w.close(); err != nil {
			c.log.Error("console: the world ended badly", "err", err)
		}
	}
}

// newEncodingAESKey is a random EncodingAESKey: 43 letters and digits, as
// WeChat's console makes one.
func newEncodingAESKey() string {
	const chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 43)
	rand.Read(b)
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return string(b)
}

// routes are the console's: the page, its script and style, the stream of
// changes, and the actions.
func (c *console) routes() http.Handler {
	mux := http.NewServeMux()
	page := template.Must(template.ParseFS(consoleFiles, "console/index.html"))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		page.Execute(w, consolePage{Customers: []string{demoCustomer, demoSecondCustomer}, Agents: []string{demoAgent, demoSecondAgent}})
	})
	static, _ := fs.Sub(consoleFiles, "console")
	mux.Handle("GET /console.js", http.FileServerFS(static))
	mux.Handle("GET /console.css", http.FileServerFS(static))
	mux.HandleFunc("GET /events", c.handleEvents)
	mux.HandleFunc("POST /act", c.handleAct)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c.hosts != nil && !slices.Contains(c.hosts, r.Host) {
			http.Error(w, "the console answers to its own address only", http.StatusMisdirectedRequest)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// consolePage is what the page's template is given.
type consolePage struct {
	Customers, Agents []string
}

// handleEvents streams the world to the page: "reset" when a new world
// starts, "wire" for each exchange, "state" when the panes change.
func (c *console) handleEvents(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	send := func(event string, v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b)
	}
	gen, sent := -1, 0
	var last []byte
	tick := time.NewTicker(400 * time.Millisecond) // the outbox changes without telling
	defer tick.Stop()
	for {
		c.mu.Lock()
		g, wire, changed := c.gen, c.wire, c.changed
		c.mu.Unlock()
		if g != gen {
			gen, sent, last = g, 0, nil
			send("reset", g)
		}
		for _, e := range wire {
			if e.Seq > sent {
				send("wire", e)
				sent = e.Seq
			}
		}
		if st, err := json.Marshal(c.state(r.Context())); err == nil && string(st) != string(last) {
			fmt.Fprintf(w, "event: state\ndata: %s\n\n", st)
			last = st
		}
		flusher.Flush()
		select {
		case <-r.Context().Done():
			return
		case <-c.ctx.Done():
			return
		case <-changed:
		case <-tick.C:
		}
	}
}

// consoleAction is what the page asks for: Do, by Who (an openid or an
// agent), with Text or To (the customer an agent writes to) where it needs
// them.
type consoleAction struct {
	Do   string `json:"do"`
	Who  string `json:"who"`
	To   string `json:"to"`
	Text string `json:"text"`
}

// maxQueued bounds the actions waiting their turn.
const maxQueued = 16

// handleAct starts an action and answers 202; what it does reaches the
// page through the stream. Only the console's page may act: the body must
// be JSON, which a page of another origin cannot send without the
// browser asking the console first, and an Origin must be the console's.
func (c *console) handleAct(w http.ResponseWriter, r *http.Request) {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		http.Error(w, "an action is JSON", http.StatusUnsupportedMediaType)
		return
	}
	if origin := r.Header.Get("Origin"); origin != "" && origin != "http://"+r.Host {
		http.Error(w, "actions come from the console's page", http.StatusForbidden)
		return
	}
	var a consoleAction
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		http.Error(w, "bad action: "+err.Error(), http.StatusBadRequest)
		return
	}
	if _, err := dec.Token(); err != io.EOF {
		http.Error(w, "bad action: more than one JSON value", http.StatusBadRequest)
		return
	}
	run, err := c.action(a)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if c.queued.Add(1) > maxQueued {
		c.queued.Add(-1)
		http.Error(w, "too many actions waiting: try again when they are done", http.StatusTooManyRequests)
		return
	}
	go func() {
		defer c.queued.Add(-1)
		run()
	}()
	w.WriteHeader(http.StatusAccepted)
}

// action returns what runs a: a reset, or an action in the world under way
// when it was asked for, one at a time, whose failure is shown on the wire.
func (c *console) action(a consoleAction) (func(), error) {
	if a.Do == "reset" || a.Do == "tutorial" {
		return func() {
			ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
			defer cancel()
			if err := c.reset(ctx); err != nil {
				c.log.Error("console: reset", "err", err)
				return
			}
			if a.Do == "tutorial" {
				gen, _ := c.current()
				c.inWorld(gen, c.tutorial)
			}
		}, nil
	}
	do, ok := consoleActions[a.Do]
	if !ok {
		return nil, fmt.Errorf("unknown action %q", a.Do)
	}
	c.mu.Lock()
	gen, prefix, follows := c.gen, "wx_", c.followed[a.Who]
	if c.world != nil {
		prefix = c.world.cfg.IMUserPrefix
	}
	c.mu.Unlock()
	if err := a.check(prefix, follows); err != nil {
		return nil, err
	}
	return func() {
		c.inWorld(gen, func(ctx context.Context, w *demoWorld, gen int) error { return do(c, ctx, w, a) })
	}, nil
}

// current is the number of the world under way and its secrets.
func (c *console) current() (gen int, sec wireSecrets) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen, c.secrets
}

// inWorld runs f in world gen after the action before it, unless a reset
// has replaced that world, and shows f's error on the wire.
func (c *console) inWorld(gen int, f func(ctx context.Context, w *demoWorld, gen int) error) {
	c.act.Lock()
	defer c.act.Unlock()
	c.mu.Lock()
	w, wctx, now := c.world, c.wctx, c.gen
	c.mu.Unlock()
	if w == nil || now != gen || wctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(wctx, 2*time.Minute)
	defer cancel()
	if err := f(ctx, w, gen); err != nil && wctx.Err() == nil {
		c.note(gen, "error", err.Error())
	}
}

// tutorial plays the demo's steps at a pace a reader can follow.
func (c *console) tutorial(ctx context.Context, w *demoWorld, gen int) error {
	c.set(gen, func() { c.playing = true })
	defer c.set(gen, func() { c.playing = false })
	client := func(who string) *http.Client { return fakes.WiredClient(c.onWire(gen), who, "bridge", 5*time.Second) }
	return playTutorial(ctx, w, client, func(line string) {
		if title, ok := strings.CutPrefix(line, "── "); ok {
			c.note(gen, "step", title)
			t := time.NewTimer(c.pace)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		}
	})
}

// set runs f under c.mu if gen is the world under way, and tells the page.
func (c *console) set(gen int, f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen == c.gen {
		f()
		c.touch()
	}
}

// touch tells the page's streams that something changed. c.mu is held.
func (c *console) touch() {
	close(c.changed)
	c.changed = make(chan struct{})
}
