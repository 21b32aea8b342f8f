package main

// Media customers send (photos, voice messages, videos), kept for IM clients to download from the bridge at
// GET /media/{id} (IM's elements carry a URL, not bytes). An id is an HMAC
// of the outbox item that fetched the media, under a key derived from the
// IM secret key: nobody can guess or alter one, and a retry of the item
// keeps its id. Media is served until MEDIA_RETENTION ends, then removed.
// On SQLite the bytes are files in MEDIA_DIR; on PostgreSQL they are in the
// media table, for every instance to serve.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // the formats WeChat sends
	_ "image/jpeg"
	_ "image/png"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// mediaIDPattern is what an id looks like: anything else is not one.
var mediaIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// mediaKey derives the key of media ids from the IM secret key.
func mediaKey(imSecret string) []byte {
	m := hmac.New(sha256.New, []byte(imSecret))
	m.Write([]byte("wechat-im-bridge media ids"))
	return m.Sum(nil)
}

// mediaID is the id of the media outbox item itemID fetched; part tells a
// video's thumbnail ("thumb") from the video ("").
func mediaID(key []byte, itemID int64, part string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(strconv.FormatInt(itemID, 10) + part))
	return hex.EncodeToString(m.Sum(nil))[:32]
}

// PutMedia keeps data as media id; keeping the same id again changes
// nothing.
func (s *Store) PutMedia(ctx context.Context, id, contentType string, data []byte, now time.Time) error {
	if !s.postgres {
		// The file first, whole (renamed into place), then its row.
		if err := os.MkdirAll(s.mediaDir, 0o700); err != nil {
			return fmt.Errorf("put media: %w", err)
		}
		tmp := filepath.Join(s.mediaDir, id+".tmp")
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			return fmt.Errorf("put media: %w", err)
		}
		if err := os.Rename(tmp, filepath.Join(s.mediaDir, id)); err != nil {
			return fmt.Errorf("put media: %w", err)
		}
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if s.postgres {
			_, err := s.exec(ctx, tx, `INSERT INTO media (id, content_type, size, created_at, data) VALUES (?, ?, ?, ?, ?)
				ON CONFLICT (id) DO NOTHING`, id, contentType, len(data), now.UnixMilli(), data)
			return err
		}
		_, err := s.exec(ctx, tx, `INSERT INTO media (id, content_type, size, created_at) VALUES (?, ?, ?, ?)
			ON CONFLICT (id) DO NOTHING`, id, contentType, len(data), now.UnixMilli())
		return err
	})
	if err != nil {
		return fmt.Errorf("put media: %w", err)
	}
	return nil
}

// errNoMedia is returned for an id the store does not keep.
var errNoMedia = errors.New("no such media")

// GetMedia returns media id's type, when it was kept, and its bytes.
func (s *Store) GetMedia(ctx context.Context, id string) (contentType string, created time.Time, data []byte, err error) {
	var ms int64
	if s.postgres {
		err = s.rdb.QueryRowContext(ctx, `SELECT content_type, created_at, data FROM media WHERE id = $1`, id).Scan(&contentType, &ms, &data)
	} else {
		err = s.rdb.QueryRowContext(ctx, `SELECT content_type, created_at FROM media WHERE id = ?`, id).Scan(&contentType, &ms)
		if err == nil {
			data, err = os.ReadFile(filepath.Join(s.mediaDir, id))
		}
	}
	if errors.Is(err, sql.ErrNoRows) || errors.Is(err, os.ErrNotExist) {
		return "", time.Time{}, nil, errNoMedia
	}
	return contentType, time.UnixMilli(ms), data, err
}

// PruneMedia removes the media kept before cutoff.
func (s *Store) PruneMedia(ctx context.Context, cutoff time.Time) error {
	var ids []string
	if !s.postgres {
		rows, err := s.rdb.QueryContext(ctx, `SELECT id FROM media WHERE created_at < ?`, cutoff.UnixMilli())
		if err != nil {
			return fmt.Errorf("prune media: %w", err)
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err == nil {
				ids = append(ids, id)
			}
		}
		rows.Close()
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `DELETE FROM media WHERE created_at < ?`, cutoff.UnixMilli())
		return err
	})
	if err != nil {
		return fmt.Errorf("prune media: %w", err)
	}
	for _, id := range ids { // the rows are gone: no one is served these files
		os.Remove(filepath.Join(s.mediaDir, id))
	}
	return nil
}

// handleMedia serves GET /media/{id}: the media's bytes with its type, and
// ranges of them, while its retention lasts; anything else is 404.
func (b *bridge) handleMedia() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if !mediaIDPattern.MatchString(id) {
			http.NotFound(w, r)
			return
		}
		ct, created, data, err := b.store.GetMedia(r.Context(), id)
		switch {
		case errors.Is(err, errNoMedia) || err == nil && b.now().Sub(created) >= b.cfg.MediaRetention:
			http.NotFound(w, r)
			return
		case err != nil:
			b.log.Error("media not read", "err", err)
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Cache-Control", "private, max-age=86400")
		http.ServeContent(w, r, "", created, bytes.NewReader(data))
	})
}

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
	note := Delivery{Kind: deliverNotice, OpenID: d.OpenID, IMUser: d.IMUser, Agent: d.Agent, MsgRandom: mrand.Uint32(),
		Text: fmt.Sprintf("Your %s reached WeChat customer %s as a link: %s.", d.Media.Name, d.IMUser, why)}
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
