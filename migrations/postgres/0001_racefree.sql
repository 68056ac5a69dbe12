CREATE TABLE IF NOT EXISTS racefree_idempotency (
    key         text        PRIMARY KEY,
    fingerprint text        NOT NULL,
    outcome     jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS racefree_idempotency_expires_at ON racefree_idempotency (expires_at);
CREATE TABLE IF NOT EXISTS racefree_sequences (
    name     text   NOT NULL,
    key      text   NOT NULL,
    next     bigint,
    holdings bigint NOT NULL,
    PRIMARY KEY (name, key)
);
