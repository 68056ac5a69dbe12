//! `#[idempotent]` on a SQL store: claim, body, outcome and `COMMIT` in one transaction.
//!
//! # Protocol
//! 1. **replay without a transaction**: check a connection out of the pool and `SELECT` the
//!    key's record on it. Committed, unexpired, same fingerprint → replay its outcome;
//!    another fingerprint → `Conflict`. (Committed records are final until they expire, so
//!    reading them unlocked is safe: one round trip.) On PostgreSQL only a key this store
//!    answered or completed lately (a retry, likely to replay; [`Recent`]) is read first; any
//!    other key (most calls are first executions) skips this read and claims at once, and a
//!    committed record refuses the claim. On SQLite every key is read first: the claim takes
//!    the database's one write lock, which a replay must not wait for.
//! 2. **claim**: open the transaction on the connection and claim in it. The usual
//!    case costs one round trip on PostgreSQL: `BEGIN` is sent with the claim's insert
//!    ([`Dialect::claim_on_begin`]), which takes the key's in-flight lock
//!    (`pg_try_advisory_xact_lock(hash(table, key))`, answered at once) and inserts the
//!    in-flight record, and *fails* if the lock is held or the key has a record. Only then is
//!    the insert rolled back, with a fresh `BEGIN` in the same round trip (separately on a
//!    pooler that loses prepared statements), and the claim that reads why
//!    ([`Dialect::claim`]) sent: it takes the lock and, only if it was free, runs
//!    `INSERT … ON CONFLICT (key) DO NOTHING RETURNING`, returning the committed record
//!    beside the result.
//!    Inserted → the caller executes, holding the transaction. Not inserted → a committed
//!    record exists: replay / `Conflict` as in 1, or, if it has expired, `UPDATE` it into this
//!    caller's claim (only while still expired) and execute. On SQLite the database's write
//!    lock *is* the claim (nobody else writes until the transaction ends), taken in a plain
//!    `BEGIN` by the claim's first statement ([`Dialect::lock_and_read`]): the record is read
//!    again under it (a record committed since step 1 answers), and none is
//!    written until step 4 writes it whole, over an expired one. In a caller's transaction
//!    ([`SqlStore::within`]), which may not hold the write lock, the claim inserts its
//!    in-flight record as on PostgreSQL.
//! 3. **in flight** (PostgreSQL, the lock was taken): [`Claim::InFlight`]. `in_flight =
//!    "reject"` answers `InProgress` now; otherwise [`wait`](IdempotencyBackend::wait) takes
//!    the lock *shared* (every waiter passes together when the owner's transaction ends),
//!    bounded by `lock_timeout` from the call's deadline, and the caller claims again: step 1
//!    then replays the owner's committed outcome, or, if the owner rolled back, one caller wins
//!    the claim.
//! 4. **complete**: write the outcome (versioned JSON) and its `expires_at` on the claim's
//!    record (on PostgreSQL an `INSERT … ON CONFLICT DO UPDATE` of the transaction's own
//!    claim, or an `UPDATE` of the row a claim that read first named; on SQLite, write the
//!    record), and `COMMIT`, in one round trip
//!    ([`Dialect::commit_with_outcome`]): the
//!    effect and the record become visible at once. If the connection is lost with the
//!    answer, the store waits (a few seconds at most) for the key's in-flight lock, which the
//!    lost transaction holds until it ends, and reads the record: its outcome → `Ok`; none →
//!    `StoreUnavailable` (rolled back); otherwise, or if that cannot be read,
//!    `OutcomeUnknown`.
//! 5. **release** (an `Err` not stored, a panic, a dropped future): drop the transaction;
//!    sqlx rolls it back before the connection is reused, and a crashed process's
//!    transaction is rolled back by the server. The claim never existed for anyone else.
//!
//! The primary key is the integrity guarantee (two claims of one key can never both commit);
//! the advisory lock only lets PostgreSQL say "in flight" without waiting (and keeps a claim
//! from queueing on another transaction's uncommitted insert). The in-flight row is never
//! visible to others: nothing can find a claim "running" after its owner is gone, so there
//! are no lease timers.
//!
//! Round trips (PostgreSQL), on one checkout: first execution 2 + the body's own (`BEGIN` with
//! the claim, … , outcome with `COMMIT`), or 3 + the body's own for a key this store saw lately
//! (the read first); replay of a key this store saw lately 1 (the read); replay of any other
//! key 3 (the refused claim, `ROLLBACK` with `BEGIN`, the claim that reads the record). A pool
//! with `test_before_acquire` (sqlx's default) adds a ping per checkout, as it does to a bare
//! transaction, and sqlx pings again (in the background) when the connection goes back to the
//! pool: that ping also carries the `ROLLBACK` of the empty transaction the commit leaves open
//! (see `transaction.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::Pool;

use super::dialect::{self, Dialect, Record, Settled};
use super::error::Failure;
use super::transaction::{Began, Owned, StoreTx};
use super::{InTransaction, SqlStore, Tables, Tx};
use crate::idempotent::{Claim, Fingerprint, IdempotencyBackend, IdempotencyError, RecordKey};

/// The longest record key (function, scope and client key) accepted, in bytes: PostgreSQL's
/// B-tree rows hold about 2.7 kB.
const MAX_KEY: usize = 2048;

/// The version of the outcome encoding: `{"v": 1, "value": <the outcome as JSON>}`.
const FORMAT: u32 = 1;

#[derive(Serialize)]
struct Stored<'a, T> {
    v: u32,
    value: &'a T,
}

#[derive(Deserialize)]
struct Version {
    v: u32,
}

#[derive(Deserialize)]
struct Decoded<T> {
    v: u32,
    value: T,
}

/// The claim of one key of a SQL store: the open transaction the body writes in, and the key
/// (`None` for a call without a key, which gets a plain transaction). Completing it writes the
/// outcome and commits; dropping it rolls back. `'c` is `'static` for the store's own
/// transactions and the caller's connection for [`SqlStore::within`] (then the transaction is
/// a savepoint, and the caller's `COMMIT` is what makes it durable).
pub struct SqlIdempotencyLease<'c, D: Dialect> {
    tx: StoreTx<'c, D>,
    key: Option<RecordKey>,
    caller_commits: bool,
    /// The request's fingerprint (empty for a call without a key).
    fingerprint: String,
    /// The claim wrote its in-flight record. Not when the transaction's write lock already
    /// excludes every other claim (SQLite's, taken by the claim's first statement): the
    /// completion then writes the record whole, one write instead of two.
    recorded: bool,
}

impl<'c, D: Dialect> SqlIdempotencyLease<'c, D> {
    /// The claim of `key` by a request with `fingerprint`, in `tx`; `recorded`: the claim
    /// wrote the key's in-flight record.
    fn claimed(
        tx: StoreTx<'c, D>,
        key: &RecordKey,
        fingerprint: String,
        caller_commits: bool,
        recorded: bool,
    ) -> Self {
        SqlIdempotencyLease {
            tx,
            key: Some(key.clone()),
            caller_commits,
            fingerprint,
            recorded,
        }
    }

    /// The transaction's connection, for the body's statements.
    pub fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }

    /// The transaction as a [`Tx`].
    pub fn tx(&mut self) -> Tx<'_, D> {
        Tx::of(self)
    }
}

impl<D: Dialect> InTransaction<D> for SqlIdempotencyLease<'_, D> {
    fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }
}

impl<D: Dialect> std::fmt::Debug for SqlIdempotencyLease<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlIdempotencyLease")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Keys a store answered (replay, conflict, in flight), failed to claim (a store error) or
/// completed lately, by their lock number: on PostgreSQL a claim of one of them reads the
/// record first, because it is likely a retry that one read answers; a claim of any other key
/// (most are first executions) claims at once, which saves that read. Only the order of the
/// two steps depends on it, not an answer (on a database that takes writes; a read-only one
/// replays only what is read first): a key missing here (never seen, or pushed out) that has
/// a live record costs two more round trips (and its refused claim an `ERROR` line in the
/// server log), and a key that is here but has no live record costs one. Each store has its
/// own: a store made per request never reads first. Unused on SQLite (always reads first).
///
/// A direct-mapped table of [`RECENT`] numbers (8 bytes each, made on first use), written and
/// read with plain atomic stores and loads: a key pushes out whichever earlier key shares its
/// slot, so it holds up to that many.
pub(super) struct Recent {
    slots: OnceLock<Box<[AtomicU64]>>,
}

/// How many keys [`Recent`] remembers at most (a power of two).
const RECENT: usize = 4096;

impl Recent {
    pub(super) const fn new() -> Recent {
        Recent {
            slots: OnceLock::new(),
        }
    }

    fn slot(&self, lock: i64) -> &AtomicU64 {
        let slots = self
            .slots
            .get_or_init(|| (0..RECENT).map(|_| AtomicU64::new(0)).collect());
        // The lock number is a hash (xxh3): its low bits spread keys evenly.
        &slots[lock as u64 as usize & (RECENT - 1)]
    }

    fn saw(&self, lock: i64) {
        self.slot(lock).store(lock as u64, Relaxed);
    }

    fn seen(&self, lock: i64) -> bool {
        // 0 is an empty slot; a key whose lock number is 0 is simply never "seen".
        lock != 0 && self.slot(lock).load(Relaxed) == lock as u64
    }
}

fn unavailable(error: sqlx::Error) -> IdempotencyError {
    Failure::of(error).unavailable()
}

/// What a committed, unexpired record answers to a claim with `fingerprint`.
fn answer<T: DeserializeOwned>(
    key: &RecordKey,
    fingerprint: &str,
    record: Record,
) -> Result<T, IdempotencyError> {
    let client_key = || key.client_key().to_owned();
    if record.fingerprint != fingerprint {
        return Err(IdempotencyError::Conflict { key: client_key() });
    }
    let undecodable = |reason: String| IdempotencyError::Undecodable {
        key: client_key(),
        reason,
    };
    let text = record
        .outcome
        .ok_or_else(|| undecodable("the record has no outcome".into()))?;
    // One parse when the record is what this version wrote.
    match serde_json::from_str::<Decoded<T>>(&text) {
        Ok(decoded) if decoded.v == FORMAT => Ok(decoded.value),
        // Not what this version wrote: the version, read on its own, says why.
        decoded => {
            let version: Version = serde_json::from_str(&text)
                .map_err(|e| undecodable(format!("not a versioned outcome: {e}")))?;
            if version.v != FORMAT {
                return Err(undecodable(format!(
                    "outcome format {} (this version reads {FORMAT})",
                    version.v
                )));
            }
            Err(undecodable(
                decoded.err().map(|e| e.to_string()).unwrap_or_default(),
            ))
        }
    }
}

/// The outcome as its record stores it, or why it cannot be stored: it does not encode, its
/// JSON does not decode back (a replay would be `Undecodable`), or the database cannot hold it
/// ([`Dialect::unstorable`]). Refused before anything is sent, so the call rolls back and
/// says why, instead of committing an effect whose outcome no replay can return.
fn encode<D: Dialect, T: Serialize + DeserializeOwned>(outcome: &T) -> Result<String, String> {
    let encoded = serde_json::to_string(&Stored {
        v: FORMAT,
        value: outcome,
    })
    .map_err(|e| format!("the outcome cannot be encoded as JSON: {e}"))?;
    if let Err(error) = serde_json::from_str::<Decoded<T>>(&encoded) {
        return Err(super::super::not_replayable(&error));
    }
    match D::unstorable(&encoded) {
        Some(reason) => Err(reason.to_owned()),
        None => Ok(encoded),
    }
}

fn check_len(key: &RecordKey) -> Result<(), IdempotencyError> {
    match key.as_str().len() {
        len if len > MAX_KEY => Err(IdempotencyError::KeyTooLong { len, max: MAX_KEY }),
        _ => Ok(()),
    }
}

/// Steps 2–3 of the protocol in an open transaction `tx`: the claim statement (in-flight
/// lock and insert), then the committed record's answer, or the replacement of an expired one.
/// `lock` is the key's lock number (`Tables::lock_id`).
async fn claim_in<'c, D: Dialect, T: DeserializeOwned>(
    mut tx: StoreTx<'c, D>,
    tables: &Tables,
    key: &RecordKey,
    lock: i64,
    fingerprint: &str,
    caller_commits: bool,
) -> Result<Claim<T, SqlIdempotencyLease<'c, D>, i64>, IdempotencyError> {
    let lease = |tx| {
        Claim::Execute(SqlIdempotencyLease::claimed(
            tx,
            key,
            fingerprint.to_owned(),
            caller_commits,
            true,
        ))
    };
    // Under the key's lock nobody else claims it, but a purge may delete an expired record
    // between two statements, or a record may commit after the claim's snapshot: claim again.
    for _ in 0..3 {
        let claimed = D::claim(&mut tx, tables, key.as_str(), fingerprint, lock)
            .await
            .map_err(unavailable)?;
        if claimed.inserted {
            return Ok(lease(tx));
        }
        let replaced = match claimed.record {
            // Committed and final until it expires: whoever holds the lock will find it too.
            // Dropping `tx` rolls back a transaction (or savepoint) that wrote nothing.
            Some(record) if !record.expired => {
                return answer(key, fingerprint, record).map(Claim::Replay)
            }
            _ if !claimed.locked => return Ok(Claim::InFlight(lock)),
            Some(_expired) => D::replace_expired(&mut tx, tables, key.as_str(), fingerprint)
                .await
                .map_err(unavailable)?,
            None => false,
        };
        if replaced {
            return Ok(lease(tx));
        }
    }
    Err(IdempotencyError::StoreUnavailable {
        reason: "the record kept changing under the claim (a concurrent purge?)".into(),
    })
}

/// Whether the store's own transaction that wrote `encoded` for `key` (request
/// `fingerprint`) committed, after the connection was lost with the answer to its `COMMIT`
/// (sent at `sent`): `None` if that cannot be told.
///
/// The lost transaction holds the key's in-flight lock until it ends, so once the lock is
/// free (waited for at most [`SETTLE_WAIT`]) a read shows its fate. The database compares
/// (`jsonb` does not keep the text it was given):
/// - an unexpired record of this fingerprint with this outcome → committed (or a duplicate of
///   the same request committed the same outcome since: the caller's answer is the same);
/// - such a record, expired → `None`: it may be an older one this call was replacing;
/// - no record, or another one → not committed, if this call's record could not have expired
///   and been purged or replaced since (more than a second of its TTL left); else `None`.
async fn settle<D: Dialect>(
    pool: &Pool<D>,
    tables: &Tables,
    key: &RecordKey,
    fingerprint: &str,
    encoded: &str,
    sent: Instant,
    ttl: Duration,
) -> Option<bool> {
    const SETTLE_WAIT: Duration = Duration::from_secs(5);
    let lock = tables.lock_id(key.as_str());
    D::wait_unlocked(pool, lock, Some(SETTLE_WAIT)).await.ok()?;
    let mut connection = pool.acquire().await.ok()?;
    let found = D::read_settled(&mut connection, tables, key.as_str(), fingerprint, encoded)
        .await
        .ok()?;
    let fresh = sent.elapsed() + Duration::from_secs(1) < ttl;
    match found {
        Some(Settled {
            ours: true,
            expired: false,
        }) => Some(true),
        Some(Settled {
            ours: true,
            expired: true,
        }) => None,
        _ if fresh => Some(false),
        _ => None,
    }
}

/// Step 4: the outcome, then `COMMIT` (or, in the caller's transaction, `RELEASE SAVEPOINT`).
/// `pool` (the store's own transactions) settles a commit whose answer was lost.
async fn complete_in<D: Dialect, T: Serialize + DeserializeOwned>(
    lease: SqlIdempotencyLease<'_, D>,
    tables: &Tables,
    pool: Option<&Pool<D>>,
    outcome: &T,
    ttl: Duration,
) -> Result<(), IdempotencyError> {
    let SqlIdempotencyLease {
        tx,
        key,
        caller_commits,
        fingerprint,
        recorded,
    } = lease;
    let client_key = key.as_ref().map_or("", RecordKey::client_key).to_owned();
    let committed = |result: Result<(), sqlx::Error>| {
        result.map_err(|e| match caller_commits {
            // Nothing is durable before the caller's own COMMIT: a lost answer is no worse,
            // unless the body ended the caller's transaction.
            true => Failure::of(e).or_unknown(&client_key, Failure::unavailable),
            false => Failure::of(e).at_commit(&client_key),
        })
    };
    let Some(key) = key else {
        // A call without a key: its transaction, nothing recorded.
        return committed(tx.commit().await);
    };
    let encoded = encode::<D, T>(outcome).map_err(|reason| IdempotencyError::OutcomeNotStored {
        key: key.client_key().to_owned(),
        reason: format!("{reason}; the transaction was rolled back"),
    })?;
    match tx {
        // The outcome and `COMMIT` in one round trip.
        StoreTx::Own(tx) if tx.one_trip_commit() || !recorded => {
            let sent = Instant::now();
            let whole = (!recorded).then_some(fingerprint.as_str());
            let committed = tx
                .commit_with_outcome(tables, key.as_str(), whole, &encoded, ttl)
                .await;
            let lost = match committed.map_err(Failure::of) {
                Ok(()) => return Ok(()),
                Err(lost @ Failure::ConnectionLost(_)) => lost,
                Err(refused) => return Err(refused.at_commit(&client_key)),
            };
            let settled = match pool {
                Some(pool) => settle(pool, tables, &key, &fingerprint, &encoded, sent, ttl).await,
                None => None,
            };
            match settled {
                Some(true) => Ok(()),
                Some(false) => Err(lost.rolled_back()),
                None => Err(lost.at_commit(&client_key)),
            }
        }
        // The outcome, then `COMMIT` (or `RELEASE SAVEPOINT`).
        mut tx => {
            let stored = D::store_outcome(&mut tx, tables, key.as_str(), &encoded, ttl)
                .await
                .map_err(|e| Failure::of(e).or_unknown(&client_key, Failure::unavailable))?;
            if stored == 0 {
                tx.ended();
                return Err(Failure::ended().or_unknown(&client_key, Failure::unavailable));
            }
            committed(tx.commit().await)
        }
    }
}

impl<D: Dialect> SqlStore<D> {
    async fn claim_key<T: DeserializeOwned>(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, SqlIdempotencyLease<'static, D>, i64>, IdempotencyError> {
        check_len(key)?;
        let (pool, tables) = self.store_pool()?;
        let fingerprint = fingerprint.to_string();
        let lock = tables.lock_id(key.as_str());
        let claimed = self.claim_on(pool, tables, key, fingerprint, lock).await;
        // Anything but an execution (an answer, or a failure) marks the key.
        if !matches!(claimed, Ok(Claim::Execute(_))) {
            self.remember(lock);
        }
        claimed
    }

    /// Whether a claim of the key numbered `lock` reads its record first ([`Recent`]).
    fn reads_first(&self, lock: i64) -> bool {
        !D::CLAIMS_FIRST || self.recent.seen(lock)
    }

    /// The key numbered `lock` was answered or completed: its next claim reads first.
    fn remember(&self, lock: i64) {
        if D::CLAIMS_FIRST {
            self.recent.saw(lock);
        }
    }

    /// Steps 1–3 for the store's own transaction, `lock` the key's lock number.
    async fn claim_on<T: DeserializeOwned>(
        &self,
        pool: &Pool<D>,
        tables: &Tables,
        key: &RecordKey,
        fingerprint: String,
        lock: i64,
    ) -> Result<Claim<T, SqlIdempotencyLease<'static, D>, i64>, IdempotencyError> {
        // One checkout for the read and, if it does not answer, the claim's transaction. The
        // read goes first for a key seen lately, and always where the claim takes the
        // database's write lock (SQLite): a replay there must not wait for other writers.
        let mut connection = dialect::acquire_clean(pool).await.map_err(unavailable)?;
        if self.reads_first(lock) {
            if let Some(record) = D::read_record(&mut connection, tables, key.as_str())
                .await
                .map_err(unavailable)?
            {
                if !record.expired {
                    return answer(key, &fingerprint, record).map(Claim::Replay);
                }
            }
        }
        // `BEGIN` with the insert: the usual first execution claims in this one round trip.
        let tx = match D::claim_on_begin(tables, key.as_str(), &fingerprint, lock) {
            Some(insert) => match Owned::begin_claiming(connection, tables, &insert)
                .await
                .map_err(unavailable)?
            {
                Began::Claimed(tx) => {
                    let lease = SqlIdempotencyLease::claimed(
                        StoreTx::Own(tx),
                        key,
                        fingerprint,
                        false,
                        true,
                    );
                    return Ok(Claim::Execute(lease));
                }
                // Taken (or expired, or in flight): the claim that reads why.
                Began::Refused(mut tx) => {
                    tx.begin_again().await.map_err(unavailable)?;
                    tx
                }
            },
            None => {
                // The write lock is the claim: nobody else writes until this transaction
                // ends. One statement takes it (waiting up to `busy_timeout`) and reads the
                // record under it: one committed since the read answers; an expired one is
                // overwritten at the end.
                let mut tx = Owned::begin(connection).await.map_err(unavailable)?;
                let live = D::lock_and_read(&mut tx, tables, key.as_str())
                    .await
                    .map_err(unavailable)?;
                return match live {
                    Some(record) => answer(key, &fingerprint, record).map(Claim::Replay),
                    None => Ok(Claim::Execute(SqlIdempotencyLease::claimed(
                        StoreTx::Own(tx),
                        key,
                        fingerprint,
                        false,
                        false,
                    ))),
                };
            }
        };
        claim_in(StoreTx::Own(tx), tables, key, lock, &fingerprint, false).await
    }

    async fn complete_key<T: Serialize + DeserializeOwned>(
        &self,
        lease: SqlIdempotencyLease<'static, D>,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        let (pool, tables) = self.store_pool()?;
        // A completed key's retries replay, so they read first (numbered before the lease goes).
        let completed = lease.key.as_ref().map(|key| tables.lock_id(key.as_str()));
        complete_in(lease, tables, Some(pool), outcome, ttl).await?;
        if let Some(lock) = completed {
            self.remember(lock);
        }
        Ok(())
    }

    /// This store for calls inside a transaction the caller opened on `connection` (the
    /// caller commits). Each call runs in a savepoint of it: on `Err`, panic or a dropped
    /// future the savepoint rolls back (claim and effect, the caller's earlier writes stay);
    /// on success it is released, and the record and the effect become durable with the
    /// caller's `COMMIT` — or vanish together if the caller rolls back, so a retry executes.
    /// Concurrent duplicates wait until the caller's transaction ends.
    ///
    /// It serves one call (the call's savepoint borrows the connection until it ends); make one
    /// per call. A second call on it is refused with `StoreUnavailable`.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn demo(db: &racefree_runtime::sql::PgStore, pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;                 // the handler's own transaction
    /// let in_tx = db.within(&mut tx);
    /// // #[idempotent(key = key, store = in_tx, skip(in_tx))]
    /// // async fn pay(in_tx: &InCallerTx<'_, Postgres>, key: &str, ..., tx: PgTx<'_>)
    /// // (the store as a value of its own: `store = db.within(&mut tx)` would borrow a
    /// // temporary)
    /// # drop(in_tx);
    /// tx.commit().await?;                                // the record commits with the rest
    /// # Ok(()) }
    /// ```
    pub fn within<'c>(&'c self, connection: &'c mut D::Connection) -> InCallerTx<'c, D> {
        InCallerTx {
            store: self,
            connection: std::sync::Mutex::new(Some(connection)),
        }
    }
}

/// A [`SqlStore`] inside a transaction the caller opened ([`SqlStore::within`]).
pub struct InCallerTx<'c, D: Dialect> {
    pub(super) store: &'c SqlStore<D>,
    // Taken by the one call it serves: its savepoint borrows the connection.
    pub(super) connection: std::sync::Mutex<Option<&'c mut D::Connection>>,
}

impl<D: Dialect> std::fmt::Debug for InCallerTx<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InCallerTx")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<D, T> IdempotencyBackend<T> for SqlStore<D>
where
    D: Dialect,
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = SqlIdempotencyLease<'static, D>;
    /// The key's advisory lock number (PostgreSQL).
    type InFlight = i64;
    const STORE: &'static str = D::STORE_NAME;

    const COMPLETE_COMMITS_EFFECT: bool = true;

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Claim<T, Self::Lease, i64>, IdempotencyError>> + Send {
        self.claim_key(key, fingerprint)
    }

    fn wait(
        &self,
        key: &RecordKey,
        lock: i64,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Option<T>, IdempotencyError>> + Send {
        let client_key = key.client_key().to_owned();
        async move {
            let in_progress = || IdempotencyError::InProgress {
                key: client_key.clone(),
            };
            let (pool, _) = self.store_pool()?;
            let wait = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(in_progress()),
                },
                None => None,
            };
            match D::wait_unlocked(pool, lock, wait)
                .await
                .map_err(Failure::of)
            {
                Ok(()) => Ok(None),
                Err(Failure::LockTimeout(_)) => Err(in_progress()),
                Err(failure) => Err(failure.unavailable()),
            }
        }
    }

    fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), IdempotencyError>> + Send {
        self.complete_key(lease, outcome, ttl)
    }

    async fn lease_without_key(&self) -> Result<Option<Self::Lease>, IdempotencyError> {
        let (pool, _) = self.store_pool()?;
        let tx = Owned::begin_from(pool).await.map_err(unavailable)?;
        Ok(Some(SqlIdempotencyLease {
            tx: StoreTx::Own(tx),
            key: None,
            caller_commits: false,
            fingerprint: String::new(),
            recorded: false,
        }))
    }

    fn release(&self, lease: Self::Lease) {
        // sqlx rolls a dropped open transaction back before the connection is used again.
        drop(lease);
    }
}

impl<'c, D, T> IdempotencyBackend<T> for InCallerTx<'c, D>
where
    D: Dialect,
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = SqlIdempotencyLease<'c, D>;
    /// The key's advisory lock number (PostgreSQL).
    type InFlight = i64;
    const STORE: &'static str = D::STORE_NAME;

    const COMPLETE_COMMITS_EFFECT: bool = true;

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, Self::Lease, i64>, IdempotencyError> {
        check_len(key)?;
        let (_, tables) = self.store.store_pool()?;
        let connection = self.take_connection()?;
        // A savepoint: the claim and the body's writes roll back alone, the caller commits.
        let tx = sqlx::Connection::begin(connection)
            .await
            .map_err(unavailable)?;
        claim_in(
            StoreTx::Savepoint(tx),
            tables,
            key,
            tables.lock_id(key.as_str()),
            &fingerprint.to_string(),
            true,
        )
        .await
    }

    fn wait(
        &self,
        key: &RecordKey,
        lock: i64,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Option<T>, IdempotencyError>> + Send {
        IdempotencyBackend::<T>::wait(self.store, key, lock, deadline)
    }

    async fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        let (_, tables) = self.store.store_pool()?;
        // Nothing is durable before the caller's `COMMIT`: nothing to settle.
        complete_in(lease, tables, None, outcome, ttl).await
    }

    async fn lease_without_key(&self) -> Result<Option<Self::Lease>, IdempotencyError> {
        let connection = self.take_connection()?;
        let tx = sqlx::Connection::begin(connection)
            .await
            .map_err(unavailable)?;
        Ok(Some(SqlIdempotencyLease {
            tx: StoreTx::Savepoint(tx),
            key: None,
            caller_commits: true,
            fingerprint: String::new(),
            recorded: false,
        }))
    }

    fn release(&self, lease: Self::Lease) {
        // Rolls the savepoint back (sqlx runs it before the connection's next statement).
        drop(lease);
    }
}

impl<'c, D: Dialect> InCallerTx<'c, D> {
    fn take_connection(&self) -> Result<&'c mut D::Connection, IdempotencyError> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .ok_or_else(|| IdempotencyError::StoreUnavailable {
                reason: "this in-transaction store served its call already: make one per call (SqlStore::within)".into(),
            })
    }

    /// What `#[idempotent(store = in_tx)]` calls to find the store (`in_tx` from
    /// [`SqlStore::within`]).
    #[doc(hidden)]
    pub fn idempotency_store(&self) -> &Self {
        self
    }
}
