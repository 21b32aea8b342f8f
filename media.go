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
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
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
