package main

// A push, and a fast path for reading it. WeChat's pushes are flat: an <xml> root
// whose children each hold text or CDATA, nothing more. scanFlatPush reads
// exactly that shape, several times faster than encoding/xml; whatever else
// it meets (a declaration, attributes, entities, comments, nested or
// repeated elements, a carriage return, a character XML does not allow) it
// leaves to encoding/xml, which decodes the push or refuses it. A fuzz test
// holds the two to the same result.

import (
	"bytes"
	"strconv"
	"unicode/utf8"
)

// Push is one message or event WeChat pushes to the webhook. Field names are
// WeChat's; a field absent from a push is left empty.
type Push struct {
	ToUserName   string `xml:"ToUserName"`
	FromUserName string `xml:"FromUserName"`
	CreateTime   int64  `xml:"CreateTime"`
	MsgType      string `xml:"MsgType"`
	MsgID        string `xml:"MsgId"`

	Content      string `xml:"Content"`      // text
	PicURL       string `xml:"PicUrl"`       // image
	MediaID      string `xml:"MediaId"`      // image, voice, video, shortvideo
	Format       string `xml:"Format"`       // voice
	Recognition  string `xml:"Recognition"`  // voice
	ThumbMediaID string `xml:"ThumbMediaId"` // video, shortvideo
	LocationX    string `xml:"Location_X"`   // location: latitude
	LocationY    string `xml:"Location_Y"`   // location: longitude
	Scale        string `xml:"Scale"`        // location
	Label        string `xml:"Label"`        // location
	Title        string `xml:"Title"`        // link
	Description  string `xml:"Description"`  // link
	URL          string `xml:"Url"`          // link

	Event     string `xml:"Event"`
	EventKey  string `xml:"EventKey"`  // subscribe (qrscene_…), SCAN, CLICK, VIEW
	Ticket    string `xml:"Ticket"`    // subscribe via QR code, SCAN
	Latitude  string `xml:"Latitude"`  // LOCATION
	Longitude string `xml:"Longitude"` // LOCATION
	Precision string `xml:"Precision"` // LOCATION
	MenuID    string `xml:"MenuId"`    // VIEW
}

// scanFlatPush fills p from a flat push and reports true, or reports false,
// with p in any state, when body is not one it reads.
func scanFlatPush(body []byte, p *Push) bool {
	s, ok := bytes.CutPrefix(skipSpace(body), []byte("<xml>"))
	if !ok {
		return false
	}
	var seen uint64 // a bit per field of Push, to leave repeats to encoding/xml
	for {
		s = skipSpace(s)
		if bytes.HasPrefix(s, []byte("</xml>")) {
			return true
		}
		if len(s) < 2 || s[0] != '<' {
			return false
		}
		n := 1
		for n < len(s) && isNameByte(s[n], n == 1) {
			n++
		}
		if n == 1 || n == len(s) || s[n] != '>' {
			return false
		}
		name := s[1:n]
		value, rest, ok := scanContent(s[n+1:])
		if !ok {
			return false
		}
		// The element must close here, with its own name.
		rest, ok = bytes.CutPrefix(rest, []byte("</"))
		if !ok {
			return false
		}
		if rest, ok = bytes.CutPrefix(rest, name); !ok {
			return false
		}
		if s, ok = bytes.CutPrefix(rest, []byte(">")); !ok {
			return false
		}
		if !setPushField(p, name, value, &seen) {
			return false
		}
	}
}

// scanContent reads an element's content up to the next '<' that does not
// open a CDATA section: text and CDATA sections, joined.
func scanContent(s []byte) (value string, rest []byte, ok bool) {
	var parts [][]byte
	for {
		var part []byte
		if after, isCDATA := bytes.CutPrefix(s, []byte("<![CDATA[")); isCDATA {
			end := bytes.Index(after, []byte("]]>"))
			if end < 0 {
				return "", nil, false
			}
			part, s = after[:end], after[end+3:]
		} else if len(s) > 0 && s[0] == '<' {
			break
		} else {
			end := bytes.IndexByte(s, '<')
			if end < 0 {
				return "", nil, false
			}
			part, s = s[:end], s[end:]
			if bytes.IndexByte(part, '&') >= 0 || bytes.Contains(part, []byte("]]>")) {
				return "", nil, false
			}
		}
		if !plainChars(part) {
			return "", nil, false
		}
		parts = append(parts, part)
	}
	if len(parts) == 1 {
		return string(parts[0]), s, true
	}
	return string(bytes.Join(parts, nil)), s, true
}

// plainChars reports whether b is valid UTF-8 of characters XML allows,
// without a carriage return (encoding/xml rewrites line ends).
func plainChars(b []byte) bool {
	for i := 0; i < len(b); {
		c := b[i]
		if c < utf8.RuneSelf {
			if c < 0x20 && c != '\t' && c != '\n' {
				return false
			}
			i++
			continue
		}
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size == 1 || !isXMLChar(r) {
			return false
		}
		i += size
	}
	return true
}

// isXMLChar reports whether XML 1.0 allows r in a document.
func isXMLChar(r rune) bool {
	return r == 0x09 || r == 0x0A || r == 0x0D || r >= 0x20 && r <= 0xD7FF ||
		r >= 0xE000 && r <= 0xFFFD || r >= 0x10000 && r <= 0x10FFFF
}

// isNameByte reports whether c may stand in an element name the fast path
// reads: ASCII letters, digits (not first) and '_'.
func isNameByte(c byte, first bool) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || !first && c >= '0' && c <= '9'
}

func skipSpace(s []byte) []byte {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t' || s[0] == '\n' || s[0] == '\r') {
		s = s[1:]
	}
	return s
}

// setPushField sets the field of p that the element name holds, as
// encoding/xml would, and reports false for what the fast path leaves to
// it: a field seen before, or a CreateTime that is not a plain number.
// Elements Push has no field for are skipped, as encoding/xml skips them.
func setPushField(p *Push, name []byte, v string, seen *uint64) bool {
	var f *string
	var bit uint
	switch string(name) {
	case "ToUserName":
		f, bit = &p.ToUserName, 1
	case "FromUserName":
		f, bit = &p.FromUserName, 2
	case "CreateTime":
		bit = 3
	case "MsgType":
		f, bit = &p.MsgType, 4
	case "MsgId":
		f, bit = &p.MsgID, 5
	case "Content":
		f, bit = &p.Content, 6
	case "PicUrl":
		f, bit = &p.PicURL, 7
	case "MediaId":
		f, bit = &p.MediaID, 8
	case "Format":
		f, bit = &p.Format, 9
	case "Recognition":
		f, bit = &p.Recognition, 10
	case "ThumbMediaId":
		f, bit = &p.ThumbMediaID, 11
	case "Location_X":
		f, bit = &p.LocationX, 12
	case "Location_Y":
		f, bit = &p.LocationY, 13
	case "Scale":
		f, bit = &p.Scale, 14
	case "Label":
		f, bit = &p.Label, 15
	case "Title":
		f, bit = &p.Title, 16
	case "Description":
		f, bit = &p.Description, 17
	case "Url":
		f, bit = &p.URL, 18
	case "Event":
		f, bit = &p.Event, 19
	case "EventKey":
		f, bit = &p.EventKey, 20
	case "Ticket":
		f, bit = &p.Ticket, 21
	case "Latitude":
		f, bit = &p.Latitude, 22
	case "Longitude":
		f, bit = &p.Longitude, 23
	case "Precision":
		f, bit = &p.Precision, 24
	case "MenuId":
		f, bit = &p.MenuID, 25
	default:
		return true
	}
	if *seen&(1<<bit) != 0 {
		return false
	}
	*seen |= 1 << bit
	if f != nil {
		*f = v
		return true
	}
	if v == "" { // encoding/xml leaves an empty number zero
		return true
	}
	t, err := strconv.ParseInt(v, 10, 64)
	p.CreateTime = t
	return err == nil
}
