-- The bridge's state. Applied at every open; each statement is idempotent.
-- Times are Unix milliseconds.

-- A customer is a WeChat user (openid) who has followed or written to the
-- Official Account. agent is the IM agent the customer keeps.
CREATE TABLE IF NOT EXISTS customers (
    openid     TEXT PRIMARY KEY,
    agent      TEXT NOT NULL DEFAULT '',
    followed   INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL
);

-- A conversation runs from a customer's first message until they unfollow.
-- A customer has at most one open conversation (closed_at IS NULL).
CREATE TABLE IF NOT EXISTS conversations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    openid    TEXT NOT NULL,
    agent     TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    closed_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS conversations_open ON conversations (openid) WHERE closed_at IS NULL;

-- seen_keys holds the key of every push and callback accepted, so that a
-- vendor's retry commits nothing new. For a push key (wx:…), value is the
-- passive reply it was given; for a signature key (sig:…), the push key the
-- signed URL carried, so a signed URL serves one push only.
CREATE TABLE IF NOT EXISTS seen_keys (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL DEFAULT '',
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_keys_received ON seen_keys (received_at);

-- The outbox holds every call to a vendor that the bridge owes. A lane is
-- delivered strictly in id order; state is pending, done or failed.
CREATE TABLE IF NOT EXISTS outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    lane       TEXT NOT NULL,
    delivery   TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'pending',
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (lane, id) WHERE state = 'pending';
