package main

// The customer-service desk's rules, as configured: who may serve, how
// many conversations each agent holds, when the desk is open, and what the
// customer is told. The store applies them (queue.go, commands.go,
// quota.go); this file only reads and answers them.

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	_ "time/tzdata" // BUSINESS_TIMEZONE on a machine without a zone database
)

// Desk is the desk's configuration.
type Desk struct {
	Agents  []string // IM_AGENTS, in order: a tie between agents goes to the one listed first
	MaxOpen int      // IM_AGENT_MAX_OPEN: conversations an agent holds at most; 0: no cap
	Hours   *Hours   // BUSINESS_HOURS; nil: always open
	// IdleTimeout (SESSION_IDLE_TIMEOUT) closes a conversation without a
	// message for so long.
	IdleTimeout time.Duration
	// AwayGrace (AGENT_AWAY_GRACE) is how long an agent who lost their
	// connection has to come back before they are taken offline and
	// their customers who wrote meanwhile go to the next free agent.
	AwayGrace time.Duration
	// ReplyQuota (WECHAT_REPLY_QUOTA) is how many customer-service messages
	// WeChat takes per message a customer sends: 5 by its documentation
	// (20 before 2021); 0 takes the default.
	ReplyQuota int
	Texts      DeskTexts
	UserPrefix string // IM_USER_PREFIX: a customer's IM account is prefix + openid
}

// DeskTexts are what the customer reads from the bridge itself. QueuedText
// may hold {position}, their place in the queue. An empty text is not sent.
type DeskTexts struct {
	Queued     string // QUEUED_TEXT: passive reply while they wait for an agent
	Offline    string // OFFLINE_TEXT: passive reply outside business hours
	Joined     string // AGENT_JOINED_TEXT: when an agent takes them from the queue
	Closed     string // CLOSED_TEXT: when an agent ends the conversation
	Rating     string // RATING_TEXT: asks for a rating from 1 to 5, after CLOSED_TEXT
	Rated      string // RATED_TEXT: passive reply to a rating
	Transfer   string // TRANSFER_TEXT: when an agent hands them to another
	IdleClosed string // IDLE_CLOSED_TEXT: when the conversation closes itself
}

// Default texts the customer reads.
var defaultDeskTexts = DeskTexts{
	Queued:     "All our agents are busy. You are number {position} in the queue; your messages are kept and an agent will answer you soon.",
	Offline:    "We are closed now. Your message is kept, and an agent will answer you when we open.",
	Joined:     "An agent has joined the conversation.",
	Closed:     "This conversation has ended. Thank you for contacting us.",
	Rating:     "How did we do? Reply with a number from 1 (poor) to 5 (excellent).",
	Rated:      "Thank you for your rating.",
	Transfer:   "You are being transferred to another agent, who has the conversation so far.",
	IdleClosed: "", // nothing: an idle close need not spend the customer's replies
}

// queuedText is QUEUED_TEXT with the customer's place in the queue.
func (t DeskTexts) queuedText(position int) string {
	return strings.ReplaceAll(t.Queued, "{position}", strconv.Itoa(position))
}

// Hours are the desk's opening hours in one time zone: for each weekday,
// the spans it is open.
type Hours struct {
	loc   *time.Location
	spans [7][]span // by time.Weekday
}

// span is [from, to) in minutes since midnight.
type span struct{ from, to int }

// weekdays are the names BUSINESS_HOURS takes, by time.Weekday.
var weekdays = []string{"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"}

// parseHours reads BUSINESS_HOURS: comma-separated "DAYS HH:MM-HH:MM", DAYS
// one weekday ("Sat") or a range ("Mon-Fri", "Fri-Mon"), in loc. For
// example "Mon-Fri 09:00-18:00, Sat 10:00-14:00". A span ends after it
// starts, 24:00 at the latest.
func parseHours(v string, loc *time.Location) (*Hours, error) {
	h := &Hours{loc: loc}
	for _, part := range strings.Split(v, ",") {
		days, clock, ok := strings.Cut(strings.TrimSpace(part), " ")
		if !ok {
			return nil, fmt.Errorf("%q: want DAYS HH:MM-HH:MM, such as Mon-Fri 09:00-18:00", strings.TrimSpace(part))
		}
		first, last, err := parseDays(days)
		if err != nil {
			return nil, err
		}
		from, to, err := parseClockSpan(strings.TrimSpace(clock))
		if err != nil {
			return nil, err
		}
		for d := first; ; d = (d + 1) % 7 {
			h.spans[d] = append(h.spans[d], span{from, to})
			if d == last {
				break
			}
		}
	}
	return h, nil
}

// parseDays reads "Mon" or "Mon-Fri".
func parseDays(v string) (first, last int, err error) {
	a, b, isRange := strings.Cut(v, "-")
	if first = weekday(a); first < 0 {
		return 0, 0, fmt.Errorf("%q is not a weekday (Mon, Tue, Wed, Thu, Fri, Sat, Sun)", a)
	}
	if !isRange {
		return first, first, nil
	}
	if last = weekday(b); last < 0 {
		return 0, 0, fmt.Errorf("%q is not a weekday (Mon, Tue, Wed, Thu, Fri, Sat, Sun)", b)
	}
	return first, last, nil
}

func weekday(v string) int {
	for i, d := range weekdays {
		if strings.EqualFold(v, d) {
			return i
		}
	}
	return -1
}

// parseClockSpan reads "09:00-18:00".
func parseClockSpan(v string) (from, to int, err error) {
	a, b, ok := strings.Cut(v, "-")
	if !ok {
		return 0, 0, fmt.Errorf("%q: want HH:MM-HH:MM", v)
	}
	if from, err = parseClock(a); err == nil {
		to, err = parseClock(b)
	}
	if err == nil && to <= from {
		err = fmt.Errorf("%q ends before it starts: a span cannot cross midnight, write two", v)
	}
	return from, to, err
}

// parseClock reads "HH:MM" as minutes since midnight, 24:00 included.
func parseClock(v string) (int, error) {
	t, err := time.Parse("15:04", v)
	if v == "24:00" {
		return 24 * 60, nil
	} else if err != nil || len(v) != 5 {
		return 0, fmt.Errorf("%q is not a time of day HH:MM", v)
	}
	return t.Hour()*60 + t.Minute(), nil
}

// Open reports whether the desk is open at t; nil Hours are always open.
func (h *Hours) Open(t time.Time) bool {
	if h == nil {
		return true
	}
	t = t.In(h.loc)
	m := t.Hour()*60 + t.Minute()
	for _, s := range h.spans[t.Weekday()] {
		if m >= s.from && m < s.to {
			return true
		}
	}
	return false
}
