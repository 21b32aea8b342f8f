package main

// The outbox: the calls the bridge owes the vendors, one lane per customer
// and direction, added in the transaction that commits what asks for them.
// The worker takes them and records their outcomes through claim.go.
// SQLite and PostgreSQL run the same statements but where SQLite's writer
// keeps what PostgreSQL reads through its indexes: each lane's pending items
// (lanes.go), each lane's head and the claim that holds it (heads.go).

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"time"
)

// Delivery kinds: what an outbox item asks a vendor to do.
const (
	deliverIMImport = "im_import" // account_import of a customer's IM account
	deliverIMDelete = "im_delete" // account_delete of a customer's IM account
	deliverIMSend   = "im_send"   // openim/sendmsg from a customer to their agent
	deliverWeChat   = "wx_send"   // custom/send of an agent's reply to a customer
	deliverNotice   = "im_notice" // openim/sendmsg to an agent: the bridge's word, in the customer's conversation or from the admin
)

// Delivery is one call the bridge owes a vendor, as kept in the outbox.
// MsgRandom is chosen once, and MsgSeq is the item's id (set when it is
// claimed), so every retry of a sendmsg is the same message to IM, which
// drops a repeat of (sender, MsgSeq, MsgRandom, content) within 120 s; and
// since a lane leaves in id order, MsgSeq increases within a conversation,
// which is how IM orders the messages of one second. Items queued with a
// MsgSeq of their own keep it.
type Delivery struct {
	Kind      string `json:"kind"`
	OpenID    string `json:"openid"`
	IMUser    string `json:"im_user"`
	Agent     string `json:"agent,omitempty"`
	Text      string `json:"text,omitempty"`
	MsgSeq    uint32 `json:"msg_seq,omitempty"`
	MsgRandom uint32 `json:"msg_random,omitempty"`
	// Elems, if set, are the IM elements sent in Text's place, which stays
	// the message's readable form (for notices and logs).
	Elems []MsgElem `json:"elems,omitempty"`
	// Media, if set, is what the worker fetches from WeChat and sends as
	// an image, a sound or a video (media.go).
	Media *PushMedia `json:"media,omitempty"`
	// Conv is a customer's message's conversation: it goes to whoever
	// has the conversation when it is delivered (Store.Recipient).
	Conv int64 `json:"conv,omitempty"`
	// Part is which part of a long message this is, from 0 (split.go).
	Part int `json:"part,omitempty"`
	// RatingConv, on the question that ends a conversation, is that
	// conversation: once the question reaches the customer, their next
	// message may rate it (Store.ArmRating).
	RatingConv int64 `json:"rating_conv,omitempty"`
}

// PushMedia is where media is kept: for a customer's image, voice message
// or video, its media_id at WeChat (/cgi-bin/media/get, for three days), an
// image's PicUrl, a voice message's speech recognition, a video's
// thumbnail; for an agent's, its URLs in IM (PicURL, ThumbURL).
type PushMedia struct {
	Type         string `json:"type,omitempty"`      // image, voice, video or shortvideo
	ThumbURL     string `json:"thumb_url,omitempty"` // an agent's video: its thumbnail in IM
	Seconds      int    `json:"seconds,omitempty"`   // an agent's sound or video: its duration
	Name         string `json:"name,omitempty"`      // what the customer reads of it when it goes as a link
	ThumbMediaID string `json:"thumb_media_id,omitempty"`
	MediaID      string `json:"media_id,omitempty"`
	PicURL       string `json:"pic_url,omitempty"`
	Recognition  string `json:"recognition,omitempty"`
	// Keep and KeepThumb are the ids a customer's media and its thumbnail
	// are kept under (media.go), chosen when the push is accepted, so that
	// every attempt gives IM the same message, which IM drops if repeated.
	Keep      string `json:"keep,omitempty"`
	KeepThumb string `json:"keep_thumb,omitempty"`
	// Tries counts the attempts whose fetch or upload failed for a passing
	// reason (mediaTrouble, mediacross.go).
	Tries int `json:"tries,omitempty"`
}

// lane is the outbox lane of d: one per customer and direction, so that a
// customer's messages and an agent's replies each keep their order, and a
// slow vendor on one side never holds up the other.
func (d Delivery) lane() string {
	switch d.Kind {
	case deliverWeChat:
		return "wx:" + d.OpenID
	case deliverNotice:
		if d.IMUser == "" { // from the admin
			return "notice:" + d.Agent
		}
	}
	return "im:" + d.OpenID
}

// markHeads marks each lane's first pending item its head, where it is not.
const markHeads = `UPDATE outbox SET head = 1 WHERE state = ` + sqlPending + ` AND head = 0 AND NOT EXISTS
	(SELECT 1 FROM outbox p WHERE p.lane = outbox.lane AND p.state = ` + sqlPending + ` AND p.id < outbox.id)`

// tellAgent queues a notice to agent inside the customer's conversation,
// marked as the bridge's.
func (s *Store) tellAgent(ctx context.Context, tx *sql.Tx, openid, agent, text string, now time.Time) error {
	return s.enqueue(ctx, tx, conversationNotice(s.desk.imUser(openid), openid, agent, text), now)
}

// noticeMark begins every notice the bridge writes into a conversation, so
// that the agent tells it from the customer's words.
const noticeMark = "[bridge] "

// conversationNotice is a notice to agent inside the conversation with the
// customer whose IM account is imUser: sent as that account, marked.
func conversationNotice(imUser, openid, agent, text string) Delivery {
	return Delivery{Kind: deliverNotice, OpenID: openid, IMUser: imUser, Agent: agent, Text: noticeMark + text,
		MsgRandom: mrand.Uint32()}
}

// Notice queues d, a notice to an agent, in a transaction of its own.
func (s *Store) Notice(ctx context.Context, d Delivery, now time.Time) error {
	return s.writeTx(ctx, func(ctx context.Context, tx *sql.Tx) error { return s.enqueue(ctx, tx, d, now) })
}

// enqueue adds d to the outbox, due now.
func (s *Store) enqueue(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time) error {
	_, err := s.enqueueFor(ctx, tx, d, now, nil)
	return err
}

// carry queues d as the push's outbox row, which carries rec (if not nil)
// with reply, and returns the row's id. If owed, d is a customer's message
// in one item, which owes its history row (history.go).
func (s *Store) carry(ctx context.Context, tx *sql.Tx, d Delivery, rec *pushRecord, reply string, owed bool, now time.Time) (int64, error) {
	if rec != nil {
		rec.reply = reply
	}
	var id int64
	var err error
	if owed {
		id, err = s.insertItem(ctx, tx, d, now, rec, true)
	} else {
		id, err = s.enqueueFor(ctx, tx, d, now, rec)
	}
	if err == nil && rec != nil {
		s.remember(rec, id) // recent.go
	}
	return id, err
}

// pushRecord is a push's record, carried by its outbox row on SQLite, and
// the digests of its key and signed query by which the writer finds it.
type pushRecord struct {
	key, sig, reply string
	digests         [2]uint64
	ndigests        int // 1 for a push without a signed query (in tests)
}

// enqueueFor adds d to the outbox, due now: as several items in a row if
// its text is longer than its vendor takes in one message (split.go). On
// SQLite the first row carries rec, the push that added it, if rec is not
// nil (recent.go). It returns that row's id. A customer's message queued so
// owes no history row; the caller holds the customer's row.
func (s *Store) enqueueFor(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time, rec *pushRecord) (int64, error) {
	if d.Kind == deliverIMSend {
		// A customer's message that owes nothing joins their lane after
		// the rows owed before it (history.go).
		if err := s.settleHistory(ctx, tx, d.OpenID, 0); err != nil {
			return 0, err
		}
	}
	parts := d.parts()
	if parts == nil {
		return s.insertItem(ctx, tx, d, now, rec, false)
	}
	first, err := s.insertItem(ctx, tx, parts[0], now, rec, false)
	for _, p := range parts[1:] {
		if err == nil {
			_, err = s.insertItem(ctx, tx, p, now, nil, false)
		}
	}
	return first, err
}

// insertItem adds d to the outbox, due now, as the head of its lane if the
// lane has no pending item, owing the history row of the customer's
// message it carries if owed (history.go). On SQLite the row carries rec if
// it is not nil, and the lane is known in memory (lanes.go).
func (s *Store) insertItem(ctx context.Context, tx *sql.Tx, d Delivery, now time.Time, rec *pushRecord, owed bool) (int64, error) {
	b, err := json.Marshal(d)
	if err != nil {
		return 0, err
	}
	ms := now.UnixMilli()
	lane := d.lane()
	if s.postgres {
		if err := s.lockLane(ctx, tx, lane); err != nil {
			return 0, err
		}
		var id int64
		err = s.queryRow(ctx, tx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at, history_owed, head)
			VALUES (?, ?, ?, ?, ?, ?, CASE WHEN (`+lanePending("?")+`) IS NULL THEN 1 ELSE 0 END)
			RETURNING id`, lane, string(b), ms, ms, ms, boolInt(owed), lane).Scan(&id)
		return id, err
	}
	var carried pushRecord
	if rec != nil {
		carried = *rec
	}
	res, err := s.exec(ctx, tx, `INSERT INTO outbox (lane, delivery, next_at, created_at, updated_at, push_key, push_sig, push_reply, history_owed)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`, lane, string(b), ms, ms, ms, carried.key, carried.sig, carried.reply, boolInt(owed))
	if err != nil {
		return 0, err
	}
	id, err := res.LastInsertId()
	if err != nil {
		return 0, err
	}
	if _, busy := s.laneItem(lane, 0); !busy {
		s.setHead(id, headState{at: ms}) // heads.go
	}
	s.laneAdd(lane, id)
	return id, nil
}

// lanePending is a query for 1 if the lane the expression lane names has a
// pending item, NULL if not. A scalar subquery, not EXISTS: PostgreSQL may
// turn an EXISTS into a hash of every pending item's lane, built at each
// statement, which a plan made while the outbox was small keeps choosing
// as it grows.
func lanePending(lane string) string {
	return `SELECT 1 FROM outbox p WHERE p.lane = ` + lane + ` AND p.state = ` + sqlPending + ` LIMIT 1`
}

// lockLane serializes, on PostgreSQL, the transactions that change which
// item heads a lane (adding to it, finishing its head), until the
// transaction ends. SQLite's transactions are serial already.
func (s *Store) lockLane(ctx context.Context, tx *sql.Tx, lane string) error {
	if !s.postgres {
		return nil
	}
	if openid, ok := strings.CutPrefix(lane, "wx:"); ok {
		// The customer's IM lane first, always (the lock order, db.go):
		// a transaction may go on to queue a notice there.
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext($1))`, "im:"+openid); err != nil {
			return err
		}
	}
	_, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext($1))`, lane)
	return err
}

// OutboxStats are the outbox's figures for /metrics.
type OutboxStats struct {
	Pending     int
	Failed      int
	OldestSince time.Time // when the oldest pending item was accepted; zero if none
}

// Stats returns the outbox's figures without reading the day's delivered
// items: the dead letters through their index; the pending items through
// theirs on PostgreSQL, from the writer's lanes on SQLite.
func (s *Store) Stats(ctx context.Context) (OutboxStats, error) {
	var st OutboxStats
	var oldest sql.NullInt64
	var err error
	if s.postgres {
		err = s.rdb.QueryRowContext(ctx, `SELECT
			(SELECT COUNT(*) FROM outbox WHERE state = `+sqlPending+`),
			(SELECT COUNT(*) FROM outbox WHERE state = `+sqlFailed+`),
			(SELECT MIN(created_at) FROM outbox WHERE state = `+sqlPending+`)`).Scan(&st.Pending, &st.Failed, &oldest)
	} else {
		var id int64
		st.Pending, id = s.pendingSnapshot()
		err = s.rdb.QueryRowContext(ctx, `SELECT (SELECT COUNT(*) FROM outbox WHERE state = `+sqlFailed+`),
			(SELECT created_at FROM outbox WHERE id = ?)`, id).Scan(&st.Failed, &oldest)
	}
	if err != nil {
		return OutboxStats{}, fmt.Errorf("outbox stats: %w", err)
	}
	if oldest.Valid && st.Pending > 0 {
		st.OldestSince = time.UnixMilli(oldest.Int64)
	}
	return st, nil
}

// permanentError marks an error a retry cannot fix.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }
