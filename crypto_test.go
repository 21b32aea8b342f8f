package main

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"strings"
	"testing"
)

// The WXBizMsgCrypt sample constants (protocol notes, vector V1).
const (
	v1EncodingAESKey = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
	v1Token          = "pamtest"
	v1Timestamp      = "1409304348"
	v1Nonce          = "xxxxxx"
	v1AppID          = "wxb11529c136998cb6"
	v1Random         = "aaaabbbbccccdddd"
	v1Message        = "我是中文abcd123"
	v1Encrypt        = "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg=="
	v1MsgSignature   = "82c962d39941aa48552f90ef55aa323dc620cc10"
)

func v1Key(t testing.TB) []byte {
	t.Helper()
	key, err := parseEncodingAESKey(v1EncodingAESKey)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestEncodingAESKey(t *testing.T) {
	if got := hex.EncodeToString(v1Key(t)); got != "69b71d79f8218a39259a7a29aabb2dbafc31cb3d35db7e39ebbf3d0010831051" {
		t.Errorf("got key %s", got)
	}
	for _, bad := range []string{"", "short", v1EncodingAESKey + "H", strings.Repeat("!", 43)} {
		if _, err := parseEncodingAESKey(bad); err == nil {
			t.Errorf("%q accepted as an EncodingAESKey", bad)
		}
	}
}

func TestWeChatEncryptOfficialVector(t *testing.T) {
	got, err := wechatEncrypt(v1Key(t), v1AppID, []byte(v1Random), []byte(v1Message))
	if err != nil {
		t.Fatal(err)
	}
	if got != v1Encrypt {
		t.Errorf("got Encrypt %s, want %s", got, v1Encrypt)
	}
	if sig := wechatSignature(v1Token, v1Timestamp, v1Nonce, v1Encrypt); sig != v1MsgSignature {
		t.Errorf("got msg_signature %s, want %s", sig, v1MsgSignature)
	}
	if !validMsgSignature(v1Token, v1Timestamp, v1Nonce, v1Encrypt, v1MsgSignature) {
		t.Error("the official msg_signature is refused")
	}
}

func TestWeChatDecryptOfficialVector(t *testing.T) {
	got, err := wechatDecrypt(v1Key(t), v1AppID, v1Encrypt)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != v1Message {
		t.Errorf("got %q, want %q", got, v1Message)
	}
}

// forge encrypts raw plaintext bytes (already laid out and padded) with
// the V1 key, to build malformed ciphertexts.
func forge(t *testing.T, plain []byte) string {
	t.Helper()
	key := v1Key(t)
	enc, err := cbcEncrypt(key, plain)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(enc)
}

func TestWeChatDecryptRefuses(t *testing.T) {
	key := v1Key(t)
	layout := func(lenField uint32, msg, appid string, pad int) []byte {
		p := []byte(v1Random)
		p = append(p, byte(lenField>>24), byte(lenField>>16), byte(lenField>>8), byte(lenField))
		p = append(p, msg...)
		p = append(p, appid...)
		for range pad {
			p = append(p, byte(pad))
		}
		return p
	}
	good := layout(5, "hello", v1AppID, 32-(20+5+len(v1AppID))%32)
	if _, err := wechatDecrypt(key, v1AppID, forge(t, good)); err != nil {
		t.Fatalf("the well-formed layout is refused: %v", err)
	}
	for _, tc := range []struct {
		name, encrypt string
	}{
		{"not base64", "%%%"},
		{"empty", ""},
		{"not whole blocks", base64.StdEncoding.EncodeToString([]byte("0123456789"))},
		{"another appid", forge(t, layout(5, "hello", "wx0000000000000000", 32-(20+5+18)%32))},
		{"padding 0", forge(t, append(layout(5, "hello", v1AppID, 0)[:43], make([]byte, 21)...))},
		{"padding over 32", forge(t, append(layout(5, "hello", v1AppID, 0)[:43], bytes33(21)...))},
		{"padding bytes differ", forge(t, append(layout(5, "hello", v1AppID, 0)[:43], append(bytesOf(20, 21), 20)...))},
		{"length field past the end", forge(t, layout(500, "hello", v1AppID, 32-(20+5+len(v1AppID))%32))},
		{"another key", func() string {
			other, _ := parseEncodingAESKey("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefg")
			s, _ := wechatEncrypt(other, v1AppID, []byte(v1Random), []byte("hello"))
			return s
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := wechatDecrypt(key, v1AppID, tc.encrypt); !errors.Is(err, errDecrypt) {
				t.Errorf("got %v, want errDecrypt", err)
			}
		})
	}
}

func bytesOf(n int, b byte) []byte { return []byte(strings.Repeat(string([]byte{b}), n)) }
func bytes33(n int) []byte         { return bytesOf(n, 33) }

func TestEncryptReplyRoundTrip(t *testing.T) {
	key := v1Key(t)
	env, err := encryptReply(key, v1AppID, v1Token, []byte("<xml>reply</xml>"), 1409304348, "nonce1")
	if err != nil {
		t.Fatal(err)
	}
	var r encryptedReply
	if err := xml.Unmarshal(env, &r); err != nil {
		t.Fatal(err)
	}
	if !validMsgSignature(v1Token, "1409304348", "nonce1", r.Encrypt.Value, r.MsgSignature.Value) || r.TimeStamp != 1409304348 || r.Nonce.Value != "nonce1" {
		t.Errorf("envelope %+v is not signed as WeChat checks", r)
	}
	msg, err := wechatDecrypt(key, v1AppID, r.Encrypt.Value)
	if err != nil || string(msg) != "<xml>reply</xml>" {
		t.Errorf("got %q, %v", msg, err)
	}
}

func cbcEncrypt(key, plain []byte) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	out := append([]byte(nil), plain...)
	cipher.NewCBCEncrypter(block, key[:aes.BlockSize]).CryptBlocks(out, out)
	return out, nil
}
