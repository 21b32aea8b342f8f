package main

// Media crossing between the vendors, in the worker: a customer's image,
// voice message or video fetched from WeChat and given to IM as its own
// element (kept and served by media.go), and an agent's picture, sound or
// video fetched from IM and uploaded to WeChat, or sent as a link when
// WeChat would not take it.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // the formats WeChat sends
	_ "image/jpeg"
	_ "image/png"
	"io"
	"net/http"
	"slices"
	"strings"
)

// carryMedia makes msg, a customer's message of media, carry its file as
// IM's elements, or, if the file cannot cross, its text and why. Either way
// the item is rewritten to carry what this attempt sends, so that every
// attempt after it sends the very same message, fetching nothing again:
// IM drops a repeat only of the same content.
func (w *Worker) carryMedia(ctx context.Context, it OutboxItem, msg *SendMsg) error {
	d := it.Delivery
	elems, err := w.mediaElems(ctx, it)
	if why, cannot := fileFailure(err); cannot {
		d.Text, d.Media = d.Text+"\n(not carried: "+why+")", nil
		elems = textMessage("", "", d.Text, 0, 0).MsgBody
	} else if err != nil || elems == nil {
		return err
	} else {
		d.Elems, d.Media = elems, nil
	}
	if err := w.Store.Rewrite(ctx, it, d); err != nil {
		return err
	}
	msg.MsgBody = elems
	return nil
}

// mediaElems fetches the image, voice message or video of it from WeChat,
// keeps it, and returns the elements that carry it: a TIMImageElem with its
// size, width and height (the three sizes IM asks for are the one
// original); a TIMSoundElem with its size and duration, and WeChat's speech
// recognition beside it as text; a TIMVideoFileElem with its size, duration
// and thumbnail. A failure of the file itself (fileFailure) is returned as
// it is, for the message to cross as its text.
func (w *Worker) mediaElems(ctx context.Context, it OutboxItem) ([]MsgElem, error) {
	if err := w.keepIDs(ctx, &it); err != nil {
		return nil, err
	}
	m := it.Delivery.Media
	sp, thumb, err := w.fetchPushMedia(ctx, it)
	if err != nil {
		return nil, w.mediaTrouble(ctx, &it, err)
	}
	defer sp.Close()
	u := w.PublicURL + "/media/" + m.Keep
	ct := sniffMedia(sp.head(512)) // what is served is what the bytes are, whatever their source said
	var elems []MsgElem
	switch m.Type {
	case msgImage:
		cfg, format, err := image.DecodeConfig(sp.reader())
		if err != nil {
			return nil, mediaError{why: "it is not a picture"}
		}
		info := func(typ int) map[string]any {
			return map[string]any{"Type": typ, "Size": sp.size, "Width": cfg.Width, "Height": cfg.Height, "URL": u}
		}
		elems = []MsgElem{{MsgType: "TIMImageElem", MsgContent: map[string]any{
			"UUID": m.Keep, "ImageFormat": cmp.Or(imageFormats[format], 255), "ImageInfoArray": []any{info(1), info(2), info(3)}}}}
	case msgVoice:
		elems = []MsgElem{{MsgType: "TIMSoundElem", MsgContent: map[string]any{
			"Url": u, "UUID": m.Keep, "Size": sp.size, "Second": amrSeconds(sp.reader()), "Download_Flag": 2}}}
		if m.Recognition != "" {
			elems = append(elems, MsgElem{MsgType: "TIMTextElem", MsgContent: map[string]any{"Text": m.Recognition}})
		}
	case msgVideo, msgShortVideo:
		defer thumb.Close()
		c, err := w.keepThumbnail(ctx, m, thumb)
		if err != nil {
			return nil, err
		}
		c["VideoUrl"], c["VideoUUID"], c["VideoSize"] = u, m.Keep, sp.size
		c["VideoSecond"], c["VideoFormat"], c["VideoDownloadFlag"] = mp4Seconds(sp.File, sp.size), "mp4", 2
		elems = []MsgElem{{MsgType: "TIMVideoFileElem", MsgContent: c}}
	default:
		return nil, nil
	}
	if err := w.Store.KeepMedia(ctx, m.Keep, ct, sp, w.Now()); err != nil {
		return nil, err
	}
	return elems, nil
}

// fetchPushMedia fetches a customer's media from WeChat and, for a video,
// its thumbnail, within MEDIA_FETCH_TIMEOUT.
func (w *Worker) fetchPushMedia(ctx context.Context, it OutboxItem) (sp, thumb *spool, err error) {
	ctx, cancel := w.Fetch.deadline(ctx)
	defer cancel()
	m := it.Delivery.Media
	if sp, err = w.WeChat.FetchMedia(ctx, w.Fetch, m.MediaID); err != nil {
		return nil, nil, err
	}
	if m.Type == msgVideo || m.Type == msgShortVideo {
		if thumb, err = w.WeChat.FetchMedia(ctx, w.Fetch, m.ThumbMediaID); err != nil {
			sp.Close()
			return nil, nil, err
		}
	}
	return sp, thumb, nil
}

// keepThumbnail keeps a customer's video's thumbnail, and returns the Thumb
// fields of its TIMVideoFileElem.
func (w *Worker) keepThumbnail(ctx context.Context, m *PushMedia, sp *spool) (map[string]any, error) {
	cfg, format, err := image.DecodeConfig(sp.reader())
	if err != nil {
		return nil, mediaError{why: "its thumbnail is not a picture"}
	}
	if err := w.Store.KeepMedia(ctx, m.KeepThumb, "image/"+format, sp, w.Now()); err != nil {
		return nil, err
	}
	return map[string]any{"ThumbUrl": w.PublicURL + "/media/" + m.KeepThumb, "ThumbUUID": m.KeepThumb, "ThumbSize": sp.size,
		"ThumbWidth": cfg.Width, "ThumbHeight": cfg.Height, "ThumbFormat": strings.ToUpper(strings.Replace(format, "jpeg", "jpg", 1)), "ThumbDownloadFlag": 2}, nil
}

// keepIDs makes sure the ids media of it is kept under are chosen and
// recorded with the item, so that every attempt gives the same URLs: a
// customer's are chosen when the push is accepted; an item accepted before
// that, and an agent's file sent as a link, get theirs here, once.
func (w *Worker) keepIDs(ctx context.Context, it *OutboxItem) error {
	if it.Delivery.Media.Keep != "" {
		return nil
	}
	m := *it.Delivery.Media
	m.Keep, m.KeepThumb = newMediaID(), newMediaID()
	d := it.Delivery
	d.Media = &m
	if err := w.Store.Rewrite(ctx, *it, d); err != nil {
		return err
	}
	it.Delivery = d
	return nil
}

// mediaTries is how many attempts may fail to fetch or upload a message's
// media for a passing reason (a host's 5xx, a broken connection, a
// time-out); then it crosses without the file, whoever's trouble kept it:
// a host that fails for longer would hold up every message behind it in
// its lane.
const mediaTries = 3

// mediaTrouble judges err, the failure of this attempt's fetch or upload: a
// failure of the file itself as it is; a passing one counted with the item
// (Media.Tries), and at the last of mediaTries the file's failure too.
func (w *Worker) mediaTrouble(ctx context.Context, it *OutboxItem, err error) error {
	if _, ok := fileFailure(err); ok || err == nil {
		return err
	}
	m := *it.Delivery.Media
	if m.Tries++; m.Tries >= mediaTries {
		return mediaError{why: fmt.Sprintf("it could not be carried in %d attempts (%v)", mediaTries, err)}
	}
	d := it.Delivery
	d.Media = &m
	if rerr := w.Store.Rewrite(ctx, *it, d); rerr != nil {
		w.Log.Warn("media attempt not counted", "err", rerr)
		return err
	}
	it.Delivery = d
	return err
}

// fileFailure reports why a media delivery failed for the file's own sake,
// a failure no retry can fix: a mediaError, or a code of WeChat's that
// says so (media expired, 40007). Anything else is the vendor's passing
// trouble.
func fileFailure(err error) (string, bool) {
	var me mediaError
	switch {
	case errors.As(err, &me):
		return me.why, true
	case permanent(err):
		return explain(err), true
	}
	return "", false
}

// mp4Seconds is the duration of the MP4 file r of size bytes, from its
// movie header (moov/mvhd, ISO/IEC 14496-12), in whole seconds rounded up;
// 0 if it has none. It reads box headers only: the file stays on disk.
func mp4Seconds(r io.ReaderAt, size int64) int {
	// box finds the first box of typ in [start, end) and returns where its
	// content begins and ends.
	box := func(start, end int64, typ string) (int64, int64, bool) {
		var h [16]byte
		for start+8 <= end {
			if _, err := r.ReadAt(h[:8], start); err != nil {
				return 0, 0, false
			}
			n, header := int64(binary.BigEndian.Uint32(h[:4])), int64(8)
			if n == 1 { // a 64-bit size follows the type
				if _, err := r.ReadAt(h[8:16], start+8); err != nil {
					return 0, 0, false
				}
				n, header = int64(binary.BigEndian.Uint64(h[8:16])), 16
			}
			if n < header || n > end-start {
				return 0, 0, false
			}
			if string(h[4:8]) == typ {
				return start + header, start + n, true
			}
			start += n
		}
		return 0, 0, false
	}
	ms, me, ok := box(0, size, "moov")
	if ok {
		ms, me, ok = box(ms, me, "mvhd")
	}
	mvhd := make([]byte, min(32, me-ms))
	if !ok || len(mvhd) < 20 {
		return 0
	}
	if _, err := r.ReadAt(mvhd, ms); err != nil {
		return 0
	}
	var scale, dur uint64
	switch {
	case mvhd[0] == 0:
		scale, dur = uint64(binary.BigEndian.Uint32(mvhd[12:])), uint64(binary.BigEndian.Uint32(mvhd[16:]))
	case len(mvhd) >= 32 && mvhd[0] == 1:
		scale, dur = uint64(binary.BigEndian.Uint32(mvhd[20:])), binary.BigEndian.Uint64(mvhd[24:])
	}
	if scale == 0 {
		return 0
	}
	return int((dur + scale - 1) / scale)
}

// amrFrameBytes is the size of an AMR-NB frame, header included, by its
// frame type (RFC 4867, section 5.3); each lasts 20 ms.
var amrFrameBytes = [16]int{13, 14, 16, 18, 20, 21, 27, 32, 6, 1, 1, 1, 1, 1, 1, 1}

// amrSeconds is the duration of the AMR-NB file r, in whole seconds
// rounded up; 0 for anything else (WeChat's voice messages are AMR, or
// Speex). It reads one frame at a time.
func amrSeconds(r io.Reader) int {
	br := bufio.NewReader(r)
	if magic, err := br.Peek(6); err != nil || string(magic) != "#!AMR\n" {
		return 0
	}
	br.Discard(6)
	n := 0
	for {
		h, err := br.ReadByte()
		if err != nil {
			break
		}
		size := amrFrameBytes[h>>3&0x0F] - 1
		if k, _ := br.Discard(size); k < size {
			break
		}
		n++
	}
	return (n*20 + 999) / 1000
}

// imageFormats are IM's ImageFormat codes (message formats, 1047/33527):
// JPG 1, GIF 2, PNG 3, other 255.
var imageFormats = map[string]int{"jpeg": 1, "gif": 2, "png": 3}

// wechatMediaRules are what WeChat takes as an image, voice or video
// message's upload (its temporary-media page): the most bytes, the types,
// the longest duration.
var wechatMediaRules = map[string]struct {
	max     int
	types   []string
	seconds int
	what    string
}{
	msgImage: {10 << 20, []string{"image/png", "image/jpeg", "image/gif"}, 0, "PNG, JPEG or GIF pictures of 10 MB at most"},
	msgVoice: {2 << 20, []string{"audio/amr", "audio/mpeg"}, 60, "AMR or MP3 voice messages of 2 MB and 60 s at most"},
	msgVideo: {10 << 20, []string{"video/mp4"}, 0, "MP4 videos of 10 MB at most, with a JPEG thumbnail of 64 KB at most"},
}

// sendMedia fetches an agent's picture, sound or video from IM's storage,
// at most what WeChat takes of its type, uploads it to WeChat and sends it
// to the customer as an image, voice or video message. What WeChat does
// not take, or the bridge cannot fetch whole in time, is decided at once: a
// picture is not sent, a sound or video reaches the customer as a link
// (sendLink), and the agent is told why. Only the vendors' passing trouble
// is retried.
func (w *Worker) sendMedia(ctx context.Context, it OutboxItem) error {
	m, rule := it.Delivery.Media, wechatMediaRules[it.Delivery.Media.Type]
	sp, thumb, err := w.fetchReplyMedia(ctx, it)
	err = w.mediaTrouble(ctx, &it, err)
	var me mediaError
	switch {
	case errors.As(err, &me) && (me.unreachable || m.Type == msgImage):
		return permanentError{fmt.Errorf("your %s was not fetched: %s", m.Name, me.why)}
	case errors.As(err, &me): // it is there, but the bridge cannot carry it
		return w.sendLink(ctx, it, nil, "", fmt.Sprintf("WeChat takes %s, and %s", rule.what, me.why))
	case err != nil:
		return err
	}
	defer sp.Close()
	if thumb != nil {
		defer thumb.Close()
	}
	ct, why := sniffMedia(sp.head(512)), ""
	seconds := m.Seconds
	if ct == "audio/amr" {
		seconds = max(seconds, amrSeconds(sp.reader())) // the file's own length, whatever the element says
	}
	switch {
	case !slices.Contains(rule.types, ct):
		why = "it is " + ct
	case rule.seconds > 0 && seconds > rule.seconds:
		why = fmt.Sprintf("it lasts %d s", seconds)
	case thumb != nil && sniffMedia(thumb.head(512)) != "image/jpeg":
		why = "its thumbnail is not a JPEG"
	}
	if why == "" {
		err := w.upload(ctx, it, ct, sp, thumb)
		var we *WeChatError
		var uf uploadFailed
		switch {
		case errors.As(err, &we) && uploadRefused[we.Code] && m.Type != msgImage:
			why = "it refused it: " + explain(err)
		case errors.As(err, &uf):
			if err = w.mediaTrouble(ctx, &it, uf.error); !errors.As(err, &me) {
				return err
			}
			why = me.why
		default:
			return err
		}
	}
	if m.Type == msgImage {
		return permanentError{fmt.Errorf("WeChat takes %s, and %s: send it as one", rule.what, why)}
	}
	return w.sendLink(ctx, it, sp, ct, fmt.Sprintf("WeChat takes %s, and %s", rule.what, why))
}

// uploadRefused are media/upload's codes for a file WeChat does not take:
// of a kind, a type or a size it refuses (40113 as SDK users report it,
// wechat.md; 45001 in WeChat's global return codes).
var uploadRefused = map[int]bool{40004: true, 40005: true, 40006: true, 40113: true, 45001: true}

// uploadFailed is an upload's failure for a passing reason, which
// mediaTrouble counts.
type uploadFailed struct{ error }

func (e uploadFailed) Unwrap() error { return e.error }

// fetchReplyMedia fetches an agent's file and, for a video, its thumbnail,
// within MEDIA_FETCH_TIMEOUT.
func (w *Worker) fetchReplyMedia(ctx context.Context, it OutboxItem) (sp, thumb *spool, err error) {
	ctx, cancel := w.Fetch.deadline(ctx)
	defer cancel()
	m := it.Delivery.Media
	if sp, err = w.Fetch.get(ctx, "im "+m.Name, m.PicURL, int64(wechatMediaRules[m.Type].max)); err != nil {
		return nil, nil, err
	}
	if m.Type == msgVideo {
		var me mediaError
		thumb, err = w.Fetch.get(ctx, "im video thumbnail", m.ThumbURL, 64<<10)
		if errors.As(err, &me) {
			me.why, me.unreachable = "its thumbnail: "+me.why, false // the video is there: a link to it serves
			err = me
		}
		if err != nil {
			sp.Close()
			return nil, nil, err
		}
	}
	return sp, thumb, nil
}

// upload uploads an agent's file (and a video's thumbnail) to WeChat and
// sends the customer the message that carries it.
func (w *Worker) upload(ctx context.Context, it OutboxItem, ct string, sp, thumb *spool) error {
	d := it.Delivery
	passing := func(err error) error { // an upload's failure to count, or as it is
		if _, file := fileFailure(err); err == nil || file {
			return err
		}
		return uploadFailed{err}
	}
	mediaID, err := w.WeChat.Upload(ctx, d.Media.Type, ct, sp)
	if err != nil {
		return passing(err)
	}
	switch d.Media.Type {
	case msgImage:
		return w.WeChat.SendMedia(ctx, d.OpenID, "image", map[string]string{"media_id": mediaID})
	case msgVoice:
		return w.WeChat.SendMedia(ctx, d.OpenID, "voice", map[string]string{"media_id": mediaID})
	}
	thumbID, err := w.WeChat.Upload(ctx, "thumb", "image/jpeg", thumb)
	if err != nil {
		return passing(err)
	}
	return w.WeChat.SendMedia(ctx, d.OpenID, "video", map[string]string{"media_id": mediaID, "thumb_media_id": thumbID})
}

// sendLink sends the customer a link to an agent's sound or video that
// WeChat would not take as a message: at the bridge if PUBLIC_URL is set
// and the bridge has the file (sp), kept under one id whatever the number
// of attempts, else in IM's storage. The agent is told why.
func (w *Worker) sendLink(ctx context.Context, it OutboxItem, sp *spool, ct, why string) error {
	d := it.Delivery
	link := d.Media.PicURL
	if w.PublicURL != "" && sp != nil {
		if err := w.keepIDs(ctx, &it); err != nil {
			return err
		}
		if err := w.Store.KeepMedia(ctx, it.Delivery.Media.Keep, ct, sp, w.Now()); err != nil {
			return err
		}
		link = w.PublicURL + "/media/" + it.Delivery.Media.Keep
	}
	if err := w.WeChat.SendText(ctx, d.OpenID, d.Media.Name+": "+link); err != nil {
		return err
	}
	note := conversationNotice(d.IMUser, d.OpenID, d.Agent, fmt.Sprintf("Your %s reached WeChat customer %s as a link: %s.", d.Media.Name, d.IMUser, why))
	if err := w.Store.Notice(ctx, note, w.Now()); err != nil {
		w.Log.Error("note to the agent not queued", "err", err)
	}
	return nil
}

// sniffMedia is a file's type, by its first bytes, as WeChat judges it.
func sniffMedia(data []byte) string {
	switch {
	case bytes.HasPrefix(data, []byte("#!AMR")):
		return "audio/amr"
	case bytes.HasPrefix(data, []byte("ID3")) || len(data) > 1 && data[0] == 0xFF && data[1]&0xE0 == 0xE0:
		return "audio/mpeg"
	}
	return http.DetectContentType(data)
}
