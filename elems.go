package main

// A WeChat message as IM message elements, where IM has an element of its
// own for it (the others cross as their readable text, readableText); and an
// IM message as the text a WeChat customer reads.

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"unicode"

	"golang.org/x/text/unicode/norm"
)

// pushElems returns the IM elements that carry p natively, or nil when it
// crosses as text. A location becomes a TIMLocationElem with WeChat's label
// and coordinates, exactly.
func pushElems(p Push) []MsgElem {
	if p.MsgType != msgLocation {
		return nil
	}
	lat, err1 := strconv.ParseFloat(p.LocationX, 64)
	lng, err2 := strconv.ParseFloat(p.LocationY, 64)
	if err1 != nil || err2 != nil || lat < -90 || lat > 90 || lng < -180 || lng > 180 {
		return nil // not coordinates: the text says what came
	}
	return []MsgElem{{MsgType: "TIMLocationElem", MsgContent: map[string]any{"Desc": p.Label, "Latitude": lat, "Longitude": lng}}}
}

// elemText renders one IM message element as text a WeChat customer reads.
func elemText(e MsgElem) string {
	str := func(k string) string {
		switch v := e.MsgContent[k].(type) {
		case string:
			return v
		case float64:
			return strconv.FormatFloat(v, 'f', -1, 64)
		}
		return ""
	}
	switch e.MsgType {
	case "TIMTextElem":
		return str("Text")
	case "TIMLocationElem":
		lat, lng := str("Latitude"), str("Longitude")
		return strings.TrimSpace(str("Desc") + "\n" + mapLink(lat, lng, str("Desc")))
	case "TIMFaceElem":
		return "[sticker]"
	case "TIMImageElem":
		if arr, ok := e.MsgContent["ImageInfoArray"].([]any); ok && len(arr) > 0 {
			if info, ok := arr[0].(map[string]any); ok {
				if u, ok := info["URL"].(string); ok {
					return "[image] " + u
				}
			}
		}
		return "[image]"
	case "TIMSoundElem":
		return strings.TrimSpace("[voice message] " + str("Url"))
	case "TIMFileElem":
		return strings.TrimSpace(fmt.Sprintf("[file] %s %s", str("FileName"), str("Url")))
	case "TIMVideoFileElem":
		return strings.TrimSpace("[video] " + str("VideoUrl"))
	case "TIMCustomElem":
		return str("Desc") // Data is for the app that made it: no text form
	}
	return "[" + strings.TrimPrefix(e.MsgType, "TIM") + "]"
}

// callbackText is the text of a whole message, one line an element.
func callbackText(body []MsgElem) string {
	var parts []string
	for _, e := range body {
		if t := elemText(e); t != "" {
			parts = append(parts, t)
		}
	}
	return strings.Join(parts, "\n")
}

// mapLink is a link that opens a map marked at lat, lng with name, in
// WeChat's browser: Amap's marker URI (lbs.amap.com/api/uri-api, position
// as longitude,latitude; GCJ-02, the coordinates of China's maps and of
// WeChat's own locations).
func mapLink(lat, lng, name string) string {
	q := url.Values{"position": {lng + "," + lat}, "name": {name}}
	return "https://uri.amap.com/marker?" + q.Encode()
}

// replyParts is an agent's message as the deliveries to WeChat that carry
// it, in order: each picture, sound or video one of its own (the worker
// uploads it), the elements between them one text. Each part has Text, its
// readable form, and its Media.
func replyParts(body []MsgElem) []Delivery {
	var parts []Delivery
	var texts []MsgElem
	flush := func() {
		if t := callbackText(texts); t != "" {
			parts = append(parts, Delivery{Text: t})
		}
		texts = nil
	}
	for _, e := range body {
		m := replyMedia(e)
		if m == nil {
			texts = append(texts, e)
			continue
		}
		flush()
		parts = append(parts, Delivery{Text: elemText(e), Media: m})
	}
	flush()
	return parts
}

// replyMedia is where an agent's picture, sound or video is in IM, or nil
// for any other element.
func replyMedia(e MsgElem) *PushMedia {
	str := func(k string) string { s, _ := e.MsgContent[k].(string); return s }
	num := func(k string) int { n, _ := e.MsgContent[k].(float64); return int(n) }
	switch e.MsgType {
	case "TIMImageElem":
		infos, _ := e.MsgContent["ImageInfoArray"].([]any)
		for _, x := range infos {
			if info, ok := x.(map[string]any); ok && info["Type"] == 1.0 {
				if u, _ := info["URL"].(string); u != "" {
					return &PushMedia{Type: msgImage, PicURL: u, Name: "picture"}
				}
			}
		}
	case "TIMSoundElem":
		if u := str("Url"); u != "" {
			return &PushMedia{Type: msgVoice, PicURL: u, Seconds: num("Second"), Name: "voice message"}
		}
	case "TIMVideoFileElem":
		if u := str("VideoUrl"); u != "" {
			return &PushMedia{Type: msgVideo, PicURL: u, ThumbURL: str("ThumbUrl"), Seconds: num("VideoSecond"), Name: "video"}
		}
	}
	return nil
}

// partKey is the key of part i of the message whose key is key: the first
// part keeps it.
func partKey(key string, i int) string {
	if i == 0 {
		return key
	}
	return key + "#" + strconv.Itoa(i)
}

// customerMark is what an agent reads before a customer's text that begins
// as the bridge's notices do (noticeMark), so that no customer can write
// what an agent would take for the bridge's word.
const customerMark = "[customer] "

// unmistakable returns a customer's text as an agent reads it: as it is,
// unless it begins like the bridge's notices, in any case, width or style
// (NFKC folds full-width and mathematical letters), with spaces, invisible
// or blank-looking characters or combining marks between, with any kind of
// bracket, or with letters that look alike; then behind customerMark.
func unmistakable(text string) string {
	var head []rune
	start := text[:min(len(text), 256)] // the mark is within, whatever comes between its letters
	for _, r := range norm.NFKC.String(start) {
		if len(head) == len("[bridge]") {
			break
		}
		if unicode.IsSpace(r) || unicode.In(r, unicode.Cf, unicode.Mn, unicode.Me) || blank[r] {
			continue // spaces; zero-width, direction and variation marks; combining marks; fillers
		}
		switch {
		case unicode.Is(unicode.Ps, r):
			r = '['
		case unicode.Is(unicode.Pe, r):
			r = ']'
		case lookAlike[r] != 0:
			r = lookAlike[r]
		}
		head = append(head, unicode.ToLower(r))
	}
	if string(head) == "[bridge]" {
		return customerMark + text
	}
	return text
}

// blank are the characters that show as nothing though Unicode calls them
// letters or symbols: Hangul fillers, the Braille blank, the Mongolian
// vowel separator.
var blank = map[rune]bool{'\u115f': true, '\u1160': true, '\u3164': true, '\uffa0': true, '\u2800': true, '\u180e': true}

// lookAlike maps the letters that look like those of "bridge" to them
// (after NFKC, which folds the mathematical and full-width ones): small
// capitals, Cyrillic, Greek and Latin letters with marks of their own.
var lookAlike = map[rune]rune{
	'ʙ': 'b', 'Ь': 'b', 'ь': 'b', 'Ƅ': 'b', 'ƅ': 'b', 'ɓ': 'b', 'ḃ': 'b', 'ḅ': 'b', 'ḇ': 'b', 'в': 'b',
	'ʀ': 'r', 'г': 'r', 'ŗ': 'r', 'ṛ': 'r', 'ṟ': 'r', 'ɼ': 'r', 'ɽ': 'r', 'ř': 'r', 'ŕ': 'r',
	'ɪ': 'i', 'і': 'i', 'Ι': 'i', 'ι': 'i', 'ı': 'i', 'ɩ': 'i', 'ӏ': 'i', 'í': 'i', 'ì': 'i', 'ï': 'i', 'î': 'i', 'l': 'i', '1': 'i', '|': 'i', 'ǀ': 'i',
	'ᴅ': 'd', 'ԁ': 'd', 'ď': 'd', 'ḍ': 'd', 'ḏ': 'd', 'ɗ': 'd', 'đ': 'd',
	'ɢ': 'g', 'ɡ': 'g', 'ġ': 'g', 'ģ': 'g', 'ǧ': 'g', 'ğ': 'g', 'ɠ': 'g',
	'ᴇ': 'e', 'е': 'e', 'ё': 'e', 'ė': 'e', 'é': 'e', 'è': 'e', 'ê': 'e', 'ë': 'e', 'ē': 'e', 'ę': 'e', 'ɛ': 'e', 'ε': 'e',
}
