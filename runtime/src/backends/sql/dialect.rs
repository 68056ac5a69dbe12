//! The statements that differ between PostgreSQL and SQLite, and nothing else: the protocols
//! in `idempotent.rs` and `sequenced.rs` are written once over [`Dialect`], which says how
//! each step is spelled and which lock makes it atomic. Steps whose only difference is the
//! statement's text (rendered per dialect into [`Statements`]) are written once, by
//! `same_steps!`, for both connection types.

use std::future::Future;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::Pool;

use super::schema::{Prepared, Statements, Tables};

/// A committed idempotency record, as the claim reads it.
#[doc(hidden)]
#[derive(Debug)]
pub struct Record {
    pub(crate) fingerprint: String,
    /// The versioned outcome (JSON text); `None` only for a row nobody should have committed.
    pub(crate) outcome: Option<String>,
    pub(crate) expired: bool,
}

/// What one claim statement found.
#[doc(hidden)]
#[derive(Debug)]
pub struct Claimed {
    /// The key's in-flight lock was free and is now this transaction's (always so on SQLite,
    /// where the write lock is held).
    pub(crate) locked: bool,
    /// The in-flight record was inserted: the caller executes.
    pub(crate) inserted: bool,
    /// Otherwise the committed record the claim ran into, if it could see one.
    pub(crate) record: Option<Record>,
}

/// What a settling read ([`Dialect::read_settled`]) found of the key's record.
#[doc(hidden)]
#[derive(Debug)]
pub struct Settled {
    /// Its fingerprint and outcome are the ones the lost commit wrote (compared by the
    /// database: `jsonb` keeps no text).
    pub(crate) ours: bool,
    pub(crate) expired: bool,
}

/// How a `COMMIT` sent with other statements ([`Dialect::commit_with_outcome`]) ended, when it
/// committed.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// Committed, and the empty transaction opened after it is there, as sqlx counts.
    Clean,
    /// Committed, but the statement after `COMMIT` failed: the session is not in the state
    /// sqlx counts (the connection must not be reused).
    Unclean,
}

/// A database racefree's SQL stores run on: `sqlx::Postgres` (feature `postgres`) or
/// `sqlx::Sqlite` (feature `sqlite`). Sealed: the protocol's correctness rests on each
/// dialect's locking:
///
/// | step | PostgreSQL | SQLite |
/// | --- | --- | --- |
/// | open a writing transaction | `BEGIN` (locks are per row / per key) | `BEGIN`, whose first write takes the database's one write lock (waited for up to `busy_timeout`); a claim's or holding's first statement opens a savepoint its commit releases first |
/// | claim: "is this key in flight?", insert, read | sent with `BEGIN`: `pg_try_advisory_xact_lock(hash(key))` and an `INSERT` that fails if the lock is held or the key has a record; only then one statement that takes the lock and, only if it was free, runs `INSERT … ON CONFLICT (key) DO NOTHING RETURNING`, with the committed record beside it | the write lock is the claim: the record is read under it and written whole at `COMMIT` (in a caller's transaction: `INSERT … ON CONFLICT (key) DO NOTHING RETURNING`, then the record); never "in flight": holding the write lock means nobody else is writing |
/// | wait for an owner | `pg_advisory_xact_lock_shared(hash(key))` under `lock_timeout` | never needed: taking the write lock already waited |
/// | bump a counter | `INSERT … ON CONFLICT (name, key) DO UPDATE … RETURNING` (row lock) | the same (under the write lock) |
/// | clock | the server's `clock_timestamp()`, `timestamptz` columns | SQLite's `julianday('now')`, Unix milliseconds |
pub trait Dialect: sqlx::Database + sealed::Sealed {
    /// The database, as the `store` label of racefree's metrics names it.
    #[doc(hidden)]
    const STORE_NAME: &'static str;

    #[doc(hidden)]
    fn schema(tables: &Tables) -> String;

    #[doc(hidden)]
    fn statements(idempotency: &str, sequences: &str) -> Statements;

    #[doc(hidden)]
    fn migrate(
        pool: &Pool<Self>,
        tables: &Tables,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// How a writing transaction begins, when not plain `BEGIN` (SQLite: `BEGIN IMMEDIATE`).
    #[doc(hidden)]
    const BEGIN: Option<&'static str>;

    /// How a `#[sequenced]` holding's own transaction begins, its lock waits bounded by
    /// `lock_wait`, when not plain `BEGIN` followed by
    /// [`limit_lock_wait`](Self::limit_lock_wait) (PostgreSQL: `BEGIN`, `SET LOCAL
    /// lock_timeout` and the savepoint its commit releases first, in one round trip; on SQLite
    /// the bump opens the savepoint, and `busy_timeout` bounds the wait).
    #[doc(hidden)]
    fn holding_begin(lock_wait: Option<Duration>) -> Option<String>;

    /// Whether a claim of a key the store has not seen lately skips the replay read and claims
    /// at once: where the claim costs a round trip the read would add to a first execution and
    /// takes no lock a replay would wait for (PostgreSQL; not SQLite, whose claim takes the
    /// database's one write lock).
    #[doc(hidden)]
    const CLAIMS_FIRST: bool;

    /// The claim's insert, sent in one round trip with `BEGIN`, as a statement without
    /// parameters (on PostgreSQL, `EXECUTE` of a statement the connection prepared once,
    /// [`prepare`](Self::prepare)); `None` where the write lock a transaction takes is the
    /// claim and no in-flight record is written ([`lock_and_read`](Self::lock_and_read);
    /// SQLite: one writer at a time, and the connection is a thread of this process, so a
    /// statement after `BEGIN` costs no round trip). It inserts `key`'s in-flight
    /// record and *fails* ([`refused_claim`](Self::refused_claim)) when the key has a record
    /// (committed, or expired) or another transaction holds the key's in-flight lock `lock`:
    /// `BEGIN` returns no rows through sqlx, so the failure is the answer, and the claim that
    /// reads why ([`claim`](Self::claim)) runs only then.
    #[doc(hidden)]
    fn claim_on_begin(tables: &Tables, key: &str, fingerprint: &str, lock: i64) -> Option<String>;

    /// Whether `error` is [`claim_on_begin`](Self::claim_on_begin)'s refusal (a unique or
    /// not-null violation), not a failure of the database.
    #[doc(hidden)]
    fn refused_claim(error: &sqlx::Error) -> bool;

    /// Whether `error` says the connection lacks the statements
    /// [`prepare`](Self::prepare) prepares (a new connection, or a `DISCARD ALL`).
    #[doc(hidden)]
    fn unprepared(error: &sqlx::Error) -> bool;

    /// Why the database cannot store `outcome` (a record's JSON text), if it cannot.
    #[doc(hidden)]
    fn unstorable(_outcome: &str) -> Option<&'static str> {
        None
    }

    /// Prepares, on `conn` outside any transaction, the statements it lacks of those that
    /// [`claim_on_begin`](Self::claim_on_begin) and
    /// [`commit_with_outcome`](Self::commit_with_outcome) execute by name.
    #[doc(hidden)]
    fn prepare(
        conn: &mut Self::Connection,
        tables: &Tables,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// In a transaction opened with plain `BEGIN` (deferred), takes the database's write lock
    /// (waiting up to `busy_timeout`) and reads the key's unexpired record under it, in one
    /// query that also opens the claim's savepoint (databases whose
    /// [`claim_on_begin`](Self::claim_on_begin) is `None`).
    #[doc(hidden)]
    fn lock_and_read(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
    ) -> impl Future<Output = Result<Option<Record>, sqlx::Error>> + Send;

    /// Writes the outcome and commits, in one round trip, then opens an empty transaction
    /// (which the `ROLLBACK` sqlx queues for the dropped transaction ends), counting the
    /// statements that completed: an error after `COMMIT` completed is still a commit. With
    /// `whole` (the fingerprint of a claim that wrote no record,
    /// [`lock_and_read`](Self::lock_and_read)) it writes the whole record, over an expired one. An error means nothing committed,
    /// except a lost connection.
    #[doc(hidden)]
    fn commit_with_outcome(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
        whole: Option<&str>,
        outcome: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Committed, sqlx::Error>> + Send;

    /// The key's record as a settling read sees it: whether it is the one with `fingerprint`
    /// and `outcome`, and whether it has expired.
    #[doc(hidden)]
    fn read_settled(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
        fingerprint: &str,
        outcome: &str,
    ) -> impl Future<Output = Result<Option<Settled>, sqlx::Error>> + Send;

    /// Runs `sql` (one or more statements, no parameters) as one simple query.
    #[doc(hidden)]
    fn execute_raw<'c>(
        conn: &'c mut Self::Connection,
        sql: &'c str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Bounds the lock waits of the rest of this transaction.
    #[doc(hidden)]
    fn limit_lock_wait(
        conn: &mut Self::Connection,
        wait: Duration,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Claims `key` in the open transaction: takes its in-flight lock `lock` if nobody holds
    /// it, and only then inserts the in-flight record unless the key has one; reports the
    /// committed record otherwise.
    #[doc(hidden)]
    fn claim(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
        fingerprint: &str,
        lock: i64,
    ) -> impl Future<Output = Result<Claimed, sqlx::Error>> + Send;

    /// Returns once nobody holds the key's in-flight lock (at most `wait`, then a lock-timeout
    /// error).
    #[doc(hidden)]
    fn wait_unlocked(
        pool: &Pool<Self>,
        lock: i64,
        wait: Option<Duration>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    #[doc(hidden)]
    fn read_record(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
    ) -> impl Future<Output = Result<Option<Record>, sqlx::Error>> + Send;

    /// Turns an expired record into this caller's in-flight record; `true` if it was expired.
    #[doc(hidden)]
    fn replace_expired(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
        fingerprint: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// The outcome's `UPDATE` of the claim's record: the rows it updated (1, or 0 if the body
    /// ended the transaction or sent it to other tables).
    #[doc(hidden)]
    fn store_outcome(
        conn: &mut Self::Connection,
        tables: &Tables,
        key: &str,
        outcome: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    #[doc(hidden)]
    fn purge_expired(
        pool: &Pool<Self>,
        tables: &Tables,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// The `COMMIT` of a `#[sequenced]` holding in the store's own transaction, then a `BEGIN`
    /// of an empty transaction (as [`commit_with_outcome`](Self::commit_with_outcome)), in one
    /// round trip. A body that ended the transaction itself, or went on after a failed
    /// statement, makes it fail instead of committing nothing (or another transaction) and
    /// answering `Ok`: the `RELEASE` of the savepoint the holding opened goes first, and it
    /// fails in an aborted transaction, outside one, and in a new one.
    #[doc(hidden)]
    fn commit_holding(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = Result<Committed, sqlx::Error>> + Send;

    /// Locks the key's counter row (creating it for a key never seen) and moves its next
    /// number on by one, in the transaction: the number before the move (`None` for a key
    /// never committed) and the count of holdings (the fence).
    #[doc(hidden)]
    fn bump(
        conn: &mut Self::Connection,
        tables: &Tables,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Bumped, sqlx::Error>> + Send;

    /// Sets the counter to `next`, where it still says `bumped` (what the bump left): the rows
    /// updated, 0 if the body ended the holding's transaction (the statement then runs
    /// outside it, where the counter may be another holder's). `row` is the bump's
    /// [`Bumped::row`], which finds the counter without reading the key's index.
    #[doc(hidden)]
    fn set_next(
        conn: &mut Self::Connection,
        tables: &Tables,
        name: &str,
        key: &str,
        bumped: Option<i64>,
        next: Option<i64>,
        row: Option<&str>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    #[doc(hidden)]
    fn read_next(
        pool: &Pool<Self>,
        tables: &Tables,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<i64>, sqlx::Error>> + Send;
}

/// A connection from `pool` that sqlx counts outside any transaction. One it counts inside one
/// is closed and another taken: SQLite can roll a transaction back by itself (an `ON CONFLICT
/// ROLLBACK` constraint, `RAISE(ROLLBACK)`, an I/O error), after which sqlx's own `ROLLBACK`
/// fails and its count stays at one; a claim on such a connection would get a savepoint where
/// it needs a transaction, and a store commit would leave a transaction open on it.
pub(crate) async fn acquire_clean<D: Dialect>(
    pool: &Pool<D>,
) -> Result<PoolConnection<D>, sqlx::Error> {
    loop {
        let connection = pool.acquire().await?;
        if <D::TransactionManager as sqlx::TransactionManager>::get_transaction_depth(&connection)
            == 0
        {
            return Ok(connection);
        }
        connection.close().await?;
    }
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// The statements of a schema script, one by one (prepared statements hold one each).
fn statements_of(script: &str) -> impl Iterator<Item = &str> {
    script
        .split(";\n")
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
}

/// A TTL as whole milliseconds, capped at 100 years so every database's date arithmetic holds.
fn millis(ttl: Duration) -> i64 {
    const CAP: u128 = 100 * 365 * 24 * 3600 * 1000;
    ttl.as_millis().min(CAP) as i64
}

/// Drives a multi-statement query's results to the end: how many of its statements
/// completed, and the error that stopped it, if one did.
async fn completed<S, L, R>(results: S) -> (usize, Option<sqlx::Error>)
where
    S: futures_util::Stream<Item = Result<sqlx::Either<L, R>, sqlx::Error>> + Unpin,
{
    completed_with(results, drop, |_, _| {}).await
}

/// [`completed`], handing each completed statement's result to `each`, and each row to
/// `row` (with the number of statements completed before it), in order.
async fn completed_with<S, L, R>(
    mut results: S,
    mut each: impl FnMut(L),
    mut row: impl FnMut(usize, R),
) -> (usize, Option<sqlx::Error>)
where
    S: futures_util::Stream<Item = Result<sqlx::Either<L, R>, sqlx::Error>> + Unpin,
{
    use futures_util::StreamExt;
    let mut done = 0;
    while let Some(result) = results.next().await {
        match result {
            Ok(sqlx::Either::Left(result)) => {
                each(result);
                done += 1;
            }
            Ok(sqlx::Either::Right(r)) => row(done, r),
            Err(error) => return (done, Some(error)),
        }
    }
    (done, None)
}

/// What a one-trip commit query ("…; COMMIT; BEGIN", "…; COMMIT AND CHAIN") came to, from
/// [`completed`]: statement number `commit` (counting from 1) is the `COMMIT`.
fn commit_of(
    commit: usize,
    (done, error): (usize, Option<sqlx::Error>),
) -> Result<Committed, sqlx::Error> {
    match error {
        None => Ok(Committed::Clean),
        Some(_) if done >= commit => Ok(Committed::Unclean),
        Some(error) => Err(error),
    }
}

/// In the error a commit gets when the body ended the store's transaction itself (its own
/// `COMMIT` or `ROLLBACK` on the connection) or sent it to other tables (`SET search_path`):
/// the outcome's write found no claim of the key in the transaction.
pub(crate) const NO_CLAIM: &str = "racefree: no claim of this key in this transaction";

/// The transaction-local setting a PostgreSQL bump marks its transaction with, for a first
/// number's `UPDATE` to check it runs in that transaction.
#[cfg(feature = "postgres")]
const HOLDING: &str = "racefree.holding";

/// The savepoint a PostgreSQL holding opens with `BEGIN` in the store's own transaction
/// (SQLite's bump opens `racefree_claim`), released first by its commit: a body that ended
/// the transaction (even with a `BEGIN` after it) or left it aborted makes that `RELEASE`
/// fail, where `COMMIT` would only warn outside a transaction and roll an aborted one back
/// without an error. The `RELEASE` costs the commit less than a `SELECT` that checks the
/// bump's mark did (0.11–0.19 of a bare transaction's time less, measured by
/// `examples/sql_step_costs.rs -- sequenced`).
#[cfg(feature = "postgres")]
const HOLDING_SAVEPOINT: &str = "racefree_holding";

/// What a PostgreSQL claim's `RETURNING` leaves in its mark: the claimed row's `ctid` and
/// `xmin` (the (sub)transaction that wrote it), as `mark`. The `xmin` tells this claim's row
/// from another claim's that a `VACUUM` put in the same slot since.
#[cfg(feature = "postgres")]
const MARK_OF_ROW: &str = "ctid::text || ' ' || xmin::text AS mark";

/// `code` of a database error, if `error` is one.
#[cfg(feature = "postgres")]
fn database_code(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    match error {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

/// The steps that bind and decode the same on both databases (their statements' text, in
/// `tables.sql`, is each dialect's own), as `Dialect` methods for connection type `$conn`.
macro_rules! same_steps {
    ($conn:ty) => {
        async fn read_record(
            conn: &mut $conn,
            tables: &Tables,
            key: &str,
        ) -> Result<Option<Record>, sqlx::Error> {
            let row = sqlx::query(&tables.sql.read_record)
                .bind(key)
                .fetch_optional(conn)
                .await?;
            Ok(row.map(|row| Record {
                fingerprint: sqlx::Row::get(&row, 0),
                outcome: sqlx::Row::get(&row, 1),
                expired: sqlx::Row::get(&row, 2),
            }))
        }

        async fn read_settled(
            conn: &mut $conn,
            tables: &Tables,
            key: &str,
            fingerprint: &str,
            outcome: &str,
        ) -> Result<Option<Settled>, sqlx::Error> {
            let row = sqlx::query(&tables.sql.read_settled)
                .bind(key)
                .bind(fingerprint)
                .bind(outcome)
                .fetch_optional(conn)
                .await?;
            Ok(row.map(|row| Settled {
                ours: sqlx::Row::get::<Option<bool>, _>(&row, 0).unwrap_or(false),
                expired: sqlx::Row::get(&row, 1),
            }))
        }

        fn execute_raw<'c>(
            conn: &'c mut $conn,
            sql: &'c str,
        ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
            // `Executor::execute` on the connection (not `raw_sql`, whose future is not `Send`
            // for every lifetime): a `&str` without arguments goes as one simple query.
            async move { sqlx::Executor::execute(conn, sql).await.map(drop) }
        }

        async fn replace_expired(
            conn: &mut $conn,
            tables: &Tables,
            key: &str,
            fingerprint: &str,
        ) -> Result<bool, sqlx::Error> {
            let mark = claim_mark(conn);
            let done = sqlx::query(&tables.sql.replace_expired)
                .bind(key)
                .bind(fingerprint);
            // (On PostgreSQL a `SELECT` of the marks it set: its row count is theirs.)
            Ok(bind_given(done, mark).execute(conn).await?.rows_affected() == 1)
        }

        async fn store_outcome(
            conn: &mut $conn,
            tables: &Tables,
            key: &str,
            outcome: &str,
            ttl: Duration,
        ) -> Result<u64, sqlx::Error> {
            let mark = claim_mark(conn);
            let stored = sqlx::query(&tables.sql.store_outcome)
                .bind(key)
                .bind(outcome)
                .bind(millis(ttl));
            bind_given(stored, mark)
                .execute(conn)
                .await
                .map(|done| done.rows_affected())
        }

        async fn purge_expired(pool: &Pool<Self>, tables: &Tables) -> Result<u64, sqlx::Error> {
            let done = sqlx::query(&tables.sql.purge_expired).execute(pool).await?;
            Ok(done.rows_affected())
        }

        async fn bump(
            conn: &mut $conn,
            tables: &Tables,
            name: &str,
            key: &str,
        ) -> Result<Bumped, sqlx::Error> {
            let row = sqlx::query(&tables.sql.bump)
                .bind(name)
                .bind(key)
                .fetch_one(conn)
                .await?;
            Ok(Bumped {
                next: sqlx::Row::get(&row, 0),
                holdings: sqlx::Row::get(&row, 1),
                row: sqlx::Row::get(&row, 2),
            })
        }

        async fn set_next(
            conn: &mut $conn,
            tables: &Tables,
            name: &str,
            key: &str,
            bumped: Option<i64>,
            next: Option<i64>,
            row: Option<&str>,
        ) -> Result<u64, sqlx::Error> {
            let set = sqlx::query(&tables.sql.set_next)
                .bind(name)
                .bind(key)
                .bind(next)
                .bind(bumped);
            bind_given(set, row)
                .execute(conn)
                .await
                .map(|done| done.rows_affected())
        }

        async fn read_next(
            pool: &Pool<Self>,
            tables: &Tables,
            name: &str,
            key: &str,
        ) -> Result<Option<i64>, sqlx::Error> {
            let next: Option<Option<i64>> = sqlx::query_scalar(&tables.sql.read_next)
                .bind(name)
                .bind(key)
                .fetch_optional(pool)
                .await?;
            Ok(next.flatten())
        }
    };
}

/// `query` with `value` bound as its next parameter if there is one: the parameter that only
/// one dialect's statement has (PostgreSQL's claim mark and counter row; SQLite has none, and
/// its statements take no such parameter).
fn bind_given<'q, D: sqlx::Database, T>(
    query: sqlx::query::Query<'q, D, <D as sqlx::Database>::Arguments<'q>>,
    value: Option<T>,
) -> sqlx::query::Query<'q, D, <D as sqlx::Database>::Arguments<'q>>
where
    T: 'q + sqlx::Encode<'q, D> + sqlx::Type<D> + Send,
{
    match value {
        Some(value) => query.bind(value),
        None => query,
    }
}

/// The counter upsert, the same SQL on both databases.
fn bump_sql(seq: &str, row: &str) -> String {
    format!(
        "INSERT INTO {seq} AS s (name, key, next, holdings) VALUES ($1, $2, NULL, 1) \
         ON CONFLICT (name, key) DO UPDATE SET next = s.next + 1, holdings = s.holdings + 1 \
         RETURNING next - 1, holdings, {row}"
    )
}

/// What a `#[sequenced]` bump returned ([`Dialect::bump`]).
#[doc(hidden)]
pub struct Bumped {
    /// The number before the move (`None` for a key never committed).
    pub(crate) next: Option<i64>,
    /// The count of holdings, this one included (the fence).
    pub(crate) holdings: i64,
    /// The counter row's `ctid` on PostgreSQL, for a first number's `UPDATE` to find it
    /// without reading the key's index (whose page a read locks under `SERIALIZABLE`, so
    /// first numbers of other keys failed each other at `COMMIT`); `None` on SQLite.
    pub(crate) row: Option<String>,
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sqlx::{PgConnection, Postgres, Row};

    impl Dialect for Postgres {
        const STORE_NAME: &'static str = "postgres";

        fn statements(idempotency: &str, sequences: &str) -> Statements {
            statements(idempotency, sequences)
        }

        fn schema(tables: &Tables) -> String {
            format!(
                "CREATE TABLE IF NOT EXISTS {idem} (\n    \
                     key         text        PRIMARY KEY,\n    \
                     fingerprint text        NOT NULL,\n    \
                     outcome     jsonb,\n    \
                     created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),\n    \
                     expires_at  timestamptz NOT NULL\n\
                 );\n\
                 CREATE INDEX IF NOT EXISTS {idem_name}_expires_at ON {idem} (expires_at);\n\
                 CREATE TABLE IF NOT EXISTS {seq} (\n    \
                     name     text   NOT NULL,\n    \
                     key      text   NOT NULL,\n    \
                     next     bigint,\n    \
                     holdings bigint NOT NULL,\n    \
                     PRIMARY KEY (name, key)\n\
                 );\n",
                idem = tables.idempotency,
                idem_name = tables.unqualified(&tables.idempotency),
                seq = tables.sequences,
            )
        }

        async fn migrate(pool: &Pool<Self>, tables: &Tables) -> Result<(), sqlx::Error> {
            // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog: one
            // migrating process at a time.
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(tables.lock_id("migrate"))
                .execute(&mut *tx)
                .await?;
            for statement in statements_of(&Self::schema(tables)) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        }

        const BEGIN: Option<&'static str> = None;

        fn holding_begin(lock_wait: Option<Duration>) -> Option<String> {
            // `SET LOCAL`, a utility statement: a `SELECT set_config(…)` beside `BEGIN` costs
            // more than it saves.
            let limit = lock_wait
                .map(|wait| format!("SET LOCAL lock_timeout = {}; ", lock_timeout_ms(wait)))
                .unwrap_or_default();
            Some(format!("BEGIN; {limit}SAVEPOINT {HOLDING_SAVEPOINT}"))
        }

        async fn commit_holding(conn: &mut PgConnection) -> Result<Committed, sqlx::Error> {
            let sql = format!("RELEASE {HOLDING_SAVEPOINT}; COMMIT AND CHAIN");
            let committed = commit_of(
                2,
                completed(sqlx::Executor::fetch_many(&mut *conn, sql.as_str())).await,
            );
            match committed {
                // An aborted transaction refuses the `RELEASE` (25P02), but whose? The holding's
                // own (nothing committed), or one the body began after its own `COMMIT` had
                // committed the number. Rolling back to the savepoint tells: it is there only in
                // the holding's transaction, which then stays open for the queued `ROLLBACK`;
                // anywhere else it fails (3B001), and the call is `CommitUnknown`.
                Err(error) if database_code(&error).as_deref() == Some("25P02") => {
                    let back = format!("ROLLBACK TO SAVEPOINT {HOLDING_SAVEPOINT}");
                    Self::execute_raw(conn, &back).await?;
                    Err(error)
                }
                other => other,
            }
        }

        const CLAIMS_FIRST: bool = true;

        fn claim_on_begin(
            tables: &Tables,
            key: &str,
            fingerprint: &str,
            lock: i64,
        ) -> Option<String> {
            // The outcome's statement is not executed here: a session that has the claim's has
            // it (`prepare` prepares both in one transaction, so in one server session even
            // behind a pooler), unless it was deallocated by hand, and then the commit fails
            // before `COMMIT` (`Owned::commit_with_outcome`).
            Some(format!(
                "EXECUTE {}({}, {}, '{lock}')",
                tables.sql.prepared.claim,
                text(key),
                text(fingerprint),
            ))
        }

        fn refused_claim(error: &sqlx::Error) -> bool {
            // unique_violation (the key has a record), not_null_violation (its lock is held)
            matches!(database_code(error).as_deref(), Some("23505" | "23502"))
        }

        fn unstorable(outcome: &str) -> Option<&'static str> {
            // JSONB refuses `\u0000` in a string (SQLSTATE 22P05); the escape is serde_json's
            // for a NUL character, unless its backslash is itself escaped (`\\u0000`).
            let nul = outcome.match_indices("\\u0000").any(|(at, _)| {
                let backslashes = outcome[..=at].bytes().rev().take_while(|&b| b == b'\\');
                backslashes.count() % 2 == 1
            });
            nul.then_some("PostgreSQL's JSONB cannot hold a NUL character (\\u0000) in a string")
        }

        fn unprepared(error: &sqlx::Error) -> bool {
            // invalid_sql_statement_name: "prepared statement … does not exist"
            database_code(error).as_deref() == Some("26000")
        }

        async fn prepare(conn: &mut PgConnection, tables: &Tables) -> Result<(), sqlx::Error> {
            let prepared = &tables.sql.prepared;
            // In one transaction, which a pooler in transaction mode keeps on one server
            // session: the two land in the same session, or neither does (`PREPARE` itself is
            // not undone by a rollback, so the outcome's goes first). Only the missing ones: a
            // `PREPARE` of a name the session has fails, and would end the transaction.
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let present: Vec<String> = sqlx::query_scalar(
                "SELECT name::text FROM pg_prepared_statements WHERE name IN ($1, $2)",
            )
            .bind(&prepared.outcome)
            .bind(&prepared.claim)
            .fetch_all(&mut *tx)
            .await?;
            for (name, statement) in [
                (&prepared.outcome, &prepared.prepare_outcome),
                (&prepared.claim, &prepared.prepare_claim),
            ] {
                if !present.contains(name) {
                    Self::execute_raw(&mut tx, statement).await?;
                }
            }
            tx.commit().await
        }

        async fn lock_and_read(
            _: &mut PgConnection,
            _: &Tables,
            _: &str,
        ) -> Result<Option<Record>, sqlx::Error> {
            // Claims write their record here (`claim_on_begin` is never `None`).
            Err(sqlx::Error::Protocol(
                "racefree: PostgreSQL claims take no database-wide lock".into(),
            ))
        }

        async fn commit_with_outcome(
            conn: &mut PgConnection,
            tables: &Tables,
            key: &str,
            whole: Option<&str>,
            outcome: &str,
            ttl: Duration,
        ) -> Result<Committed, sqlx::Error> {
            if whole.is_some() {
                // A claim always writes its record here (`claim_on_begin` is never `None`).
                return Err(sqlx::Error::Protocol(
                    "racefree: a PostgreSQL claim without its record".into(),
                ));
            }
            // The outcome's row tells whether it found this transaction's claim: not if the
            // body sent its own `ROLLBACK` or `COMMIT` (the statement then runs in a
            // transaction of its own) or moved the transaction to other tables. `COMMIT AND
            // CHAIN` (one statement where `COMMIT; BEGIN` is two) fails outside a transaction
            // block: after a body's own `ROLLBACK` or `COMMIT` the statements run in one
            // implicit transaction, which that failure rolls back, the expired placeholder
            // with it.
            let sql = format!(
                "EXECUTE {}({}, {}, '{}', '{}'); COMMIT AND CHAIN",
                tables.sql.prepared.outcome,
                text(key),
                text(outcome),
                millis(ttl),
                tables.lock_id(key),
            );
            // The outcome's row (`prepared.outcome`) says whether it updated the claim; none
            // (the key's claim is not this transaction's) or an insert (the key has no claim:
            // an expired placeholder went in) is no claim here.
            let mut updated = false;
            let results = sqlx::Executor::fetch_many(conn, sql.as_str());
            let finished = completed_with(results, drop, |before, row: sqlx::postgres::PgRow| {
                if before == 0 {
                    updated = row.try_get::<bool, _>(0).unwrap_or(false);
                }
            })
            .await;
            if !updated && finished.0 >= 1 {
                // Whatever became of `COMMIT`: no outcome of the store's was in it (at most
                // the expired placeholder, which counts as no record).
                return Err(sqlx::Error::Protocol(NO_CLAIM.into()));
            }
            commit_of(2, finished)
        }

        async fn limit_lock_wait(
            conn: &mut PgConnection,
            wait: Duration,
        ) -> Result<(), sqlx::Error> {
            sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                .bind(format!("{}ms", lock_timeout_ms(wait)))
                .execute(conn)
                .await
                .map(drop)
        }

        async fn claim(
            conn: &mut PgConnection,
            tables: &Tables,
            key: &str,
            fingerprint: &str,
            lock: i64,
        ) -> Result<Claimed, sqlx::Error> {
            let mark = claim_mark(conn);
            let row = sqlx::query(&tables.sql.claim)
                .bind(key)
                .bind(fingerprint)
                .bind(lock)
                .bind(mark)
                .fetch_one(conn)
                .await?;
            let fingerprint: Option<String> = row.get(2);
            Ok(Claimed {
                locked: row.get(0),
                inserted: row.get(1),
                record: fingerprint.map(|fingerprint| Record {
                    fingerprint,
                    outcome: row.get(3),
                    expired: row.get::<Option<bool>, _>(4).unwrap_or(false),
                }),
            })
        }

        async fn wait_unlocked(
            pool: &Pool<Self>,
            lock: i64,
            wait: Option<Duration>,
        ) -> Result<(), sqlx::Error> {
            // Shared: every waiter gets through at once when the owner's transaction ends.
            let mut tx = pool.begin().await?;
            if let Some(wait) = wait {
                Self::limit_lock_wait(&mut tx, wait).await?;
            }
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                .bind(lock)
                .execute(&mut *tx)
                .await?;
            tx.rollback().await
        }

        same_steps!(PgConnection);
    }

    /// The outcome's write on the key's claim in flight (`key` $1, `outcome` $2; `ttl_ms` and
    /// `mark` the expressions of the TTL in milliseconds and of the mark's name): found by the
    /// `ctid` and `xmin` the claim left in its mark ([`claim_mark`], [`MARK_OF_ROW`]), with
    /// the key checked on that row, and only if that finds nothing (the body reset its
    /// settings, a trigger of the user's updated the row since) by key; the by-key `UPDATE`
    /// is gated on the first, so on the usual path it never runs and takes no predicate lock.
    /// By key it writes only a row this transaction itself wrote at its top level (`xmin` is
    /// its xid; in a savepoint, where the claim's `xmin` is the savepoint's, it finds none and
    /// the call rolls back): after a body's own `ROLLBACK` (the statement then runs on its
    /// own, with no xid) or `ROLLBACK TO SAVEPOINT`, the key's next claim may be another
    /// caller's, committed by its own body, and this outcome must not land on it. Its row
    /// count (the `SELECT`'s) is the rows written: 0 only if no claim of the key in flight is
    /// this call's to complete.
    fn outcome_update(idem: &str, ttl_ms: &str, mark: &str) -> String {
        let set = format!(
            "UPDATE {idem} SET outcome = $2::jsonb, \
             expires_at = clock_timestamp() + {ttl_ms} * interval '1 millisecond'"
        );
        let in_flight = "key = $1 AND outcome IS NULL AND expires_at = 'infinity'";
        let part = |n| format!("split_part(current_setting({mark}, true), ' ', {n})");
        by_row_then_key(
            &set,
            &format!(
                "ctid = NULLIF({}, '')::tid AND xmin::text = {} AND {in_flight}",
                part(1),
                part(2)
            ),
            &format!(
                "{in_flight} AND txid_current_if_assigned() IS NOT NULL \
                 AND xmin = (txid_current_if_assigned() % 4294967296)::text::xid"
            ),
        )
    }

    /// `update` (an `UPDATE … SET …` without its `WHERE`) of the row `by_row` finds (by
    /// `ctid`, which reads no index), and only if that wrote nothing, of the row `by_key`
    /// finds (through an index): the by-key `UPDATE` is gated on the first by a
    /// pseudo-constant, so on the usual path its scan never runs and takes no predicate lock
    /// under `SERIALIZABLE`. The `SELECT`'s row count is the rows written.
    fn by_row_then_key(update: &str, by_row: &str, by_key: &str) -> String {
        format!(
            "WITH by_row AS ({update} WHERE {by_row} RETURNING 1), \
                  by_key AS ({update} WHERE {by_key} AND NOT EXISTS (SELECT 1 FROM by_row) \
                             RETURNING 1) \
             SELECT 1 FROM by_row UNION ALL SELECT 1 FROM by_key"
        )
    }

    /// The session setting (`racefree.claim<depth>`) a claim that read first (the `claim`
    /// statement, `replace_expired`; the one-trip claim needs none) at `conn`'s transaction
    /// depth leaves the `ctid` and `xmin` of its in-flight record in, for the outcome's
    /// `UPDATE` to find that row without reading the key's index: under `SERIALIZABLE` such a read locks the index page (a predicate
    /// lock), and concurrent first executions of other keys on that page then fail each
    /// other at `COMMIT` (most of 40 did, measured). One setting per depth, since a body
    /// may run a guarded call of its own in a savepoint of the same transaction. A session
    /// setting, not a transaction-local one: it survives a body's own `COMMIT`, after which
    /// the outcome still lands on the claim that `COMMIT` made visible (in the same server
    /// session: behind a pooler in transaction mode the next statement may run in another,
    /// and then finds nothing); a rolled-back claim puts back the value it replaced (an
    /// earlier call's). The `UPDATE` checks the row's `xmin` and key, in flight, so a stale or
    /// foreign value (an earlier call's, a pooler's shared session, a slot `VACUUM` gave to
    /// another claim) finds no other record; when the mark finds nothing it falls back to the
    /// key, but only for a row this transaction wrote ([`outcome_update`]).
    pub(super) fn claim_mark(conn: &PgConnection) -> Option<String> {
        use sqlx::TransactionManager;
        let depth = sqlx::postgres::PgTransactionManager::get_transaction_depth(conn);
        Some(format!("racefree.claim{depth}"))
    }

    /// `wait` as `lock_timeout` milliseconds: at least 1 (0 would mean no limit), at most
    /// what the setting holds.
    fn lock_timeout_ms(wait: Duration) -> u128 {
        wait.as_millis().clamp(1, i32::MAX as u128)
    }

    /// `value` as a PostgreSQL `text` expression, for an argument of `EXECUTE` in a simple
    /// query: dollar-quoted (`$rf$…$rf$`), where no escape is processed whatever the
    /// session's `standard_conforming_strings` or `backslash_quote` say, and `$` is never the
    /// second byte of a character in any client encoding. Only `$rf` in the value could end
    /// the literal early (`…$rf` followed by the closing `$rf$` too), and a NUL byte would end
    /// the query: such a value goes as its UTF-8 bytes in hex, decoded by the server, which
    /// nothing can end. (A literal costs the server less than the decoding: about 40 µs per
    /// first execution, measured.)
    fn text(value: &str) -> String {
        use std::fmt::Write;
        if !value.contains("$rf") && !value.contains('\0') {
            return format!("$rf${value}$rf$");
        }
        let mut out = String::with_capacity(2 * value.len() + 40);
        out.push_str("convert_from(decode('");
        for byte in value.bytes() {
            let _ = write!(out, "{byte:02x}");
        }
        out.push_str("', 'hex'), 'UTF8')");
        out
    }

    fn statements(idem: &str, seq: &str) -> Statements {
        Statements {
            read_record: format!(
                "SELECT fingerprint, outcome::text, expires_at <= clock_timestamp() \
                 FROM {idem} WHERE key = $1"
            ),
            // One round trip for the in-flight lock, the insert and the record. The lock CTE
            // is volatile, so it runs once; the insert runs only if the lock was free, so a
            // claim never waits on another transaction's uncommitted row. The outer SELECT
            // reads the table as it was before this statement: a record it shows is
            // committed, and after an insert it shows none.
            //
            // The insert leaves its row's `ctid` and `xmin` in the claim's mark ($4,
            // `claim_mark`), and
            // the record is read only when nothing was inserted (the pseudo-constant condition
            // gates the index scan, which then never runs): a read of the key's index takes a
            // predicate lock on its page, which under `SERIALIZABLE` makes concurrent claims
            // of other keys on that page fail each other.
            claim: format!(
                "WITH lock AS (SELECT pg_try_advisory_xact_lock($3) AS held), \
                      claim AS (INSERT INTO {idem} (key, fingerprint, expires_at) \
                                SELECT $1, $2, 'infinity'::timestamptz FROM lock WHERE held \
                                ON CONFLICT (key) DO NOTHING RETURNING {MARK_OF_ROW}), \
                      mark AS (SELECT set_config($4, mark, false) FROM claim) \
                 SELECT lock.held, EXISTS (SELECT 1 FROM mark), \
                        r.fingerprint, r.outcome, r.expired \
                 FROM lock LEFT JOIN LATERAL ( \
                      SELECT fingerprint, outcome::text, expires_at <= clock_timestamp() AS expired \
                      FROM {idem} WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM mark)) r ON true"
            ),
            replace_expired: format!(
                "WITH replaced AS (UPDATE {idem} SET fingerprint = $2, outcome = NULL, \
                                   created_at = clock_timestamp(), expires_at = 'infinity' \
                                   WHERE key = $1 AND expires_at <= clock_timestamp() \
                                   RETURNING {MARK_OF_ROW}) \
                 SELECT set_config($3, mark, false) FROM replaced"
            ),
            // Only the key's claim in flight (no outcome, no expiry): after a body's own
            // `ROLLBACK` the statement runs outside the transaction, where the key may have
            // another caller's record, which it must not touch (`outcome_update`).
            store_outcome: outcome_update(idem, "$3::float8", "$4"),
            // SKIP LOCKED: a record being replaced by a claim in flight is not waited for
            // (and is not expired once that claim commits).
            purge_expired: format!(
                "DELETE FROM {idem} WHERE key IN (SELECT key FROM {idem} \
                 WHERE expires_at <= clock_timestamp() FOR UPDATE SKIP LOCKED)"
            ),
            // The holding marks its transaction (a first number's `set_next` checks the mark).
            bump: format!(
                "{}, set_config('{HOLDING}', 'held', true)",
                bump_sql(seq, "ctid::text")
            ),
            // Only in the bump's transaction (its mark), on the counter as the bump left it:
            // the row the bump named ($5), and only if that finds nothing (a trigger of the
            // user's updated the row since) through the key's index.
            set_next: {
                let left = format!(
                    "name = $1 AND key = $2 AND next IS NOT DISTINCT FROM $4 \
                     AND current_setting('{HOLDING}', true) = 'held'"
                );
                by_row_then_key(
                    &format!("UPDATE {seq} SET next = $3"),
                    &format!("ctid = $5::tid AND {left}"),
                    &left,
                )
            },
            read_next: format!("SELECT next FROM {seq} WHERE name = $1 AND key = $2"),
            commit_outcome: String::new(),
            commit_record: String::new(),
            lock_and_read: String::new(),
            read_settled: format!(
                "SELECT fingerprint = $2 AND outcome = $3::jsonb, expires_at <= clock_timestamp() \
                 FROM {idem} WHERE key = $1"
            ),
            // The claim with `BEGIN`: no `ON CONFLICT`, so a record of the key fails the
            // insert (23505); a lock another transaction holds makes `expires_at` NULL, which
            // fails it too (23502) before the key's index is looked at, so it never waits on
            // another claim.
            //
            // The outcome with `COMMIT`: an `INSERT … ON CONFLICT (key) DO UPDATE` that updates
            // only the key's claim in flight written by this very transaction (its `xmin`).
            // Its conflict check reads the key's index with a dirty snapshot, which takes no
            // predicate lock (an `UPDATE … WHERE key` would lock the index page under
            // `SERIALIZABLE`, where first executions of other keys insert, and most of 40 such
            // calls failed each other at `COMMIT`), and the claim needs to leave nothing
            // behind to be found by. `RETURNING` tells an update from an insert: with no
            // claim of the key (the body rolled it back), an expired placeholder goes in
            // (fingerprint '', `-infinity`), which every claim treats as no record and the
            // purge deletes (it stays only where the body began a transaction of its own
            // after its `ROLLBACK`, which the `COMMIT AND CHAIN` then commits; otherwise that
            // `COMMIT AND CHAIN` fails outside a transaction block and takes the placeholder
            // with it). The row goes in only under the key's in-flight lock ($4, this
            // transaction's own while its claim stands), so after a body's own `ROLLBACK` it
            // never waits on another caller's claim in flight: it then writes nothing. After a
            // body's own `COMMIT` the claim is another transaction's, so nothing is stored:
            // the call is `OutcomeUnknown`.
            prepared: Prepared::new(
                &format!(
                    "(text, text, bigint) AS \
                     WITH lock AS (SELECT pg_try_advisory_xact_lock($3) AS held) \
                     INSERT INTO {idem} (key, fingerprint, expires_at) \
                     SELECT $1, $2, CASE WHEN held THEN 'infinity'::timestamptz END FROM lock"
                ),
                &format!(
                    "(text, text, float8, bigint) AS \
                     INSERT INTO {idem} AS r (key, fingerprint, expires_at) \
                     SELECT $1, '', '-infinity' WHERE pg_try_advisory_xact_lock($4) \
                     ON CONFLICT (key) DO UPDATE \
                     SET outcome = $2::jsonb, \
                     expires_at = clock_timestamp() + $3 * interval '1 millisecond' \
                     WHERE r.outcome IS NULL AND r.expires_at = 'infinity' \
                     AND r.xmin = (txid_current_if_assigned() % 4294967296)::text::xid \
                     RETURNING r.xmax <> 0 AS updated"
                ),
            ),
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::backends::sql::transaction::Owned;
    use sqlx::{Sqlite, SqliteConnection};

    /// No mark: the write lock is the claim, and SQLite takes no predicate locks.
    fn claim_mark(_: &SqliteConnection) -> Option<String> {
        None
    }

    /// SQLite's clock in Unix milliseconds (`julianday` works on every SQLite version).
    const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
    /// "Never expires" for an in-flight record (`i64::MAX`).
    const NEVER: i64 = i64::MAX;
    /// The savepoint a claim's (or a holding's) first statement opens in the store's own
    /// transaction, released first by its commit.
    const CLAIM_SAVEPOINT: &str = "racefree_claim";

    impl Dialect for Sqlite {
        const STORE_NAME: &'static str = "sqlite";

        fn statements(idempotency: &str, sequences: &str) -> Statements {
            statements(idempotency, sequences)
        }

        fn schema(tables: &Tables) -> String {
            format!(
                "CREATE TABLE IF NOT EXISTS {idem} (\n    \
                     key         TEXT    PRIMARY KEY NOT NULL,\n    \
                     fingerprint TEXT    NOT NULL,\n    \
                     outcome     TEXT,\n    \
                     created_at  INTEGER NOT NULL,\n    \
                     expires_at  INTEGER NOT NULL\n\
                 );\n\
                 CREATE INDEX IF NOT EXISTS {idem_name}_expires_at ON {idem} (expires_at);\n\
                 CREATE TABLE IF NOT EXISTS {seq} (\n    \
                     name     TEXT    NOT NULL,\n    \
                     key      TEXT    NOT NULL,\n    \
                     next     INTEGER,\n    \
                     holdings INTEGER NOT NULL,\n    \
                     PRIMARY KEY (name, key)\n\
                 );\n",
                idem = tables.idempotency,
                idem_name = tables.unqualified(&tables.idempotency),
                seq = tables.sequences,
            )
        }

        async fn migrate(pool: &Pool<Self>, tables: &Tables) -> Result<(), sqlx::Error> {
            // The write lock first: concurrent migrations take turns instead of failing to
            // upgrade a read lock. Dropped part way, the transaction never stays open on a
            // pooled connection (`begin_writing_from`).
            let mut tx = Owned::<Self>::begin_writing_from(pool).await?;
            for statement in statements_of(&Self::schema(tables)) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        }

        const BEGIN: Option<&'static str> = Some("BEGIN IMMEDIATE");

        fn holding_begin(_: Option<Duration>) -> Option<String> {
            None
        }

        async fn commit_holding(conn: &mut SqliteConnection) -> Result<Committed, sqlx::Error> {
            let sql = format!("RELEASE {CLAIM_SAVEPOINT}; COMMIT; BEGIN");
            commit_of(
                2,
                completed(sqlx::Executor::fetch_many(conn, sql.as_str())).await,
            )
        }

        const CLAIMS_FIRST: bool = false;

        fn claim_on_begin(_: &Tables, _: &str, _: &str, _: i64) -> Option<String> {
            // A statement after `BEGIN IMMEDIATE` is a hand-off to the connection's thread,
            // cheaper than compiling a statement with its values written in on every call.
            None
        }

        fn refused_claim(_: &sqlx::Error) -> bool {
            false
        }

        fn unprepared(_: &sqlx::Error) -> bool {
            false
        }

        async fn prepare(_: &mut SqliteConnection, _: &Tables) -> Result<(), sqlx::Error> {
            Ok(())
        }

        async fn lock_and_read(
            conn: &mut SqliteConnection,
            tables: &Tables,
            key: &str,
        ) -> Result<Option<Record>, sqlx::Error> {
            // A write statement takes the write lock as it starts, matched rows or not; a
            // live record is rewritten as it was, and returned.
            let row = sqlx::query(&tables.sql.lock_and_read)
                .bind(key)
                .fetch_optional(conn)
                .await?;
            Ok(row.map(|row| Record {
                fingerprint: sqlx::Row::get(&row, 0),
                outcome: sqlx::Row::get(&row, 1),
                expired: false,
            }))
        }

        async fn commit_with_outcome(
            conn: &mut SqliteConnection,
            tables: &Tables,
            key: &str,
            whole: Option<&str>,
            outcome: &str,
            ttl: Duration,
        ) -> Result<Committed, sqlx::Error> {
            // One prepared query of three statements (sqlx caches all three compiled).
            let query = match whole {
                Some(fingerprint) => sqlx::query(&tables.sql.commit_record)
                    .bind(key)
                    .bind(outcome)
                    .bind(millis(ttl))
                    .bind(fingerprint),
                None => sqlx::query(&tables.sql.commit_outcome)
                    .bind(key)
                    .bind(outcome)
                    .bind(millis(ttl)),
            };
            // The savepoint's `RELEASE`, the record, then `COMMIT`.
            commit_of(3, completed(sqlx::Executor::fetch_many(conn, query)).await)
        }

        async fn limit_lock_wait(_: &mut SqliteConnection, _: Duration) -> Result<(), sqlx::Error> {
            // No lock wait of its own to bound: the wait for the write lock is `busy_timeout`.
            Ok(())
        }

        async fn claim(
            conn: &mut SqliteConnection,
            tables: &Tables,
            key: &str,
            fingerprint: &str,
            _: i64,
        ) -> Result<Claimed, sqlx::Error> {
            // `BEGIN IMMEDIATE` holds the database's write lock: no other claim is in flight.
            let inserted = sqlx::query(&tables.sql.claim)
                .bind(key)
                .bind(fingerprint)
                .fetch_optional(&mut *conn)
                .await?
                .is_some();
            let record = match inserted {
                true => None,
                false => Self::read_record(conn, tables, key).await?,
            };
            Ok(Claimed {
                locked: true,
                inserted,
                record,
            })
        }

        async fn wait_unlocked(
            _: &Pool<Self>,
            _: i64,
            _: Option<Duration>,
        ) -> Result<(), sqlx::Error> {
            Ok(())
        }

        same_steps!(SqliteConnection);
    }

    fn statements(idem: &str, seq: &str) -> Statements {
        Statements {
            read_record: format!(
                "SELECT fingerprint, outcome, expires_at <= {NOW_MS} FROM {idem} WHERE key = $1"
            ),
            claim: format!(
                "INSERT INTO {idem} (key, fingerprint, created_at, expires_at) \
                 VALUES ($1, $2, {NOW_MS}, {NEVER}) ON CONFLICT (key) DO NOTHING RETURNING 1"
            ),
            replace_expired: format!(
                "UPDATE {idem} SET fingerprint = $2, outcome = NULL, created_at = {NOW_MS}, \
                 expires_at = {NEVER} WHERE key = $1 AND expires_at <= {NOW_MS}"
            ),
            // Only the key's claim in flight (see PostgreSQL's).
            store_outcome: format!(
                "UPDATE {idem} SET outcome = $2, expires_at = {NOW_MS} + $3 \
                 WHERE key = $1 AND outcome IS NULL AND expires_at = {NEVER}"
            ),
            purge_expired: format!("DELETE FROM {idem} WHERE expires_at <= {NOW_MS}"),
            // The holding opens the savepoint its commit releases first: a body that ended the
            // transaction (even with a `BEGIN` after it) makes the commit fail.
            bump: format!("SAVEPOINT {CLAIM_SAVEPOINT}; {}", bump_sql(seq, "NULL")),
            // Only in the bump's transaction: its savepoint is released and opened again
            // first (a body that ended the transaction makes the `RELEASE` fail).
            set_next: format!(
                "RELEASE {CLAIM_SAVEPOINT}; SAVEPOINT {CLAIM_SAVEPOINT}; \
                 UPDATE {seq} SET next = $3 WHERE name = $1 AND key = $2 AND next IS $4"
            ),
            read_next: format!("SELECT next FROM {seq} WHERE name = $1 AND key = $2"),
            // Each releases the claim's savepoint first: if the body ended the transaction,
            // that fails and nothing is written. (`commit_record` follows `lock_and_read`,
            // which opens it; `commit_outcome`, for a claim that wrote an in-flight record in
            // the store's own transaction, has no caller on SQLite.)
            commit_outcome: format!(
                "RELEASE {CLAIM_SAVEPOINT}; \
                 UPDATE {idem} SET outcome = $2, expires_at = {NOW_MS} + $3 \
                 WHERE key = $1 AND outcome IS NULL AND expires_at = {NEVER}; \
                 COMMIT; BEGIN"
            ),
            commit_record: format!(
                "RELEASE {CLAIM_SAVEPOINT}; \
                 INSERT INTO {idem} (key, fingerprint, outcome, created_at, expires_at) \
                 VALUES ($1, $4, $2, {NOW_MS}, {NOW_MS} + $3) \
                 ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 outcome = excluded.outcome, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at; \
                 COMMIT; BEGIN"
            ),
            read_settled: format!(
                "SELECT fingerprint = $2 AND outcome = $3, expires_at <= {NOW_MS} \
                 FROM {idem} WHERE key = $1"
            ),
            // The savepoint the commit releases first (`commit_record`), opened in the same
            // query (no hand-off of its own).
            lock_and_read: format!(
                "SAVEPOINT {CLAIM_SAVEPOINT}; \
                 UPDATE {idem} SET outcome = outcome WHERE key = $1 AND expires_at > {NOW_MS} \
                 RETURNING fingerprint, outcome"
            ),
            prepared: Prepared::default(),
        }
    }
}
