package main

// What the console's three panes show: the hooks that record what happens
// in the world (each exchange on the wire, what each customer reads), and
// the state read from it (the agents' conversations and presence, the queue
// and the outbox), which the page is sent whole when it changes.

import (
	"context"
	"database/sql"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"slices"
	"strings"
	"time"

	"wechat-im-bridge/fakes"
)

// note puts a line of kind "step" or "error" on the wire, any secret it
// quotes masked.
func (c *console) note(gen int, kind, text string) {
	now := time.Now()
	c.addWire(gen, wireEntry{Kind: kind, Title: maskText(text), At: now.Format("15:04:05.000"), T: now.UnixMicro()})
}

// addWire appends e to world gen's wire.
func (c *console) addWire(gen int, e wireEntry) {
	c.set(gen, func() {
		c.seq++
		e.Seq = c.seq
		c.wire = append(c.wire, e)
		if len(c.wire) > maxWire {
			c.wire = c.wire[len(c.wire)-maxWire:]
		}
	})
}

// onWire is world gen's Wire hook: each exchange, explained.
func (c *console) onWire(gen int) func(fakes.Exchange) {
	return func(x fakes.Exchange) {
		c.mu.Lock()
		sec := c.secrets
		c.mu.Unlock()
		c.addWire(gen, explainExchange(x, sec))
	}
}

// chatLine is one line of a customer's WeChat chat: from the customer,
// the Official Account, or WeChat itself.
type chatLine struct {
	From string `json:"from"` // customer, account or wechat
	Text string `json:"text"`
	Note string `json:"note,omitempty"` // how it came: a passive reply, a customer-service message
}

// onPush is world gen's OnPush hook: what the customer sent, and the
// passive reply or WeChat's notice they read after it.
func (c *console) onPush(gen int) func(string, []byte, *fakes.PushResult) {
	return func(openid string, push []byte, res *fakes.PushResult) {
		var line chatLine
		p := readPushFields(push)
		switch {
		case res == nil:
			line = chatLine{From: "customer", Text: p.text()}
		case res.Reply != nil:
			line = chatLine{From: "account", Text: res.Reply.Content, Note: "passive reply"}
		case res.Failed:
			line = chatLine{From: "wechat", Text: "该公众号暂时无法提供服务，请稍后再试", Note: "WeChat's notice: the push was not answered"}
		default:
			return
		}
		c.set(gen, func() {
			c.chats[openid] = append(c.chats[openid], line)
			if len(c.chats[openid]) > maxChat {
				c.chats[openid] = c.chats[openid][len(c.chats[openid])-maxChat:]
			}
			if res == nil && p.MsgType == "event" && (p.Event == "subscribe" || p.Event == "unsubscribe") {
				c.followed[openid] = p.Event == "subscribe"
			}
		})
	}
}

// maxChat is how many lines of each customer's chat the console keeps.
const maxChat = 200

// pushFields are the fields of a push the customer's chat shows.
type pushFields struct {
	MsgType, Content, Event, Label string
}

// readPushFields reads them from a push's XML.
func readPushFields(push []byte) pushFields {
	var p pushFields
	xml.Unmarshal(push, &p)
	return p
}

// text is what the customer sees of their own push.
func (p pushFields) text() string {
	switch p.MsgType {
	case "text":
		return p.Content
	case "image":
		return "📷 photo"
	case "voice":
		return "🎤 voice note"
	case "location":
		return "📍 " + p.Label
	case "event":
		if p.Event == "subscribe" {
			return "(followed the Official Account)"
		}
		if p.Event == "unsubscribe" {
			return "(unfollowed)"
		}
		return "(" + p.Event + ")"
	}
	return "(" + p.MsgType + ")"
}

// onSend is world gen's OnSend hook: a customer-service message WeChat
// took, which the customer reads.
func (c *console) onSend(gen int) func(fakes.CustomMessage) {
	return func(m fakes.CustomMessage) {
		text := m.Text
		if m.MsgType != "text" {
			text = map[string]string{"image": "📷 picture", "voice": "🎤 voice note", "video": "🎬 video"}[m.MsgType]
		}
		c.set(gen, func() {
			c.chats[m.ToUser] = append(c.chats[m.ToUser], chatLine{From: "account", Text: text, Note: "customer-service message"})
		})
	}
}

// consoleState is what the page draws, sent whole when it changes.
type consoleState struct {
	Safe      bool           `json:"safe"`
	IMDown    bool           `json:"imDown"`
	Playing   bool           `json:"playing"`
	Prefix    string         `json:"prefix"`
	Customers []customerView `json:"customers"`
	Agents    []agentView    `json:"agents"`
	Queue     []string       `json:"queue"`
	Outbox    []outboxView   `json:"outbox"`
}

// customerView is one customer's WeChat: whether they follow, and their chat.
type customerView struct {
	OpenID   string     `json:"openid"`
	Followed bool       `json:"followed"`
	Chat     []chatLine `json:"chat"`
}

// agentView is one agent's IM client: their presence and conversations.
type agentView struct {
	ID     string     `json:"id"`
	Status string     `json:"status"` // IM's word: Online, PushOnline, Offline
	Convs  []convView `json:"convs"`
}

// convView is one conversation in an agent's client: with a customer's
// account, or the admin's notices.
type convView struct {
	Peer string   `json:"peer"`
	Msgs []imLine `json:"msgs"`
}

// imLine is one message in an agent's conversation: theirs (Mine) or the
// other side's.
type imLine struct {
	Mine bool   `json:"mine"`
	Text string `json:"text"`
}

// outboxView is one outbox item, as the page lists it.
type outboxView struct {
	ID       int64  `json:"id"`
	Lane     string `json:"lane"`
	What     string `json:"what"`
	State    string `json:"state"`
	Attempts int    `json:"attempts"`
	NextIn   string `json:"nextIn,omitempty"`
	Error    string `json:"error,omitempty"`
}

// state reads the panes' state from the world and its database.
func (c *console) state(ctx context.Context) consoleState {
	c.mu.Lock()
	w, db := c.world, c.db
	st := consoleState{Safe: c.safe, IMDown: c.imDown, Playing: c.playing}
	for _, id := range []string{demoCustomer, demoSecondCustomer} {
		st.Customers = append(st.Customers, customerView{OpenID: id, Followed: c.followed[id], Chat: slices.Clone(c.chats[id])})
	}
	c.mu.Unlock()
	if w == nil {
		return st
	}
	st.Prefix = w.cfg.IMUserPrefix
	msgs := w.im.Messages()
	for _, id := range []string{demoAgent, demoSecondAgent} {
		st.Agents = append(st.Agents, agentView{ID: id, Status: w.im.Status(id), Convs: conversations(id, msgs)})
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	st.Queue, st.Outbox = readQueueAndOutbox(ctx, db)
	return st
}

// conversations are agent's conversations in msgs, the newest first.
func conversations(agent string, msgs []fakes.Message) []convView {
	var convs []convView
	for _, m := range msgs {
		if m.OnlineOnly || (m.From != agent && m.To != agent) {
			continue
		}
		peer, mine := m.From, m.From == agent
		if mine {
			peer = m.To
		}
		i := slices.IndexFunc(convs, func(v convView) bool { return v.Peer == peer })
		if i < 0 {
			convs = append(convs, convView{Peer: peer})
			i = len(convs) - 1
		}
		convs[i].Msgs = append(convs[i].Msgs, imLine{Mine: mine, Text: elemsText(m)})
	}
	slices.Reverse(convs)
	return convs
}

// elemsText is what an IM client shows of m, in words: the page loads no
// file, so that every request on the wire is one the world made.
func elemsText(m fakes.Message) string {
	var elems []struct {
		MsgType    string
		MsgContent struct {
			Text, Desc string
			Second     int
		}
	}
	json.Unmarshal(m.Body, &elems)
	var parts []string
	for _, e := range elems {
		switch e.MsgType {
		case "TIMTextElem":
			parts = append(parts, e.MsgContent.Text)
		case "TIMImageElem":
			parts = append(parts, "📷 picture")
		case "TIMSoundElem":
			parts = append(parts, fmt.Sprintf("🎤 voice note, %d s", e.MsgContent.Second))
		case "TIMLocationElem":
			parts = append(parts, "📍 "+e.MsgContent.Desc)
		default:
			parts = append(parts, "("+e.MsgType+")")
		}
	}
	return strings.Join(parts, "\n")
}

// readQueueAndOutbox reads the queue (openids, longest waiting first) and the newest
// outbox items from the bridge's database.
func readQueueAndOutbox(ctx context.Context, db *sql.DB) (queue []string, outbox []outboxView) {
	queue = []string{}
	rows, err := db.QueryContext(ctx, `SELECT openid FROM conversations WHERE closed_at IS NULL AND agent = '' ORDER BY id`)
	if err == nil {
		for rows.Next() {
			var id string
			if rows.Scan(&id) == nil {
				queue = append(queue, id)
			}
		}
		rows.Close()
	}
	rows, err = db.QueryContext(ctx, `SELECT id, lane, delivery, state, attempts, next_at, last_error FROM outbox ORDER BY id DESC LIMIT 14`)
	if err != nil {
		return queue, nil
	}
	defer rows.Close()
	now := time.Now().UnixMilli()
	for rows.Next() {
		var v outboxView
		var raw string
		var next int64
		if rows.Scan(&v.ID, &v.Lane, &raw, &v.State, &v.Attempts, &next, &v.Error) != nil {
			continue
		}
		var d Delivery
		json.Unmarshal([]byte(raw), &d)
		v.What = d.Kind
		if d.Text != "" {
			v.What += ": " + clipText(d.Text, 40)
		}
		if v.State == "pending" && next > now {
			v.NextIn = fmt.Sprintf("in %d s", (next-now+999)/1000) // whole seconds: the page is sent it when it changes
		}
		outbox = append(outbox, v)
	}
	return queue, outbox
}

// clipText is s cut to n runes.
func clipText(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n]) + "…"
}
