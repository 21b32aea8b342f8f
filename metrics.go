package main

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the bridge's Prometheus metrics, on a registry of its own so
// that several bridges in one process (the tests) keep theirs apart.
type metrics struct {
	reg             *prometheus.Registry
	pushes          *prometheus.CounterVec   // by type and outcome
	callbacks       *prometheus.CounterVec   // by outcome
	deliveries      *prometheus.CounterVec   // by target and outcome
	retries         *prometheus.CounterVec   // by target
	deadLetters     *prometheus.CounterVec   // by target
	uncertain       *prometheus.CounterVec   // attempts after one of unknown outcome, by target and outcome
	webhookLatency  *prometheus.HistogramVec // by endpoint
	deliveryLatency *prometheus.HistogramVec // accepted to delivered, by target
	wait            prometheus.Histogram     // a customer's wait for an agent
	firstReply      prometheus.Histogram     // a conversation given to an agent, to their first reply
	ratings         *prometheus.CounterVec   // by rating, 1 to 5
	sweeps          prometheus.Counter       // the desk's sweeps done
}

// newMetrics registers the bridge's metrics; the outbox gauges read st at
// each scrape.
func newMetrics(st *Store) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_wechat_pushes_total",
			Help: "WeChat pushes by MsgType (or event) and outcome: accepted, duplicate, ignored, refused, failed."},
			[]string{"type", "outcome"}),
		callbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_im_callbacks_total",
			Help: "IM callbacks by outcome: forwarded, duplicate, ignored, refused, failed; deferred: replies kept in deferred_replies until their conversation's history is read; recovered: agents' replies read back from IM's history after a gap; unrecovered: conversations whose history could not be read."}, []string{"outcome"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_deliveries_total",
			Help: "Delivery attempts by target (im, wechat) and outcome: delivered, retry, dead."}, []string{"target", "outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_delivery_retries_total",
			Help: "Failed delivery attempts that will be retried, by target."}, []string{"target"}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_dead_letters_total",
			Help: "Deliveries given up on and kept as dead letters, by target."}, []string{"target"}),
		uncertain: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_uncertain_attempts_total",
			Help: "Attempts after an earlier one whose outcome was not known, past IM's deduplication: im found (IM had the message: recorded delivered, not sent again), im absent (sent again), wechat resent (sent again: the customer may read it twice)."},
			[]string{"target", "outcome"}),
		webhookLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "bridge_webhook_duration_seconds",
			Help:    "Time to answer a WeChat push or IM callback.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}}, []string{"endpoint"}),
		deliveryLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "bridge_delivery_latency_seconds",
			Help:    "Time from a message's acceptance to its delivery, by target.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200}}, []string{"target"}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "bridge_customer_wait_seconds",
			Help:    "How long a new conversation waited for an agent; 0 for one given an agent at once.",
			Buckets: []float64{1, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600}}),
		firstReply: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "bridge_first_reply_seconds",
			Help:    "Time from a conversation given to an agent to the agent's first reply in it.",
			Buckets: []float64{5, 15, 30, 60, 120, 300, 600, 1800, 3600}}),
		ratings: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bridge_ratings_total",
			Help: "Customers' ratings of ended conversations, by rating (1 to 5)."}, []string{"rating"}),
		sweeps: prometheus.NewCounter(prometheus.CounterOpts{Name: "bridge_desk_sweeps_total",
			Help: "Sweeps of the desk done: idle conversations closed, conversations agents left requeued, the queue drained."}),
	}
	m.reg.MustRegister(m.pushes, m.callbacks, m.deliveries, m.retries, m.deadLetters, m.uncertain, m.webhookLatency, m.deliveryLatency,
		m.wait, m.firstReply, m.ratings, m.sweeps,
		outboxCollector{st: st,
			depth:  prometheus.NewDesc("bridge_outbox_depth", "Deliveries not yet made.", nil, nil),
			oldest: prometheus.NewDesc("bridge_outbox_oldest_age_seconds", "Age of the oldest delivery not yet made; 0 when there is none.", nil, nil),
			dead:   prometheus.NewDesc("bridge_dead_letters", "Dead letters kept in the store.", nil, nil),
			up:     prometheus.NewDesc("bridge_store_up", "1 if the store was read for this scrape; 0 if not, and then the outbox gauges are absent.", nil, nil),
		},
		deskCollector{st: st,
			waiting: prometheus.NewDesc("bridge_customers_waiting", "Customers waiting for an agent.", nil, nil),
			open:    prometheus.NewDesc("bridge_agent_open_conversations", "Open conversations by agent.", []string{"agent"}, nil),
			online:  prometheus.NewDesc("bridge_agent_online", "1 if IM last said the agent is online (or said nothing), else 0.", []string{"agent"}, nil),
		},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// handler serves the metrics in the Prometheus text format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// timed records how long h takes to answer, as endpoint.
func (m *metrics) timed(endpoint string, h http.Handler) http.Handler {
	o := m.webhookLatency.WithLabelValues(endpoint)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		h.ServeHTTP(w, r)
		o.Observe(time.Since(start).Seconds())
	})
}

// assigned records the waits of customers given an agent.
func (m *metrics) assigned(as []Assignment) {
	for _, a := range as {
		m.wait.Observe(a.Waited.Seconds())
	}
}

// target is the vendor a delivery kind goes to, as metrics label it.
func target(kind string) string {
	if kind == deliverWeChat {
		return "wechat"
	}
	return "im"
}

// outboxCollector reports the outbox's gauges, all three from one read of
// the store a scrape: on SQLite, counting the pending items reads the
// whole outbox.
type outboxCollector struct {
	st                      *Store
	depth, oldest, dead, up *prometheus.Desc
}

func (c outboxCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.oldest
	ch <- c.dead
	ch <- c.up
}

func (c outboxCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := c.st.Stats(ctx)
	if err != nil {
		// No figure rather than a false zero: an alert on the outbox's age
		// must not go quiet because the store cannot be read.
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	age := 0.0
	if !s.OldestSince.IsZero() {
		age = time.Since(s.OldestSince).Seconds()
	}
	ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(s.Pending))
	ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, age)
	ch <- prometheus.MustNewConstMetric(c.dead, prometheus.GaugeValue, float64(s.Failed))
}

// deskCollector reports who waits and who serves, read from the store at
// each scrape.
type deskCollector struct {
	st                    *Store
	waiting, open, online *prometheus.Desc
}

func (c deskCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.waiting
	ch <- c.open
	ch <- c.online
}

func (c deskCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	d, err := c.st.DeskStats(ctx)
	if err != nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.waiting, prometheus.GaugeValue, float64(d.Waiting))
	for _, a := range d.Agents {
		ch <- prometheus.MustNewConstMetric(c.open, prometheus.GaugeValue, float64(a.Open), a.Agent)
		ch <- prometheus.MustNewConstMetric(c.online, prometheus.GaugeValue, float64(a.Online), a.Agent)
	}
}
