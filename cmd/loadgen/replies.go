package main

// The agents' side of a load run (-replies): each message that reaches IM
// is answered by its agent from an IM client, and the run checks that every
// answer reaches the customer in WeChat, once and in order. IM calls the
// bridge back for each answer (the first bridge, with several); under
// -chaos the callbacks made while it is down fail, as IM's do, and only the
// bridge's recovery from IM's history brings those answers through.

import (
	"context"
	"fmt"
	"hash/fnv"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"wechat-im-bridge/fakes"
)

// loadCallbackToken signs IM's callbacks in a load run.
const loadCallbackToken = "load-callback-token"

// replyAgents is how many agents' clients send answers at once; a
// customer's answers are all sent by one of them, in order.
const replyAgents = 8

// replyTrial sends the agents' answers and follows them to WeChat.
type replyTrial struct {
	wx     *fakes.WeChat
	im     *fakes.IM
	prefix string // IM_USER_PREFIX
	queues [replyAgents]chan replyJob
	wg     sync.WaitGroup
	// closing is held to write to the queues (shared) and to close them.
	closing sync.RWMutex
	closed  bool

	mu       sync.Mutex
	sent     map[int64]time.Time // a message's seq → when its answer left the agent
	sentSeqs map[string][]int64  // a customer's answers, in the order sent
	got      map[int64]time.Time // seq → when WeChat first accepted its answer
	gotSeqs  map[string][]int64  // a customer's answers, in the order first accepted
	dupes    int
	failed   int // answers IM did not take from the agent
}

// replyJob is one answer to send.
type replyJob struct {
	agent, account, openid string
	seq                    int64
}

// newReplyTrial starts the agents' clients; they stop when ctx ends or
// after close.
func newReplyTrial(ctx context.Context, wx *fakes.WeChat, im *fakes.IM, prefix string) *replyTrial {
	rt := &replyTrial{wx: wx, im: im, prefix: prefix,
		sent: map[int64]time.Time{}, sentSeqs: map[string][]int64{}, got: map[int64]time.Time{}, gotSeqs: map[string][]int64{}}
	for i := range rt.queues {
		rt.queues[i] = make(chan replyJob, 1<<16)
		rt.wg.Go(func() {
			for job := range rt.queues[i] {
				if ctx.Err() == nil {
					rt.send(ctx, job)
				}
			}
		})
	}
	return rt
}

// answer queues the agent's answer to m, a customer's message numbered seq
// that reached the agent.
func (rt *replyTrial) answer(m fakes.Message, seq int64) {
	openid, ok := strings.CutPrefix(m.From, rt.prefix)
	if !ok {
		return
	}
	h := fnv.New32a()
	h.Write([]byte(openid))
	rt.closing.RLock()
	defer rt.closing.RUnlock()
	if !rt.closed {
		rt.queues[h.Sum32()%replyAgents] <- replyJob{agent: m.To, account: m.From, openid: openid, seq: seq}
	}
}

// send has the agent answer, as a client does, with "re" and the number of
// the message answered. The customer's message opened WeChat's window for
// the answer (the generator builds its pushes itself, so the fake is told).
func (rt *replyTrial) send(ctx context.Context, job replyJob) {
	rt.wx.Wrote(job.openid)
	at := time.Now()
	_, err := rt.im.SendAsAgent(ctx, job.agent, job.account, "re "+strconv.FormatInt(job.seq, 10))
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if err != nil {
		rt.failed++
		return
	}
	rt.sent[job.seq] = at
	rt.sentSeqs[job.openid] = append(rt.sentSeqs[job.openid], job.seq)
}

// delivered takes a customer-service message WeChat accepted.
func (rt *replyTrial) delivered(m fakes.CustomMessage) {
	seq, err := strconv.ParseInt(strings.TrimPrefix(m.Text, "re "), 10, 64)
	if err != nil {
		return
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if _, ok := rt.got[seq]; ok {
		rt.dupes++
		return
	}
	rt.got[seq] = m.At
	rt.gotSeqs[m.ToUser] = append(rt.gotSeqs[m.ToUser], seq)
}

// close sends no more answers once those queued are sent.
func (rt *replyTrial) close() {
	rt.closing.Lock()
	if !rt.closed {
		rt.closed = true
		for _, q := range rt.queues {
			close(q)
		}
	}
	rt.closing.Unlock()
	rt.wg.Wait()
}

// allDelivered reports whether every answer sent has reached WeChat.
func (rt *replyTrial) allDelivered() bool {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	for seq := range rt.sent {
		if _, ok := rt.got[seq]; !ok {
			return false
		}
	}
	return true
}

// deliveredCount returns how many answers have reached WeChat.
func (rt *replyTrial) deliveredCount() int {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return len(rt.got)
}

// report writes the trial's line and returns the answers lost, sent twice
// and out of order.
func (rt *replyTrial) report(w io.Writer) (lost, dupes, disordered int) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	var lat []time.Duration
	for seq, at := range rt.sent {
		if got, ok := rt.got[seq]; ok {
			lat = append(lat, max(got.Sub(at), 0))
		} else {
			lost++
		}
	}
	for openid, sent := range rt.sentSeqs {
		// The answers that arrived keep the order they were sent in.
		arrived := slices.DeleteFunc(slices.Clone(sent), func(seq int64) bool { _, ok := rt.got[seq]; return !ok })
		if !slices.Equal(arrived, rt.gotSeqs[openid]) {
			disordered++
		}
	}
	slices.Sort(lat)
	fmt.Fprintf(w, "agents' answers:       %d sent from IM clients (%d refused), reached WeChat p50 %s, p99 %s, max %s (from the agent's send)\n",
		len(rt.sent), rt.failed, pct(lat, 50), pct(lat, 99), pct(lat, 100))
	fmt.Fprintf(w, "answers lost:          %d; duplicated: %d; customers with answers out of order: %d\n", lost, rt.dupes, disordered)
	return lost, rt.dupes, disordered
}
