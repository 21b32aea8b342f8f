package main

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// TestSplitText: pieces stay within the limit, join to the text, and are
// never cut inside a character, an emoji sequence, a flag or a mark.
func TestSplitText(t *testing.T) {
	family := "👨‍👩‍👧‍👦"       // joined by ZWJ
	thumbs := "👍🏽"            // with a skin tone
	flag := "🇨🇳"              // two regional indicators
	accent := "e\u0301"       // e and a combining acute
	keycap := "1\ufe0f\u20e3" // 1️⃣
	units := []string{"a", "汉", family, thumbs, flag, accent, keycap, "é", " ", "\n"}
	var b strings.Builder
	for i := 0; b.Len() < 9000; i++ {
		b.WriteString(units[(i*7+i/3)%len(units)])
	}
	text := b.String()
	for _, limit := range []int{16, 37, 100, 2048} {
		pieces := splitText(text, limit, utf8.RuneLen)
		if strings.Join(pieces, "") != text {
			t.Fatalf("limit %d: the pieces do not join to the text", limit)
		}
		for i, p := range pieces {
			if len(p) > limit || !utf8.ValidString(p) {
				t.Fatalf("limit %d: piece %d has %d bytes (valid UTF-8: %v)", limit, i, len(p), utf8.ValidString(p))
			}
			if i == len(pieces)-1 {
				continue
			}
			next := pieces[i+1]
			for _, u := range []string{family, thumbs, flag, accent, keycap} {
				for k := 1; k < len(u); k++ {
					if strings.HasSuffix(p, u[:k]) && strings.HasPrefix(next, u[k:]) && utf8.ValidString(u[:k]) {
						// a cut inside u, unless u's first part is a whole unit itself here
						if !strings.HasSuffix(p, u) {
							t.Fatalf("limit %d: piece %d ends inside %q", limit, i, u)
						}
					}
				}
			}
		}
	}
	if got := splitText("short", 2048, utf8.RuneLen); len(got) != 1 || got[0] != "short" {
		t.Errorf("a short text gave %q", got)
	}
	// A piece ends after a space in its second half rather than in a word.
	if got := splitText("hello world again", 12, utf8.RuneLen); got[0] != "hello world " {
		t.Errorf("got %q, want the first piece to end after the space", got)
	}
}

// TestNoticePartsMarked: every part of a long notice begins with the
// bridge's mark, so no part is a customer's words standing alone.
func TestNoticePartsMarked(t *testing.T) {
	d := conversationNotice("wx_c1", "c1", "agent_kim", "Transferred to you by agent_lee. The last messages:\ncustomer: "+strings.Repeat("ab ", 9000))
	parts := d.parts()
	if len(parts) < 2 {
		t.Fatalf("%d parts, want the notice split", len(parts))
	}
	for i, p := range parts {
		if !strings.HasPrefix(p.Text, noticeMark) || jsonLen0(p.Text) > maxIMText {
			t.Errorf("part %d: %q…, %d bytes as JSON; want the mark first, %d bytes at most", i, p.Text[:20], jsonLen0(p.Text), maxIMText)
		}
	}
}

// jsonLen0 is the bytes of s as JSON.
func jsonLen0(s string) int {
	n := 0
	for _, r := range s {
		n += jsonLen(r)
	}
	return n
}
