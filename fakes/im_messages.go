package fakes

// Messages in the fake IM: openim/sendmsg, admin_getroammsg (the history),
// recalls, and the message body checks they share.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
	"strings"
	"time"
)

// MaxMsgBody is the most bytes of MsgBody, as JSON, IM takes in one
// message: 12 KB (the message-length limit in IM's documentation,
// tencentyun/qcloud-documents #14824); past it, 93000.
const MaxMsgBody = 12 << 10

// sendMsg serves openim/sendmsg: it validates the message as IM does, drops
// a repeat of the same (sender, MsgSeq, MsgRandom, content) within 120 s
// (DedupWindow),
// delivers it and fires the callbacks the message does not forbid.
func (im *IM) sendMsg(ctx context.Context, req map[string]json.RawMessage, now time.Time) imAnswer {
	var to, from string
	if json.Unmarshal(req["To_Account"], &to) != nil || to == "" {
		return imFail(90003, "Invalid format of To_Account")
	}
	var random uint32
	if json.Unmarshal(req["MsgRandom"], &random) != nil {
		return imFail(90005, "MsgRandom is missing or not an integer")
	}
	var body []json.RawMessage
	if json.Unmarshal(req["MsgBody"], &body) != nil || len(body) == 0 {
		return imFail(90007, "MsgBody is not an array")
	}
	if len(req["MsgBody"]) > MaxMsgBody {
		return imFail(93000, "JSON data packet is too long")
	}
	text, err := checkBody(body)
	if err != nil {
		return imFail(90010, err.Error())
	}
	im.mu.Lock()
	sensitive := im.sensitive
	im.mu.Unlock()
	for _, w := range sensitive {
		if strings.Contains(text, w) {
			return imFail(80001, "the text hit content security")
		}
	}
	var seq uint32
	if raw, ok := req["MsgSeq"]; ok && json.Unmarshal(raw, &seq) != nil {
		return imFail(90010, "MsgSeq is not a 32-bit unsigned integer")
	}
	if seq == 0 {
		seq = randUint32()
	}
	if raw, ok := req["MsgLifeTime"]; ok {
		var life int64
		if json.Unmarshal(raw, &life) != nil || life < 0 || life > 604800 {
			return imFail(90026, "MsgLifeTime is invalid")
		}
	}
	var forbid []string
	if raw, ok := req["ForbidCallbackControl"]; ok && json.Unmarshal(raw, &forbid) != nil {
		return imFail(90010, "ForbidCallbackControl is not an array of strings")
	}
	from = im.opts.Admin
	if raw, ok := req["From_Account"]; ok {
		if json.Unmarshal(raw, &from) != nil || from == "" {
			return imFail(90008, "From_Account is invalid")
		}
	}

	im.mu.Lock()
	switch {
	case !im.accounts[from]:
		im.mu.Unlock()
		return imFail(90008, "From_Account is not imported")
	case !im.accounts[to] && !im.deleted[to].IsZero():
		im.mu.Unlock()
		return imFail(90012, "To_Account does not exist")
	case !im.accounts[to]:
		im.mu.Unlock()
		return imFail(20003, "To_Account is invalid or not imported")
	}
	key := fmt.Sprintf("%s|%d|%d|%08x", from, seq, random, crc32.ChecksumIEEE(req["MsgBody"]))
	if now.Sub(im.lastSweep) > 10*time.Second {
		for k, v := range im.recent {
			if now.Sub(v.at) > im.opts.DedupWindow {
				delete(im.recent, k)
			}
		}
		im.lastSweep = now
	}
	if prev, dup := im.recent[key]; dup && now.Sub(prev.at) <= im.opts.DedupWindow {
		im.mu.Unlock()
		a := imOK()
		a["MsgTime"], a["MsgKey"] = prev.time, prev.msgKey
		return a
	}
	m := Message{From: from, To: to, Text: text, Body: req["MsgBody"], MsgSeq: seq, MsgRandom: random,
		MsgTime: now.Unix(), Platform: "RESTAPI"}
	m.MsgKey = fmt.Sprintf("%d_%d_%d", seq, random, m.MsgTime)
	im.recent[key] = recentSend{at: now, msgKey: m.MsgKey, time: m.MsgTime}
	im.mu.Unlock()

	if err := im.deliver(ctx, m, !slices.Contains(forbid, "ForbidBeforeSendMsgCallback"), !slices.Contains(forbid, "ForbidAfterSendMsgCallback")); err != nil {
		return imFail(20006, err.Error())
	}
	a := imOK()
	a["MsgTime"], a["MsgKey"] = m.MsgTime, m.MsgKey
	return a
}

// Limits of openim/admin_getroammsg: the messages a page may hold, the
// size of a page's MsgList (IM stops near 13 KB and says Complete 0), and
// how long the history is kept (roaming storage, 7 days by default).
const (
	roamMaxCnt    = 100
	roamPageBytes = 13 << 10
	roamKeep      = 7 * 24 * time.Hour
)

// getRoamMsg serves openim/admin_getroammsg: the history of the one-to-one
// conversation between two accounts, both directions, sent from MinTime to
// MaxTime (Unix seconds, both included), newest first, a page at a time. A
// page ends after MaxCnt messages or about 13 KB; its LastMsgTime and
// LastMsgKey are its oldest message's, and the next page is asked for with
// MaxTime set to LastMsgTime and LastMsgKey given. The accounts are named
// Operator_Account and Peer_Account (From_Account and To_Account in
// earlier versions of IM's documentation, still taken).
func (im *IM) getRoamMsg(req map[string]json.RawMessage, now time.Time) imAnswer {
	var operator, peer string
	opRaw, peerRaw := req["Operator_Account"], req["Peer_Account"]
	if opRaw == nil && peerRaw == nil {
		opRaw, peerRaw = req["From_Account"], req["To_Account"]
	}
	if json.Unmarshal(opRaw, &operator) != nil || operator == "" || json.Unmarshal(peerRaw, &peer) != nil || peer == "" {
		return imFail(90001, "Operator_Account and Peer_Account are required")
	}
	var maxCnt int
	var minTime, maxTime int64
	if json.Unmarshal(req["MaxCnt"], &maxCnt) != nil || maxCnt < 1 || maxCnt > roamMaxCnt {
		return imFail(90001, fmt.Sprintf("MaxCnt must be an integer from 1 to %d", roamMaxCnt))
	}
	if json.Unmarshal(req["MinTime"], &minTime) != nil || json.Unmarshal(req["MaxTime"], &maxTime) != nil || minTime < 0 || minTime > maxTime {
		return imFail(90001, "MinTime and MaxTime must be Unix times, MinTime not after MaxTime")
	}
	var lastKey string
	if raw, ok := req["LastMsgKey"]; ok && json.Unmarshal(raw, &lastKey) != nil {
		return imFail(90001, "LastMsgKey is not a string")
	}

	im.mu.Lock()
	var history []Message // newest first
	for i := len(im.messages) - 1; i >= 0; i-- {
		m := im.messages[i]
		between := m.From == operator && m.To == peer || m.From == peer && m.To == operator
		if between && !m.OnlineOnly && m.MsgTime >= minTime && m.MsgTime <= maxTime && now.Sub(time.Unix(m.MsgTime, 0)) <= roamKeep {
			history = append(history, m)
		}
	}
	im.mu.Unlock()
	// IM orders a conversation by time, and the messages of one second by
	// MsgSeq.
	slices.SortStableFunc(history, func(a, b Message) int {
		return cmp.Or(cmp.Compare(b.MsgTime, a.MsgTime), cmp.Compare(b.MsgSeq, a.MsgSeq))
	})
	if lastKey != "" {
		if i := slices.IndexFunc(history, func(m Message) bool { return m.MsgKey == lastKey }); i >= 0 {
			history = history[i+1:]
		}
	}
	var page []map[string]any
	size := 0
	for _, m := range history {
		flags := 0
		if m.Recalled {
			flags = 8
		}
		item := map[string]any{
			"From_Account": m.From, "To_Account": m.To, "MsgSeq": m.MsgSeq, "MsgRandom": m.MsgRandom,
			"MsgTimeStamp": m.MsgTime, "MsgFlagBits": flags, "IsPeerRead": 0, "MsgKey": m.MsgKey,
			"MsgBody": m.Body, "CloudCustomData": "",
		}
		b, _ := json.Marshal(item)
		if len(page) == maxCnt || len(page) > 0 && size+len(b) > roamPageBytes {
			break
		}
		page, size = append(page, item), size+len(b)
	}
	a := imOK()
	a["Complete"], a["MsgCnt"], a["MsgList"] = 1, len(page), page
	if len(page) < len(history) {
		a["Complete"] = 0
	}
	if len(page) > 0 {
		last := page[len(page)-1]
		a["LastMsgTime"], a["LastMsgKey"] = last["MsgTimeStamp"], last["MsgKey"]
	}
	return a
}

// Recall marks the message msgKey withdrawn, as admin_msgwithdraw or the
// sender's client does: it stays in the history with MsgFlagBits 8.
func (im *IM) Recall(msgKey string) bool {
	im.mu.Lock()
	defer im.mu.Unlock()
	for i := range im.messages {
		if im.messages[i].MsgKey == msgKey {
			im.messages[i].Recalled = true
			return true
		}
	}
	return false
}

// checkBody checks each element as IM does and returns the text of the
// text elements.
func checkBody(body []json.RawMessage) (string, error) {
	var texts []string
	customs := 0
	for i, raw := range body {
		var e struct {
			MsgType    string
			MsgContent map[string]any
		}
		if json.Unmarshal(raw, &e) != nil || e.MsgContent == nil {
			return "", fmt.Errorf("MsgBody[%d] is not a message element", i)
		}
		switch e.MsgType {
		case "TIMTextElem":
			t, ok := e.MsgContent["Text"].(string)
			if !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMTextElem needs Text", i)
			}
			texts = append(texts, t)
		case "TIMCustomElem":
			if customs++; customs > 1 {
				return "", errors.New("only one TIMCustomElem per message")
			}
			if _, ok := e.MsgContent["Data"].(string); !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMCustomElem needs Data", i)
			}
		case "TIMLocationElem":
			_, okLat := e.MsgContent["Latitude"].(float64)
			_, okLng := e.MsgContent["Longitude"].(float64)
			desc, okDesc := e.MsgContent["Desc"]
			if _, isString := desc.(string); !okLat || !okLng || okDesc && !isString {
				return "", fmt.Errorf("MsgBody[%d]: TIMLocationElem needs numeric Latitude and Longitude, and Desc a string", i)
			}
		case "TIMSoundElem":
			// Sent by REST, a sound is fetched by clients from its Url: IM
			// asks for Url, UUID, Size, Second and Download_Flag 2.
			u, okURL := e.MsgContent["Url"].(string)
			_, okUUID := e.MsgContent["UUID"].(string)
			_, okSize := e.MsgContent["Size"].(float64)
			_, okSecond := e.MsgContent["Second"].(float64)
			flag, _ := e.MsgContent["Download_Flag"].(float64)
			if !okURL || !strings.HasPrefix(u, "http") || !okUUID || !okSize || !okSecond || flag != 2 {
				return "", fmt.Errorf("MsgBody[%d]: TIMSoundElem needs Url, UUID, Size, Second and Download_Flag 2", i)
			}
		case "TIMFileElem":
			if err := checkFields(e.MsgContent, []string{"Url", "UUID", "FileName"}, []string{"FileSize", "Download_Flag"}); err != nil {
				return "", fmt.Errorf("MsgBody[%d]: TIMFileElem %v", i, err)
			}
		case "TIMVideoFileElem":
			if err := checkFields(e.MsgContent, []string{"VideoUrl", "VideoUUID", "VideoFormat", "ThumbUrl", "ThumbUUID", "ThumbFormat"},
				[]string{"VideoSize", "VideoSecond", "ThumbSize", "ThumbWidth", "ThumbHeight"}); err != nil ||
				e.MsgContent["VideoDownloadFlag"] != 2.0 || e.MsgContent["ThumbDownloadFlag"] != 2.0 {
				return "", fmt.Errorf("MsgBody[%d]: TIMVideoFileElem needs its video and thumbnail fields, download flags 2 (%v)", i, err)
			}
		case "TIMImageElem":
			if err := checkImage(e.MsgContent); err != nil {
				return "", fmt.Errorf("MsgBody[%d]: TIMImageElem %v", i, err)
			}
		case "TIMFaceElem":
			if _, ok := e.MsgContent["Index"].(float64); !ok {
				return "", fmt.Errorf("MsgBody[%d]: TIMFaceElem needs Index", i)
			}
		default:
			return "", fmt.Errorf("MsgBody[%d]: MsgType %q is not modelled by the fake", i, e.MsgType)
		}
	}
	return strings.Join(texts, "\n"), nil
}

// SendAsAgent sends text from agent to the account to, as an IM client
// (OptPlatform Web) would: the Before callback may refuse it, then it is
// delivered and the After callback fires. Both callbacks are made before it
// returns.

// checkImage checks a TIMImageElem's content as IM's message formats page
// (1047/33527) gives it: UUID, ImageFormat, and ImageInfoArray of the
// original (Type 1), large (2) and thumbnail (3), each with Size, Width,
// Height and URL.
func checkImage(c map[string]any) error {
	if _, ok := c["UUID"].(string); !ok {
		return errors.New("needs UUID")
	}
	if _, ok := c["ImageFormat"].(float64); !ok {
		return errors.New("needs a numeric ImageFormat")
	}
	infos, ok := c["ImageInfoArray"].([]any)
	if !ok || len(infos) != 3 {
		return errors.New("needs ImageInfoArray of three sizes")
	}
	for k, x := range infos {
		info, ok := x.(map[string]any)
		if !ok {
			return fmt.Errorf("ImageInfoArray[%d] is not an object", k)
		}
		for _, f := range []string{"Type", "Size", "Width", "Height"} {
			if _, ok := info[f].(float64); !ok {
				return fmt.Errorf("ImageInfoArray[%d] needs a numeric %s", k, f)
			}
		}
		if u, ok := info["URL"].(string); !ok || !strings.HasPrefix(u, "http") {
			return fmt.Errorf("ImageInfoArray[%d] needs a URL", k)
		}
	}
	return nil
}

// checkFields reports the first of strs that is not a string, or of nums
// that is not a number, in c.
func checkFields(c map[string]any, strs, nums []string) error {
	for _, f := range strs {
		if _, ok := c[f].(string); !ok {
			return fmt.Errorf("%s is not a string", f)
		}
	}
	for _, f := range nums {
		if _, ok := c[f].(float64); !ok {
			return fmt.Errorf("%s is not a number", f)
		}
	}
	return nil
}
