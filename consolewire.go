package main

// The console's wire: each HTTP exchange between WeChat, the bridge and IM,
// made readable. A payload is pretty-printed (XML and JSON indented, a
// multipart upload or a file summarised), its secrets and signatures
// masked, an encrypted push or reply shown beside its plaintext, a
// signature beside the computation that makes it, and one sentence says
// what the exchange is and why, linking the page it follows.

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"wechat-im-bridge/fakes"
)

// wireEntry is one line of the wire: an exchange, or a note ("step" or
// "error") of the console's own.
type wireEntry struct {
	Seq    int    `json:"seq"`
	Kind   string `json:"kind"` // http, step or error
	At     string `json:"at"`
	T      int64  `json:"t"` // when, in µs: the page shows exchanges in the order they began
	From   string `json:"from,omitempty"`
	To     string `json:"to,omitempty"`
	Title  string `json:"title"`
	What   string `json:"what,omitempty"`
	Link   string `json:"link,omitempty"`
	Req    string `json:"req,omitempty"`  // the request line, masked, and its body
	Sign   string `json:"sign,omitempty"` // how the request's or answer's signature is made
	Inner  string `json:"inner,omitempty"`
	Status int    `json:"status,omitempty"`
	Resp   string `json:"resp,omitempty"`
	// RespInner is an encrypted answer's plaintext.
	RespInner string `json:"respInner,omitempty"`
}

// wireSecrets are what the console needs to open and check what it shows:
// never shown themselves.
type wireSecrets struct {
	WeChatToken, AppID, AESKey, IMCallbackToken string
}

// Pages an exchange follows.
const (
	docPush     = "https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_standard_messages.html"
	docEvent    = "https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html"
	docVerify   = "https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/message-push.html"
	docSafe     = "https://developers.weixin.qq.com/doc/subscription/guide/dev/push/encryption.md"
	docToken    = "https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/getStableAccessToken.html"
	docCustom   = "https://developers.weixin.qq.com/doc/offiaccount/Customer_Service/Customer_Service_Messages.html"
	docMedia    = "https://developers.weixin.qq.com/doc/offiaccount/Asset_Management/New_temporary_materials.html"
	docCallback = "https://cloud.tencent.com/document/product/269/1522"
	docState    = "https://cloud.tencent.com/document/product/269/2570"
	docSendMsg  = "https://cloud.tencent.com/document/product/269/2282"
	docImport   = "https://cloud.tencent.com/document/product/269/1608"
	docOnline   = "https://cloud.tencent.com/document/product/269/2566"
	docRoam     = "https://cloud.tencent.com/document/product/269/42794"
	docDelete   = "https://cloud.tencent.com/document/product/269/36443"
	docCheck    = "https://cloud.tencent.com/document/product/269/38417"
	docElems    = "https://www.tencentcloud.com/document/product/1047/33527"
)

// explainExchange makes x a wire entry.
func explainExchange(x fakes.Exchange, sec wireSecrets) wireEntry {
	u, _ := url.Parse(x.URL)
	q := u.Query()
	e := wireEntry{Kind: "http", At: x.At.Format("15:04:05.000"), T: x.At.UnixMicro(), From: x.From, To: x.To, Status: x.Status,
		Title: x.Method + " " + u.Path}
	e.Req = x.Method + " " + maskURL(u) + "\n\n" + prettyBody(x.ReqType, x.Req)
	e.Resp = prettyBody(x.RespType, x.Resp)
	if x.Status == 0 {
		e.Resp = "(no answer: the caller gave up)"
	}
	switch {
	case u.Path == "/wechat":
		explainPush(&e, x, q, sec)
	case u.Path == "/imcallback":
		explainCallback(&e, q, sec, x.From)
	case strings.HasPrefix(u.Path, "/media/"):
		e.What, e.Link = "The agent's IM client downloads the customer's file from the bridge, at the URL the IM message's element gave (PUBLIC_URL/media/{id}).", docElems
	case x.To == "WeChat":
		explainWeChatAPI(&e, u.Path)
	case x.To == "IM":
		explainIMAPI(&e, u.Path, x.Req)
	}
	return e
}

// explainPush explains a push or the URL verification, and shows how its
// signatures are made and, in safe mode, what its envelope holds.
func explainPush(e *wireEntry, x fakes.Exchange, q url.Values, sec wireSecrets) {
	ts, nonce := q.Get("timestamp"), q.Get("nonce")
	e.Sign = signWork("signature", q.Get("signature"), sec.WeChatToken, "WECHAT_TOKEN", ts, nonce)
	if x.Method == "GET" {
		e.Title = "GET /wechat: URL verification"
		e.What, e.Link = "WeChat checks the URL the operator saved in its console: the bridge echoes echostr only if signature is WeChat's, made with the Token both know.", docVerify
		return
	}
	plain := x.Req
	if enc := xmlField(x.Req, "Encrypt"); enc != "" {
		e.Sign += "\n\n" + signWork("msg_signature", q.Get("msg_signature"), sec.WeChatToken, "WECHAT_TOKEN", ts, nonce, enc)
		if b, err := openEnvelope(sec, enc); err == nil {
			plain = b
			e.Inner = indentXML(b)
		}
	}
	if enc := xmlField(x.Resp, "Encrypt"); enc != "" {
		e.Sign += "\n\nThe reply's MsgSignature, the same way:\n" + signWork("MsgSignature", xmlField(x.Resp, "MsgSignature"), sec.WeChatToken, "WECHAT_TOKEN",
			xmlField(x.Resp, "TimeStamp"), xmlField(x.Resp, "Nonce"), enc)
		if b, err := openEnvelope(sec, enc); err == nil {
			e.RespInner = indentXML(b)
		}
	}
	msgType, event := xmlField(plain, "MsgType"), xmlField(plain, "Event")
	e.Title = "POST /wechat: " + msgType
	if event != "" {
		e.Title += " " + event
	}
	safe := ""
	if e.Inner != "" {
		safe = " In safe mode the message travels AES-encrypted in Encrypt, signed by msg_signature; the reply is encrypted the same way."
	}
	switch {
	case x.Status == 0:
		e.What, e.Link = "The bridge did not answer within WeChat's 5 s: WeChat drops the connection and pushes again, three times in all.", docPush
	case event == "subscribe":
		e.What, e.Link = "WeChat pushes the follow as a signed XML event: the bridge records the customer, answers the welcome as a passive reply, and queues the import of their IM account."+safe, docEvent
	case event == "unsubscribe":
		e.What, e.Link = "WeChat pushes the unfollow: the bridge closes the customer's conversation, and tells the agent."+safe, docEvent
	case event != "":
		e.What, e.Link = "WeChat pushes an event of the customer's."+safe, docEvent
	default:
		e.What, e.Link = "WeChat pushes the customer's message as signed XML: the bridge commits it to its outbox and answers within WeChat's 5 s, with a passive reply where the customer has something to read (the connecting text on a conversation's first message, their place in the queue, thanks for a rating), else \"success\"; its worker carries the message to IM."+safe, docPush
	}
	if e.Inner != "" {
		e.Link = docSafe
	}
}

// explainCallback explains one of IM's callbacks, and how its Sign is made.
func explainCallback(e *wireEntry, q url.Values, sec wireSecrets, from string) {
	cmd := q.Get("CallbackCommand")
	e.Title = "POST /imcallback: " + cmd
	e.Link = docCallback
	if from != "IM" {
		e.What = "Someone posts a reply as IM would, without IM's Sign: the bridge refuses it, and no customer receives it."
		return
	}
	rt := q.Get("RequestTime")
	sum := sha256.Sum256([]byte(sec.IMCallbackToken + rt))
	e.Sign = fmt.Sprintf("Sign = sha256(token + RequestTime)\n  token       = %s (IM_CALLBACK_TOKEN, from IM's console)\n  RequestTime = %s\n  sha256      = %s  %s",
		masked, rt, maskSig(hex.EncodeToString(sum[:])), matchMark(hex.EncodeToString(sum[:]) == q.Get("Sign")))
	switch cmd {
	case "C2C.CallbackAfterSendMsg":
		e.What = "IM tells the bridge an agent sent a message: the bridge queues it for the customer (or acts on a command such as /transfer) and answers at once."
	case "C2C.CallbackBeforeSendMsg":
		e.What = "IM asks the bridge before it delivers a message: the bridge lets it through."
	case "State.StateChange":
		e.What, e.Link = "IM tells the bridge an agent's client logged in or out: the desk gives waiting customers to agents online, and hands on the conversations of one who stays away.", docState
	default:
		e.What = "IM calls the bridge back."
	}
}

// explainWeChatAPI explains a call of the bridge's to WeChat's API.
func explainWeChatAPI(e *wireEntry, path string) {
	switch {
	case path == "/cgi-bin/stable_token":
		e.What, e.Link = "The bridge gets an access_token with the AppID and AppSecret, keeps it in its database for every instance, and renews it before it ends.", docToken
	case path == "/cgi-bin/message/custom/send":
		e.What, e.Link = "The bridge sends the customer what the agent wrote, or its own word (an agent joined, a transfer, the end and its rating question), with the customer-service message API: allowed within 48 h of the customer's last message, five to each.", docCustom
	case path == "/cgi-bin/message/custom/typing":
		e.What, e.Link = "The bridge shows the customer that the agent is typing.", docCustom
	case path == "/cgi-bin/media/get":
		e.What, e.Link = "The bridge fetches the customer's file from WeChat (kept there three days) to keep it and give the agent a URL to it.", docMedia
	case path == "/cgi-bin/media/upload":
		e.What, e.Link = "The bridge uploads the agent's file to WeChat as temporary media, to send it by its media_id.", docMedia
	case strings.HasPrefix(path, "/mmbiz/"):
		e.What, e.Link = "The bridge fetches the customer's photo from its PicUrl.", docPush
	default:
		e.What = "The bridge calls WeChat's API."
	}
}

// explainIMAPI explains a call of the bridge's to IM's REST API.
func explainIMAPI(e *wireEntry, path string, body []byte) {
	cmd := strings.TrimPrefix(path, "/v4/")
	e.Title = "POST " + cmd
	switch cmd {
	case "im_open_login_svc/account_import":
		e.What, e.Link = "The bridge imports the customer's own IM account (IM_USER_PREFIX + openid), so that the customer is a contact in the agent's client.", docImport
	case "im_open_login_svc/account_delete":
		e.What, e.Link = "The bridge deletes a customer's IM account (IM_UNFOLLOW=delete).", docDelete
	case "im_open_login_svc/account_check":
		e.What, e.Link = "The bridge checks whether IM has a customer's account.", docCheck
	case "openim/sendmsg":
		var m struct{ From_Account, To_Account string }
		json.Unmarshal(body, &m)
		e.What, e.Link = fmt.Sprintf("The bridge, as IM's admin, sends a one-to-one message from %s to %s. MsgSeq and MsgRandom are chosen once, so a retry is the same message and IM drops a repeat.", m.From_Account, m.To_Account), docSendMsg
	case "openim/query_online_status":
		e.What, e.Link = "The bridge asks IM which agents are online, to give customers to them.", docOnline
	case "openim/admin_getroammsg":
		e.What, e.Link = "The bridge reads a conversation's history in IM: to learn whether a send it had no answer to arrived, or to read back the replies of a gap.", docRoam
	default:
		if strings.HasPrefix(path, "/files/") {
			e.Title = "GET " + path
			e.What, e.Link = "The bridge downloads the agent's file from IM's storage, at the URL its element gave, to send it on to WeChat.", docElems
		} else {
			e.What = "The bridge calls IM's REST API."
		}
	}
}

// masked stands for a secret the wire does not show.
const masked = "•••"

// Query parameters that are secrets, and those that are signatures: a
// signature is shown by its first characters, enough to match it with its
// computation, as the bridge's logs never show it at all.
var (
	secretParams = []string{"access_token", "usersig", "secret"}
	sigParams    = []string{"signature", "msg_signature", "Sign"}
	secretJSON   = regexp.MustCompile(`("(?:access_token|secret)"\s*:\s*)"[^"]*"`)
	sigXML       = regexp.MustCompile(`(<MsgSignature>(?:<!\[CDATA\[)?)([0-9a-f]{8})[0-9a-f]+`)
)

// secretInText finds a secret or a signature as a query parameter within
// a text, such as an error that quotes a URL.
var secretInText = regexp.MustCompile(`(?i)\b(access_token|usersig|secret|signature|msg_signature|sign)=[^&\s"]+`)

// maskText is s with the secrets and signatures it quotes masked.
func maskText(s string) string { return secretInText.ReplaceAllString(s, "${1}="+masked) }

// maskURL is u's path and query with secrets and signatures masked.
func maskURL(u *url.URL) string {
	q := u.Query()
	for k, vs := range q {
		for i, v := range vs {
			switch {
			case slices.Contains(secretParams, k):
				vs[i] = masked
			case slices.Contains(sigParams, k):
				vs[i] = maskSig(v)
			}
		}
	}
	if len(q) == 0 {
		return u.Path
	}
	s, _ := url.QueryUnescape(q.Encode())
	return u.Path + "?" + s
}

// maskSig is a signature's first characters: enough to match it with its
// computation, too few to be of use.
func maskSig(s string) string {
	if len(s) <= 8 {
		return s
	}
	return s[:8] + "…"
}

// matchMark says whether a computed signature is the one sent.
func matchMark(ok bool) string {
	if ok {
		return "✓ matches"
	}
	return "✗ does not match"
}

// signWork shows how WeChat's signature name is made: SHA-1 of its inputs
// sorted as strings and joined. The token is shown masked, and the inputs
// in their given order: where the token sorts would tell of it.
func signWork(name, got, token, tokenName string, inputs ...string) string {
	shown := []string{masked + " (" + tokenName + ")"}
	for _, s := range inputs {
		if len(s) > 24 {
			s = s[:16] + "… (Encrypt)"
		}
		shown = append(shown, s)
	}
	all := append([]string{token}, inputs...)
	slices.Sort(all)
	sum := sha1.Sum([]byte(strings.Join(all, "")))
	h := hex.EncodeToString(sum[:])
	return fmt.Sprintf("%s = sha1 of the inputs, sorted as strings and joined\n  inputs = [%s]\n  sha1   = %s  %s", name, strings.Join(shown, ", "), maskSig(h), matchMark(h == got))
}

// openEnvelope decrypts a safe-mode Encrypt text.
func openEnvelope(sec wireSecrets, enc string) ([]byte, error) {
	key, err := parseEncodingAESKey(sec.AESKey)
	if err != nil {
		return nil, err
	}
	return wechatDecrypt(key, sec.AppID, enc)
}

// xmlField is the text of the first element name in b, or "".
func xmlField(b []byte, name string) string {
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		t, err := d.Token()
		if err != nil {
			return ""
		}
		if s, ok := t.(xml.StartElement); ok && s.Name.Local == name {
			var v string
			if d.DecodeElement(&v, &s) == nil {
				return v
			}
			return ""
		}
	}
}

// prettyBody is a payload made readable, secrets masked.
func prettyBody(ctype string, b []byte) string {
	if len(b) == 0 {
		return "(empty)"
	}
	mt, params, _ := mime.ParseMediaType(ctype)
	switch {
	case mt == "multipart/form-data":
		return multipartSummary(b, params["boundary"])
	case strings.HasPrefix(mt, "image/"), strings.HasPrefix(mt, "audio/"), strings.HasPrefix(mt, "video/"), mt == "application/octet-stream":
		return fmt.Sprintf("(%s, %d bytes)", mt, len(b))
	case json.Valid(b):
		var out bytes.Buffer
		if json.Indent(&out, secretJSON.ReplaceAll(b, []byte(`$1"`+masked+`"`)), "", "  ") == nil {
			return out.String()
		}
	case bytes.HasPrefix(bytes.TrimSpace(b), []byte("<xml")):
		return sigXML.ReplaceAllString(indentXML(b), "${1}${2}…")
	case !utf8.Valid(b):
		return fmt.Sprintf("(%d bytes of %s)", len(b), ctype)
	}
	return string(b)
}

// multipartSummary lists an upload's parts: name, file name, type, size.
func multipartSummary(b []byte, boundary string) string {
	r := multipart.NewReader(bytes.NewReader(b), boundary)
	var lines []string
	for {
		p, err := r.NextPart()
		if err != nil {
			break
		}
		n, _ := io.Copy(io.Discard, p)
		lines = append(lines, fmt.Sprintf("part %q: file %q, %s, %d bytes", p.FormName(), p.FileName(), p.Header.Get("Content-Type"), n))
	}
	return "multipart/form-data\n" + strings.Join(lines, "\n")
}

// indentXML is WeChat's flat XML one element a line, text as CDATA unless
// it is a number, as WeChat writes it; what is not such XML is as it came.
func indentXML(b []byte) string {
	if bytes.Contains(bytes.TrimSpace(b), []byte("\n")) {
		return string(b)
	}
	d := xml.NewDecoder(bytes.NewReader(b))
	var out strings.Builder
	depth, open := 0, false
	for {
		t, err := d.RawToken()
		if err == io.EOF {
			return strings.TrimPrefix(out.String(), "\n")
		}
		if err != nil {
			return string(b)
		}
		switch t := t.(type) {
		case xml.StartElement:
			out.WriteString("\n" + strings.Repeat("  ", depth) + "<" + t.Name.Local + ">")
			depth, open = depth+1, true
		case xml.EndElement:
			depth--
			if !open {
				out.WriteString("\n" + strings.Repeat("  ", depth))
			}
			out.WriteString("</" + t.Name.Local + ">")
			open = false
		case xml.CharData:
			s := string(bytes.TrimSpace(t))
			if _, err := strconv.ParseFloat(s, 64); err == nil || s == "" {
				out.WriteString(s)
			} else {
				out.WriteString("<![CDATA[" + s + "]]>")
			}
		}
	}
}
