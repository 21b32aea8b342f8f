package main

// Fuzz targets for the code that reads what strangers send: the push
// parser, the decryptor, the signature checks and the callback decoder. The
// seeds here and in testdata/fuzz/ run in every ordinary test run; run one
// target for longer with, e.g., go test -run '^$' -fuzz FuzzDecodePush.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func addPushSeeds(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "push", "*.xml"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

func FuzzDecodePush(f *testing.F) {
	addPushSeeds(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		p, err := decodePush(body)
		if err != nil {
			if !errors.Is(err, errBadPush) {
				t.Fatalf("error %v does not wrap errBadPush", err)
			}
			return
		}
		if p.FromUserName == "" || p.MsgType == "" {
			t.Fatalf("accepted a push without sender or type: %+v", p)
		}
		b := &bridge{cfg: Config{IMUserPrefix: "wx_"}}
		in := b.inbound(p)
		if in.Action == actMessage && in.Text == "" && p.MsgType != msgText {
			t.Fatalf("a %s message has no readable text", p.MsgType)
		}
		reply := encodeTextReply(p, "hello ]]> <&>", 1)
		if _, err := decodePushReply(reply); err != nil {
			t.Fatalf("the reply to an accepted push does not parse: %v\n%s", err, reply)
		}
	})
}

// FuzzFlatPushScan holds the fast path to encoding/xml: whatever push it
// reads, encoding/xml reads the same way.
func FuzzFlatPushScan(f *testing.F) {
	addPushSeeds(f)
	for _, s := range []string{
		"<xml><Content>a<![CDATA[b]]>c</Content></xml>",
		"<xml><CreateTime></CreateTime><X><![CDATA[</xml>]]></X></xml>",
		"\n<xml>\n<MsgType>text</MsgType>\n</xml>trailing",
		"<xml><Content>\u00e9\U0001F600</Content></xml>",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var fast Push
		if !scanFlatPush(body, &fast) {
			return
		}
		var slow Push
		if err := decodeXML(body, &slow); err != nil {
			t.Fatalf("the fast path read %+v, encoding/xml refused: %v", fast, err)
		}
		if fast != slow {
			t.Fatalf("the fast path read\n%+v\nencoding/xml\n%+v", fast, slow)
		}
	})
}

// decodePushReply parses a passive text reply, for the fuzzer's check.
func decodePushReply(b []byte) (textReply, error) {
	var r textReply
	err := decodeXML(b, &r)
	return r, err
}

func FuzzWeChatDecrypt(f *testing.F) {
	key, _ := parseEncodingAESKey(v1EncodingAESKey)
	f.Add(v1Encrypt)
	f.Add("")
	f.Add("AAAA")
	f.Fuzz(func(t *testing.T, encrypt string) {
		msg, err := wechatDecrypt(key, v1AppID, encrypt)
		if err != nil {
			if !errors.Is(err, errDecrypt) {
				t.Fatalf("error %v does not wrap errDecrypt", err)
			}
			return
		}
		// Whatever decrypts must encrypt back to something that decrypts
		// to the same message.
		again, err := wechatEncrypt(key, v1AppID, bytes.Repeat([]byte{'r'}, 16), msg)
		if err != nil {
			t.Fatal(err)
		}
		if back, err := wechatDecrypt(key, v1AppID, again); err != nil || !bytes.Equal(back, msg) {
			t.Fatalf("round trip of %q gave %q, %v", msg, back, err)
		}
	})
}

func FuzzWeChatEncryptRoundTrip(f *testing.F) {
	key, _ := parseEncodingAESKey(v1EncodingAESKey)
	f.Add([]byte(v1Message), v1AppID)
	f.Add([]byte{}, "")
	f.Add(bytes.Repeat([]byte{32}, 64), "wx")
	f.Fuzz(func(t *testing.T, msg []byte, appID string) {
		enc, err := wechatEncrypt(key, appID, []byte("0123456789abcdef"), msg)
		if err != nil {
			t.Fatal(err)
		}
		got, err := wechatDecrypt(key, appID, enc)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("got %q, %v; want %q", got, err, msg)
		}
		if appID != v1AppID {
			if _, err := wechatDecrypt(key, v1AppID, enc); err == nil && !bytes.HasSuffix([]byte(appID), []byte(v1AppID)) {
				t.Fatalf("a message for appid %q decrypted for %q", appID, v1AppID)
			}
		}
	})
}

func FuzzSignatures(f *testing.F) {
	f.Add("AAAAA", "1714036504", "1514711492", "f464b24fc39322e44b38aa78f5edd27bd1441696")
	f.Add("xxxxyyyy", "1669872112", "", "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061")
	f.Add("", "", "", "")
	f.Fuzz(func(t *testing.T, token, timestamp, nonce, sig string) {
		good := wechatSignature(token, timestamp, nonce)
		if !validWeChatSignature(token, timestamp, nonce, good) {
			t.Fatal("the right signature is refused")
		}
		if sig != good && validWeChatSignature(token, timestamp, nonce, sig) && !equalFoldHex(sig, good) {
			t.Fatalf("signature %q accepted, want %q", sig, good)
		}
		if !validMsgSignature(token, timestamp, nonce, sig, wechatSignature(token, timestamp, nonce, sig)) {
			t.Fatal("the right msg_signature is refused")
		}
		now := time.Unix(1669872112, 0)
		validCallbackSign(token, timestamp, sig, now, time.Minute) // must not panic
		if validCallbackSign(token, timestamp, sig, now, time.Minute) && !equalFoldHex(sig, callbackSignOf(token, timestamp)) {
			t.Fatalf("callback sign %q accepted for %q", sig, timestamp)
		}
	})
}

func FuzzDecodeCallback(f *testing.F) {
	f.Add([]byte(`{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"agent_kim","To_Account":"wx_o1","MsgSeq":1,"MsgRandom":2,"MsgTime":3,"MsgKey":"1_2_3","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}],"SendMsgResult":0}`))
	f.Add([]byte(`{"MsgBody":[{"MsgType":"TIMImageElem","MsgContent":{"ImageInfoArray":[{"URL":1},{}]}},{"MsgType":"TIMLocationElem","MsgContent":{"Latitude":"x"}}]}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		cb, err := decodeCallback(body)
		if err != nil {
			return
		}
		text := callbackText(cb.MsgBody)
		if !json.Valid(body) {
			t.Fatalf("invalid JSON accepted: %q", body)
		}
		_ = callbackKey(cb)
		_ = text
	})
}

// equalFoldHex reports whether sig, lower-cased, is want: the checks take
// hex digests in either case.
func equalFoldHex(sig, want string) bool { return strings.ToLower(sig) == want }

// callbackSignOf is the callback Sign for token and requestTime.
func callbackSignOf(token, requestTime string) string {
	sum := sha256.Sum256([]byte(token + requestTime))
	return hex.EncodeToString(sum[:])
}
