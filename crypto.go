package main

// WeChat's message encryption (safe and compatible modes): AES-256-CBC with
// the key from the 43-character EncodingAESKey, the IV its first 16 bytes,
// PKCS#7 padding to 32-byte blocks, over
// random(16) ‖ len(msg) as big-endian uint32 ‖ msg ‖ appid.
// Pure functions, tested against the official vectors and fuzzed.

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
)

// wechatBlock is the PKCS#7 block size WeChat pads to: 32, not AES's 16.
const wechatBlock = 32

// errDecrypt is the one error every decryption failure wraps, so a caller
// cannot tell padding from length from appid failures apart by accident.
var errDecrypt = errors.New("cannot decrypt wechat message")

// parseEncodingAESKey returns the 32-byte AES key an EncodingAESKey stands
// for: base64 of the 43 characters with "=" appended.
func parseEncodingAESKey(s string) ([]byte, error) {
	if len(s) != 43 {
		return nil, errors.New("EncodingAESKey must be 43 characters")
	}
	key, err := base64.StdEncoding.DecodeString(s + "=")
	if err != nil || len(key) != 32 {
		return nil, errors.New("EncodingAESKey is not valid base64 of 32 bytes")
	}
	return key, nil
}

// wechatEncrypt encrypts msg for appID with key, using random as the 16
// leading random bytes, and returns the base64 text WeChat calls Encrypt.
func wechatEncrypt(key []byte, appID string, random, msg []byte) (string, error) {
	if len(random) != 16 {
		return "", errors.New("random must be 16 bytes")
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return "", err
	}
	var p bytes.Buffer
	p.Write(random)
	binary.Write(&p, binary.BigEndian, uint32(len(msg)))
	p.Write(msg)
	p.WriteString(appID)
	pad := wechatBlock - p.Len()%wechatBlock
	p.Write(bytes.Repeat([]byte{byte(pad)}, pad))
	out := p.Bytes()
	cipher.NewCBCEncrypter(block, key[:aes.BlockSize]).CryptBlocks(out, out)
	return base64.StdEncoding.EncodeToString(out), nil
}

// wechatDecrypt reverses wechatEncrypt and checks everything it can: the
// padding (1 to 32 bytes, all alike), the length field, and that the
// trailing appid is appID.
func wechatDecrypt(key []byte, appID, encrypt string) ([]byte, error) {
	ct, err := base64.StdEncoding.DecodeString(encrypt)
	if err != nil {
		return nil, fmt.Errorf("%w: not base64", errDecrypt)
	}
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("%w: length %d is not a whole number of blocks", errDecrypt, len(ct))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errDecrypt, err)
	}
	p := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, key[:aes.BlockSize]).CryptBlocks(p, ct)
	pad := int(p[len(p)-1])
	if pad < 1 || pad > wechatBlock || pad > len(p) {
		return nil, fmt.Errorf("%w: bad padding", errDecrypt)
	}
	for _, b := range p[len(p)-pad:] {
		if int(b) != pad {
			return nil, fmt.Errorf("%w: bad padding", errDecrypt)
		}
	}
	p = p[:len(p)-pad]
	if len(p) < 20 {
		return nil, fmt.Errorf("%w: too short", errDecrypt)
	}
	n := binary.BigEndian.Uint32(p[16:20])
	if uint64(n) > uint64(len(p)-20) {
		return nil, fmt.Errorf("%w: length field %d exceeds the message", errDecrypt, n)
	}
	msg, gotAppID := p[20:20+n], p[20+n:]
	if subtle.ConstantTimeCompare(gotAppID, []byte(appID)) != 1 {
		return nil, fmt.Errorf("%w: message is for another appid", errDecrypt)
	}
	return msg, nil
}
