-- The bridge's state on SQLite, one instance. sqlite3 runs this file as it
-- is; the bridge applies it at every open, so each statement is idempotent.
-- How a change reaches a database made before it: docs/SCHEMA.md.
-- Ids are SQLite's rowid: one more than the largest in the table.
-- Times are Unix milliseconds.

-- A customer is a WeChat user (openid) who has followed or written to the
-- Official Account. agent is no longer written (conversations holds each
-- conversation's agent) and stays for databases made before. event_at is
-- when they last followed, clicked a menu or scanned a QR code (three
-- replies within a minute, quota.go); held how many replies wait for their
-- next message (the quota spent); rating_conv the conversation an agent
-- ended whose rating their next message may be.
CREATE TABLE IF NOT EXISTS customers (
    openid      TEXT PRIMARY KEY,
    agent       TEXT NOT NULL DEFAULT '',
    followed    INTEGER NOT NULL DEFAULT 1,
    created_at  BIGINT NOT NULL,
    event_at    BIGINT NOT NULL DEFAULT 0,
    held        INTEGER NOT NULL DEFAULT 0,
    rating_conv BIGINT NOT NULL DEFAULT 0
);

-- A conversation runs from a customer's first message until an agent
-- ends it, it stays idle, or the customer unfollows (closed_by: agent,
-- idle, unfollow). A customer has at most one open conversation (closed_at
-- IS NULL); while it waits for an agent its agent is '' (queue.go), and
-- requeued_from the agent who left it, if one did. rating is the
-- customer's, 1 to 5, 0 for none.
CREATE TABLE IF NOT EXISTS conversations (
    id             INTEGER PRIMARY KEY,
    openid         TEXT NOT NULL,
    agent          TEXT NOT NULL,
    opened_at      BIGINT NOT NULL,
    closed_at      BIGINT,
    queued_at      BIGINT NOT NULL DEFAULT 0,
    assigned_at    BIGINT NOT NULL DEFAULT 0,
    first_reply_at BIGINT NOT NULL DEFAULT 0,
    closed_by      TEXT NOT NULL DEFAULT '',
    rating         INTEGER NOT NULL DEFAULT 0,
    requeued_from  TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS conversations_open ON conversations (openid) WHERE closed_at IS NULL;
-- conversations_queued is the queue, longest-waiting first (ids increase);
-- conversations_customer finds a customer's last conversation and history.
CREATE INDEX IF NOT EXISTS conversations_queued ON conversations (id) WHERE closed_at IS NULL AND agent = '';
CREATE INDEX IF NOT EXISTS conversations_customer ON conversations (openid, id);

-- agent_load counts each agent's open conversations, kept with them, so a
-- new customer's assignment reads one small row an agent; online is IM's
-- last word on the agent (1 until IM says otherwise), presence_at that
-- word's EventTime, assigned_at when the agent was last given a
-- conversation (the one idle longest wins a tie); events counts IM's words
-- (a reading asked before one is not taken), gone_at is when the agent's
-- conversations are left without them if they are still away (0 while they
-- are here: presence.go).
CREATE TABLE IF NOT EXISTS agent_load (
    agent       TEXT PRIMARY KEY,
    open        INTEGER NOT NULL DEFAULT 0,
    online      INTEGER NOT NULL DEFAULT 1,
    presence_at BIGINT NOT NULL DEFAULT 0,
    assigned_at BIGINT NOT NULL DEFAULT 0,
    events      BIGINT NOT NULL DEFAULT 0,
    gone_at     BIGINT NOT NULL DEFAULT 0,
    logged_out  INTEGER NOT NULL DEFAULT 0
);

-- messages keeps every message of every conversation, both ways (history.go):
-- direction in (the customer's) or out (an agent's, or the bridge's when
-- agent is ''), its text, the WeChat messages it takes (parts), and state:
-- queued (its delivery is outbox item outbox_id), waiting (for an agent),
-- held (for the customer's next message: the quota is spent), or not_sent
-- (past the 48-hour window). A waiting or held message keeps its delivery.
-- grant_of names the allowance an outgoing message was sent under (quota.go):
-- the id of the customer's message, or minus the time of their event.
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY,
    conversation BIGINT NOT NULL,
    openid       TEXT NOT NULL,
    direction    TEXT NOT NULL,
    agent        TEXT NOT NULL DEFAULT '',
    text         TEXT NOT NULL,
    parts        INTEGER NOT NULL DEFAULT 1,
    state        TEXT NOT NULL,
    outbox_id    BIGINT NOT NULL DEFAULT 0,
    delivery     TEXT NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    grant_of     BIGINT NOT NULL DEFAULT 0
);
-- messages_customer reads a customer's messages: the history, the quota's
-- count, the last message of a conversation that may be idle. It costs the
-- most of a push's writes on SQLite (docs/SPEED.md).
CREATE INDEX IF NOT EXISTS messages_customer ON messages (openid, id);

-- seen_keys holds the key of every callback accepted, so that IM's repeated
-- callback commits nothing new, and of the pushes the writer's memory of the
-- recent pushes could not hold: a push is recorded in the outbox row it
-- adds (push_key, push_sig, push_reply; recent.go). For a push, value is the
-- passive reply it was given and sig its signed query: a signed query serves
-- one push only.
CREATE TABLE IF NOT EXISTS seen_keys (
    key         TEXT PRIMARY KEY,
    sig         TEXT UNIQUE,
    value       TEXT NOT NULL DEFAULT '',
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_keys_received ON seen_keys (received_at);

-- The outbox holds every call to a vendor that the bridge owes. A lane is
-- delivered strictly in id order; state is pending, done or failed (a dead
-- letter, with its reason in last_error). Only a lane's first pending item,
-- its head, may be taken. The writer keeps each lane's pending items, its
-- head and the claim that holds it in memory (lanes.go, heads.go): head,
-- claimed_by and claimed_until are PostgreSQL's, and no index by lane or by
-- head is kept. tried_at is when an attempt whose outcome is not known (no
-- answer, or the bridge stopped before recording it) was first made, 0 if
-- none: a later attempt may find the vendor acted on it (worker.go).
-- history_owed is 1 on a customer's message whose history row is not
-- written yet (history.go).
CREATE TABLE IF NOT EXISTS outbox (
    id            INTEGER PRIMARY KEY,
    lane          TEXT NOT NULL,
    delivery      TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending',
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       BIGINT NOT NULL,
    claimed_by    TEXT NOT NULL DEFAULT '',
    head          INTEGER NOT NULL DEFAULT 0,
    claimed_until BIGINT NOT NULL DEFAULT 0,
    last_error    TEXT NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    push_key      TEXT NOT NULL DEFAULT '',
    push_sig      TEXT NOT NULL DEFAULT '',
    push_reply    TEXT NOT NULL DEFAULT '',
    tried_at      BIGINT NOT NULL DEFAULT 0,
    history_owed  INTEGER NOT NULL DEFAULT 0
);
-- outbox_failed lists the dead letters, which are few, so /metrics counts
-- them without reading the day's delivered items.
CREATE INDEX IF NOT EXISTS outbox_failed ON outbox (id) WHERE state = 'failed';

-- Credentials the instances share: the WeChat access_token and the IM
-- admin's UserSig, so one instance refreshes them for all.
CREATE TABLE IF NOT EXISTS credentials (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL DEFAULT '',
    refresh_at BIGINT NOT NULL DEFAULT 0
);
-- settings: name app holds the app the database serves (WeChat's AppID
-- and IM's SDKAppID): a bridge of another app does not start on it.
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- heartbeats: name im_callbacks holds when a bridge was last known to take
-- IM's callbacks, every gap before that having been recovered. IM makes a
-- callback once: the replies agents sent while no bridge answered are read
-- back from IM's message history at the next start (recover.go).
CREATE TABLE IF NOT EXISTS heartbeats (
    name TEXT PRIMARY KEY,
    at   BIGINT NOT NULL
);
-- deferred_replies keeps, committed, a reply that came by callback while
-- its conversation's history was still to be read back; it goes to the
-- outbox in its place among the replies of the gap, or after them
-- (recover.go). (It was held_replies: "held" is the quota's word.)
CREATE TABLE IF NOT EXISTS deferred_replies (
    id         INTEGER PRIMARY KEY,
    openid     TEXT NOT NULL,
    key        TEXT NOT NULL,
    delivery   TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- media keeps what customers send (and an agent's sound or video sent as a
-- link), for IM clients to download at GET /media/{id} until
-- MEDIA_RETENTION ends; the bytes are files named by id in MEDIA_DIR,
-- beside the database.
CREATE TABLE IF NOT EXISTS media (
    id           TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    size         BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);

-- Changes to databases made before this file (docs/SCHEMA.md): the writer's
-- memory replaced the indexes by lane and by head; the outbox's push columns
-- are added by schema.go when missing.
DROP INDEX IF EXISTS outbox_heads;
DROP INDEX IF EXISTS outbox_pending;
DROP INDEX IF EXISTS outbox_due;
