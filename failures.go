package main

// How a failed attempt is judged: whether the vendor may have acted on it,
// whether a retry can fix it, when the retry comes, and what the agent is
// told when it cannot.

import (
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"strconv"
	"time"
)

// uncertain reports whether the vendor may have acted on an attempt that
// failed with err: it did not answer, or answered that it failed inside.
func uncertain(err error) bool {
	var ie *IMError
	var we *WeChatError
	var pe permanentError
	var nc notCalled
	switch {
	case errors.As(err, &pe), errors.As(err, &nc):
		return false
	case errors.As(err, &ie):
		return imMaybeDone[ie.Code]
	case errors.As(err, &we):
		return we.Code == -1 // system busy: the call may have gone through
	}
	return true // no answer: a time-out, a refused or broken connection, an HTTP error
}

// permanent reports whether err is one no retry can fix.
func permanent(err error) bool {
	var pe permanentError
	var ie *IMError
	var we *WeChatError
	switch {
	case errors.As(err, &pe):
		return true
	case errors.As(err, &ie):
		return imPermanent[ie.Code] != ""
	case errors.As(err, &we):
		return wechatPermanent[we.Code] != ""
	}
	return false
}

// explain is err's text, and what its vendor code means for the agent if
// it is a code no retry can fix.
func explain(err error) string {
	var ie *IMError
	var we *WeChatError
	switch {
	case errors.As(err, &ie) && imPermanent[ie.Code] != "":
		return err.Error() + ": " + imPermanent[ie.Code]
	case errors.As(err, &we) && wechatPermanent[we.Code] != "":
		return err.Error() + ": " + wechatPermanent[we.Code]
	}
	return err.Error()
}

// isIMCode reports whether err is an IM answer with one of codes.
func isIMCode(err error, codes ...int) bool {
	var ie *IMError
	if !errors.As(err, &ie) {
		return false
	}
	for _, c := range codes {
		if ie.Code == c {
			return true
		}
	}
	return false
}

// notice is the IM message that tells the agent of a conversation that a
// delivery in it was given up because of err, or nil when there is no one
// to tell: inside the conversation for a reply WeChat did not take, from
// the admin for a customer's message IM did not take. When the agent's own
// account is gone, another agent is told.
func (w *Worker) notice(d Delivery, reason string, err error) *Delivery {
	to, text := d.Agent, ""
	switch d.Kind {
	case deliverWeChat:
		text = fmt.Sprintf("Not delivered to WeChat customer %s: %q\nReason: %s", d.IMUser, d.Text, reason)
	case deliverIMSend:
		quoted := strconv.Quote(d.Text)
		var ie *IMError
		if errors.As(err, &ie) && ie.Code == imErrContentSecurity {
			quoted = "(not quoted: IM would refuse it again)"
		}
		text = fmt.Sprintf("A message of WeChat customer %s could not reach you: %s\nReason: %s", d.IMUser, quoted, reason)
		if errors.As(err, &ie) && imAgentGone[ie.Code] {
			to = ""
			if i := slices.IndexFunc(w.Agents, func(a string) bool { return a != d.Agent }); i >= 0 {
				to = w.Agents[i]
			}
			text = fmt.Sprintf("A message of WeChat customer %s could not reach agent %s: %q\nReason: %s", d.IMUser, d.Agent, d.Text, reason)
		}
	default:
		return nil // imports, deletions and notices themselves: logged and counted only
	}
	if to == "" {
		return nil
	}
	n := conversationNotice(d.IMUser, d.OpenID, to, text)
	if d.Kind == deliverIMSend {
		// What kept the customer's message out of IM would keep a notice
		// from their account out too: the admin tells the agent.
		n.IMUser = ""
	}
	return &n
}

// backoff is the wait before the attempt after attempts failures:
// exponential from floor, capped at ceiling, with jitter so that lanes
// failing together do not retry together.
func backoff(attempts int, floor, ceiling time.Duration) time.Duration {
	d := ceiling
	if attempts < 30 && floor<<attempts > 0 {
		d = min(floor<<attempts, ceiling)
	}
	return d/2 + mrand.N(d/2+1)
}
