package main

// The WeChat side's wire protocol: signatures, the pushed XML, passive replies.
// Everything here is pure, so it is tested against the official vectors.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
)

// wechatSignature is sha1 over the sorted, concatenated parts, in lowercase
// hex: sort(token, timestamp, nonce) for URL verification and pushes.
func wechatSignature(parts ...string) string {
	sum := signatureSum(parts...)
	return hex.EncodeToString(sum[:])
}

// signatureSum is the sha1 of the sorted, concatenated parts. It takes four
// parts at most (msg_signature's), sorted and joined on the stack but for
// long ones (an encrypted push).
func signatureSum(parts ...string) [sha1.Size]byte {
	var sorted [4]string
	s := append(sorted[:0], parts...)
	slices.Sort(s)
	buf := make([]byte, 0, 256)
	for _, p := range s {
		buf = append(buf, p...)
	}
	return sha1.Sum(buf)
}

// signatureMatches reports, in constant time but for its length, whether
// sig is the signature of parts, in hex of either case.
func signatureMatches(sig string, parts ...string) bool {
	sum := signatureSum(parts...)
	var want [2 * sha1.Size]byte
	hex.Encode(want[:], sum[:])
	if len(sig) != len(want) {
		return false
	}
	var diff byte
	for i := range want {
		c := sig[i]
		if 'A' <= c && c <= 'F' {
			c += 'a' - 'A'
		}
		diff |= want[i] ^ c
	}
	return diff == 0
}

// validWeChatSignature reports, in constant time, whether signature signs
// timestamp and nonce with token.
func validWeChatSignature(token, timestamp, nonce, signature string) bool {
	return signatureMatches(signature, token, timestamp, nonce)
}

// Message types and events the bridge knows by name.
const (
	msgText       = "text"
	msgImage      = "image"
	msgVoice      = "voice"
	msgVideo      = "video"
	msgShortVideo = "shortvideo"
	msgLocation   = "location"
	msgLink       = "link"
	msgEvent      = "event"

	eventSubscribe   = "subscribe"
	eventUnsubscribe = "unsubscribe"
)

// quotaEvents are the events after which WeChat takes three
// customer-service messages within a minute: a menu click (click,
// scancode_push and scancode_waitmsg only) and a QR scan by a follower.
var quotaEvents = map[string]bool{"CLICK": true, "scancode_push": true, "scancode_waitmsg": true, "SCAN": true}

// errBadPush marks a push the bridge refuses as malformed.
var errBadPush = errors.New("bad wechat push")

// noDirectives passes XML tokens through and refuses any directive, so a
// DOCTYPE or entity declaration never reaches the decoder.
type noDirectives struct{ d *xml.Decoder }

func (n noDirectives) Token() (xml.Token, error) {
	t, err := n.d.Token()
	if _, ok := t.(xml.Directive); ok {
		return nil, errors.New("xml directives (DOCTYPE, ENTITY) are not allowed")
	}
	return t, err
}

// decodeXML decodes a WeChat XML body into v, strictly, refusing DOCTYPE
// and entity declarations. Its errors wrap errBadPush.
func decodeXML(body []byte, v any) error {
	d := xml.NewDecoder(bytes.NewReader(body))
	d.Strict = true
	if err := xml.NewTokenDecoder(noDirectives{d}).Decode(v); err != nil {
		return fmt.Errorf("%w: decode xml: %v", errBadPush, err)
	}
	return nil
}

// decodePush parses a plaintext push and checks the fields every push must
// carry. Its errors wrap errBadPush.
func decodePush(body []byte) (Push, error) {
	var p Push
	if !scanFlatPush(body, &p) {
		p = Push{}
		if err := decodeXML(body, &p); err != nil {
			return Push{}, err
		}
	}
	switch {
	case p.FromUserName == "":
		return Push{}, fmt.Errorf("%w: FromUserName is missing", errBadPush)
	case p.MsgType == "":
		return Push{}, fmt.Errorf("%w: MsgType is missing", errBadPush)
	case p.MsgType == msgEvent && p.Event == "":
		return Push{}, fmt.Errorf("%w: Event is missing", errBadPush)
	case p.MsgType != msgEvent && isMessageType(p.MsgType) && p.MsgID == "":
		return Push{}, fmt.Errorf("%w: MsgId is missing", errBadPush)
	}
	if p.MsgID != "" {
		if _, err := strconv.ParseUint(p.MsgID, 10, 64); err != nil {
			return Push{}, fmt.Errorf("%w: MsgId %q is not a 64-bit number", errBadPush, p.MsgID)
		}
	}
	return p, nil
}

// isMessageType reports whether t is one of the customer message types the
// bridge forwards.
func isMessageType(t string) bool {
	switch t {
	case msgText, msgImage, msgVoice, msgVideo, msgShortVideo, msgLocation, msgLink:
		return true
	}
	return false
}

// pushKey identifies a push across WeChat's retries: messages by MsgId with
// sender and time (MsgIds have collided across users), events by sender, time
// and event, as WeChat recommends. The time comes first, so that keys
// arrive in nearly ascending order and each commit changes few pages of
// their index.
func pushKey(p Push) string {
	t := strconv.FormatInt(p.CreateTime, 10)
	if p.MsgID != "" {
		return "wx:msg:" + t + ":" + p.MsgID + ":" + p.FromUserName
	}
	return "wx:event:" + t + ":" + p.FromUserName + ":" + p.Event + ":" + p.EventKey
}

// readableText renders a customer message as the text an agent reads.
func readableText(p Push) string {
	switch p.MsgType {
	case msgText:
		return p.Content
	case msgImage:
		return "[image] " + p.PicURL
	case msgVoice:
		if p.Recognition != "" {
			return "[voice] " + p.Recognition
		}
		return "[voice message]"
	case msgVideo:
		return "[video]"
	case msgShortVideo:
		return "[short video]"
	case msgLocation:
		if p.Label == "" {
			return fmt.Sprintf("[location] (%s, %s)", p.LocationX, p.LocationY)
		}
		return fmt.Sprintf("[location] %s (%s, %s)", p.Label, p.LocationX, p.LocationY)
	case msgLink:
		s := "[link] " + p.Title
		if p.Description != "" {
			s += "\n" + p.Description
		}
		return s + "\n" + p.URL
	}
	return "[" + p.MsgType + "]"
}

// cdata is a string written as a CDATA section, as WeChat's own XML is.
type cdata struct {
	Value string `xml:",cdata"`
}

// textReply is a passive text reply.
type textReply struct {
	XMLName      xml.Name `xml:"xml"`
	ToUserName   cdata    `xml:"ToUserName"`
	FromUserName cdata    `xml:"FromUserName"`
	CreateTime   int64    `xml:"CreateTime"`
	MsgType      cdata    `xml:"MsgType"`
	Content      cdata    `xml:"Content"`
}

// encodeTextReply builds the passive reply that answers push with text.
func encodeTextReply(push Push, text string, now int64) []byte {
	b, err := xml.Marshal(textReply{
		ToUserName:   cdata{push.FromUserName},
		FromUserName: cdata{push.ToUserName},
		CreateTime:   now,
		MsgType:      cdata{"text"},
		Content:      cdata{text},
	})
	if err != nil {
		panic("encode text reply: " + err.Error()) // only strings and an int: cannot fail
	}
	return b
}

// readLimited reads at most limit bytes of r, and errTooLarge past that.
func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, errTooLarge
	}
	return b, nil
}

// errTooLarge is returned by readLimited for a body over its limit.
var errTooLarge = errors.New("body too large")

// validMsgSignature reports, in constant time, whether sig is the
// msg_signature of an encrypted push or reply.
func validMsgSignature(token, timestamp, nonce, encrypt, sig string) bool {
	return signatureMatches(sig, token, timestamp, nonce, encrypt)
}

// encryptedPush is the envelope of an encrypted push. In compatible mode the
// plaintext fields are there too; the bridge reads only what is encrypted,
// since only that is signed.
type encryptedPush struct {
	ToUserName string `xml:"ToUserName"`
	Encrypt    string `xml:"Encrypt"`
}

// decodeEncryptedPush parses the envelope of an encrypted push.
func decodeEncryptedPush(body []byte) (encryptedPush, error) {
	var e encryptedPush
	if err := decodeXML(body, &e); err != nil {
		return encryptedPush{}, err
	}
	if e.Encrypt == "" {
		return encryptedPush{}, fmt.Errorf("%w: Encrypt is missing", errBadPush)
	}
	return e, nil
}

// encryptedReply is a passive reply in safe mode.
type encryptedReply struct {
	XMLName      xml.Name `xml:"xml"`
	Encrypt      cdata    `xml:"Encrypt"`
	MsgSignature cdata    `xml:"MsgSignature"`
	TimeStamp    int64    `xml:"TimeStamp"`
	Nonce        cdata    `xml:"Nonce"`
}

// encryptReply wraps a plaintext passive reply in the encrypted envelope,
// signed with token; timestamp (seconds) and nonce are the reply's own.
func encryptReply(key []byte, appID, token string, reply []byte, timestamp int64, nonce string) ([]byte, error) {
	random := make([]byte, 16)
	rand.Read(random)
	enc, err := wechatEncrypt(key, appID, random, reply)
	if err != nil {
		return nil, err
	}
	ts := fmt.Sprint(timestamp)
	return xml.Marshal(encryptedReply{
		Encrypt:      cdata{enc},
		MsgSignature: cdata{wechatSignature(token, ts, nonce, enc)},
		TimeStamp:    timestamp,
		Nonce:        cdata{nonce},
	})
}
