package main

// An agent typing in TUIKit shows the customer WeChat's typing state. TUIKit
// sends, while its user types, an online-only custom message
// {"businessID":"user_typing_status","typingStatus":1}, and typingStatus 0
// when they stop. The bridge turns it into /cgi-bin/message/custom/typing,
// best effort: one call in the background, never retried, never queued
// with the replies (Worker.ShowTyping). WeChat shows the state for 15 s and refuses it again
// while it shows (45081), and only within 30 s of the customer's last
// message (45080): the first is avoided here, the second is WeChat's to
// refuse.

import (
	"context"
	"encoding/json"
	"sync"
	"time"
)

// typingShown is how long WeChat shows a typing state.
const typingShown = 15 * time.Second

// typingState reports whether body is TUIKit's typing indicator, and
// whether it says the agent types (on) or stopped.
func typingState(body []MsgElem) (on, ok bool) {
	if len(body) != 1 || body[0].MsgType != "TIMCustomElem" {
		return false, false
	}
	data, _ := body[0].MsgContent["Data"].(string)
	var d struct {
		BusinessID   string `json:"businessID"`
		TypingStatus int    `json:"typingStatus"`
	}
	if json.Unmarshal([]byte(data), &d) != nil || d.BusinessID != "user_typing_status" {
		return false, false
	}
	return d.TypingStatus == 1, true
}

// typingStates remembers, for each customer shown a typing state, until
// when it shows; it holds only those of the last 15 s.
type typingStates struct {
	mu    sync.Mutex
	until map[string]time.Time
}

// due reports whether a typing command for openid should be sent now: a
// Typing not while one shows, a CancelTyping only while one shows.
func (t *typingStates) due(openid string, on bool, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.until == nil {
		t.until = map[string]time.Time{}
	}
	if len(t.until) > 1000 {
		for id, u := range t.until {
			if !now.Before(u) {
				delete(t.until, id)
			}
		}
	}
	showing := now.Before(t.until[openid])
	switch {
	case on && !showing:
		t.until[openid] = now.Add(typingShown)
		return true
	case !on && showing:
		delete(t.until, openid)
		return true
	}
	return false
}

// ShowTyping sends the customer's typing state in the background, if due:
// the callback handler asks, and the worker, which makes the vendor calls,
// calls WeChat, bounded by its HTTP client's time-out.
func (w *Worker) ShowTyping(openid string, on bool) {
	if !w.typing.due(openid, on, w.Now()) {
		return
	}
	go func() {
		if err := w.WeChat.Typing(context.Background(), openid, on); err != nil {
			w.Log.Debug("typing state not shown", "err", err)
		}
	}()
}
