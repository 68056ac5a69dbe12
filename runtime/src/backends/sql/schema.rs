//! The two tables, their names, and the statements over them, rendered once per store.
//!
//! - `<prefix>idempotency`: one row per (function, scope, key): `key` (primary key),
//!   `fingerprint`, `outcome` (versioned JSON, `jsonb` on PostgreSQL; `NULL` only inside the
//!   transaction that claimed the key), `created_at`, `expires_at` (indexed, for
//!   [`purge_expired`](super::SqlStore::purge_expired)).
//! - `<prefix>sequences`: one row per (sequence name, key): `next` (the next number, `NULL`
//!   until the key's first success), `holdings` (how many holdings committed: the fence).
//!
//! The default prefix is `racefree_`; `migrations/` at the repository root holds the same SQL
//! for the default prefix, for sqlx-migrate or refinery users.

use super::dialect::Dialect;

/// The table names a store uses, and its statements rendered with them.
#[derive(Debug, Clone)]
pub struct Tables {
    pub(crate) idempotency: String,
    pub(crate) sequences: String,
    pub(crate) sql: Statements,
}

/// Every statement the stores send, rendered once per store (sqlx caches prepared statements
/// by their text, so they are prepared once per connection).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Statements {
    pub(crate) read_record: String,
    pub(crate) claim: String,
    pub(crate) replace_expired: String,
    pub(crate) store_outcome: String,
    pub(crate) purge_expired: String,
    pub(crate) bump: String,
    pub(crate) set_next: String,
    pub(crate) read_next: String,
    /// SQLite: the outcome, `COMMIT` and an empty `BEGIN`, one prepared query.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) commit_outcome: String,
    /// SQLite: the same, writing the whole record (the claim wrote none).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) commit_record: String,
    /// Whether the key's record has a given fingerprint and outcome, and has expired.
    pub(crate) read_settled: String,
    /// SQLite: takes the write lock and reads the key's live record.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) lock_and_read: String,
    /// PostgreSQL: the statements executed by name inside simple queries.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) prepared: Prepared,
}

/// PostgreSQL statements a connection prepares once (SQL `PREPARE`) so that a simple query
/// (the only kind that can carry `BEGIN` or `COMMIT` with another statement in one round
/// trip) can `EXECUTE` them without planning them again. Both are named after one hash of
/// both texts, so stores with other tables, or another version's statements, never collide,
/// and a session that has this claim statement has this outcome statement, even one a pooler
/// shares with other versions: they are prepared together, in one transaction
/// (`Dialect::prepare`).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub struct Prepared {
    pub(crate) claim: String,
    pub(crate) prepare_claim: String,
    pub(crate) outcome: String,
    pub(crate) prepare_outcome: String,
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
impl Prepared {
    /// `claim` and `outcome` are `PREPARE` bodies: `(types) AS statement`.
    pub(crate) fn new(claim: &str, outcome: &str) -> Prepared {
        let name = |kind: &str, body: &str| {
            format!(
                "racefree_{kind}_{:016x}",
                xxhash_rust::xxh3::xxh3_64(body.as_bytes())
            )
        };
        let both = format!("{claim}\n{outcome}");
        let (claim_name, outcome_name) = (name("claim", &both), name("outcome", &both));
        Prepared {
            prepare_claim: format!("PREPARE {claim_name} {claim}"),
            prepare_outcome: format!("PREPARE {outcome_name} {outcome}"),
            claim: claim_name,
            outcome: outcome_name,
        }
    }
}

/// A table prefix that is not `[A-Za-z_][A-Za-z0-9_]*`, optionally after one `schema.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPrefix(pub String);

impl std::fmt::Display for BadPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table prefix `{}` must be letters, digits and `_` (optionally `schema.` first), not starting with a digit",
            self.0
        )
    }
}

impl std::error::Error for BadPrefix {}

fn identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks `prefix` (it is pasted into SQL, so only identifier characters pass).
pub(crate) fn check_prefix(prefix: &str) -> Result<(), BadPrefix> {
    let (schema, tables) = match prefix.split_once('.') {
        Some((schema, tables)) => (Some(schema), tables),
        None => (None, prefix),
    };
    let ok = schema.is_none_or(identifier) && (tables.is_empty() || identifier(tables));
    ok.then_some(()).ok_or_else(|| BadPrefix(prefix.to_owned()))
}

impl Tables {
    pub(crate) fn new<D: Dialect>(prefix: &str) -> Tables {
        let idempotency = format!("{prefix}idempotency");
        let sequences = format!("{prefix}sequences");
        let sql = D::statements(&idempotency, &sequences);
        Tables {
            idempotency,
            sequences,
            sql,
        }
    }

    /// The name of the idempotency records' table.
    pub fn idempotency(&self) -> &str {
        &self.idempotency
    }

    /// The name of the sequence counters' table.
    pub fn sequences(&self) -> &str {
        &self.sequences
    }

    /// A table's name without its schema, for naming its indexes.
    pub(crate) fn unqualified<'a>(&self, table: &'a str) -> &'a str {
        table.rsplit_once('.').map_or(table, |(_, name)| name)
    }

    /// A transaction-scoped advisory lock number for `what` in these tables.
    pub(crate) fn lock_id(&self, what: &str) -> i64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(self.idempotency.as_bytes());
        hasher.update(&[0]);
        hasher.update(what.as_bytes());
        hasher.digest() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_identifiers() {
        for good in ["racefree_", "", "app.racefree_", "_x", "s.", "Billing2_"] {
            assert_eq!(check_prefix(good), Ok(()), "{good}");
        }
        for bad in ["1x", "a-b", "x;drop", "a.b.c", ".x", "x y", "\"x\""] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    /// `migrations/<dialect>/0001_racefree.sql` must be what `migrate()` runs for the default
    /// prefix; `RACEFREE_BLESS=1` rewrites it.
    fn check_shipped<D: Dialect>(dialect: &str) {
        let path = format!(
            "{}/../migrations/{dialect}/0001_racefree.sql",
            env!("CARGO_MANIFEST_DIR")
        );
        let rendered = D::schema(&Tables::new::<D>(super::super::DEFAULT_PREFIX));
        if std::env::var_os("RACEFREE_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            shipped, rendered,
            "{path} differs from migrate(): RACEFREE_BLESS=1 rewrites it"
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn shipped_postgres_migration_is_what_migrate_runs() {
        check_shipped::<sqlx::Postgres>("postgres");
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn shipped_sqlite_migration_is_what_migrate_runs() {
        check_shipped::<sqlx::Sqlite>("sqlite");
    }
}
