package main

// The media run (-media N): N customers each send a video of 10 MB while
// their agents each send one back, all at once, and the agents' clients
// download every customer's video from the bridge; the bridge's peak
// memory says whether media streams through it or is held whole.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/jpeg"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// mediaBytes is the size of each video: just under WeChat's 10 MB.
const mediaBytes = 10<<20 - 4<<10

// mediaEnv is what the bridge needs to carry media between the fakes: where
// IM clients download it, and leave to fetch from the fakes on loopback.
func (t *trial) mediaEnv(addr string) []string {
	return []string{"PUBLIC_URL=http://" + addr,
		"MEDIA_FETCH_ALLOW=" + strings.TrimPrefix(t.wx.URL, "http://") + "," + strings.TrimPrefix(t.im.URL, "http://")}
}

// runMedia runs the media run and reports the bridge's peak memory.
func (t *trial) runMedia(ctx context.Context, w io.Writer) error {
	n, addr := t.o.media, t.fleet.addrs[0]
	t.wx.SetTarget("http://" + addr + "/wechat")
	t.im.SetCallbackURL("http://" + addr + "/imcallback")
	video, thumb := testVideo(mediaBytes), testThumb()
	customers := make([]string, n)
	for i := range customers {
		customers[i] = fmt.Sprintf("oMediaLoad%06d", i)
		if r := t.wx.SendText(ctx, customers[i], "hello"); r.Status != http.StatusOK {
			return fmt.Errorf("load: push answered %d", r.Status)
		}
	}
	agentOf := map[string]string{} // the customer's IM account → their agent
	if err := waitFor(ctx, "each customer's first message in IM", func() bool {
		for _, m := range t.im.Messages() {
			agentOf[m.From] = m.To
		}
		return len(agentOf) >= n
	}); err != nil {
		return err
	}

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for _, c := range customers {
		wg.Add(2)
		go func() { // the customer's video
			defer wg.Done()
			videoID, _ := t.wx.AddMedia(video, "video/mp4")
			thumbID, _ := t.wx.AddMedia(thumb, "image/jpeg")
			if r := t.wx.SendMessage(ctx, c, "video", map[string]string{"MediaId": videoID, "ThumbMediaId": thumbID}); r.Status != http.StatusOK {
				errs <- fmt.Errorf("load: video push answered %d", r.Status)
			}
		}()
		go func() { // the agent's video
			defer wg.Done()
			elem := map[string]any{"MsgType": "TIMVideoFileElem", "MsgContent": map[string]any{
				"VideoUrl": t.im.AddFile(video, "video/mp4"), "VideoUUID": "v", "VideoSize": len(video), "VideoSecond": 5,
				"VideoFormat": "mp4", "VideoDownloadFlag": 2, "ThumbUrl": t.im.AddFile(thumb, "image/jpeg"), "ThumbUUID": "t",
				"ThumbSize": len(thumb), "ThumbWidth": 8, "ThumbHeight": 6, "ThumbFormat": "JPG", "ThumbDownloadFlag": 2}}
			if _, err := t.im.SendElemsAsAgent(ctx, agentOf["wx_"+c], "wx_"+c, false, elem); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	var urls []string
	if err := waitFor(ctx, "every video in IM and in WeChat", func() bool {
		urls = urls[:0]
		for _, m := range t.im.Messages() {
			var body []struct {
				MsgType    string
				MsgContent struct{ VideoUrl string }
			}
			if json.Unmarshal(m.Body, &body) == nil && len(body) == 1 && body[0].MsgType == "TIMVideoFileElem" {
				urls = append(urls, body[0].MsgContent.VideoUrl)
			}
		}
		sent := 0
		for _, m := range t.wx.Sent() {
			if m.MsgType == "video" {
				sent++
			}
		}
		return len(urls) >= n && sent >= n
	}); err != nil {
		return err
	}
	crossed := time.Since(start)
	// The agents' clients download the customers' videos, all at once.
	downloads := make(chan error, len(urls))
	for _, u := range urls {
		go func() { downloads <- download(ctx, u, len(video)) }()
	}
	for range urls {
		if err := <-downloads; err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "media: %d videos of %.1f MB each way crossed in %s, and were downloaded from the bridge\n",
		n, float64(len(video))/(1<<20), crossed.Round(time.Millisecond))
	fmt.Fprintf(w, "bridge peak memory:    %s (VmHWM)\n", t.fleet.peakMemory())
	return nil
}

// waitFor polls cond until it holds, for two minutes at most.
func waitFor(ctx context.Context, what string, cond func() bool) error {
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("load: gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// download fetches u from the bridge and checks its size.
func download(ctx context.Context, u string, size int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil && (resp.StatusCode != http.StatusOK || n != int64(size)) {
		err = fmt.Errorf("load: %s answered %d with %d bytes, want %d", u, resp.StatusCode, n, size)
	}
	return err
}

// testVideo is an MP4 file of size bytes: its type, a movie header of 5 s,
// and padding.
func testVideo(size int) []byte {
	box := func(typ string, content []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(8+len(content)))
		return append(append(b, typ...), content...)
	}
	mvhd := make([]byte, 100)
	binary.BigEndian.PutUint32(mvhd[12:], 1000)
	binary.BigEndian.PutUint32(mvhd[16:], 5000)
	v := append(box("ftyp", []byte("isom\x00\x00\x02\x00isomiso2mp41")), box("moov", box("mvhd", mvhd))...)
	return append(v, box("free", make([]byte, size-len(v)-8))...)
}

// testThumb is a small JPEG.
func testThumb() []byte {
	var b bytes.Buffer
	jpeg.Encode(&b, image.NewRGBA(image.Rect(0, 0, 8, 6)), nil)
	return b.Bytes()
}
