CREATE TABLE IF NOT EXISTS racefree_idempotency (
    key         TEXT    PRIMARY KEY NOT NULL,
    fingerprint TEXT    NOT NULL,
    outcome     TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS racefree_idempotency_expires_at ON racefree_idempotency (expires_at);
CREATE TABLE IF NOT EXISTS racefree_sequences (
    name     TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    next     INTEGER,
    holdings INTEGER NOT NULL,
    PRIMARY KEY (name, key)
);
