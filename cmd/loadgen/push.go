package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync/atomic"
	"time"
	"wechat-im-bridge/fakes"
)

// pushers is what the pushing connections of a load run share.
type pushers struct {
	addrs            []string // the bridges' addresses
	token, oa        string   // WECHAT_TOKEN, and the Official Account's ID
	conns, customers int
	resend           bool      // send a push left without an answer again (-chaos)
	stop, giveUp     time.Time // when to push no more; when to stop resending
	// msgIDs is added to each push's number for its MsgId: one of its own
	// a run, so that a run on a database an earlier one used carries new
	// messages, not that run's again.
	msgIDs int64

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
			ps.oa, openid, created, n, ps.msgIDs+n)
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

// pct returns the p-th percentile of sorted durations, rounded.
func pct(sorted []time.Duration, p int) string {
	if len(sorted) == 0 {
		return "n/a"
	}
	i := min(len(sorted)-1, len(sorted)*p/100)
	return sorted[i].Round(10 * time.Microsecond).String()
}
