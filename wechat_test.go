package main

import (
	"context"
	"encoding/xml"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"wechat-im-bridge/fakes"
)

func TestWeChatSignatureOfficialVectors(t *testing.T) {
	for _, tc := range []struct {
		name, token, timestamp, nonce, want string
	}{
		{"URL verification", "AAAAA", "1714036504", "1514711492", "f464b24fc39322e44b38aa78f5edd27bd1441696"},
		{"plaintext push", "AAAAA", "1714037059", "486452656", "899cf89e464efb63f54ddac96b0a0a235f53aa78"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := wechatSignature(tc.token, tc.timestamp, tc.nonce); got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
			if !validWeChatSignature(tc.token, tc.timestamp, tc.nonce, tc.want) {
				t.Error("the official signature is refused")
			}
			if !validWeChatSignature(tc.token, tc.timestamp, tc.nonce, strings.ToUpper(tc.want)) {
				t.Error("the signature in upper case is refused")
			}
			if validWeChatSignature(tc.token+"x", tc.timestamp, tc.nonce, tc.want) {
				t.Error("another token's signature is accepted")
			}
			if validWeChatSignature(tc.token, tc.timestamp, tc.nonce, "") {
				t.Error("an empty signature is accepted")
			}
		})
	}
}

func readPush(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "push", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDecodePush decodes a sample of every documented message and event
// type and checks what the bridge makes of it.
func TestDecodePush(t *testing.T) {
	for _, tc := range []struct {
		file       string
		wantType   string
		wantEvent  string
		wantAction pushAction
		wantText   string
		wantKey    string
	}{
		{"text.xml", "text", "", actMessage, "아동복 신상품은 언제쯤 나오나요?", "wx:msg:1669640884:6265881059295447969:oJqxQwYRyZMXFTc8sipB5TSe6Vw4"},
		{"image.xml", "image", "", actMessage, "[image] http://mmbiz.qpic.cn/mmbiz_jpg/abc/0", ""},
		{"voice.xml", "voice", "", actMessage, "[voice] 언제 나와요", ""},
		{"video.xml", "video", "", actMessage, "[video]", ""},
		{"shortvideo.xml", "shortvideo", "", actMessage, "[short video]", ""},
		{"location.xml", "location", "", actMessage, "[location] Seoul City Hall (37.5665, 126.978)", ""},
		{"link.xml", "link", "", actMessage, "[link] Spring collection\nNew arrivals\nhttps://example.com/spring", ""},
		{"subscribe.xml", "event", "subscribe", actFollow, "", "wx:event:1669640891:oJqxQwYRyZMXFTc8sipB5TSe6Vw4:subscribe:qrscene_123123"},
		{"unsubscribe.xml", "event", "unsubscribe", actUnfollow, "", ""},
		{"scan.xml", "event", "SCAN", actEvent, "", ""},
		{"location_event.xml", "event", "LOCATION", actNone, "", ""},
		{"click.xml", "event", "CLICK", actEvent, "", ""},
		{"view.xml", "event", "VIEW", actNone, "", ""},
	} {
		t.Run(tc.file, func(t *testing.T) {
			p, err := decodePush(readPush(t, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if p.MsgType != tc.wantType || p.Event != tc.wantEvent || p.FromUserName != "oJqxQwYRyZMXFTc8sipB5TSe6Vw4" || p.ToUserName != "gh_b1eb3f8bd6c6" {
				t.Errorf("got %s/%s from %s to %s, want %s/%s", p.MsgType, p.Event, p.FromUserName, p.ToUserName, tc.wantType, tc.wantEvent)
			}
			b := &bridge{cfg: Config{IMUserPrefix: "wx_", IMAgents: []string{"a"}}}
			in := b.inbound(p)
			if in.Action != tc.wantAction || in.Text != tc.wantText {
				t.Errorf("got action %d text %q, want %d %q", in.Action, in.Text, tc.wantAction, tc.wantText)
			}
			if tc.wantKey != "" && in.Key != tc.wantKey {
				t.Errorf("got key %q, want %q", in.Key, tc.wantKey)
			}
			if in.IMUser != "wx_oJqxQwYRyZMXFTc8sipB5TSe6Vw4" {
				t.Errorf("got IM user %q", in.IMUser)
			}
		})
	}
}

func TestDecodePushRefuses(t *testing.T) {
	text := string(readPush(t, "text.xml"))
	for _, tc := range []struct {
		name, body string
	}{
		{"empty body", ""},
		{"not xml", "hello"},
		{"truncated xml", text[:len(text)/2]},
		{"json", `{"ToUserName":"gh_x","MsgType":"text"}`},
		{"doctype", `<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY e "boom">]>` + text},
		{"no FromUserName", strings.Replace(text, "<FromUserName><![CDATA[oJqxQwYRyZMXFTc8sipB5TSe6Vw4]]></FromUserName>", "", 1)},
		{"no MsgType", strings.Replace(text, "<MsgType><![CDATA[text]]></MsgType>", "", 1)},
		{"message without MsgId", strings.Replace(text, "<MsgId>6265881059295447969</MsgId>", "", 1)},
		{"MsgId not a number", strings.Replace(text, "6265881059295447969", "abc", 1)},
		{"event without Event", strings.Replace(string(readPush(t, "click.xml")), "<Event><![CDATA[CLICK]]></Event>", "", 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := decodePush([]byte(tc.body)); !errors.Is(err, errBadPush) {
				t.Errorf("got %v, want errBadPush", err)
			}
		})
	}
}

func TestEncodeTextReplyRoundTrip(t *testing.T) {
	push := Push{ToUserName: "gh_b1eb3f8bd6c6", FromUserName: "oJqx"}
	for _, text := range []string{"hello", "a ]]> b", "<b>&amp;</b>", "줄\n바꿈"} {
		b := encodeTextReply(push, text, 1700000000)
		var got textReply
		if err := xml.Unmarshal(b, &got); err != nil {
			t.Fatalf("%q: %v\n%s", text, err, b)
		}
		if got.Content.Value != text || got.ToUserName.Value != "oJqx" || got.FromUserName.Value != "gh_b1eb3f8bd6c6" || got.CreateTime != 1700000000 {
			t.Errorf("%q: got %+v", text, got)
		}
	}
}

// TestEveryMessageTypeCrosses pushes each sample message type through the
// bridge and checks the agent reads it; events the bridge does not act on
// are answered "success" and reach nobody.
func TestEveryMessageTypeCrosses(t *testing.T) {
	h := newHarness(t, harnessOptions{wechat: fakes.WeChatOptions{OAID: "gh_b1eb3f8bd6c6"}})
	ctx := context.Background()
	wantTexts := []string{}
	for _, tc := range []struct {
		file     string
		wantText string // the text, or the elements as sent; empty: nothing reaches IM
	}{
		{"text.xml", "아동복 신상품은 언제쯤 나오나요?"},
		{"image.xml", "[image] http://mmbiz.qpic.cn/mmbiz_jpg/abc/0"},
		{"voice.xml", "[voice] 언제 나와요"},
		{"video.xml", "[video]"},
		{"shortvideo.xml", "[short video]"},
		{"location.xml", `[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"Seoul City Hall","Latitude":37.5665,"Longitude":126.978}}]`},
		{"link.xml", "[link] Spring collection\nNew arrivals\nhttps://example.com/spring"},
		{"scan.xml", ""},
		{"location_event.xml", ""},
		{"click.xml", ""},
		{"view.xml", ""},
	} {
		r := h.wx.Push(ctx, readPush(t, tc.file))
		if r.Status != 200 {
			t.Errorf("%s: got status %d %q", tc.file, r.Status, r.Body)
		}
		if tc.wantText == "" {
			if r.Body != "success" {
				t.Errorf("%s: got %q, want success", tc.file, r.Body)
			}
			continue
		}
		wantTexts = append(wantTexts, tc.wantText)
	}
	eventually(t, "every message in IM", func() bool { return len(h.im.Messages()) == len(wantTexts) })
	for i, m := range h.im.Messages() {
		if got := m.Text; got != wantTexts[i] && string(m.Body) != wantTexts[i] {
			t.Errorf("message %d: agent read %q (%s), want %q", i, got, m.Body, wantTexts[i])
		}
	}
}

// The fast path reads every push sample (so the fuzz test compares real
// pushes), and reads it as encoding/xml does.
func TestFlatPushScanReadsSamples(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("testdata", "push", "*.xml"))
	if len(files) == 0 {
		t.Fatal("no push samples")
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		var fast, slow Push
		if !scanFlatPush(b, &fast) {
			t.Errorf("%s: the fast path left it to encoding/xml", name)
			continue
		}
		if err := decodeXML(b, &slow); err != nil || fast != slow {
			t.Errorf("%s: fast path %+v, encoding/xml %+v, %v", name, fast, slow, err)
		}
	}
	// What it does not read, it leaves alone.
	for _, body := range []string{
		`<?xml version="1.0"?><xml><MsgType>text</MsgType></xml>`,
		`<xml><Content>a &amp; b</Content></xml>`,
		`<xml><Content a="1">x</Content></xml>`,
		`<xml><!-- c --><MsgType>text</MsgType></xml>`,
		`<xml><MsgType>text</MsgType><MsgType>image</MsgType></xml>`,
		"<xml><Content>a\r\nb</Content></xml>",
		`<xml><ScanCodeInfo><ScanType>qrcode</ScanType></ScanCodeInfo></xml>`,
		`<xml><Content>x</Contents></xml>`,
		`<root><MsgType>text</MsgType></root>`,
	} {
		var p Push
		if scanFlatPush([]byte(body), &p) {
			t.Errorf("the fast path read %q", body)
		}
	}
}
