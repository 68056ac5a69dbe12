//! `#[idempotent]` on a SQL store: claim, body, outcome and `COMMIT` in one transaction.
//!
//! # Protocol
//! 1. **replay without a transaction**: `SELECT` the key's record. Committed, unexpired, same
//!    fingerprint → replay its outcome; another fingerprint → `Conflict`. (Committed records
//!    are final until they expire, so reading them unlocked is safe: one round trip.)
//! 2. **claim**: open the transaction ([`Dialect::begin_write`]), take the key's in-flight lock
//!    (PostgreSQL: `pg_try_advisory_xact_lock(hash(table, key))`, answered at once; SQLite: the
//!    write lock `BEGIN IMMEDIATE` took), then `INSERT … ON CONFLICT (key) DO NOTHING
//!    RETURNING`. Inserted → the caller executes, holding the transaction. Not inserted → a
//!    committed record exists: replay / `Conflict` as in 1, or, if it has expired, `UPDATE` it
//!    into this caller's claim (only while still expired) and execute.
//! 3. **in flight** (PostgreSQL, the lock was taken): [`Claim::InFlight`]. `in_flight =
//!    "reject"` answers `InProgress` now; otherwise [`wait`](IdempotencyBackend::wait) takes
//!    the lock *shared* (every waiter passes together when the owner's transaction ends),
//!    bounded by `lock_timeout` from the call's deadline, and the caller claims again: step 1
//!    then replays the owner's committed outcome, or, if the owner rolled back, one caller wins
//!    the claim.
//! 4. **complete**: `UPDATE` the record with the outcome (versioned JSON) and its
//!    `expires_at`, then `COMMIT`, which makes the effect and the record visible at once.
//! 5. **release** (an `Err` not stored, a panic, a dropped future): drop the transaction;
//!    sqlx rolls it back before the connection is reused, and a crashed process's
//!    transaction is rolled back by the server. The claim never existed for anyone else.
//!
//! The primary key is the integrity guarantee (two claims of one key can never both commit);
//! the advisory lock only lets PostgreSQL say "in flight" without waiting. The in-flight row
//! is never visible to others: nothing can find a claim "running" after its owner is gone, so
//! there are no lease timers.
//!
//! Round trips (PostgreSQL): replay 1; first execution 5 + the body's own (read, `BEGIN`,
//! lock, insert, … , outcome, `COMMIT`). A pool with `test_before_acquire` (sqlx's default)
//! adds a ping per checkout.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::Transaction;

use super::dialect::{Dialect, Record};
use super::error::Failure;
use super::{InTransaction, SqlStore, Tx};
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
    value: T,
}

/// The claim of one key of a SQL store: the open transaction the body writes in, and the key
/// (`None` for a call without a key, which gets a plain transaction). Completing it writes the
/// outcome and commits; dropping it rolls back.
pub struct SqlIdempotencyLease<D: Dialect> {
    tx: Transaction<'static, D>,
    key: Option<RecordKey>,
}

impl<D: Dialect> SqlIdempotencyLease<D> {
    /// The transaction's connection, for the body's statements.
    pub fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }

    /// The transaction as a [`Tx`].
    pub fn tx(&mut self) -> Tx<'_, D> {
        Tx::of(self)
    }
}

impl<D: Dialect> InTransaction<D> for SqlIdempotencyLease<D> {
    fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }
}

impl<D: Dialect> std::fmt::Debug for SqlIdempotencyLease<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlIdempotencyLease")
            .field("key", &self.key)
            .finish_non_exhaustive()
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
    let version: Version = serde_json::from_str(&text)
        .map_err(|e| undecodable(format!("not a versioned outcome: {e}")))?;
    if version.v != FORMAT {
        return Err(undecodable(format!(
            "outcome format {} (this version reads {FORMAT})",
            version.v
        )));
    }
    let decoded: Decoded<T> =
        serde_json::from_str(&text).map_err(|e| undecodable(e.to_string()))?;
    Ok(decoded.value)
}

impl<D: Dialect> SqlStore<D> {
    async fn claim_key<T: DeserializeOwned>(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, SqlIdempotencyLease<D>, i64>, IdempotencyError> {
        if key.as_str().len() > MAX_KEY {
            return Err(IdempotencyError::KeyTooLong {
                len: key.as_str().len(),
                max: MAX_KEY,
            });
        }
        let (pool, tables) = self.store_pool()?;
        let fingerprint = fingerprint.to_string();
        if let Some(record) = D::read_record(pool, tables, key.as_str())
            .await
            .map_err(unavailable)?
        {
            if !record.expired {
                return answer(key, &fingerprint, record).map(Claim::Replay);
            }
        }
        let mut tx = D::begin_write(pool).await.map_err(unavailable)?;
        let lock = tables.lock_id(key.as_str());
        if !D::try_lock_key(&mut tx, lock).await.map_err(unavailable)? {
            return Ok(Claim::InFlight(lock));
        }
        // Under the key's lock nobody else claims it, but a purge may delete an expired
        // record between two statements: then insert again.
        for _ in 0..3 {
            if D::insert_claim(&mut tx, tables, key.as_str(), &fingerprint)
                .await
                .map_err(unavailable)?
            {
                return Ok(Claim::Execute(SqlIdempotencyLease {
                    tx,
                    key: Some(key.clone()),
                }));
            }
            let Some(record) = D::read_record_in(&mut tx, tables, key.as_str())
                .await
                .map_err(unavailable)?
            else {
                continue;
            };
            if !record.expired {
                // Dropping `tx` rolls back a transaction that wrote nothing.
                return answer(key, &fingerprint, record).map(Claim::Replay);
            }
            if D::replace_expired(&mut tx, tables, key.as_str(), &fingerprint)
                .await
                .map_err(unavailable)?
            {
                return Ok(Claim::Execute(SqlIdempotencyLease {
                    tx,
                    key: Some(key.clone()),
                }));
            }
        }
        Err(IdempotencyError::StoreUnavailable {
            reason: "the record kept changing under the claim (a concurrent purge?)".into(),
        })
    }

    async fn complete_key<T: Serialize>(
        &self,
        lease: SqlIdempotencyLease<D>,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        let SqlIdempotencyLease { mut tx, key } = lease;
        let Some(key) = key else {
            // A call without a key: its transaction, nothing recorded.
            return tx.commit().await.map_err(|e| Failure::of(e).at_commit(""));
        };
        let (_, tables) = self.store_pool()?;
        let encoded = serde_json::to_string(&Stored {
            v: FORMAT,
            value: outcome,
        })
        .map_err(|e| IdempotencyError::OutcomeNotStored {
            key: key.client_key().to_owned(),
            reason: format!("{e}; the transaction was rolled back"),
        })?;
        D::store_outcome(&mut tx, tables, key.as_str(), &encoded, ttl)
            .await
            .map_err(unavailable)?;
        tx.commit()
            .await
            .map_err(|e| Failure::of(e).at_commit(key.client_key()))
    }
}

impl<D, T> IdempotencyBackend<T> for SqlStore<D>
where
    D: Dialect,
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = SqlIdempotencyLease<D>;
    /// The key's advisory lock number (PostgreSQL).
    type InFlight = i64;

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
        let tx = pool.begin().await.map_err(unavailable)?;
        Ok(Some(SqlIdempotencyLease { tx, key: None }))
    }

    fn release(&self, lease: Self::Lease) {
        // sqlx rolls a dropped open transaction back before the connection is used again.
        drop(lease);
    }
}
