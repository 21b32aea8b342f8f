package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestLocationCrossesNatively: a customer's location reaches the agent as a
// TIMLocationElem with WeChat's label and coordinates, exactly, which any IM
// client shows as a map pin.
func TestLocationCrossesNatively(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	fields := map[string]string{"Location_X": "31.230416", "Location_Y": "121.473701", "Scale": "15", "Label": "上海市人民广场"}
	m := h.pushToAgent("location", fields, "im_sendmsg_location.json")
	c := m.MsgBody[0].MsgContent
	if m.MsgBody[0].MsgType != "TIMLocationElem" || c["Desc"] != "上海市人民广场" || c["Latitude"] != 31.230416 || c["Longitude"] != 121.473701 {
		t.Errorf("IM got %+v, want the label and coordinates exactly", m.MsgBody)
	}
}

// TestAgentLocationReachesCustomerAsMapLink: an agent's location reaches the
// customer as the place's name and a link that opens a map marked there.
func TestAgentLocationReachesCustomerAsMapLink(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, map[string]any{"MsgType": "TIMLocationElem",
		"MsgContent": map[string]any{"Desc": "上海市人民广场", "Latitude": 31.230416, "Longitude": 121.473701}})
	eventually(t, "the place in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
	want := "上海市人民广场\nhttps://uri.amap.com/marker?name=%E4%B8%8A%E6%B5%B7%E5%B8%82%E4%BA%BA%E6%B0%91%E5%B9%BF%E5%9C%BA&position=121.473701%2C31.230416"
	if got := h.sentTo(customer)[0].Text; got != want {
		t.Errorf("the customer read %q, want %q", got, want)
	}
}

// testPNG is a small PNG, w by h.
func testPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for x := range w {
		img.Set(x, 0, color.RGBA{R: uint8(40 * x), G: 90, B: 200, A: 255})
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestImageCrossesAsImage: with PUBLIC_URL, a customer's photo reaches the
// agent as a TIMImageElem with its real size, width and height, whose URL
// serves the very bytes WeChat had, with their type and by ranges; an id
// guessed or altered, or any other path under /media/, is 404.
func TestImageCrossesAsImage(t *testing.T) {
	forStores(t, testImageCrossesAsImage)
}

func testImageCrossesAsImage(t *testing.T, pg bool) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{postgres: pg, env: map[string]string{"PUBLIC_URL": public}})
	photo := testPNG(t, 3, 2)
	mediaID, picURL := h.wx.AddMedia(photo, "image/png")
	m := h.pushToAgent("image", map[string]string{"PicUrl": picURL, "MediaId": mediaID}, "im_sendmsg_image.json")
	infos, _ := m.MsgBody[0].MsgContent["ImageInfoArray"].([]any)
	if m.MsgBody[0].MsgType != "TIMImageElem" || len(infos) != 3 {
		t.Fatalf("IM got %+v, want a TIMImageElem", m.MsgBody)
	}
	info := infos[0].(map[string]any)
	if info["Width"] != 3.0 || info["Height"] != 2.0 || info["Size"] != float64(len(photo)) {
		t.Errorf("image info %v, want 3×2 and %d bytes", info, len(photo))
	}
	u, _ := info["URL"].(string)
	path, ok := strings.CutPrefix(u, public)
	if !ok || !strings.HasPrefix(path, "/media/") {
		t.Fatalf("URL %q is not under PUBLIC_URL's /media/", u)
	}

	get := func(path, rng string) (int, string, []byte) {
		req, _ := http.NewRequest(http.MethodGet, h.base+path, nil)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("Content-Type"), b
	}
	if status, ct, b := get(path, ""); status != 200 || ct != "image/png" || !bytes.Equal(b, photo) {
		t.Errorf("GET %s: %d %s, %d bytes; want 200 image/png and the photo", path, status, ct, len(b))
	}
	if status, _, b := get(path, "bytes=0-3"); status != http.StatusPartialContent || !bytes.Equal(b, photo[:4]) {
		t.Errorf("a range: %d, %q", status, b)
	}
	id := strings.TrimPrefix(path, "/media/")
	altered := id[:len(id)-1] + string("0123456789abcdef"[(strings.IndexByte("0123456789abcdef", id[len(id)-1])+1)%16])
	for _, p := range []string{"/media/" + altered, "/media/0123456789abcdef0123456789abcdef", "/media/", "/media/" + id + "/x", "/media/../bridge.db"} {
		if status, _, _ := get(p, ""); status != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", p, status)
		}
	}
}

// TestMediaExpires: media is served until MEDIA_RETENTION ends, then 404.
func TestMediaExpires(t *testing.T) {
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": "https://bridge.example.com", "MEDIA_RETENTION": "300ms"}})
	ctx := context.Background()
	mediaID, picURL := h.wx.AddMedia(testPNG(t, 1, 1), "image/png")
	h.wx.SendMessage(ctx, customer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID})
	eventually(t, "the photo in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	var m SendMsg
	json.Unmarshal(h.im.RequestsTo("/v4/openim/sendmsg")[0].Body, &m)
	u := m.MsgBody[0].MsgContent["ImageInfoArray"].([]any)[0].(map[string]any)["URL"].(string)
	path := strings.TrimPrefix(u, "https://bridge.example.com")
	eventually(t, "the media expired", func() bool {
		resp, err := http.Get(h.base + path)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusNotFound
	})
}

// TestVoiceCrossesAsSound: with PUBLIC_URL, a customer's voice message
// reaches the agent as a TIMSoundElem they can play, with its duration, and
// WeChat's speech recognition beside it as text.
func TestVoiceCrossesAsSound(t *testing.T) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	voice := sampleAMR(130) // 2.6 s
	mediaID, _ := h.wx.AddMedia(voice, "audio/amr")
	m := h.pushToAgent("voice", map[string]string{"MediaId": mediaID, "Format": "amr", "Recognition": "什么时候发货"}, "im_sendmsg_voice.json")
	if len(m.MsgBody) != 2 || m.MsgBody[0].MsgType != "TIMSoundElem" || m.MsgBody[1].MsgContent["Text"] != "什么时候发货" {
		t.Fatalf("IM got %+v, want the sound and its recognition", m.MsgBody)
	}
	c := m.MsgBody[0].MsgContent
	if c["Second"] != 3.0 || c["Size"] != float64(len(voice)) {
		t.Errorf("sound %v, want 3 s and %d bytes", c, len(voice))
	}
	resp, err := http.Get(h.base + strings.TrimPrefix(c["Url"].(string), public))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "audio/amr" || !bytes.Equal(b, voice) {
		t.Errorf("the sound's URL: %d %s, %d bytes", resp.StatusCode, resp.Header.Get("Content-Type"), len(b))
	}
}

// pushToAgent pushes a customer's message of msgType with fields, waits for
// it in IM, checks the sendmsg against golden (if named), and returns it.
func (h *harness) pushToAgent(msgType string, fields map[string]string, golden string) SendMsg {
	h.t.Helper()
	if r := h.wx.SendMessage(context.Background(), customer, msgType, fields); r.Status != 200 {
		h.t.Fatalf("push answered %d", r.Status)
	}
	eventually(h.t, "the "+msgType+" in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	sends := h.im.RequestsTo("/v4/openim/sendmsg")
	if golden != "" {
		goldenJSON(h.t, golden, maskMediaIDs(sends[0].Body), "MsgSeq", "MsgRandom")
	}
	var m SendMsg
	if err := json.Unmarshal(sends[0].Body, &m); err != nil {
		h.t.Fatal(err)
	}
	return m
}

// maskMediaIDs writes the media ids in body, random for each message, as
// "media-1", "media-2" in the order they first appear.
func maskMediaIDs(body []byte) []byte {
	seen := map[string]string{}
	return regexp.MustCompile(`[0-9a-f]{32}`).ReplaceAllFunc(body, func(id []byte) []byte {
		if _, ok := seen[string(id)]; !ok {
			seen[string(id)] = fmt.Sprintf("media-%d", len(seen)+1)
		}
		return []byte(seen[string(id)])
	})
}

// testMP4 is the skeleton of an MP4 file: its type, and a movie header that
// says it lasts 4.2 s (a time scale of 1,000).
func testMP4() []byte {
	box := func(typ string, content []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(8+len(content)))
		return append(append(b, typ...), content...)
	}
	mvhd := make([]byte, 100)                   // version 0, flags, times...
	binary.BigEndian.PutUint32(mvhd[12:], 1000) // time scale
	binary.BigEndian.PutUint32(mvhd[16:], 4200) // duration
	ftyp := box("ftyp", []byte("isom\x00\x00\x02\x00isomiso2mp41"))
	return append(ftyp, box("moov", box("mvhd", mvhd))...)
}

// TestVideoCrossesAsVideo: with PUBLIC_URL, a customer's video reaches the
// agent as a TIMVideoFileElem with its size, duration and thumbnail, both
// served by the bridge; WeChat's media/get gives a video's bytes at the
// video_url it answers with.
func TestVideoCrossesAsVideo(t *testing.T) {
	for _, typ := range []string{"video", "shortvideo"} {
		t.Run(typ, func(t *testing.T) { testVideoCrossesAsVideo(t, typ) })
	}
}

func testVideoCrossesAsVideo(t *testing.T, typ string) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	video, thumb := testMP4(), testPNG(t, 8, 6)
	videoID, _ := h.wx.AddMedia(video, "video/mp4")
	thumbID, _ := h.wx.AddMedia(thumb, "image/png")
	m := h.pushToAgent(typ, map[string]string{"MediaId": videoID, "ThumbMediaId": thumbID}, "im_sendmsg_video.json")
	c := m.MsgBody[0].MsgContent
	if m.MsgBody[0].MsgType != "TIMVideoFileElem" || c["VideoSecond"] != 5.0 || c["VideoSize"] != float64(len(video)) ||
		c["ThumbWidth"] != 8.0 || c["ThumbHeight"] != 6.0 {
		t.Fatalf("IM got %+v, want the video of 5 s with its 8×6 thumbnail", m.MsgBody)
	}
	for _, f := range []struct {
		url, ct string
		want    []byte
	}{{c["VideoUrl"].(string), "video/mp4", video}, {c["ThumbUrl"].(string), "image/png", thumb}} {
		resp, err := http.Get(h.base + strings.TrimPrefix(f.url, public))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != f.ct || !bytes.Equal(b, f.want) {
			t.Errorf("%s: %d %s, %d bytes", f.url, resp.StatusCode, resp.Header.Get("Content-Type"), len(b))
		}
	}
}

// imageElem is a TIMImageElem of an image an agent's client put at u.
func imageElem(u string, size int) map[string]any {
	info := func(typ int) map[string]any {
		return map[string]any{"Type": typ, "Size": size, "Width": 3, "Height": 2, "URL": u}
	}
	return map[string]any{"MsgType": "TIMImageElem", "MsgContent": map[string]any{
		"UUID": "agent-upload", "ImageFormat": 3, "ImageInfoArray": []any{info(1), info(2), info(3)}}}
}

// TestAgentImageReachesCustomerAsImage: an agent's text and picture reach
// the customer in order, the picture uploaded to WeChat and sent as an
// image message; a picture WeChat would refuse is never uploaded, and the
// agent is told at once what to send instead.
func TestAgentImageReachesCustomerAsImage(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	photo := testPNG(t, 3, 2)
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false,
		map[string]any{"MsgType": "TIMTextElem", "MsgContent": map[string]any{"Text": "Here is your label:"}},
		imageElem(h.im.AddFile(photo, "image/png"), len(photo)))
	eventually(t, "the text and the image in WeChat", func() bool { return len(h.sentTo(customer)) == 2 })
	sent := h.sentTo(customer)
	if sent[0].Text != "Here is your label:" || sent[1].MsgType != "image" {
		t.Fatalf("the customer got %+v, want the text then the image", sent)
	}
	ups := h.wx.Uploads()
	if len(ups) != 1 || ups[0].MediaID != sent[1].MediaID || ups[0].Type != "image" || !bytes.Equal(ups[0].Data, photo) {
		t.Errorf("uploads %+v, want the photo, sent by its media_id", ups)
	}
	goldenJSON(t, "wechat_custom_send_image.json", h.wx.RequestsTo("/cgi-bin/message/custom/send")[1].Body)

	bmp := append([]byte("BM"), make([]byte, 64)...)
	h.im.SendElemsAsAgent(ctx, "agent_kim", customerIM(customer), false, imageElem(h.im.AddFile(bmp, "image/bmp"), len(bmp)))
	eventually(t, "the agent told", func() bool {
		return strings.Contains(h.textsTo("agent_kim", "\n"), "WeChat takes PNG, JPEG or GIF pictures")
	})
	if n := len(h.wx.Uploads()); n != 1 {
		t.Errorf("%d uploads, want the refused image never uploaded", n)
	}
}

// testJPEG is a small JPEG, w by h.
func testJPEG(t *testing.T, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, image.NewRGBA(image.Rect(0, 0, w, h)), nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestAgentSoundAndVideoReachCustomer: an agent's sound and video reach the
// customer as voice and video messages when WeChat takes them (AMR or MP3,
// 2 MB, 60 s; MP4, 10 MB, a JPEG thumbnail); a longer sound reaches them as
// a link to it at the bridge, and the agent a note saying why.
func TestAgentSoundAndVideoReachCustomer(t *testing.T) {
	const public = "https://bridge.example.com"
	h := newHarness(t, harnessOptions{env: map[string]string{"PUBLIC_URL": public}})
	ctx := context.Background()
	h.wx.SendText(ctx, customer, question)
	eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
	im := customerIM(customer)
	sound := func(data []byte, seconds int) map[string]any {
		return map[string]any{"MsgType": "TIMSoundElem", "MsgContent": map[string]any{
			"Url": h.im.AddFile(data, "audio/amr"), "UUID": "s", "Size": len(data), "Second": seconds, "Download_Flag": 2}}
	}
	voice, video, thumb := sampleAMR(100), testMP4(), testJPEG(t, 8, 6)
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, sound(voice, 2))
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, map[string]any{"MsgType": "TIMVideoFileElem", "MsgContent": map[string]any{
		"VideoUrl": h.im.AddFile(video, "video/mp4"), "VideoUUID": "v", "VideoSize": len(video), "VideoSecond": 5, "VideoFormat": "mp4",
		"VideoDownloadFlag": 2, "ThumbUrl": h.im.AddFile(thumb, "image/jpeg"), "ThumbUUID": "t", "ThumbSize": len(thumb),
		"ThumbWidth": 8, "ThumbHeight": 6, "ThumbFormat": "JPG", "ThumbDownloadFlag": 2}})
	long := sampleAMR(3500) // 70 s
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, sound(long, 70))
	eventually(t, "three messages in WeChat", func() bool { return len(h.sentTo(customer)) == 3 })
	sent := h.sentTo(customer)
	if sent[0].MsgType != "voice" || sent[1].MsgType != "video" || sent[2].MsgType != "text" {
		t.Fatalf("the customer got %+v, want a voice, a video and a text link", sent)
	}
	ups := h.wx.Uploads()
	if len(ups) != 3 || !bytes.Equal(ups[0].Data, voice) || !bytes.Equal(ups[1].Data, video) || ups[2].Type != "thumb" {
		t.Errorf("uploads: %d, want the voice, the video and its thumbnail", len(ups))
	}
	link, ok := strings.CutPrefix(sent[2].Text, "voice message: "+public)
	if !ok {
		t.Fatalf("the customer read %q, want a link to the sound at the bridge", sent[2].Text)
	}
	resp, err := http.Get(h.base + link)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(b, long) {
		t.Errorf("the link serves %d bytes, want the sound's %d", len(b), len(long))
	}
	eventually(t, "the note to the agent", func() bool {
		return strings.Contains(h.textsTo("agent_kim", "\n"), "as a link: WeChat takes AMR or MP3")
	})
	cs := h.wx.RequestsTo("/cgi-bin/message/custom/send")
	goldenJSON(t, "wechat_custom_send_voice.json", cs[0].Body)
	goldenJSON(t, "wechat_custom_send_video.json", cs[1].Body)

	// A file: Official Accounts send none, so its name and a link.
	h.im.SendElemsAsAgent(ctx, "agent_kim", im, false, map[string]any{"MsgType": "TIMFileElem", "MsgContent": map[string]any{
		"Url": "https://im.example.com/files/invoice.pdf", "UUID": "f", "FileName": "invoice.pdf", "FileSize": 1024, "Download_Flag": 2}})
	eventually(t, "the file's link", func() bool { return len(h.sentTo(customer)) == 4 })
	if got := h.sentTo(customer)[3].Text; got != "[file] invoice.pdf https://im.example.com/files/invoice.pdf" {
		t.Errorf("the customer read %q for a file", got)
	}
}

// keepBytes keeps data as media id in st, as the worker keeps a file it
// fetched.
func keepBytes(t *testing.T, st *Store, id, ct string, data []byte, now time.Time) {
	t.Helper()
	sp, err := newSpool(st.mediaDir)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	sp.Write(data)
	sp.size = int64(len(data))
	if err := st.KeepMedia(context.Background(), id, ct, sp, now); err != nil {
		t.Fatal(err)
	}
}

// readMedia returns media id's bytes, or the store's error.
func readMedia(st *Store, id string) ([]byte, error) {
	f, err := st.OpenMedia(context.Background(), id)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// TestMediaPruned: media kept before the cutoff is removed, its row and
// its bytes; newer media stays.
func TestMediaPruned(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			st := openTestStore(t, kind)
			ctx, now := context.Background(), time.Now()
			keepBytes(t, st, "00000000000000000000000000000001", "image/png", []byte("old"), now.Add(-8*24*time.Hour))
			keepBytes(t, st, "00000000000000000000000000000002", "image/png", []byte("new"), now)
			if err := st.PruneMedia(ctx, now.Add(-7*24*time.Hour)); err != nil {
				t.Fatal(err)
			}
			if _, err := readMedia(st, "00000000000000000000000000000001"); !errors.Is(err, errNoMedia) {
				t.Errorf("old media: %v, want it gone", err)
			}
			if data, err := readMedia(st, "00000000000000000000000000000002"); err != nil || string(data) != "new" {
				t.Errorf("new media: %q, %v", data, err)
			}
			if kind == "sqlite" {
				if _, err := os.Stat(filepath.Join(st.mediaDir, "00000000000000000000000000000001")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the old media's file: %v, want it removed", err)
				}
			} else {
				var parts int
				st.db.QueryRow(`SELECT count(*) FROM media_parts WHERE id = '00000000000000000000000000000001'`).Scan(&parts)
				if parts != 0 {
					t.Errorf("the old media has %d parts left, want none", parts)
				}
			}
		})
	}
}

// TestMediaWithoutPublicURL: without PUBLIC_URL the bridge says at start
// that media crosses as text, and a photo does.
func TestMediaWithoutPublicURL(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	if !strings.Contains(h.logs.String(), "media crosses as text") {
		t.Error("the bridge did not say media crosses as text")
	}
	mediaID, picURL := h.wx.AddMedia(testPNG(t, 1, 1), "image/png")
	m := h.pushToAgent("image", map[string]string{"PicUrl": picURL, "MediaId": mediaID}, "") // its PicUrl names the fake's port
	if m.MsgBody[0].MsgType != "TIMTextElem" || m.MsgBody[0].MsgContent["Text"] != "[image] "+picURL {
		t.Errorf("IM got %+v, want the photo as its link", m.MsgBody)
	}
}
