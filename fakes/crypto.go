package fakes

// WeChat's AES message encryption, written again from the protocol notes
// rather than shared with the bridge, so that each checks the other.

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
)

func aesKey(encodingAESKey string) ([]byte, error) {
	key, err := base64.StdEncoding.DecodeString(encodingAESKey + "=")
	if err != nil || len(key) != 32 {
		return nil, fmt.Errorf("EncodingAESKey %q is not 43 characters of base64 for 32 bytes", encodingAESKey)
	}
	return key, nil
}

// encryptMsg lays out random(16) ‖ BE32 len ‖ msg ‖ appid, pads it PKCS#7
// to 32 bytes, encrypts it with AES-256-CBC (IV = key[:16]) and returns it
// in base64.
func encryptMsg(key []byte, appID string, msg []byte) string {
	var rnd [16]byte
	for i := range rnd {
		rnd[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[randUint32()%36]
	}
	p := append([]byte(nil), rnd[:]...)
	p = binary.BigEndian.AppendUint32(p, uint32(len(msg)))
	p = append(p, msg...)
	p = append(p, appID...)
	n := 32 - len(p)%32
	for range n {
		p = append(p, byte(n))
	}
	block, _ := aes.NewCipher(key)
	cipher.NewCBCEncrypter(block, key[:16]).CryptBlocks(p, p)
	return base64.StdEncoding.EncodeToString(p)
}

// decryptMsg reverses encryptMsg, checking padding 1..32, the length field
// and the appid, as WeChat does with an encrypted reply.
func decryptMsg(key []byte, appID, b64 string) ([]byte, error) {
	ct, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(ct) == 0 || len(ct)%16 != 0 {
		return nil, errors.New("Encrypt is not base64 of whole AES blocks")
	}
	block, _ := aes.NewCipher(key)
	p := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, key[:16]).CryptBlocks(p, ct)
	n := int(p[len(p)-1])
	if n < 1 || n > 32 || n > len(p) {
		return nil, fmt.Errorf("padding %d is outside 1..32", n)
	}
	for _, c := range p[len(p)-n:] {
		if int(c) != n {
			return nil, errors.New("padding bytes differ")
		}
	}
	p = p[:len(p)-n]
	if len(p) < 20 {
		return nil, errors.New("plaintext shorter than its header")
	}
	l := int(binary.BigEndian.Uint32(p[16:20]))
	if l > len(p)-20 {
		return nil, errors.New("length field exceeds the plaintext")
	}
	if got := string(p[20+l:]); got != appID {
		return nil, fmt.Errorf("appid %q, want %q", got, appID)
	}
	return p[20 : 20+l], nil
}
