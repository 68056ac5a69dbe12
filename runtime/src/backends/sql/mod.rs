//! PostgreSQL and SQLite stores for `#[idempotent]` and `#[sequenced]` on sqlx (features
//! `postgres`, `sqlite`): **the guarantee commits in the same transaction as the effect.**
//!
//! A claim or a sequence number is taken inside a database transaction that the store opens;
//! the body gets that transaction's connection ([`Tx`], which derefs to `PgConnection` /
//! `SqliteConnection`) and writes its effect there; the outcome (or the next number) is
//! written and the transaction committed in one `COMMIT`. So the record and the effect exist
//! together or not at all: there are no lease timers, no "running" state that outlives a
//! process, and no window between "effect done" and "outcome recorded".
//!
//! - [`SqlStore`] ([`PgStore`], [`SqliteStore`]): built from the pool the application already
//!   has ([`SqlStore::new`]) or lazily from a URL for a `static` ([`SqlStore::lazy`]); a
//!   configurable table prefix; [`migrate`](SqlStore::migrate) (the same SQL ships under
//!   `migrations/`), [`purge_expired`](SqlStore::purge_expired).
//! - `#[idempotent]`: `SqlStore` implements [`IdempotencyBackend`](crate::IdempotencyBackend); its lease
//!   ([`SqlIdempotencyLease`]) owns the transaction. Protocol: `idempotent.rs`.
//! - Inside a transaction the **caller** already opened (the caller commits):
//!   [`SqlStore::within`]`(&mut caller_tx)` gives an [`InCallerTx`] for one call, which runs in a
//!   savepoint of it; the record and the effect then commit — or roll back — with the caller's
//!   transaction. For `#[sequenced]`: `db.within(&mut caller_tx).sequence("name")`
//!   ([`InCallerTx::sequence`]): the number is consumed by the caller's `COMMIT`.
//! - `#[sequenced]`: [`SqlStore::sequence`] names a family of sequences and implements
//!   [`SequenceBackend`](crate::SequenceBackend); its lease ([`SqlSequenceLease`]) owns the transaction. Protocol:
//!   `sequenced.rs`.
//! - How PostgreSQL and SQLite differ (which lock makes each step atomic): [`Dialect`].
//!
//! # With the attributes
//!
//! ```ignore
//! use racefree::sql::{PgStore, PgTx};
//! use racefree::{idempotent, sequenced, IdempotencyError, Seq};
//!
//! struct App { db: PgStore }              // PgStore::new(pool) from the pool the app has
//!
//! #[idempotent(key = key, store = app.db)]
//! async fn pay(app: &App, key: &str, cents: i64, mut tx: PgTx<'_>) -> Result<Receipt, Error> {
//!     sqlx::query("INSERT INTO payments (key, cents) VALUES ($1, $2)")
//!         .bind(key).bind(cents).execute(&mut *tx).await?;     // commits with the record
//!     Ok(Receipt { cents })
//! }
//!
//! #[sequenced(key = customer.to_owned(), store = app.db.sequence("invoice_no"))]
//! async fn invoice(app: &App, customer: &str, seq: Seq, mut tx: PgTx<'_>) -> Result<u64, Error> {
//!     sqlx::query("INSERT INTO invoices (customer, number) VALUES ($1, $2)")
//!         .bind(customer).bind(seq.get() as i64).execute(&mut *tx).await?;
//!     Ok(seq.get())                                             // the number commits with the row
//! }
//! // callers: pay(&app, "k-1", 1999).await, invoice(&app, "acme").await — no `tx`, no `seq`.
//! ```
//!
//! The `tx` parameter (type `PgTx<'_>`, `SqliteTx<'_>` or `Tx<'_, D>`) is supplied by the
//! attribute and absent from the callers' signature, like `seq: Seq`. The error type needs
//! `From<IdempotencyError>` / `From<SequenceError>`, and the functions must be `async`.
//! Misuse is a compile error at the parameter: a `tx` without `store = ...`, on a sync `fn`,
//! by reference, twice, or (for `#[sequenced]`) without a `Seq`. Without the attribute, the
//! same protocol is available directly: claim → the lease's
//! [`connection`](SqlIdempotencyLease::connection) → complete, and
//! [`SqlSequence`]`::acquire_async` → [`SqlSequenceLease::connection`] → `commit_async`.
//!
//! # What holds
//!
//! | event | `#[idempotent]` | `#[sequenced]` |
//! | --- | --- | --- |
//! | body returns `Err` (not stored), panics, or its future is dropped (client gone) | effect and claim roll back together; the key is free; the retry executes once | effect and number roll back together; the next call gets the same number |
//! | the process crashes after the effect, before `COMMIT` | the server rolls the transaction back when the connection drops: as above | as above |
//! | the connection is killed mid-body (`pg_terminate_backend`), the server restarts | the body's next statement fails, nothing committed, the caller gets its error; the retry executes once | the call fails, nothing committed, no gap |
//! | `COMMIT` sent, answer lost | settled: once the key's in-flight lock is free (the lost transaction has ended), the record is read: this outcome → `Ok`, none → [`IdempotencyError::StoreUnavailable`]; [`IdempotencyError::OutcomeUnknown`] only if that read fails. A retry replays if it committed, executes if not — never both | [`SequenceError::CommitUnknown`](crate::SequenceError::CommitUnknown): check the effect |
//! | a concurrent duplicate (same key and fingerprint) | waits for the owner's transaction, then replays its committed outcome (or executes, if the owner rolled back); `in_flight = "reject"` answers `InProgress` at once on PostgreSQL | waits on the counter row's lock: numbers are unique, gap-free and in commit order across every process and machine on the database |
//! | the caller's own transaction rolls back after the call ([`SqlStore::within`]) | the record rolls back with the effect: the retry executes once (a store outside the transaction would replay `Ok` for an effect that does not exist) | the number rolls back with the effect: the next call gets it; other callers of the key wait for the caller's `COMMIT` or rollback ([`InCallerTx::sequence`]) |
//! | the same key with another fingerprint | `Conflict`, the stored outcome untouched | — |
//! | a stored record that does not decode | [`IdempotencyError::Undecodable`], never a re-execution | — |
//! | an outcome no replay could return: not encodable, JSON that does not decode back into its type (a NaN float), a NUL character on PostgreSQL | [`IdempotencyError::OutcomeNotStored`], refused before `COMMIT`: the effect rolls back, the key stays free | — |
//! | database down, pool exhausted (its `acquire_timeout`), a statement timeout, a serialization failure before `COMMIT`, a `COMMIT` the server refused | [`IdempotencyError::StoreUnavailable`]: nothing ran or nothing committed | [`SequenceError::Store`](crate::SequenceError::Store), except a serialization failure at the bump in the store's own transaction, which is taken again in a new one (up to 64 times); a lock wait past the deadline: [`SequenceError::Timeout`](crate::SequenceError::Timeout) |
//! | `SERIALIZABLE`, many keys at once (PostgreSQL) | on the usual path the store's statements on a first execution take no predicate lock (the outcome is an `INSERT … ON CONFLICT DO UPDATE` of the transaction's own claim, whose conflict check reads with a dirty snapshot; a claim that read first finds its row by the `ctid` it left in a session setting), so first executions of different keys do not fail each other; the body's own reads take their predicate locks as anywhere | the bump takes no predicate lock, and a key's first number finds its counter by the row the bump returned: callers of different keys do not fail each other |
//! | failover to a synchronous replica | what was committed survives; with asynchronous replication, the last commits may be lost *together with their effects*, so records and effects still agree | as for idempotency |
//!
//! # What it does not promise
//! - Effects **outside** the transaction (an HTTP call, an email, a Redis write) are not rolled
//!   back; after a crash they may happen again on the retry. Write them to an outbox table in
//!   the transaction instead.
//! - A body that commits or ends the transaction itself breaks the promise: [`Tx`] hands out
//!   the connection, not the transaction, so this takes deliberate `COMMIT` statements.
//! - A transaction stays open while the body runs: on PostgreSQL it holds a pooled connection
//!   and its row locks; on SQLite it holds **the database's one write lock**, so writers of
//!   every key queue behind it (SQLite is one writer at a time; WAL lets readers and replays
//!   proceed). Keep bodies short; on SQLite, `busy_timeout` bounds the wait.
//! - On SQLite a duplicate in flight cannot be told apart from any other writer: with
//!   `in_flight = "reject"` it still waits for the write lock (up to `busy_timeout`, then
//!   [`IdempotencyError::StoreUnavailable`]) and then replays. Only PostgreSQL answers
//!   `InProgress` at once.
//! - Sync functions cannot use these stores (all I/O is async).
//!
//! # Which database
//! PostgreSQL for several machines, long bodies or many keys written at once (row locks are per
//! key); SQLite for one machine (several processes may share the file in WAL mode) where the
//! single write lock is acceptable.

mod dialect;
mod error;
mod idempotent;
mod schema;
mod sequenced;
mod transaction;

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use sqlx::Pool;

use crate::idempotent::IdempotencyError;
use crate::sync::keyed_locks::KeyedLocks;

pub use dialect::Dialect;
pub use idempotent::{InCallerTx, SqlIdempotencyLease};
pub use schema::{BadPrefix, Tables};
pub use sequenced::{SqlSequence, SqlSequenceLease};

#[cfg(feature = "postgres")]
pub use sqlx::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlx::Sqlite;

/// The sqlx this store is built on, for pools and queries of your own.
pub use ::sqlx;

/// A store on PostgreSQL (feature `postgres`).
#[cfg(feature = "postgres")]
pub type PgStore = SqlStore<sqlx::Postgres>;
/// A store on SQLite (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub type SqliteStore = SqlStore<sqlx::Sqlite>;
/// The transaction a body runs in, on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgTx<'t> = Tx<'t, sqlx::Postgres>;
/// The transaction a body runs in, on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteTx<'t> = Tx<'t, sqlx::Sqlite>;

/// The default table prefix: tables `racefree_idempotency` and `racefree_sequences`.
pub const DEFAULT_PREFIX: &str = "racefree_";

/// The idempotency records and sequence counters of one database.
///
/// Built from the application's pool, so the store and the application share connections:
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use racefree_runtime::sql::{sqlx::PgPool, PgStore};
///
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
/// let db = PgStore::new(pool).with_prefix("billing_")?;   // billing_idempotency, billing_sequences
/// db.migrate().await?;                                      // CREATE TABLE IF NOT EXISTS
/// // #[idempotent(key = key, store = state.db)] ... ; #[sequenced(key = customer, store = state.db.sequence("invoice_no"))]
/// let purged = db.purge_expired().await?;                  // from a scheduled job
/// # let _ = purged; Ok(()) }
/// ```
///
/// or lazily for a `static` (the pool is created on first use, inside the runtime that uses
/// it; a lazily created pool belongs to that Tokio runtime):
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use racefree_runtime::sql::SqliteStore;
///
/// static DB: SqliteStore = SqliteStore::lazy("sqlite://app.db?mode=rwc");
/// # }
/// ```
pub struct SqlStore<D: Dialect> {
    source: Source<D>,
    prefix: Cow<'static, str>,
    tables: OnceLock<Tables>,
    // In-process FIFO per sequence key, and re-entry detection; the database orders processes.
    sequence_locks: OnceLock<KeyedLocks<String>>,
    // Keys answered or completed here lately: on PostgreSQL their next claim reads first.
    recent: idempotent::Recent,
}

enum Source<D: Dialect> {
    Pool(Pool<D>),
    Lazy {
        url: &'static str,
        pool: OnceLock<Result<Pool<D>, String>>,
    },
}

impl<D: Dialect> SqlStore<D> {
    /// A store on the application's pool. Pool settings apply: `max_connections` bounds the
    /// calls in flight, `acquire_timeout` how long a call waits for a connection before
    /// [`IdempotencyError::StoreUnavailable`] / [`SequenceError::Store`](crate::SequenceError::Store).
    pub fn new(pool: Pool<D>) -> Self {
        SqlStore {
            source: Source::Pool(pool),
            prefix: Cow::Borrowed(DEFAULT_PREFIX),
            tables: OnceLock::new(),
            sequence_locks: OnceLock::new(),
            recent: idempotent::Recent::new(),
        }
    }

    /// A store that creates its pool from `url` on first use (sqlx's default pool options). A
    /// bad URL fails every call with the store's error.
    pub const fn lazy(url: &'static str) -> Self {
        SqlStore {
            source: Source::Lazy {
                url,
                pool: OnceLock::new(),
            },
            prefix: Cow::Borrowed(DEFAULT_PREFIX),
            tables: OnceLock::new(),
            sequence_locks: OnceLock::new(),
            recent: idempotent::Recent::new(),
        }
    }

    /// [`lazy`](Self::lazy) with a table prefix, for a `static`. The prefix must be letters,
    /// digits and `_` (optionally `schema.` first); a bad one fails every call.
    pub const fn lazy_with_prefix(url: &'static str, prefix: &'static str) -> Self {
        SqlStore {
            source: Source::Lazy {
                url,
                pool: OnceLock::new(),
            },
            prefix: Cow::Borrowed(prefix),
            tables: OnceLock::new(),
            sequence_locks: OnceLock::new(),
            recent: idempotent::Recent::new(),
        }
    }

    /// Names the tables `<prefix>idempotency` and `<prefix>sequences` (default `racefree_`).
    /// `prefix` is pasted into SQL, so it must be letters, digits and `_`, optionally with a
    /// `schema.` in front.
    pub fn with_prefix(mut self, prefix: impl Into<Cow<'static, str>>) -> Result<Self, BadPrefix> {
        let prefix = prefix.into();
        schema::check_prefix(&prefix)?;
        self.prefix = prefix;
        self.tables = OnceLock::new();
        Ok(self)
    }

    /// The pool, creating it on first use for a lazy store.
    pub fn pool(&self) -> Result<&Pool<D>, sqlx::Error> {
        match &self.source {
            Source::Pool(pool) => Ok(pool),
            Source::Lazy { url, pool } => pool
                .get_or_init(|| {
                    sqlx::pool::PoolOptions::<D>::new()
                        .connect_lazy(url)
                        .map_err(|e| e.to_string())
                })
                .as_ref()
                .map_err(|e| sqlx::Error::Configuration(e.clone().into())),
        }
    }

    /// The tables' names and statements.
    pub fn tables(&self) -> &Tables {
        self.tables.get_or_init(|| Tables::new::<D>(&self.prefix))
    }

    /// Creates the tables and index if absent (`CREATE … IF NOT EXISTS`, one migrating
    /// process at a time). The same SQL for the default prefix is under `migrations/`.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let tables = self.checked_tables()?;
        D::migrate(self.pool()?, tables).await
    }

    /// The SQL [`migrate`](Self::migrate) runs, e.g. to put into your own migrations.
    pub fn schema_sql(&self) -> String {
        D::schema(self.tables())
    }

    /// Deletes the idempotency records whose `expires_at` has passed, and only those (never a
    /// record in flight: it is uncommitted, or its replacement is row-locked until it commits);
    /// returns how many. Safe to run from a scheduled job while calls run.
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        let tables = self.checked_tables()?;
        D::purge_expired(self.pool()?, tables).await
    }

    /// What `#[idempotent(store = ...)]` calls to find the store (see
    /// `__private::StoreRef`): inherent here, because this store keeps outcomes of every type,
    /// so the generic trait method could not tell which `IdempotencyBackend<T>` is meant.
    #[doc(hidden)]
    pub fn idempotency_store(&self) -> &Self {
        self
    }

    fn checked_tables(&self) -> Result<&Tables, sqlx::Error> {
        schema::check_prefix(&self.prefix).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
        Ok(self.tables())
    }

    fn store_pool(&self) -> Result<(&Pool<D>, &Tables), IdempotencyError> {
        let unavailable = |reason: String| IdempotencyError::StoreUnavailable { reason };
        let tables = self
            .checked_tables()
            .map_err(|e| unavailable(e.to_string()))?;
        let pool = self.pool().map_err(|e| unavailable(e.to_string()))?;
        Ok((pool, tables))
    }

    fn sequence_locks(&self) -> &KeyedLocks<String> {
        self.sequence_locks.get_or_init(KeyedLocks::new)
    }
}

impl<D: Dialect> std::fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("database", &<D as sqlx::Database>::NAME)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The transaction a guarded body runs in: it derefs to the connection (`&mut PgConnection`,
/// `&mut SqliteConnection`), so `query.execute(&mut *tx)` writes inside the store's
/// transaction, and the write commits or rolls back with the claim or number. It hands out the
/// connection, not the transaction: the store commits.
pub struct Tx<'t, D: Dialect> {
    connection: &'t mut D::Connection,
}

impl<'t, D: Dialect> Tx<'t, D> {
    /// The transaction of `lease` (what the attribute does for a `tx` parameter).
    pub fn of<L: InTransaction<D>>(lease: &'t mut L) -> Self {
        Tx {
            connection: lease.connection(),
        }
    }
}

impl<D: Dialect> Deref for Tx<'_, D> {
    type Target = D::Connection;
    fn deref(&self) -> &D::Connection {
        self.connection
    }
}

impl<D: Dialect> DerefMut for Tx<'_, D> {
    fn deref_mut(&mut self) -> &mut D::Connection {
        self.connection
    }
}

impl<D: Dialect> std::fmt::Debug for Tx<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("database", &<D as sqlx::Database>::NAME)
            .finish()
    }
}

/// A lease that is a transaction: the connection a body writes its effect on.
#[diagnostic::on_unimplemented(
    message = "a `Tx` parameter needs a SQL store: this store's lease is not a database transaction",
    note = "pass `store = <a racefree::sql::PgStore or SqliteStore>` (for #[sequenced]: `store = db.sequence(\"name\")`)"
)]
pub trait InTransaction<D: Dialect> {
    /// The connection of the lease's transaction.
    fn connection(&mut self) -> &mut D::Connection;
}
