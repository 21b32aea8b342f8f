-- The bridge's state, for SQLite and PostgreSQL alike. Applied at every open
-- (on PostgreSQL under an advisory lock, so instances may start together,
-- and only if it changed since it was last applied: store.go keeps its
-- digest in schema_applied); each statement is idempotent. ID_PRIMARY_KEY stands for the dialect's
-- auto-assigned key. On SQLite it is the rowid, one more than the largest
-- id in the table: an id comes again only once the newest rows are pruned
-- (delivered a day before), and what looks a row up by id then finds it
-- gone or checks what it reads (recent.go). Times are Unix milliseconds.

-- A customer is a WeChat user (openid) who has followed or written to the
-- Official Account. agent is the IM agent the customer keeps.
CREATE TABLE IF NOT EXISTS customers (
    openid     TEXT PRIMARY KEY,
    agent      TEXT NOT NULL DEFAULT '',
    followed   INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

-- A conversation runs from a customer's first message until they unfollow.
-- A customer has at most one open conversation (closed_at IS NULL).
CREATE TABLE IF NOT EXISTS conversations (
    id        ID_PRIMARY_KEY,
    openid    TEXT NOT NULL,
    agent     TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    closed_at BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS conversations_open ON conversations (openid) WHERE closed_at IS NULL;

-- agent_load counts each agent's open conversations, kept with them, so a
-- new customer's assignment reads one small row an agent.
CREATE TABLE IF NOT EXISTS agent_load (
    agent TEXT PRIMARY KEY,
    open  INTEGER NOT NULL DEFAULT 0
);

-- seen_keys holds the key of every push and callback accepted, so that a
-- vendor's retry commits nothing new. For a push, value is the passive reply
-- it was given and sig its signed query: a signed query serves one push only.
-- On SQLite a push is recorded instead in the outbox row it adds, in the
-- columns push_key, push_sig and push_reply, which the store adds to the
-- outbox at open (recent.go); only what does not fit in the writer's memory
-- comes here.
CREATE TABLE IF NOT EXISTS seen_keys (
    key         TEXT PRIMARY KEY,
    sig         TEXT UNIQUE,
    value       TEXT NOT NULL DEFAULT '',
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_keys_received ON seen_keys (received_at);

-- The outbox holds every call to a vendor that the bridge owes. A lane is
-- delivered strictly in id order; state is pending, done or failed (a dead
-- letter, with its reason in last_error). head marks the first pending item
-- of its lane, the only one that may be taken, so finding work reads the
-- heads alone however long the queues. An instance delivering an item holds
-- it until claimed_until; an instance that dies lets it go then. (On
-- SQLite the writer keeps heads and claims in memory: see DUE_HEADS.)
CREATE TABLE IF NOT EXISTS outbox (
    id            ID_PRIMARY_KEY,
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
    updated_at    BIGINT NOT NULL
);
-- PENDING_BY_LANE stands for the index of each lane's pending items on
-- PostgreSQL. On SQLite, which one instance owns, the writer keeps them in
-- memory (lanes.go) and the index, which each insert changed at a random
-- place, is dropped.
PENDING_BY_LANE;
-- DUE_HEADS stands, on PostgreSQL, for outbox_due, which lists the heads
-- in the order they are claimed. It keeps claimed_until too, so a claim
-- passes over the heads that deliveries in flight hold without reading
-- their rows. (It replaces outbox_heads, which did not.) On SQLite the
-- writer keeps the heads and their claims in memory (heads.go): there
-- head, claimed_by and claimed_until are not used, and the index is
-- dropped.
DROP INDEX IF EXISTS outbox_heads;
DUE_HEADS;
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
-- heartbeats: name im_callbacks holds when a bridge was last known to take
-- IM's callbacks, every gap before that having been recovered. IM makes a
-- callback once: the replies agents sent while no bridge answered are read
-- back from IM's message history at the next start (recover.go).
CREATE TABLE IF NOT EXISTS heartbeats (
    name TEXT PRIMARY KEY,
    at   BIGINT NOT NULL
);
-- held_replies keeps, committed, a reply that came by callback while its
-- conversation's history was still to be read back; it goes to the outbox
-- in its place among the replies of the gap, or after them (recover.go).
CREATE TABLE IF NOT EXISTS held_replies (
    id         ID_PRIMARY_KEY,
    openid     TEXT NOT NULL,
    key        TEXT NOT NULL,
    delivery   TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
