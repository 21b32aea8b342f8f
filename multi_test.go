package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"

	"wechat-im-bridge/fakes"
)

// roundRobin is a load balancer for tests: each request goes to the next
// backend in turn.
func roundRobin(t *testing.T, backends ...string) string {
	var proxies []*httputil.ReverseProxy
	for _, b := range backends {
		u, err := url.Parse(b)
		if err != nil {
			t.Fatal(err)
		}
		proxies = append(proxies, httputil.NewSingleHostReverseProxy(u))
	}
	var n atomic.Uint64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proxies[(n.Add(1)-1)%uint64(len(proxies))].ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestTwoBridgesOneDatabase runs two bridges on one PostgreSQL database
// behind one address: pushes and their retries spread over both forward
// once, each customer's messages keep their order, agents' replies through
// either arrive once and in order, and the two share one access_token and
// one UserSig.
func TestTwoBridgesOneDatabase(t *testing.T) {
	h := newHarness(t, harnessOptions{postgres: true, agents: []string{"agent_kim", "agent_lee"},
		wechat: fakes.WeChatOptions{QuotaPerMessage: 20}, env: map[string]string{"WECHAT_REPLY_QUOTA": "20"}}) // the older quota, so ten replies fit one window
	second, _ := startBridge(t, h.env, h.logs)
	lb := roundRobin(t, h.base, second)
	h.wx.SetTarget(lb + "/wechat")
	h.im.SetCallbackURL(lb + "/imcallback")
	ctx := context.Background()

	// One push, delivered three times: each delivery reaches the other
	// bridge than the last.
	push := h.wx.MessageXML("o_retry", "text", map[string]string{"Content": "once"})
	for range 3 {
		if r := h.wx.Push(ctx, push); r.Status != 200 {
			t.Fatalf("push got %d %q", r.Status, r.Body)
		}
	}

	h.burst(4, 12)
	h.checkBurst(4, 12)
	eventually(t, "the retried push in IM", func() bool { return len(h.messagesTo("agent_kim"))+len(h.messagesTo("agent_lee")) == 1+4*12 })
	n := 0
	for _, m := range h.im.Messages() {
		if m.From == customerIM("o_retry") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("the retried push reached IM %d times, want once", n)
	}

	// Agents reply; IM's callbacks alternate between the bridges.
	for i := range 10 {
		if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(burstOpenID(0)), fmt.Sprintf("reply %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "every reply in WeChat", func() bool { return len(h.sentTo(burstOpenID(0))) == 10 })
	for i, m := range h.sentTo(burstOpenID(0)) {
		if want := fmt.Sprintf("reply %d", i); m.Text != want {
			t.Errorf("reply %d reads %q, want %q", i, m.Text, want)
		}
	}

	if n := len(h.wx.RequestsTo("/cgi-bin/stable_token")); n != 1 {
		t.Errorf("the two bridges fetched the access_token %d times, want once", n)
	}
	sigs := map[string]bool{}
	for _, r := range h.im.Requests() {
		sigs[r.Query.Get("usersig")] = true
	}
	if len(sigs) != 1 {
		t.Errorf("the two bridges used %d UserSigs, want one", len(sigs))
	}
}

// TestSchemaAppliedByInstancesStartingTogether opens four stores at once on
// a fresh PostgreSQL schema.
func TestSchemaAppliedByInstancesStartingTogether(t *testing.T) {
	url := testPostgres(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := openStore(context.Background(), url, storeOptions{})
			if err == nil {
				st.Close()
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// One connection to PostgreSQL is enough for every path: nothing waits for
// a second connection while it holds one, so a small DATABASE_MAX_CONNS
// slows the bridge down but never stops it.
func TestPostgresOneConnection(t *testing.T) {
	h := newHarness(t, harnessOptions{postgres: true, env: map[string]string{"DATABASE_MAX_CONNS": "1"}})
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	if _, err := h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the answer in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
}

// The store opens as many connections to PostgreSQL as it is told, and
// defaultPGConns when told nothing.
func TestPostgresPoolSize(t *testing.T) {
	url := testPostgres(t)
	for _, tc := range []struct{ conns, want int }{{0, defaultPGConns}, {3, 3}} {
		st, err := openStore(context.Background(), url, storeOptions{PGConns: tc.conns})
		if err != nil {
			t.Fatal(err)
		}
		if got := st.db.Stats().MaxOpenConnections; got != tc.want {
			t.Errorf("openStore(…, %d): got at most %d connections, want %d", tc.conns, got, tc.want)
		}
		st.Close()
	}
}
