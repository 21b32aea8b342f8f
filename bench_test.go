package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// BenchmarkWebhook measures the webhook path: a signed text push in, its
// work committed to the store, the answer written. No vendor is called.
func BenchmarkWebhook(b *testing.B) {
	for _, store := range []string{"sqlite", "postgres"} {
		b.Run(store, func(b *testing.B) {
			push := webhookPushes(b, openTestStore(b, store))
			// Each customer's first message opens a conversation, which
			// takes locks a later one does not; measured alone, those first
			// thousand would make the figure depend on b.N. They are sent
			// before the timer starts, so that it measures customers the
			// bridge knows.
			var wg sync.WaitGroup
			var warm atomic.Int64
			for range 32 {
				wg.Go(func() {
					for warm.Add(1) <= 1000 {
						if err := push(); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			if b.Failed() {
				b.FailNow()
			}
			b.ReportAllocs()
			b.SetParallelism(16) // 32 concurrent pushes on 2 cores, as in the load run
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := push(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// webhookPushes returns a function that sends the next signed text push
// through a bridge's routes on st, from one of a thousand customers, as on
// a busy afternoon. No vendor is called.
func webhookPushes(b *testing.B, st *Store) func() error {
	cfg := Config{WeChatToken: "token123", IMUserPrefix: "wx_", IMAgents: []string{"agent_kim"},
		WeChatPushMaxSkew: 5 * time.Minute, WelcomeText: "w", ConnectingText: "c"}
	m := newMetrics(st)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	br := &bridge{cfg: cfg, store: st, worker: &Worker{wake: make(chan struct{}, 1)}, metrics: m, log: log, now: time.Now}
	h := br.routes()
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	var seq atomic.Int64
	return func() error {
		i := seq.Add(1)
		nonce := strconv.FormatInt(i, 10)
		q := url.Values{"signature": {fakes.Sign("token123", ts, nonce)}, "timestamp": {ts}, "nonce": {nonce}}
		body := fmt.Sprintf("<xml><ToUserName><![CDATA[gh_x]]></ToUserName><FromUserName><![CDATA[o_customer_%d]]></FromUserName>"+
			"<CreateTime>%s</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>%d</MsgId></xml>",
			i%1000, ts, i)
		req := httptest.NewRequest(http.MethodPost, "/wechat?"+q.Encode(), strings.NewReader(body))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			return fmt.Errorf("got %d %s", rec.Code, rec.Body)
		}
		return nil
	}
}

// BenchmarkDelivery measures the outbox's part of a delivery: a lane head
// claimed and, once delivered, recorded done, its lane's next item made the
// head; no vendor is called. Eight goroutines a processor (sixteen on two
// cores) do this at once, over a thousand customers' queues, so that on
// SQLite the writer commits their writes together, as it does a busy
// bridge's (on PostgreSQL their claims meet, and some take nothing and
// claim again). cpu-µs/op is the process's CPU time an item.
func BenchmarkDelivery(b *testing.B) {
	for _, store := range []string{"sqlite", "postgres"} {
		b.Run(store, func(b *testing.B) {
			st := openTestStore(b, store)
			ctx, now := context.Background(), time.Now()
			err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
				for i := range b.N + 64 {
					d := Delivery{Kind: deliverIMSend, OpenID: fmt.Sprint("o", i%1000), IMUser: fmt.Sprint("wx_o", i%1000),
						Agent: "agent_kim", Text: "hello, I would like to ask about my order", MsgSeq: uint32(i), MsgRandom: 7}
					if err := st.enqueue(ctx, tx, d, now); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			var owners atomic.Int64
			b.SetParallelism(8)
			b.ResetTimer()
			cpu := processCPU()
			b.RunParallel(func(pb *testing.PB) {
				owner := fmt.Sprint("w", owners.Add(1))
				for pb.Next() {
					// On PostgreSQL a claim that met another's takes
					// nothing; the worker would look again.
					var items []OutboxItem
					var err error
					for try := 0; err == nil && len(items) == 0; try++ {
						if try == 100 {
							err = errors.New("100 claims took nothing")
							break
						}
						items, err = st.Claim(ctx, owner, now, time.Minute, 1)
					}
					if err == nil {
						err = st.Delivered(ctx, items, now)
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(processCPU()-cpu)/float64(b.N)/float64(time.Microsecond), "cpu-µs/op")
		})
	}
}

// processCPU is the CPU time, user and system, the process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRoundTrip measures one whole round trip against the fakes: a
// customer's message from WeChat into IM, and the agent's reply from IM to
// WeChat, one after the other.
//
// With history=20000 the customer wrote and was answered 10,000 times three
// days before: what a message and its reply cost must not grow with what
// the customer said long ago.
func BenchmarkRoundTrip(b *testing.B) {
	for _, old := range []int{0, 20_000} {
		b.Run(fmt.Sprintf("history=%d", old), func(b *testing.B) { benchmarkRoundTrip(b, old) })
	}
}

func benchmarkRoundTrip(b *testing.B, old int) {
	// The fakes signal each message as it lands: waiting on them costs
	// nothing that grows with the messages before.
	toAgent, toCustomer := make(chan struct{}, 1), make(chan struct{}, 1)
	signal := func(ch chan struct{}) {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	h := newHarness(b, harnessOptions{
		wechat: fakes.WeChatOptions{QuotaPerMessage: 1 << 30, OnSend: func(fakes.CustomMessage) { signal(toCustomer) }},
		im: fakes.IMOptions{RateLimit: -1, OnMessage: func(m fakes.Message) {
			if m.To == "agent_kim" {
				signal(toAgent)
			}
		}},
		env: map[string]string{"IM_RATE_LIMIT": "0", "WECHAT_REPLY_QUOTA": "1000000000"}})
	if old > 0 {
		db := h.openStoreDB(true)
		tx, err := db.Begin()
		if err != nil {
			b.Fatal(err)
		}
		then := time.Now().Add(-72 * time.Hour).UnixMilli()
		for i := range old {
			direction := []string{"in", "out"}[i%2]
			if _, err := tx.Exec(`INSERT INTO messages (conversation, openid, direction, agent, text, state, created_at)
				VALUES (0, ?, ?, 'agent_kim', 'an older exchange', 'queued', ?)`, customer, direction, then+int64(i)); err != nil {
				b.Fatal(err)
			}
		}
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
		db.Close()
	}
	ctx := context.Background()
	wait := func(ch chan struct{}, what string) {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			b.Fatal(what)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		h.wx.SendText(ctx, customer, "q"+strconv.Itoa(i))
		wait(toAgent, "the message did not reach IM")
		h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "a"+strconv.Itoa(i))
		wait(toCustomer, "the reply did not reach WeChat")
	}
}

// BenchmarkPushDuringPrune measures what a prune costs the pushes that
// arrive while it runs: a history of 100,000 messages, 20,000 closed
// conversations and 100,000 delivered items, all past their cutoff, is
// pruned while sixteen goroutines push. max-stall-ms is the longest a push
// took, p99-ms its 99th percentile, prune-s how long the prune took; batch
// is the rows a write (all: the whole prune in one write, each table's).
// Run it with -benchtime=1x: each iteration seeds and prunes anew.
func BenchmarkPushDuringPrune(b *testing.B) {
	for _, store := range []string{"sqlite", "postgres"} {
		for _, batch := range []int{pruneBatch, 1 << 30} {
			name := fmt.Sprintf("%s/batch=%d", store, batch)
			if batch == 1<<30 {
				name = store + "/batch=all"
			}
			b.Run(name, func(b *testing.B) {
				defer func(n int) { pruneBatch = n }(pruneBatch)
				pruneBatch = batch
				st := openTestStore(b, store)
				push := webhookPushes(b, st)
				ctx := context.Background()
				var stalls []time.Duration
				var pruning time.Duration
				for range b.N {
					seedHistory(b, st, 100_000, 20_000)
					done := make(chan struct{})
					var mu sync.Mutex
					var wg sync.WaitGroup
					for range 16 {
						wg.Go(func() {
							for {
								select {
								case <-done:
									return
								default:
								}
								start := time.Now()
								if err := push(); err != nil {
									b.Error(err)
									return
								}
								mu.Lock()
								stalls = append(stalls, time.Since(start))
								mu.Unlock()
							}
						})
					}
					start := time.Now()
					_, _, err := st.PruneHistory(ctx, time.Now().Add(-time.Hour))
					if err == nil {
						_, err = st.PruneOutbox(ctx, time.Now().Add(-time.Hour))
					}
					pruning += time.Since(start)
					close(done)
					wg.Wait()
					if err != nil {
						b.Fatal(err)
					}
				}
				slices.Sort(stalls)
				if len(stalls) == 0 {
					b.Fatal("no push was made while the prune ran")
				}
				b.ReportMetric(float64(stalls[len(stalls)-1])/1e6, "max-stall-ms")
				b.ReportMetric(float64(stalls[len(stalls)*99/100])/1e6, "p99-ms")
				b.ReportMetric(pruning.Seconds()/float64(b.N), "prune-s")
			})
		}
	}
}

// seedHistory writes, made two hours ago, messages finished messages and
// conversations closed conversations, and as many delivered outbox items as
// messages, ids following those there are.
func seedHistory(b *testing.B, st *Store, messages, conversations int) {
	b.Helper()
	ctx := context.Background()
	made := time.Now().Add(-2 * time.Hour).UnixMilli()
	for done := 0; done < messages; done += 10_000 {
		err := st.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			for i := done; i < min(done+10_000, messages); i++ {
				openid := fmt.Sprint("o_old_", i%conversations)
				if _, err := st.exec(ctx, tx, `INSERT INTO messages (conversation, openid, direction, text, state, created_at)
					VALUES (?, ?, 'in', 'a message of an older year, of some length as they are', 'queued', ?)`, i%conversations, openid, made); err != nil {
					return err
				}
				if _, err := st.exec(ctx, tx, `INSERT INTO outbox (lane, delivery, state, next_at, created_at, updated_at)
					VALUES (?, '{"kind":"im_send","text":"a message of an older year"}', 'done', ?, ?, ?)`, "im:"+openid, made, made, made); err != nil {
					return err
				}
				if i < conversations {
					if _, err := st.exec(ctx, tx, `INSERT INTO conversations (openid, agent, opened_at, closed_at) VALUES (?, 'agent_kim', ?, ?)`,
						openid, made, made); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}
