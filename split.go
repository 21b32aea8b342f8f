package main

// Texts longer than a vendor takes in one message cross as several, in
// order, each its own outbox item. A text is cut only between characters a
// reader sees as one: never inside a UTF-8 sequence, an emoji with its
// modifiers, joiners and variation selectors, a flag, or a letter with its
// combining marks; at a line break or a space when one is near.

import (
	"unicode"
	"unicode/utf8"
)

// The vendors' limits on one message's text.
const (
	// maxWeChatText is the most UTF-8 bytes of a customer-service text.
	// WeChat publishes no figure for custom/send; 2,048 is WeCom's
	// documented limit and what reports of its refusal (45002) give.
	maxWeChatText = 2048
	// maxIMText is the most bytes of a text as JSON in a sendmsg: IM takes
	// a message body of at most 12 KB (93000 past it), and the element
	// around the text takes some.
	maxIMText = 12<<10 - 64
)

// parts returns d as the deliveries that carry it within its vendor's
// limit, or nil when its text fits in one message.
func (d Delivery) parts() []Delivery {
	var texts []string
	switch {
	case d.Kind == deliverWeChat && len(d.Text) > maxWeChatText:
		texts = splitText(d.Text, maxWeChatText, utf8.RuneLen)
	case d.Kind == deliverNotice && len(d.Text)*6 > maxIMText: // room for the mark each later part gains
		texts = splitText(d.Text, maxIMText-len(noticeMark), jsonLen)
	case d.Kind == deliverIMSend && len(d.Elems) == 0 && len(d.Text)*6 > maxIMText: // 6: a rune's most, as JSON
		texts = splitText(d.Text, maxIMText, jsonLen)
	}
	if len(texts) <= 1 {
		return nil
	}
	out := make([]Delivery, len(texts))
	for i, t := range texts {
		out[i] = d
		out[i].Text = t
		if d.Kind == deliverNotice && i > 0 {
			out[i].Text = noticeMark + t // every part of a notice is the bridge's, and says so
		}
		if i < len(texts)-1 {
			out[i].RatingConv = 0 // the question is asked once its last part is there
		}
		out[i].MsgRandom = d.MsgRandom + uint32(i) // each part a message of its own to IM
		out[i].Part = i
	}
	return out
}

// splitText cuts s into pieces whose cost, summed over their runes, is at
// most limit each, and which joined are s. A piece ends after the last line
// break or space of its second half if it has one, else at the last
// boundary between two characters that fits.
func splitText(s string, limit int, cost func(rune) int) []string {
	var out []string
	for len(s) > 0 {
		spent, cut, space, whole := 0, 0, 0, true
		var prev rune
		for i, r := range s {
			if i > 0 && boundary(prev, r) {
				if spent > limit {
					whole = false
					break
				}
				cut = i
			}
			if (r == '\n' || r == ' ') && spent+cost(r) <= limit && spent > limit/2 {
				space = i + 1 // after it: the next piece does not start with it
			}
			spent += cost(r)
			prev = r
		}
		if whole && spent <= limit {
			out = append(out, s)
			break
		}
		if space > 0 {
			cut = space
		}
		if cut == 0 { // one character longer than the limit: it goes alone
			_, cut = utf8.DecodeRuneInString(s)
		}
		out = append(out, s[:cut])
		s = s[cut:]
	}
	return out
}

// boundary reports whether a text may be cut between runes a and b: not
// before a joiner, a variation selector, a skin tone, a tag, a keycap or a
// combining mark, not after a joiner, and not inside a flag (a pair of
// regional indicators; a run of them is cut between pairs only where a
// pair ends, which this approximates by never cutting between two).
func boundary(a, b rune) bool {
	switch {
	case a == 0x200D || b == 0x200D: // zero-width joiner
		return false
	case b == 0xFE0E || b == 0xFE0F: // variation selectors
		return false
	case b >= 0x1F3FB && b <= 0x1F3FF: // skin tones
		return false
	case b >= 0xE0020 && b <= 0xE007F: // tags (subdivision flags)
		return false
	case b == 0x20E3: // combining enclosing keycap
		return false
	case isRegional(a) && isRegional(b):
		return false
	case unicode.In(b, unicode.Mn, unicode.Me, unicode.Mc):
		return false
	case a == '\r' && b == '\n':
		return false
	}
	return true
}

func isRegional(r rune) bool { return r >= 0x1F1E6 && r <= 0x1F1FF }

// jsonLen is the bytes r takes in a JSON string as the IM client writes it
// (marshalJSON: no HTML escaping).
func jsonLen(r rune) int {
	switch {
	case r == '"' || r == '\\' || r == '\n' || r == '\r' || r == '\t' || r == '\b' || r == '\f':
		return 2
	case r < 0x20 || r == 0x2028 || r == 0x2029 || r == utf8.RuneError:
		return 6
	}
	return utf8.RuneLen(r)
}
