package main

// Media crossing between the vendors, in the worker: a customer's image,
// voice message or video fetched from WeChat and given to IM as its own
// element (kept and served by media.go), and an agent's picture, sound or
// video fetched from IM and uploaded to WeChat, or sent as a link when
// WeChat would not take it.

import (
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
	"net/http"
	"slices"
	"strings"
)

// mediaElems fetches the image, voice message or video of it from WeChat,
// keeps it, and returns the elements that carry it: a TIMImageElem with its
// size, width and height (the three sizes IM asks for are the one
// original); a TIMSoundElem with its size and duration, and WeChat's speech
// recognition beside it as text; a TIMVideoFileElem with its size, duration
// and thumbnail. Media WeChat no longer has, or that is not what it
// says, returns nil: the message crosses as its text.
func (w *Worker) mediaElems(ctx context.Context, it OutboxItem) ([]MsgElem, error) {
	m := it.Delivery.Media
	data, ct, err := w.WeChat.FetchMedia(ctx, *m)
	if err != nil {
		if permanent(err) || isHTTPStatus(err, http.StatusNotFound) {
			w.Log.Warn("media not fetched: it crosses as text", "err", err)
			return nil, nil
		}
		return nil, err
	}
	id := mediaID(w.MediaKey, it.ID, "")
	u := w.PublicURL + "/media/" + id
	var elems []MsgElem
	switch m.Type {
	case msgImage:
		cfg, format, imageCT, err := decodeImage(data, ct)
		if err != nil {
			w.Log.Warn("not an image WeChat sent: it crosses as text", "err", err)
			return nil, nil
		}
		ct = imageCT
		info := func(typ int) map[string]any {
			return map[string]any{"Type": typ, "Size": len(data), "Width": cfg.Width, "Height": cfg.Height, "URL": u}
		}
		elems = []MsgElem{{MsgType: "TIMImageElem", MsgContent: map[string]any{
			"UUID": id, "ImageFormat": cmp.Or(imageFormats[format], 255), "ImageInfoArray": []any{info(1), info(2), info(3)}}}}
	case msgVoice:
		if ct == "" || strings.HasPrefix(ct, "application/octet-stream") {
			ct = "audio/amr"
		}
		elems = []MsgElem{{MsgType: "TIMSoundElem", MsgContent: map[string]any{
			"Url": u, "UUID": id, "Size": len(data), "Second": amrSeconds(data), "Download_Flag": 2}}}
		if m.Recognition != "" {
			elems = append(elems, MsgElem{MsgType: "TIMTextElem", MsgContent: map[string]any{"Text": m.Recognition}})
		}
	case msgVideo, msgShortVideo:
		thumb, err := w.thumbnail(ctx, it)
		if err != nil || thumb == nil {
			return nil, err
		}
		if !strings.HasPrefix(ct, "video/") {
			ct = "video/mp4"
		}
		thumb["VideoUrl"], thumb["VideoUUID"], thumb["VideoSize"] = u, id, len(data)
		thumb["VideoSecond"], thumb["VideoFormat"], thumb["VideoDownloadFlag"] = mp4Seconds(data), "mp4", 2
		elems = []MsgElem{{MsgType: "TIMVideoFileElem", MsgContent: thumb}}
	default:
		return nil, nil
	}
	if err := w.Store.PutMedia(ctx, id, ct, data, w.Now()); err != nil {
		return nil, err
	}
	return elems, nil
}

// thumbnail fetches and keeps a video's thumbnail, and returns the Thumb
// fields of its TIMVideoFileElem; nil when WeChat no longer has it, or it is
// not an image.
func (w *Worker) thumbnail(ctx context.Context, it OutboxItem) (map[string]any, error) {
	data, ct, err := w.WeChat.FetchMedia(ctx, PushMedia{MediaID: it.Delivery.Media.ThumbMediaID})
	if err != nil {
		if permanent(err) || isHTTPStatus(err, http.StatusNotFound) {
			w.Log.Warn("video thumbnail not fetched: the video crosses as text", "err", err)
			return nil, nil
		}
		return nil, err
	}
	cfg, format, ct, err := decodeImage(data, ct)
	if err != nil {
		w.Log.Warn("video thumbnail is not an image: the video crosses as text", "err", err)
		return nil, nil
	}
	id := mediaID(w.MediaKey, it.ID, "thumb")
	if err := w.Store.PutMedia(ctx, id, ct, data, w.Now()); err != nil {
		return nil, err
	}
	return map[string]any{"ThumbUrl": w.PublicURL + "/media/" + id, "ThumbUUID": id, "ThumbSize": len(data),
		"ThumbWidth": cfg.Width, "ThumbHeight": cfg.Height, "ThumbFormat": strings.ToUpper(strings.Replace(format, "jpeg", "jpg", 1)), "ThumbDownloadFlag": 2}, nil
}

// decodeImage reads an image's size and format, and returns its type: ct,
// or the format's if ct does not name an image.
func decodeImage(data []byte, ct string) (image.Config, string, string, error) {
	cfg, format, err := image.DecodeConfig(bytes.NewReader(data))
	if err == nil && !strings.HasPrefix(ct, "image/") {
		ct = "image/" + format
	}
	return cfg, format, ct, err
}

// mp4Seconds is an MP4 file's duration from its movie header (moov/mvhd,
// ISO/IEC 14496-12), in whole seconds rounded up; 0 if it has none.
func mp4Seconds(data []byte) int {
	box := func(b []byte, typ string) []byte { // the content of the first box of typ in b
		for len(b) >= 8 {
			size := int(binary.BigEndian.Uint32(b))
			if size < 8 || size > len(b) {
				return nil
			}
			if string(b[4:8]) == typ {
				return b[8:size]
			}
			b = b[size:]
		}
		return nil
	}
	mvhd := box(box(data, "moov"), "mvhd")
	var scale, dur uint64
	switch {
	case len(mvhd) >= 20 && mvhd[0] == 0:
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

// amrSeconds is the duration of an AMR-NB file, in whole seconds rounded
// up; 0 for anything else (WeChat's voice messages are AMR, or Speex).
func amrSeconds(data []byte) int {
	frames, ok := bytes.CutPrefix(data, []byte("#!AMR\n"))
	if !ok {
		return 0
	}
	n := 0
	for len(frames) > 0 {
		size := amrFrameBytes[frames[0]>>3&0x0F]
		if size > len(frames) {
			break
		}
		frames, n = frames[size:], n+1
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

// maxAgentMedia bounds what the bridge fetches of an agent's media.
const maxAgentMedia = 50 << 20

// sendMedia fetches an agent's picture, sound or video from IM's storage,
// uploads it to WeChat and sends it to the customer as an image, voice or
// video message. A picture WeChat would refuse is never uploaded: the
// delivery ends at once, and the agent is told what to send instead. A sound
// or video WeChat would refuse reaches the customer as a link, and the agent
// a note saying why.
func (w *Worker) sendMedia(ctx context.Context, it OutboxItem) error {
	d := it.Delivery
	m, rule := d.Media, wechatMediaRules[d.Media.Type]
	data, _, err := getBytes(ctx, w.WeChat.HTTP, "im "+m.Name, m.PicURL, maxAgentMedia)
	if err != nil {
		return err
	}
	ct := sniffMedia(data)
	why := ""
	switch {
	case len(data) > rule.max:
		why = fmt.Sprintf("it has %d bytes", len(data))
	case !slices.Contains(rule.types, ct):
		why = "it is " + ct
	case rule.seconds > 0 && m.Seconds > rule.seconds:
		why = fmt.Sprintf("it lasts %d s", m.Seconds)
	}
	var thumb []byte
	if why == "" && m.Type == msgVideo {
		if thumb, _, err = getBytes(ctx, w.WeChat.HTTP, "im video thumbnail", m.ThumbURL, 64<<10+1); err != nil && !errors.Is(err, errTooLarge) {
			return err
		}
		if len(thumb) > 64<<10 || errors.Is(err, errTooLarge) || sniffMedia(thumb) != "image/jpeg" {
			why = "its thumbnail is not a JPEG of 64 KB at most"
		}
	}
	switch {
	case why != "" && m.Type == msgImage:
		return permanentError{fmt.Errorf("WeChat takes %s, and %s: send it as one", rule.what, why)}
	case why != "":
		return w.sendLink(ctx, it, data, ct, fmt.Sprintf("WeChat takes %s, and %s", rule.what, why))
	}
	mediaID, err := w.WeChat.Upload(ctx, m.Type, m.Type, data)
	if err != nil {
		return err
	}
	switch m.Type {
	case msgImage:
		return w.WeChat.SendMedia(ctx, d.OpenID, "image", map[string]string{"media_id": mediaID})
	case msgVoice:
		return w.WeChat.SendMedia(ctx, d.OpenID, "voice", map[string]string{"media_id": mediaID})
	}
	thumbID, err := w.WeChat.Upload(ctx, "thumb", "thumb", thumb)
	if err != nil {
		return err
	}
	return w.WeChat.SendMedia(ctx, d.OpenID, "video", map[string]string{"media_id": mediaID, "thumb_media_id": thumbID})
}

// sendLink sends the customer a link to an agent's sound or video that
// WeChat would not take as a message: at the bridge if PUBLIC_URL is set,
// else in IM's storage. The agent is told why.
func (w *Worker) sendLink(ctx context.Context, it OutboxItem, data []byte, ct, why string) error {
	d := it.Delivery
	link := d.Media.PicURL
	if w.PublicURL != "" {
		id := mediaID(w.MediaKey, it.ID, "")
		if err := w.Store.PutMedia(ctx, id, ct, data, w.Now()); err != nil {
			return err
		}
		link = w.PublicURL + "/media/" + id
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
