package main

// Media kept for IM clients to download from the bridge at GET /media/{id}
// (IM's elements carry a URL, not bytes): what customers send, and an
// agent's sound or video that reaches a customer as a link. An id is 128
// random bits, chosen once per message and kept with the file, so no id is
// ever given to two files. Media is served until MEDIA_RETENTION ends, then
// removed. On SQLite the bytes are files in MEDIA_DIR; on PostgreSQL they
// are rows of media_parts, for every instance to serve. Either way they go
// from disk to disk and to the network in pieces, never whole in memory.

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// mediaIDPattern is what an id looks like: anything else is not one.
var mediaIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// newMediaID returns an id no media has had.
func newMediaID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// mediaPart is the size of a PostgreSQL media_parts row: what one write
// sends and one read of a download holds.
const mediaPart = 256 << 10

// KeepMedia keeps the spooled file sp as media id, of type ct; keeping an
// id again changes nothing. On SQLite the spool, already in MEDIA_DIR, is
// renamed into place before its row is written: a crash between leaves a
// file without a row, which the next start removes (cleanMediaDir). On
// PostgreSQL the row and its parts are written in one transaction.
func (s *Store) KeepMedia(ctx context.Context, id, ct string, sp *spool, now time.Time) error {
	insert := `INSERT INTO media (id, content_type, size, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`
	if !s.postgres {
		if err := s.placeMedia(id, sp); err != nil {
			return fmt.Errorf("keep media: %w", err)
		}
		return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			_, err := s.exec(ctx, tx, insert, id, ct, sp.size, now.UnixMilli())
			return err
		})
	}
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		res, err := s.exec(ctx, tx, insert, id, ct, sp.size, now.UnixMilli())
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return err // kept already
		}
		buf := make([]byte, mediaPart)
		for pos := int64(0); pos < sp.size; pos += mediaPart {
			n, err := sp.ReadAt(buf[:min(mediaPart, sp.size-pos)], pos)
			if err != nil && !(errors.Is(err, io.EOF) && int64(n) == sp.size-pos) {
				return err
			}
			if _, err := s.exec(ctx, tx, `INSERT INTO media_parts (id, pos, data) VALUES (?, ?, ?)`, id, pos, buf[:n]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("keep media: %w", err)
	}
	return nil
}

// placeMedia puts sp's file in MEDIA_DIR as id, whole: renamed if it is a
// spool there, else copied to a spool there first.
func (s *Store) placeMedia(id string, sp *spool) error {
	src := sp.path
	if src == "" || filepath.Dir(src) != filepath.Clean(s.mediaDir) {
		tmp, err := newSpool(s.mediaDir)
		if err != nil {
			return err
		}
		defer tmp.Close()
		if _, err := io.Copy(tmp.File, sp.reader()); err != nil {
			return err
		}
		src = tmp.path
		tmp.path = ""
	}
	if err := os.Rename(src, filepath.Join(s.mediaDir, id)); err != nil {
		return err
	}
	if src == sp.path {
		sp.path = "" // kept: Close leaves it
	}
	return nil
}

// cleanMediaDir removes what a crash can leave in MEDIA_DIR, which is the
// bridge's own: spools, and files renamed into place whose row was never
// written or was pruned, older than a minute (a file younger may be one
// being written). It touches no file of a name the bridge does not give.
// The store runs it when it opens, and the hourly prune.
func (s *Store) cleanMediaDir(ctx context.Context) error {
	entries, err := os.ReadDir(s.mediaDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("clean media folder: %w", err)
	}
	rows, err := s.rdb.QueryContext(ctx, `SELECT id FROM media`)
	if err != nil {
		return fmt.Errorf("clean media folder: %w", err)
	}
	kept := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return fmt.Errorf("clean media folder: %w", err)
		}
		kept[id] = true
	}
	if err := cmp.Or(rows.Err(), rows.Close()); err != nil {
		return fmt.Errorf("clean media folder: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		id, spool := strings.CutSuffix(name, spoolSuffix) // an earlier version's spools were ID.tmp
		spool = spool && (strings.HasPrefix(name, spoolPrefix) || mediaIDPattern.MatchString(id))
		if !spool && (!mediaIDPattern.MatchString(name) || kept[name]) {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Minute {
			os.Remove(filepath.Join(s.mediaDir, name))
		}
	}
	return nil
}

// errNoMedia is returned for an id the store does not keep.
var errNoMedia = errors.New("no such media")

// mediaFile is kept media, open for reading from any offset.
type mediaFile struct {
	io.ReadSeeker
	contentType string
	created     time.Time
	size        int64
	close       func() error
}

// Close releases the file.
func (f *mediaFile) Close() error { return f.close() }

// OpenMedia opens media id for reading, or returns errNoMedia.
func (s *Store) OpenMedia(ctx context.Context, id string) (*mediaFile, error) {
	var ms int64
	f := &mediaFile{close: func() error { return nil }}
	err := s.readRow(ctx, `SELECT content_type, created_at, size FROM media WHERE id = ?`, id).Scan(&f.contentType, &ms, &f.size)
	f.created = time.UnixMilli(ms)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, errNoMedia
	case err != nil:
		return nil, fmt.Errorf("open media: %w", err)
	case s.postgres:
		f.ReadSeeker = &partsReader{ctx: ctx, db: s.rdb, id: id, size: f.size}
		return f, nil
	}
	file, err := os.Open(filepath.Join(s.mediaDir, id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNoMedia
	} else if err != nil {
		return nil, fmt.Errorf("open media: %w", err)
	}
	f.ReadSeeker, f.close = file, file.Close
	return f, nil
}

// partsReader reads media from its PostgreSQL parts, one part at a time.
type partsReader struct {
	ctx      context.Context
	db       *sql.DB
	id       string
	size     int64
	pos      int64
	part     []byte // the part that starts at partPos
	partPos  int64
	partRead bool
}

func (r *partsReader) Read(p []byte) (int, error) {
	if r.pos >= r.size {
		return 0, io.EOF
	}
	if !r.partRead || r.pos < r.partPos || r.pos >= r.partPos+int64(len(r.part)) {
		err := r.db.QueryRowContext(r.ctx, `SELECT pos, data FROM media_parts WHERE id = $1 AND pos <= $2 ORDER BY pos DESC LIMIT 1`,
			r.id, r.pos).Scan(&r.partPos, &r.part)
		if errors.Is(err, sql.ErrNoRows) || err == nil && r.pos >= r.partPos+int64(len(r.part)) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return 0, fmt.Errorf("read media: %w", err)
		}
		r.partRead = true
	}
	n := copy(p, r.part[r.pos-r.partPos:])
	r.pos += int64(n)
	return n, nil
}

func (r *partsReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekCurrent:
		offset += r.pos
	case io.SeekEnd:
		offset += r.size
	}
	if offset < 0 {
		return 0, errors.New("read media: seek before the start")
	}
	r.pos = offset
	return offset, nil
}

// PruneMedia removes the media kept before cutoff, a few at a time: on
// PostgreSQL a medium's parts are up to 10 MB of rows (prune.go).
func (s *Store) PruneMedia(ctx context.Context, cutoff time.Time) error {
	const batch = 20
	for ctx.Err() == nil {
		var ids []string
		err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
			ids = ids[:0]
			rows, err := s.query(ctx, tx, `SELECT id FROM media WHERE created_at < ? LIMIT `+strconv.Itoa(batch), cutoff.UnixMilli())
			if err != nil {
				return err
			}
			for rows.Next() {
				var id string
				if err := rows.Scan(&id); err != nil {
					rows.Close()
					return err
				}
				ids = append(ids, id)
			}
			if err := rows.Close(); err != nil {
				return err
			}
			for _, id := range ids {
				if s.postgres {
					if _, err := s.exec(ctx, tx, `DELETE FROM media_parts WHERE id = ?`, id); err != nil {
						return err
					}
				}
				if _, err := s.exec(ctx, tx, `DELETE FROM media WHERE id = ?`, id); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("prune media: %w", err)
		}
		for _, id := range ids { // the rows are gone: no one is served these files
			if !s.postgres {
				os.Remove(filepath.Join(s.mediaDir, id))
			}
		}
		if len(ids) < batch {
			break
		}
	}
	if !s.postgres {
		return s.cleanMediaDir(ctx)
	}
	return ctx.Err()
}

// mediaWriteTimeout is how long one answer of /media/ may take to send: a
// deadline of its own, far beyond the server's 10 s, for a 10 MB video to
// reach a phone on a slow network (ranges let it resume past that).
const mediaWriteTimeout = 10 * time.Minute

// servedAsItself reports whether media of type ct is served with its type:
// pictures, sounds and videos, but never SVG, a picture that runs script.
func servedAsItself(ct string) bool {
	kind, _, _ := strings.Cut(ct, "/")
	return (kind == "image" || kind == "audio" || kind == "video") && !strings.HasPrefix(ct, "image/svg")
}

// handleMedia serves GET /media/{id}: the media's bytes, and ranges of
// them, while its retention lasts; anything else is 404. A picture, sound or
// video is served with its type; anything else as a download, and nothing
// as a page: the browser is told not to guess the type, nor to run what it
// shows.
func (b *bridge) handleMedia() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Security-Policy", "sandbox")
		id := r.PathValue("id")
		if !mediaIDPattern.MatchString(id) {
			http.NotFound(w, r)
			return
		}
		f, err := b.store.OpenMedia(r.Context(), id)
		switch {
		case errors.Is(err, errNoMedia):
			http.NotFound(w, r)
			return
		case err != nil:
			b.log.Error("media not read", "err", err)
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		defer f.Close()
		if b.now().Sub(f.created) >= b.cfg.MediaRetention {
			http.NotFound(w, r)
			return
		}
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(mediaWriteTimeout))
		if servedAsItself(f.contentType) {
			w.Header().Set("Content-Type", f.contentType)
		} else {
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Disposition", "attachment")
		}
		w.Header().Set("Cache-Control", "private, max-age=86400")
		http.ServeContent(w, r, "", f.created, f)
	})
}
