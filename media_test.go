package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// sound is a TIMSoundElem of an agent's client, whose file is at u.
func sound(u string, size, seconds int) map[string]any {
	return map[string]any{"MsgType": "TIMSoundElem", "MsgContent": map[string]any{
		"Url": u, "UUID": "s", "Size": size, "Second": seconds, "Download_Flag": 2}}
}

// video is a TIMVideoFileElem of an agent's client, the video at u and
// its thumbnail at thumb.
func video(u, thumb string, size int) map[string]any {
	return map[string]any{"MsgType": "TIMVideoFileElem", "MsgContent": map[string]any{
		"VideoUrl": u, "VideoUUID": "v", "VideoSize": size, "VideoSecond": 5, "VideoFormat": "mp4",
		"VideoDownloadFlag": 2, "ThumbUrl": thumb, "ThumbUUID": "t", "ThumbSize": 100,
		"ThumbWidth": 8, "ThumbHeight": 6, "ThumbFormat": "JPG", "ThumbDownloadFlag": 2}}
}

// answered has the agent answer the customer's question, and waits for
// the answer in WeChat: the bridge has fetched an access_token.
func (h *harness) answered() {
	h.t.Helper()
	h.im.SendAsAgent(context.Background(), "agent_kim", customerIM(customer), "One moment.")
	eventually(h.t, "the answer in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
}

// agentReady pushes the customer's question and waits for it in IM, so
// that the agent may answer.
func (h *harness) agentReady() {
	h.t.Helper()
	h.wx.SendText(context.Background(), customer, question)
	eventually(h.t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
}

// TestUploadsAsWeChatTakesThem: each upload's part is named with the
// extension of its type, a thumbnail's id is read from thumb_media_id, and
// an upload whose access_token went stale is retried with a fresh one. The
// fake WeChat refuses what the real one refuses.
func TestUploadsAsWeChatTakesThem(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.agentReady()
	h.answered() // the bridge has a WeChat token now
	photo, mp4, thumb := testPNG(t, 3, 2), testMP4(), testJPEG(t, 8, 6)
	h.wx.ExpireToken()
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, imageElem(h.im.AddFile(photo, "image/png"), len(photo)))
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false,
		video(h.im.AddFile(mp4, "video/mp4"), h.im.AddFile(thumb, "image/jpeg"), len(mp4)))
	eventually(t, "the image and the video in WeChat", func() bool { return len(h.sentTo(customer)) == 3 })
	if sent := h.sentTo(customer)[1:]; sent[0].MsgType != "image" || sent[1].MsgType != "video" {
		t.Fatalf("the customer got %+v, want an image and a video", sent)
	}
	var names []string
	for _, u := range h.wx.Uploads() {
		names = append(names, u.Filename)
	}
	if want := []string{"image.png", "video.mp4", "thumb.jpg"}; strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("uploads named %v, want %v", names, want)
	}
	if n := len(h.wx.RequestsTo("/cgi-bin/media/upload")); n != 4 {
		t.Errorf("%d upload calls, want 4: the first met the stale token and was made again", n)
	}
	if n := len(h.deadLetters()); n != 0 {
		t.Errorf("%d dead letters, want none", n)
	}
}

// TestLargeFilesBlockNoLane: an agent's 60 MB video and a customer's 12 MB
// video are decided at their first attempt, each crossing in its fallback
// form (a link; the text), and the messages after them follow at once.
func TestLargeFilesBlockNoLane(t *testing.T) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	ctx := context.Background()
	h.agentReady()
	im := customerIM(customer)

	big := append(testMP4(), make([]byte, 60<<20)...)
	bigURL := h.im.AddFile(big, "video/mp4")
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, video(bigURL, h.im.AddFile(testJPEG(t, 8, 6), "image/jpeg"), len(big)))
	h.im.SendAsAgent(ctx, "agent_kim", im, "Did the video reach you?")
	eventually(t, "the link and the next reply", func() bool { return len(h.sentTo(customer)) == 2 })
	if got := h.sentTexts(customer); got[0] != "video: "+bigURL || got[1] != "Did the video reach you?" {
		t.Errorf("the customer read %q, want the video's link in IM, then the reply", got)
	}
	h.eventuallyNotice("agent_kim", customer, "as a link: WeChat takes MP4 videos of 10 MB at most, with a JPEG thumbnail of 64 KB at most, and it has more than 10 MB")
	if n := len(h.wx.Uploads()); n != 0 {
		t.Errorf("%d uploads, want none", n)
	}

	large := append(testMP4(), make([]byte, 12<<20)...)
	videoID, _ := h.wx.AddMedia(large, "video/mp4")
	thumbID, _ := h.wx.AddMedia(testPNG(t, 8, 6), "image/png")
	h.wx.SendMessage(ctx, customer, "video", map[string]string{"MediaId": videoID, "ThumbMediaId": thumbID})
	h.wx.SendText(ctx, customer, "Did you get it?")
	eventually(t, "the video's text and the next message", func() bool { return len(h.customerTexts("agent_kim", customer)) == 3 })
	if got := h.customerTexts("agent_kim", customer)[1:]; got[0] != "[video]\n(not carried: it has more than 10 MB)" || got[1] != "Did you get it?" {
		t.Errorf("the agent read %q, want the video as text with why, then the next message", got)
	}
	if n := len(h.deadLetters()); n != 0 {
		t.Errorf("%d dead letters, want none", n)
	}
}

// TestSlowHostBlocksNoLane: a host that never answers is given up after
// MEDIA_FETCH_TIMEOUT, not VENDOR_TIMEOUT, at the first attempt: the sound
// reaches the customer as its link, the agent is told why, and the next
// reply follows.
func TestSlowHostBlocksNoLane(t *testing.T) {
	release := make(chan struct{})
	silent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(silent.Close)
	t.Cleanup(func() { close(release) })
	h := newHarness(t, harnessOptions{env: map[string]string{"MEDIA_FETCH_TIMEOUT": "300ms", "VENDOR_TIMEOUT": "5s"}})
	h.env["MEDIA_FETCH_ALLOW"] += "," + strings.TrimPrefix(silent.URL, "http://")
	h.restart()
	ctx := context.Background()
	h.agentReady()
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(silent.URL+"/voice.amr", 1000, 2))
	h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), "And a text.")
	eventually(t, "the link and the text", func() bool { return len(h.sentTo(customer)) == 2 })
	if got := h.sentTexts(customer); got[0] != "voice message: "+silent.URL+"/voice.amr" || got[1] != "And a text." {
		t.Errorf("the customer read %q", got)
	}
	h.eventuallyNotice("agent_kim", customer, "it did not download within MEDIA_FETCH_TIMEOUT")
}

// TestFetchCannotBeAimedInward: the bridge fetches nothing from an
// address that is not public (loopback, cloud metadata), directly or by a
// redirect, unless MEDIA_FETCH_ALLOW names its host; the agent is told why,
// the customer gets nothing of it, and the host gets no request.
func TestFetchCannotBeAimedInward(t *testing.T) {
	var inner atomic.Int32
	internal := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inner.Add(1)
		w.Write(sampleAMR(10))
	}))
	t.Cleanup(internal.Close)
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, r.URL.Query().Get("to"), http.StatusFound)
	}))
	t.Cleanup(redirector.Close)
	h := newHarness(t, harnessOptions{})
	h.env["MEDIA_FETCH_ALLOW"] += "," + strings.TrimPrefix(redirector.URL, "http://")
	h.restart()
	ctx := context.Background()
	h.agentReady()
	port := internal.URL[strings.LastIndex(internal.URL, ":"):]
	cases := []struct{ url, why string }{
		{internal.URL + "/latest/meta-data", "and its host's is loopback"},
		{"http://169.254.169.254/latest/meta-data/iam", "and its host's is link-local"},
		{"http://[::1]" + port + "/x", "and its host's is loopback"},
		{"http://100.64.0.1/x", "and its host's is shared"},
		{"http://10.1.2.3/x", "and its host's is private"},
		{"http://0.0.0.0" + port + "/x", "and its host's is unspecified"},
		{redirector.URL + "/?to=file:///etc/passwd", `only over http(s), not "file"`},
		{redirector.URL + "/?to=" + internal.URL + "/x", "and its host's is loopback"},
		{redirector.URL + "/?to=http://169.254.169.254/x", "and its host's is link-local"},
	}
	for i, c := range cases {
		if i > 0 { // WeChat takes five replies a message: the customer writes again
			h.wx.SendText(ctx, customer, "and?")
			eventually(t, "the customer's message in IM", func() bool { return len(h.customerTexts("agent_kim", customer)) == i+1 })
		}
		h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(c.url, 100, 1))
		var got string
		eventually(t, fmt.Sprintf("the agent told of %s", c.url), func() bool {
			for _, n := range h.noticesTo("agent_kim", customer) {
				if strings.Contains(n, strconv.Quote("[voice message] "+c.url)) {
					got = n
					return true
				}
			}
			return false
		})
		if !strings.Contains(got, c.why) || !strings.Contains(got, "was not fetched") {
			t.Errorf("%s: the agent read %q, want it to say %q", c.url, got, c.why)
		}
	}
	if n := inner.Load(); n != 0 {
		t.Errorf("the internal host got %d requests, want none", n)
	}
	if sent := h.sentTo(customer); len(sent) != 0 {
		t.Errorf("the customer got %+v, want nothing", sent)
	}
}

// TestMediaServedAsData: what the bridge serves is a picture, sound or
// video under its own type, or else a download: an agent's "voice message"
// that is an HTML page reaches the customer as a link that serves it as
// application/octet-stream, an attachment; every answer says nosniff.
func TestMediaServedAsData(t *testing.T) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	h.agentReady()
	page := []byte("<!DOCTYPE html><html><script>alert(document.cookie)</script></html>")
	h.im.SendElemsAsAgent(context.Background(), "agent_kim", customerIM(customer), false, sound(h.im.AddFile(page, "audio/amr"), len(page), 1))
	eventually(t, "the link", func() bool { return len(h.sentTo(customer)) == 1 })
	link, ok := strings.CutPrefix(h.sentTo(customer)[0].Text, "voice message: "+public)
	if !ok {
		t.Fatalf("the customer read %q, want a link at the bridge", h.sentTo(customer)[0].Text)
	}
	resp, err := http.Get(h.base + link)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct, cd := resp.Header.Get("Content-Type"), resp.Header.Get("Content-Disposition"); ct != "application/octet-stream" || cd != "attachment" || !bytes.Equal(b, page) {
		t.Errorf("served as %q, %q; want application/octet-stream, attachment", ct, cd)
	}
	for _, p := range []string{link, "/media/0123456789abcdef0123456789abcdef"} {
		resp, err := http.Get(h.base + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: X-Content-Type-Options %q, want nosniff", p, resp.Header.Get("X-Content-Type-Options"))
		}
	}
}

// TestMediaIDsNeverReused: on SQLite an outbox id is used again once the
// items after it are gone; a media id is not. Two customers' photos, one
// sent after the other was delivered, get ids of their own, and each URL
// serves its own photo.
func TestMediaIDsNeverReused(t *testing.T) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	ctx := context.Background()
	var urls []string
	for i, openid := range []string{customer, "o6_bmjrPTlm6_2sgVt7hMZOPfL2N"} {
		photo := testPNG(t, i+2, 2)
		mediaID, picURL := h.wx.AddMedia(photo, "image/png")
		h.wx.SendMessage(ctx, openid, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
		eventually(t, "the photo in IM", func() bool { return len(h.messagesTo("agent_kim")) == i+1 })
		var body []MsgElem
		json.Unmarshal(h.messagesTo("agent_kim")[i].Body, &body)
		info, ok := body[0].MsgContent["ImageInfoArray"].([]any)
		if !ok {
			t.Fatalf("IM got %s, want a TIMImageElem", h.messagesTo("agent_kim")[i].Body)
		}
		urls = append(urls, info[0].(map[string]any)["URL"].(string))
		// The items delivered are pruned, as a day later, and the bridge
		// starts again: the next items take their ids again.
		eventually(t, "the outbox delivered", func() bool {
			var n int
			db := h.openStoreDB(false)
			defer db.Close()
			db.QueryRow(`SELECT count(*) FROM outbox WHERE state <> 'done'`).Scan(&n)
			return n == 0
		})
		h.stop()
		db := h.openStoreDB(true)
		if _, err := db.Exec(`DELETE FROM outbox`); err != nil {
			t.Fatal(err)
		}
		db.Close()
		h.start()
	}
	if urls[0] == urls[1] {
		t.Fatalf("both photos at %s", urls[0])
	}
	for i, u := range urls {
		resp, err := http.Get(h.base + strings.TrimPrefix(u, public))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !bytes.Equal(b, testPNG(t, i+2, 2)) {
			t.Errorf("%s serves another file than photo %d", u, i+1)
		}
	}
}

// TestMediaStreamedByRanges: media larger than a PostgreSQL part is
// served whole and by ranges across parts, from either store.
func TestMediaStreamedByRanges(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, external: true, env: map[string]string{"PUBLIC_URL": "https://bridge.example.com"}})
		st, err := openStore(context.Background(), h.env["DATABASE_URL"], storeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, 2*mediaPart+1000)
		for i := range data {
			data[i] = byte(i * 7)
		}
		id := newMediaID()
		keepBytes(t, st, id, "video/mp4", data, time.Now())
		st.Close() // one bridge a SQLite file
		h.start()
		for _, c := range []struct {
			rng        string
			from, to   int
			wantStatus int
		}{{"", 0, len(data), 200}, {"bytes=262000-262300", 262000, 262301, 206}, {"bytes=-10", len(data) - 10, len(data), 206}} {
			req, _ := http.NewRequest(http.MethodGet, h.base+"/media/"+id, nil)
			if c.rng != "" {
				req.Header.Set("Range", c.rng)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.wantStatus || !bytes.Equal(b, data[c.from:c.to]) {
				t.Errorf("range %q: %d, %d bytes; want %d and bytes %d to %d", c.rng, resp.StatusCode, len(b), c.wantStatus, c.from, c.to)
			}
		}
	})
}

// TestMediaDirCleanedAtStart: what a crash leaves in MEDIA_DIR, a spool or
// a file whose row was never written, is removed when the store opens;
// kept media stays, and so do a file the bridge did not name and one
// written in the last minute.
func TestMediaDirCleanedAtStart(t *testing.T) {
	dir := t.TempDir()
	db := "sqlite:" + filepath.Join(dir, "bridge.db")
	st, err := openStore(context.Background(), db, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kept := newMediaID()
	keepBytes(t, st, kept, "image/png", []byte("kept"), time.Now())
	st.Close()
	orphan, spool := filepath.Join(dir, "media", newMediaID()), filepath.Join(dir, "media", spoolPrefix+"123"+spoolSuffix)
	old := filepath.Join(dir, "media", newMediaID()+".tmp") // an earlier version's spool
	foreign := filepath.Join(dir, "media", "report.tmp")
	young := filepath.Join(dir, "media", spoolPrefix+"456"+spoolSuffix) // being written, maybe
	for _, f := range []string{orphan, spool, old, foreign, young} {
		if err := os.WriteFile(f, []byte("left by a crash"), 0o600); err != nil {
			t.Fatal(err)
		}
		if f != young {
			an := time.Now().Add(-2 * time.Minute)
			os.Chtimes(f, an, an)
		}
	}
	st, err = openStore(context.Background(), db, storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, f := range []string{orphan, spool, old} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s: %v, want it removed", filepath.Base(f), err)
		}
	}
	for _, f := range []string{foreign, young} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("%s: %v, want it left alone", filepath.Base(f), err)
		}
	}
	if data, err := readMedia(st, kept); string(data) != "kept" {
		t.Errorf("kept media: %q, %v", data, err)
	}
}

// TestMediaMovedToParts: a PostgreSQL database made before media_parts
// keeps its media: the store moves each file's bytes into a part at open,
// and serves them as before.
func TestMediaMovedToParts(t *testing.T) {
	dsn := testPostgres(t)
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TABLE media (id TEXT PRIMARY KEY, content_type TEXT NOT NULL, size BIGINT NOT NULL,
		created_at BIGINT NOT NULL, data BYTEA NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	id, older := newMediaID(), make([]byte, 2*mediaPart+7)
	for i := range older {
		older[i] = byte(i % 251)
	}
	if _, err := db.Exec(`INSERT INTO media VALUES ($1, 'video/mp4', $2, $3, $4)`, id, len(older), time.Now().UnixMilli(), older); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second open finds nothing to move
		st, err := openStore(context.Background(), dsn, storeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if data, err := readMedia(st, id); err != nil || !bytes.Equal(data, older) {
			t.Errorf("the older file: %d bytes, %v; want its %d", len(data), err, len(older))
		}
		var parts int
		st.db.QueryRow(`SELECT count(*) FROM media_parts WHERE id = $1 AND length(data) <= $2`, id, mediaPart).Scan(&parts)
		if parts != 3 {
			t.Errorf("the older file is in %d parts of %d bytes at most, want 3", parts, mediaPart)
		}
		st.Close()
	}
}

// TestFailingHostBlocksNoLane: a host that answers an agent's file with
// 5xx, a refused connection or anything but 200 holds nothing up: a 5xx or
// a refused connection is tried mediaFetchTries times, then the sound goes
// as its link; any other answer is the file's, and it is not sent; the
// replies after each follow.
func TestFailingHostBlocksNoLane(t *testing.T) {
	var calls atomic.Int32
	host := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch r.URL.Path {
		case "/busy":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		}
	}))
	t.Cleanup(host.Close)
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close() // nothing listens there now
	h := newHarness(t, harnessOptions{env: map[string]string{"RETRY_MIN_DELAY": "20ms", "RETRY_MAX_DELAY": "50ms"}})
	h.env["MEDIA_FETCH_ALLOW"] += "," + strings.TrimPrefix(host.URL, "http://") + "," + strings.TrimPrefix(closed.URL, "http://")
	h.restart()
	ctx := context.Background()
	h.agentReady()
	for i, u := range []string{host.URL + "/busy", closed.URL + "/gone", host.URL + "/empty"} {
		if i > 0 { // WeChat takes five replies a message: the customer writes again
			h.wx.SendText(ctx, customer, "and?")
			eventually(t, "the customer's message in IM", func() bool { return len(h.customerTexts("agent_kim", customer)) == i+1 })
		}
		before := len(h.sentTo(customer))
		h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(u, 100, 1))
		h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), fmt.Sprintf("reply %d", i))
		eventually(t, "the reply after "+u, func() bool {
			sent := h.sentTexts(customer)
			return len(sent) > before && sent[len(sent)-1] == fmt.Sprintf("reply %d", i)
		})
		got := h.sentTexts(customer)[before:]
		if i < 2 && (len(got) != 2 || got[0] != "voice message: "+u) {
			t.Errorf("%s: the customer read %q, want the link, then the reply", u, got)
		}
		if i == 2 && len(got) != 1 {
			t.Errorf("%s: the customer read %q, want the reply alone", u, got)
		}
	}
	h.eventuallyNotice("agent_kim", customer, "it could not be carried in 3 attempts")
	h.eventuallyNotice("agent_kim", customer, "was not fetched: its URL answers HTTP 204")
	if n := calls.Load(); n != 3+1 {
		t.Errorf("the host was asked %d times, want 3 for the busy file and 1 for the empty one", n)
	}
}

// TestFallbackKeptAcrossAttempts: once an attempt sends a customer's
// photo as its text (its download was too slow), every later attempt sends
// that text too, so IM drops a repeat: when IM carried out the first
// attempt without answering, the agent reads the message once.
func TestFallbackKeptAcrossAttempts(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com",
		"MEDIA_FETCH_TIMEOUT": "200ms", "VENDOR_TIMEOUT": "1s", "RETRY_MIN_DELAY": "2s", "RETRY_MAX_DELAY": "2s"}})
	ctx := context.Background()
	h.agentReady()
	h.answered() // the bridge has a WeChat token now
	mediaID, picURL := h.wx.AddMedia(testPNG(t, 3, 2), "image/png")
	h.wx.Delay(500 * time.Millisecond) // media/get: longer than MEDIA_FETCH_TIMEOUT
	release := h.im.Hold()             // IM carries out the sendmsg, but answers too late
	defer release()
	h.wx.SendMessage(ctx, customer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
	eventually(t, "the first attempt given up", func() bool {
		return strings.Contains(h.metricsText(), `bridge_deliveries_total{outcome="retry",target="im"}`)
	})
	h.wx.Delay(0) // the next attempt, a second or more later, would fetch the photo
	release()
	eventually(t, "the photo's item delivered", func() bool {
		db := h.openStoreDB(false)
		defer db.Close()
		var n int
		db.QueryRow(`SELECT count(*) FROM outbox WHERE state = 'pending'`).Scan(&n)
		return n == 0
	})
	msgs := h.customerTexts("agent_kim", customer)
	if len(msgs) != 2 || !strings.HasPrefix(msgs[1], "[image] "+picURL+"\n(not carried: it did not download within MEDIA_FETCH_TIMEOUT)") {
		t.Errorf("the agent read %q, want the question, then the photo's text once", msgs)
	}
	if n := len(h.messagesTo("agent_kim")); n != 2 {
		t.Errorf("the agent got %d messages, want 2", n)
	}
}

// TestCustomerMediaHostSilent: when WeChat does not answer a media/get
// within MEDIA_FETCH_TIMEOUT, the customer's photo crosses as its text with
// why, and their next message follows.
func TestCustomerMediaHostSilent(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com", "MEDIA_FETCH_TIMEOUT": "300ms"}})
	ctx := context.Background()
	h.agentReady()
	h.answered() // the bridge has a WeChat token now
	mediaID, picURL := h.wx.AddMedia(testPNG(t, 3, 2), "image/png")
	release := h.wx.Hold()
	h.wx.SendMessage(ctx, customer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
	h.wx.SendText(ctx, customer, "Hello?")
	eventually(t, "both messages in IM", func() bool { return len(h.customerTexts("agent_kim", customer)) == 3 })
	release()
	got := h.customerTexts("agent_kim", customer)[1:]
	if got[0] != "[image] "+picURL+"\n(not carried: it did not download within MEDIA_FETCH_TIMEOUT)" || got[1] != "Hello?" {
		t.Errorf("the agent read %q", got)
	}
}

// TestLongSoundMeasured: a sound WeChat would refuse for its length goes
// as a link even when its element claims it is short: the bridge measures
// an AMR file itself.
func TestLongSoundMeasured(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	h.agentReady()
	long := sampleAMR(4500) // 90 s
	u := h.im.AddFile(long, "audio/amr")
	h.im.SendElemsAsAgent(context.Background(), "agent_kim", customerIM(customer), false, sound(u, len(long), 5))
	eventually(t, "the link", func() bool { return len(h.sentTo(customer)) == 1 })
	if got := h.sentTexts(customer)[0]; got != "voice message: "+u {
		t.Errorf("the customer read %q, want the link", got)
	}
	h.eventuallyNotice("agent_kim", customer, "and it lasts 90 s")
	if n := len(h.wx.Uploads()); n != 0 {
		t.Errorf("%d uploads, want none", n)
	}
}

// TestSVGServedAsDownload: a picture that can run script is never served
// as a picture.
func TestSVGServedAsDownload(t *testing.T) {
	h := newHarness(t, harnessOptions{external: true, env: map[string]string{"PUBLIC_URL": "https://bridge.example.com"}})
	st, err := openStore(context.Background(), h.env["DATABASE_URL"], storeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	id := newMediaID()
	keepBytes(t, st, id, "image/svg+xml", []byte(`<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>`), time.Now())
	st.Close() // one bridge a SQLite file
	h.start()
	resp, err := http.Get(h.base + "/media/" + id)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ct, cd := resp.Header.Get("Content-Type"), resp.Header.Get("Content-Disposition"); ct != "application/octet-stream" || cd != "attachment" {
		t.Errorf("an SVG served as %q, %q; want application/octet-stream, attachment", ct, cd)
	}
}

// TestNotPublic: the addresses a fetch refuses, IPv4 inside IPv6 judged by
// the IPv4 address.
func TestNotPublic(t *testing.T) {
	for _, c := range []struct{ addr, want string }{
		{"8.8.8.8", ""}, {"2400:3200::1", ""}, {"64:ff9b::808:808", ""},
		{"127.0.0.1", "loopback"}, {"::1", "loopback"}, {"::ffff:127.0.0.1", "loopback"},
		{"10.1.2.3", "private"}, {"172.16.0.1", "private"}, {"192.168.1.1", "private"}, {"fd00::1", "private"},
		{"169.254.169.254", "link-local"}, {"fe80::1", "link-local"},
		{"100.64.0.1", "shared (100.64.0.0/10)"}, {"239.1.1.1", "multicast"}, {"0.0.0.0", "unspecified"}, {"::", "unspecified"},
		{"0.1.2.3", `"this network" (0.0.0.0/8)`}, {"240.0.0.1", "reserved (240.0.0.0/4)"}, {"198.18.0.1", "for benchmarks (198.18.0.0/15)"},
		{"64:ff9b::a00:1", "private"}, {"2002:a9fe:a9fe::1", "link-local"}, {"::a00:1", "IPv4-compatible (::/96)"},
		{"fec0::1", "site-local (fec0::/10)"}, {"2001::1", "reserved (2001::/23, Teredo included)"},
	} {
		if got := notPublic(netip.MustParseAddr(c.addr)); got != c.want {
			t.Errorf("%s: %q, want %q", c.addr, got, c.want)
		}
	}
}

// TestMediaPassingFailures: a passing failure holds a media message up for
// one more attempt, not for good and not as its text: WeChat's media/get
// answering 503 once, IM's sendmsg 500 twice (the file is fetched once,
// and every attempt sends IM the same message), an upload answering 503.
// An upload WeChat refuses as a type it does not take (40113) sends the
// sound as a link.
func TestMediaPassingFailures(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com",
		"RETRY_MIN_DELAY": "20ms", "RETRY_MAX_DELAY": "50ms"}})
	ctx := context.Background()
	h.agentReady()
	h.answered() // the bridge has a WeChat token now

	mediaID, picURL := h.wx.AddMedia(testPNG(t, 3, 2), "image/png")
	h.wx.FailNextStatus(1, http.StatusServiceUnavailable)
	h.im.FailNextStatus(2, http.StatusInternalServerError)
	h.wx.SendMessage(ctx, customer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
	eventually(t, "the photo in IM", func() bool { return len(h.messagesTo("agent_kim")) == 2 })
	if m := h.messagesTo("agent_kim")[1]; !strings.Contains(string(m.Body), "TIMImageElem") {
		t.Errorf("the agent got %s, want the photo", m.Body)
	}
	if n := len(h.wx.RequestsTo("/cgi-bin/media/get")); n != 2 {
		t.Errorf("media/get called %d times, want 2: the 503, then once", n)
	}

	voice := sampleAMR(50)
	h.wx.FailNextStatus(1, http.StatusServiceUnavailable)
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(h.im.AddFile(voice, "audio/amr"), len(voice), 1))
	eventually(t, "the voice message", func() bool { return len(h.sentTo(customer)) == 2 })
	if got := h.sentTo(customer)[1]; got.MsgType != "voice" {
		t.Errorf("the customer got %+v, want the voice message", got)
	}

	h.wx.FailNext(1, 40113)
	u := h.im.AddFile(voice, "audio/amr")
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(u, len(voice), 1))
	eventually(t, "the link", func() bool { return len(h.sentTo(customer)) == 3 })
	if got := h.sentTexts(customer)[2]; !strings.HasPrefix(got, "voice message: https://bridge.example.com/media/") {
		t.Errorf("the customer read %q, want a link to the voice at the bridge", got)
	}
	h.eventuallyNotice("agent_kim", customer, "and it refused it: wechat media/upload: errcode 40113")
}

// TestLinkKeptOnce: an agent's file sent as a link is kept once, whatever
// the number of attempts the link takes to reach WeChat.
func TestLinkKeptOnce(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com",
		"RETRY_MIN_DELAY": "20ms", "RETRY_MAX_DELAY": "50ms"}})
	ctx := context.Background()
	h.agentReady()
	h.answered()            // the bridge has a WeChat token now
	long := sampleAMR(3500) // 70 s: a link
	h.wx.FailNextStatus(2, http.StatusBadGateway)
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, sound(h.im.AddFile(long, "audio/amr"), len(long), 70))
	eventually(t, "the link", func() bool { return len(h.sentTo(customer)) == 2 })
	db := h.openStoreDB(false)
	defer db.Close()
	var kept int
	db.QueryRow(`SELECT count(*) FROM media`).Scan(&kept)
	if kept != 1 {
		t.Errorf("%d files kept for one link, want 1", kept)
	}
}
