package main

// The console's two sides: what the learner may do as a customer or an
// agent (each done as their WeChat or IM client does it, through the
// fakes), and the panes' state the page draws: each customer's chat, each
// agent's conversations and presence, the queue and the outbox.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"image"
	"image/png"
	"net/http"
	"slices"
	"strings"
	"time"

	"wechat-im-bridge/fakes"
)

// consoleActions are the actions the page may ask for, by name; reset and
// tutorial are the console's own (console.action).
var consoleActions = map[string]func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error{
	"follow": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.Follow(ctx, a.Who))
	},
	"unfollow": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.Unfollow(ctx, a.Who))
	},
	"write": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.SendText(ctx, a.Who, a.Text))
	},
	"photo": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		id, picURL := w.wx.AddMedia(samplePNG(), "image/png")
		return pushed(w.wx.SendMessage(ctx, a.Who, "image", map[string]string{"PicUrl": picURL, "MediaId": id}))
	},
	"voice": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		id, _ := w.wx.AddMedia(sampleAMR(150), "audio/amr")
		return pushed(w.wx.SendMessage(ctx, a.Who, "voice", map[string]string{"MediaId": id, "Format": "amr", "Recognition": "주문한 옷은 언제 도착하나요?"}))
	},
	"location": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.SendMessage(ctx, a.Who, "location",
			map[string]string{"Location_X": "37.5665", "Location_Y": "126.978", "Scale": "15", "Label": "Seoul City Hall"}))
	},
	"reply": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		_, err := w.im.SendAsAgent(ctx, a.Who, a.To, a.Text)
		return err
	},
	"picture": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		photo := samplePNG()
		info := map[string]any{"Type": 1, "Size": len(photo), "Width": 4, "Height": 3, "URL": w.im.AddFile(photo, "image/png")}
		elem := map[string]any{"MsgType": "TIMImageElem", "MsgContent": map[string]any{"UUID": "console", "ImageFormat": 3,
			"ImageInfoArray": []any{info, info, info}}}
		_, err := w.im.SendElemsAsAgent(ctx, a.Who, a.To, false, elem)
		return err
	},
	"login": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return answered(w.im.Login(ctx, a.Who))
	},
	"logout": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return answered(w.im.Logout(ctx, a.Who))
	},
	"safe": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		mode, on := fakes.ModePlaintext, a.Text == "on"
		if on {
			mode = fakes.ModeSafe
		}
		c.mu.Lock()
		key, gen := c.secrets.AESKey, c.gen
		c.mu.Unlock()
		if err := w.wx.SetEncryption(mode, key); err != nil {
			return err
		}
		c.set(gen, func() { c.safe = on })
		// Saving the mode in WeChat's console checks the URL again.
		return w.wx.Verify(ctx)
	},
	"imfail": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		on := a.Text == "on"
		if on {
			w.im.FailNextStatus(1<<30, http.StatusServiceUnavailable) // until switched off
		} else {
			w.im.FailNext(0, 0)
		}
		c.mu.Lock()
		gen := c.gen
		c.mu.Unlock()
		c.set(gen, func() { c.imDown = on })
		return nil
	},
}

// check refuses an action that names no one it may act for.
func (a consoleAction) check(prefix string) error {
	customer := a.Who == demoCustomer || a.Who == demoSecondCustomer
	agent := a.Who == demoAgent || a.Who == demoSecondAgent
	switch a.Do {
	case "follow", "unfollow", "photo", "voice", "location":
		if !customer {
			return fmt.Errorf("%s is not one of the console's customers", a.Who)
		}
	case "write":
		if !customer || strings.TrimSpace(a.Text) == "" {
			return errors.New("a customer writes a text that is not empty")
		}
	case "reply", "picture":
		to, _ := strings.CutPrefix(a.To, prefix)
		if !agent || (to != demoCustomer && to != demoSecondCustomer) || (a.Do == "reply" && strings.TrimSpace(a.Text) == "") {
			return errors.New("an agent writes a text that is not empty to one of the customers")
		}
	case "login", "logout":
		if !agent {
			return fmt.Errorf("%s is not one of the console's agents", a.Who)
		}
	}
	return nil
}

// pushed reports a push WeChat gave up on.
func pushed(r fakes.PushResult) error {
	if r.Failed {
		return fmt.Errorf("WeChat gave up on the push after %d attempts (last answer %d %q)", r.Attempts, r.Status, r.Body)
	}
	return nil
}

// answered reports a callback the bridge did not take.
func answered(r fakes.CallbackResult) error {
	if r.Err != nil {
		return fmt.Errorf("%s: %w", r.Command, r.Err)
	}
	return nil
}

// samplePNG is the photo the demo's customer and agents send: 4×3 pixels.
func samplePNG() []byte {
	img := image.NewRGBA(image.Rect(0, 0, 4, 3))
	for i := range img.Pix {
		img.Pix[i] = byte(60 * i)
	}
	var b bytes.Buffer
	png.Encode(&b, img)
	return b.Bytes()
}

// sampleAMR is an AMR-NB file of n frames of 20 ms (mode 12.2 kbit/s): a
// voice note.
func sampleAMR(n int) []byte {
	b := []byte("#!AMR\n")
	for i := range n {
		frame := make([]byte, 32)
		frame[0] = 7<<3 | 0x04
		frame[1] = byte(i)
		b = append(b, frame...)
	}
	return b
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
		switch {
		case res == nil:
			line = chatLine{From: "customer", Text: pushText(push)}
		case res.Reply != nil:
			line = chatLine{From: "account", Text: res.Reply.Content, Note: "passive reply"}
		case res.Failed:
			line = chatLine{From: "wechat", Text: "该公众号暂时无法提供服务，请稍后再试", Note: "WeChat's notice: the push was not answered"}
		default:
			return
		}
		c.set(gen, func() {
			c.chats[openid] = append(c.chats[openid], line)
			if res == nil && strings.Contains(string(push), "subscribe") {
				c.followed[openid] = !strings.Contains(string(push), "unsubscribe")
			}
		})
	}
}

// pushText is what the customer sees of their own push.
func pushText(push []byte) string {
	var p struct {
		MsgType, Content, Event, Label, Recognition string
	}
	xml.Unmarshal(push, &p)
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

type customerView struct {
	OpenID   string     `json:"openid"`
	Followed bool       `json:"followed"`
	Chat     []chatLine `json:"chat"`
}

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

type imLine struct {
	Mine bool   `json:"mine"`
	Text string `json:"text"`
	Img  string `json:"img,omitempty"` // an image's URL
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
		text, img := elemsText(m)
		convs[i].Msgs = append(convs[i].Msgs, imLine{Mine: mine, Text: text, Img: img})
	}
	slices.Reverse(convs)
	return convs
}

// elemsText is what an IM client shows of m, and the URL of its image if
// it has one.
func elemsText(m fakes.Message) (text, img string) {
	var elems []struct {
		MsgType    string
		MsgContent struct {
			Text, Desc     string
			Second         int
			ImageInfoArray []struct{ URL string }
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
			if len(e.MsgContent.ImageInfoArray) > 0 {
				img = e.MsgContent.ImageInfoArray[0].URL
			}
		case "TIMSoundElem":
			parts = append(parts, fmt.Sprintf("🎤 voice note, %d s", e.MsgContent.Second))
		case "TIMLocationElem":
			parts = append(parts, "📍 "+e.MsgContent.Desc)
		default:
			parts = append(parts, "("+e.MsgType+")")
		}
	}
	return strings.Join(parts, "\n"), img
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
			v.NextIn = fmt.Sprintf("%.1f s", float64(next-now)/1000)
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
