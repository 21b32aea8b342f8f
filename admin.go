package main

// The operator's endpoints: the dead letters, a retry of one, and a
// customer's history (history.go). They need
// Authorization: Bearer ADMIN_TOKEN; with ADMIN_TOKEN unset they answer 404,
// as if they were not there.

import (
	"context"
	"crypto/subtle"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// DeadLetter is a delivery given up, as /admin/deadletters lists it.
type DeadLetter struct {
	ID        int64    `json:"id"`
	Lane      string   `json:"lane"`
	Delivery  Delivery `json:"delivery"`
	Reason    string   `json:"reason"`
	Attempts  int      `json:"attempts"`
	CreatedAt int64    `json:"created_at"` // Unix ms
	FailedAt  int64    `json:"failed_at"`
}

// maxDeadLetters bounds what one listing returns: the newest.
const maxDeadLetters = 500

// DeadLetters returns the newest dead letters, newest first.
func (s *Store) DeadLetters(ctx context.Context) ([]DeadLetter, error) {
	rows, err := s.rdb.QueryContext(ctx, s.q(`SELECT id, lane, delivery, last_error, attempts, created_at, updated_at
		FROM outbox WHERE state = `+sqlFailed+` ORDER BY id DESC LIMIT `+strconv.Itoa(maxDeadLetters)))
	if err != nil {
		return nil, fmt.Errorf("dead letters: %w", err)
	}
	defer rows.Close()
	out := []DeadLetter{}
	for rows.Next() {
		var d DeadLetter
		var raw string
		if err := rows.Scan(&d.ID, &d.Lane, &raw, &d.Reason, &d.Attempts, &d.CreatedAt, &d.FailedAt); err != nil {
			return nil, fmt.Errorf("dead letters: %w", err)
		}
		json.Unmarshal([]byte(raw), &d.Delivery) // an unreadable one is listed with its reason
		out = append(out, d)
	}
	return out, rows.Err()
}

// errNoDeadLetter is returned for an id that names no dead letter.
var errNoDeadLetter = errors.New("no such dead letter")

// RetryDeadLetter queues dead letter id's delivery again, as a new item at
// the end of its lane, and marks the dead letter retried, in one
// transaction: it is retried once.
func (s *Store) RetryDeadLetter(ctx context.Context, id int64, now time.Time) error {
	err := s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error {
		var raw string
		err := s.queryRow(ctx, tx, `SELECT delivery FROM outbox WHERE id = ? AND state = `+sqlFailed+``+s.lockRow(), id).Scan(&raw)
		if errors.Is(err, sql.ErrNoRows) {
			return errNoDeadLetter
		} else if err != nil {
			return err
		}
		var d Delivery
		if err := json.Unmarshal([]byte(raw), &d); err != nil {
			return fmt.Errorf("dead letter %d cannot be read: %w", id, err)
		}
		d.MsgSeq = 0 // the new item's id
		if d.Kind == deliverIMSend {
			// A customer's message joins their lane after the rows owed
			// before it, written under the customer's row (history.go).
			// No other transaction waits for a dead letter.
			if err := s.lockCustomer(ctx, tx, d.OpenID); err != nil {
				return err
			}
		}
		if _, err := s.exec(ctx, tx, `UPDATE outbox SET state = `+sqlRetried+`, updated_at = ? WHERE id = ?`, now.UnixMilli(), id); err != nil {
			return err
		}
		next, err := s.enqueueFor(ctx, tx, d, now, nil)
		if err != nil {
			return err
		}
		// The history follows the message to its new item: the newest row
		// to name the old one, as SQLite gives a pruned item's id to a new one.
		_, err = s.exec(ctx, tx, `UPDATE messages SET outbox_id = ? WHERE id = (SELECT MAX(id) FROM messages WHERE openid = ? AND outbox_id = ?)`,
			next, d.OpenID, id)
		return err
	})
	if err != nil && !errors.Is(err, errNoDeadLetter) {
		return fmt.Errorf("retry dead letter: %w", err)
	}
	return err
}

// admin wraps an operator's endpoint: 404 without ADMIN_TOKEN, 401 without
// the right bearer token, compared in constant time.
func (b *bridge) admin(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b.cfg.AdminToken == "" {
			http.NotFound(w, r)
			return
		}
		got, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if subtle.ConstantTimeCompare([]byte(got), []byte(b.cfg.AdminToken)) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		h(w, r)
	})
}

// handleDeadLetters serves GET /admin/deadletters.
func (b *bridge) handleDeadLetters(w http.ResponseWriter, r *http.Request) {
	list, err := b.store.DeadLetters(r.Context())
	if err != nil {
		b.log.Error("dead letters not read", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(list)
}

// handleRetryDeadLetter serves POST /admin/deadletters/{id}/retry.
func (b *bridge) handleRetryDeadLetter(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err == nil {
		err = b.store.RetryDeadLetter(r.Context(), id, b.now())
	}
	switch {
	case errors.Is(err, errNoDeadLetter) || errors.Is(err, strconv.ErrSyntax) || errors.Is(err, strconv.ErrRange):
		http.Error(w, "no such dead letter", http.StatusNotFound)
	case err != nil:
		b.log.Error("dead letter not retried", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
	default:
		b.log.Info("dead letter retried", "id", id)
		b.worker.Notify()
		w.WriteHeader(http.StatusAccepted)
	}
}

// handleCustomerMessages serves GET /admin/customers/{openid}/messages.
func (b *bridge) handleCustomerMessages(w http.ResponseWriter, r *http.Request) {
	openid := r.PathValue("openid")
	convs, err := b.store.CustomerHistory(r.Context(), openid)
	if err != nil {
		b.log.Error("history not read", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	if len(convs) == 0 {
		http.Error(w, "no conversations with this customer", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(struct {
		OpenID        string                `json:"openid"`
		Conversations []HistoryConversation `json:"conversations"`
	}{openid, convs})
}
