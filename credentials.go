package main

// The app a database serves, and the credentials the instances share on
// PostgreSQL: WeChat's access_token and IM's UserSig, refreshed by one
// instance at a time.

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"fmt"
	"time"
)

// BindApp records, the first time, that the database serves app (its
// Official Account's AppID and its IM app's SDKAppID), and refuses any
// other: two apps' customers, conversations and outbox would mix in one
// database, and one app's bridge would deliver the other's messages with
// its own credentials.
func (s *Store) BindApp(ctx context.Context, app string) error {
	var bound string
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `INSERT INTO settings (name, value) VALUES ('app', ?) ON CONFLICT (name) DO NOTHING`, app); err != nil {
			return err
		}
		return s.queryRow(ctx, tx, `SELECT value FROM settings WHERE name = 'app'`).Scan(&bound)
	})
	if err != nil {
		return fmt.Errorf("the database's app: %w", err)
	}
	if bound != app {
		return fmt.Errorf("the database serves %s, and this bridge %s: give each app a database of its own "+
			"(on PostgreSQL a schema of its own will do: search_path in DATABASE_URL), or their customers and messages would mix", bound, app)
	}
	return nil
}

// credentialName is the name a credential is shared under: what it is, the
// app it belongs to, and a digest of the secret it is made with, so that a
// rotated secret never takes the old one's. The digest does not give the
// secret back.
func credentialName(what, app, secret string) string {
	sum := sha256.Sum256([]byte("wechat-im-bridge credential\x00" + secret))
	return what + ":" + app + ":" + hex.EncodeToString(sum[:8])
}

// SharedCredential returns the credential name as the instances share it on
// PostgreSQL: the stored value while it is not due for refresh and is not
// stale (a value the vendor refused), else a new one from fetch, stored for
// the others. The row is locked while fetch runs, so one instance refreshes
// at a time and the others take its result. On SQLite, with one instance,
// it calls fetch.
func (s *Store) SharedCredential(ctx context.Context, name, stale string, now time.Time,
	fetch func() (string, time.Time, error)) (value string, refreshAt time.Time, err error) {
	if !s.postgres {
		return fetch()
	}
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `INSERT INTO credentials (name) VALUES (?) ON CONFLICT (name) DO NOTHING`, name); err != nil {
			return err
		}
		var at int64
		if err := s.queryRow(ctx, tx, `SELECT value, refresh_at FROM credentials WHERE name = ?`+s.lockRow(), name).Scan(&value, &at); err != nil {
			return err
		}
		refreshAt = time.UnixMilli(at)
		if value != "" && value != stale && now.Before(refreshAt) {
			return nil
		}
		if value, refreshAt, err = fetch(); err != nil {
			return err
		}
		_, err := s.exec(ctx, tx, `UPDATE credentials SET value = ?, refresh_at = ? WHERE name = ?`, value, refreshAt.UnixMilli(), name)
		return err
	})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("shared credential %s: %w", name, err)
	}
	return value, refreshAt, nil
}
