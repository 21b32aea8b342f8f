package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestBatchTakesOnlyCustomersItHolds: a batch carries oB (known) and oX's
// second message. oX is new when the
// batch's customer read starts (it waits on oB's row), and another
// instance records oX's first message meanwhile; the conversation read,
// after, finds oX's open conversation. The batch leaves oX alone, as it
// does not hold oX's row: oX's unfollow, while the batch waits for a lane,
// does not wait for it, and oX's message does not join the conversation
// the unfollow closed.
func TestBatchTakesOnlyCustomersItHolds(t *testing.T) {
	st := openTestStore(t, "postgres")
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	if _, err := st.AcceptPush(ctx, message("first-oB", "oB", "hello"), now); err != nil {
		t.Fatal(err)
	}
	t0 := holdLock(t, st.db, `SELECT 1 FROM customers WHERE openid = 'oB' FOR UPDATE`)
	t2 := holdLock(t, st.db, `SELECT pg_advisory_xact_lock(hashtext('im:oB'))`) // sorts before im:oX
	ops := batchOps(now, message("kB2", "oB", "B again"), message("kX2", "oX", "X second"))
	taken := make(chan struct{})
	go func() { st.pushes.take(ops); close(taken) }()
	eventually(t, "a statement with "+"FROM customers WHERE openid = t.o FOR UPDATE"+" to wait", func() bool { return waitingOn(t, st.db, "%"+"FROM customers WHERE openid = t.o FOR UPDATE"+"%") })
	// Another instance takes oX's first message alone meanwhile.
	if acc, err := st.acceptAlone(ctx, message("kX1", "oX", "X first"), now); err != nil || acc.Reply != replyConnecting {
		t.Fatal(acc, err)
	}
	t0.Rollback()
	eventually(t, "a statement with "+"pg_advisory_xact_lock(h)"+" to wait", func() bool { return waitingOn(t, st.db, "%"+"pg_advisory_xact_lock(h)"+"%") })
	unf := message("kX-unfollow", "oX", "")
	unf.Action = actUnfollow
	done := make(chan error, 1)
	go func() { _, err := st.acceptAlone(ctx, unf, now.Add(time.Second)); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t2.Rollback()
		<-taken
		t.Fatal("the unfollow waited for the batch: oX's row is held")
	}
	t2.Rollback()
	<-taken
	for i := range ops {
		if r := <-ops[i].done; r.err != nil {
			t.Fatal(r.err)
		}
	}
	if err := st.settleCustomer(ctx, "oX"); err != nil { // the rows owed, history.go
		t.Fatal(err)
	}
	var conv int64
	var closedAt sql.NullInt64
	if err := st.db.QueryRow(`SELECT m.conversation, c.closed_at FROM messages m JOIN conversations c ON c.id = m.conversation
		WHERE m.openid = 'oX' AND m.text = 'X second'`).Scan(&conv, &closedAt); err != nil {
		t.Fatal(err)
	}
	var lane []string
	for _, raw := range columnOf(t, st.db, st, `SELECT delivery FROM outbox WHERE lane = ? ORDER BY id`, "im:oX") {
		i := strings.Index(raw, `"text":`)
		if i >= 0 {
			lane = append(lane, raw[i:min(len(raw), i+40)])
		}
	}
	if closedAt.Valid {
		t.Errorf("oX's second message was added to conversation %d, closed by the unfollow before it; oX's IM lane: %q", conv, lane)
	}
}

// TestReplayInALaterBatchWaits: the genuine push waits in its customer's
// chain (behind a menu click, the customer's row held elsewhere); a replay
// of its signed query comes in the next batch. The replay waits for the
// genuine push's answer, and is refused.
func TestReplayInALaterBatchWaits(t *testing.T) {
	st := openTestStore(t, "postgres")
	st.SetDesk(&Desk{Agents: []string{"a1"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	for _, o := range []string{"oX", "oY"} {
		if _, err := st.AcceptPush(ctx, message("first-"+o, o, "hello"), now); err != nil {
			t.Fatal(err)
		}
	}
	tx := holdLock(t, st.db, `SELECT 1 FROM customers WHERE openid = 'oX' FOR UPDATE`)
	ev := message("kX-ev", "oX", "")
	ev.Action = actEvent
	genuine := message("kX-msg", "oX", "genuine")
	genuine.SigKey = "sig:captured"
	ops1 := batchOps(now, ev, genuine) // arrives first: both to oX's chain
	st.pushes.take(ops1)
	replay := message("kY-replay", "oY", "replayed body")
	replay.SigKey = "sig:captured"
	ops2 := batchOps(now, replay) // arrives after the genuine push
	st.pushes.take(ops2)
	replayWaits(t, ops2[0]) // the genuine push waits for oX's row
	tx.Rollback()
	r := <-ops2[0].done
	<-ops1[0].done
	g := <-ops1[1].done
	if g.err != nil || !errors.Is(r.err, errReplay) {
		t.Errorf("genuine push (first) got err=%v, replay (later) got acc=%+v err=%v; want the genuine accepted and the replay refused", g.err, r.acc, r.err)
	}
}

// TestBatchLeavesMessagesInPartsAlone: a batch of new and known customers,
// one of whom sends a text split in parts. The batch takes the others'
// messages, each in one item owing its history row; the customer with the
// long text is taken alone, whose push writes that message's row, after
// the rows owed before it. Each history row names the first item of its
// message, in the order the customer wrote, and each lane has one head,
// its first pending item.
func TestBatchLeavesMessagesInPartsAlone(t *testing.T) {
	st := openTestStore(t, "postgres")
	st.SetDesk(&Desk{Agents: []string{"a1", "a2"}, UserPrefix: "wx_"})
	ctx, now := context.Background(), time.Now()
	if _, err := st.AcceptPush(ctx, message("first-oK", "oK", "hello"), now); err != nil {
		t.Fatal(err)
	}
	sent := map[string][]string{"oK": {"hello"}}
	var ins []Inbound
	for i, o := range []string{"oN1", "oK", "oN2", "oN1", "oK", "oN2"} {
		text := fmt.Sprintf("m%d-%s", i, o)
		if i == 4 {
			text = strings.Repeat("x", 30000) + text
		}
		sent[o] = append(sent[o], text)
		ins = append(ins, message(fmt.Sprintf("k%d", i), o, text))
	}
	ops := batchOps(now, ins...)
	st.pushes.take(ops)
	for i := range ops {
		if r := <-ops[i].done; r.err != nil {
			t.Fatal(r.err)
		}
	}
	if st.pushes.batched.Load() == 0 {
		t.Fatal("nothing batched")
	}
	for _, o := range []string{"oN1", "oK", "oN2"} {
		if err := st.settleCustomer(ctx, o); err != nil { // the rows owed, history.go
			t.Fatal(err)
		}
		rows, err := st.db.Query(`SELECT m.text, o.delivery FROM messages m JOIN outbox o ON o.id = m.outbox_id
			WHERE m.openid = $1 AND m.direction = 'in' ORDER BY m.id`, o)
		if err != nil {
			t.Fatal(err)
		}
		var texts []string
		for rows.Next() {
			var text, raw string
			var d Delivery
			if err := rows.Scan(&text, &raw); err != nil || json.Unmarshal([]byte(raw), &d) != nil {
				t.Fatal(err)
			}
			if d.Kind != deliverIMSend || d.Part != 0 || !strings.HasPrefix(text, d.Text) {
				t.Errorf("%s's history %.12q… names an item of kind %s, part %d, text %.12q…", o, text, d.Kind, d.Part, d.Text)
			}
			texts = append(texts, text)
		}
		rows.Close()
		if !slices.Equal(texts, sent[o]) {
			t.Errorf("%s's history reads %.20q, want %.20q", o, texts, sent[o])
		}
	}
	for _, o := range []string{"oN1", "oN2"} { // new: the import first
		var d Delivery
		if err := json.Unmarshal([]byte(columnOf(t, st.db, st, `SELECT delivery FROM outbox WHERE lane = ? ORDER BY id`, "im:"+o)[0]), &d); err != nil || d.Kind != deliverIMImport {
			t.Errorf("%s's IM lane begins with %s (%v), want the import", o, d.Kind, err)
		}
	}
	checkHeads(t, st.db)
}
