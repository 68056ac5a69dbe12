//! The Redis store behind the attributes: `#[idempotent(store = …)]` and
//! `#[sequenced(store = …)]`.
//!
//! ```text
//! use racefree::redis::RedisStore;
//!
//! static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
//! static RECEIPTS: RedisIdempotencyStore<Receipt> = RedisIdempotencyStore::new(&REDIS);
//!
//! #[idempotent(key = req.key.as_deref(), store = RECEIPTS)]
//! async fn charge(req: &Charge) -> Result<Receipt, ApiError> { … }        // Receipt: Serialize + DeserializeOwned
//!
//! #[sequenced(key = shop, store = REDIS.sequence("orders::next_no"))]
//! async fn next_no(shop: &str, seq: Seq) -> Result<String, OrderError> { … }
//! ```
//!
//! [`RedisIdempotencyStore<T>`] names the outcome type `T` once: `RedisStore` itself stores
//! outcomes of any serde type, and `store = <expr>` alone does not tell the compiler which.
//! `#[idempotent]` records are keyed by the function path, scope and client key the attribute
//! passes in. `#[sequenced]` passes only the key, so a sequence is named explicitly with
//! [`RedisStore::sequence`]: two functions must not share a name unless they mean to share
//! numbers. Both are async only: a sync function with a Redis store is a compile error
//! (idempotency: `BlockingIdempotencyBackend` is not implemented) or fails with
//! `SequenceError::Store` saying to make it `async` (sequences).

use std::future::Future;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::envelope::{decode_outcome, IdemState};
use super::idempotency::{self, Claim, OwnerClaim};
use super::lease::{Backoff, Heartbeat, ReleaseOnDrop};
use super::sequence::{HeldKey, HoldError};
use super::{Connection, RedisKey, RedisStore, RedisStoreError};
use crate::error::IdempotencyError;
use crate::fingerprint::Fingerprint;
use crate::idempotency::{Claim as BackendClaim, IdempotencyBackend, RecordKey};
use crate::keyed_locks::Holder;
use crate::sequence_error::SequenceError;
use crate::sequencer::{SequenceBackend, SequenceLease};

fn unavailable(err: RedisStoreError) -> IdempotencyError {
    IdempotencyError::StoreUnavailable {
        reason: err.to_string(),
    }
}

/// A claim on an idempotency key in Redis, kept alive by a heartbeat until completed or released.
pub struct RedisIdempotencyLease {
    claim: OwnerClaim,
    conn: Connection,
    _heartbeat: Heartbeat,
}

impl<T> IdempotencyBackend<T> for RedisStore
where
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = RedisIdempotencyLease;
    type InFlight = Fingerprint;

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<BackendClaim<T, Self::Lease, Self::InFlight>, IdempotencyError>>
           + Send {
        let redis_key = RedisKey::from_record(key);
        let client_key = key.client_key().to_owned();
        async move {
            let lease = self.store_options().lease;
            let fp = fingerprint.to_string();
            match self
                .idempotency()
                .claim(&redis_key, &fp, lease)
                .await
                .map_err(unavailable)?
            {
                Claim::Owner(claim) => {
                    let conn = self.connection().await.map_err(unavailable)?;
                    let heartbeat = Heartbeat::start(
                        &idempotency::EXTEND,
                        conn.clone(),
                        claim.redis_key().to_owned(),
                        claim.token().to_owned(),
                        lease,
                    );
                    Ok(BackendClaim::Execute(RedisIdempotencyLease {
                        claim,
                        conn,
                        _heartbeat: heartbeat,
                    }))
                }
                Claim::Replay(outcome) => Ok(BackendClaim::Replay(
                    decode_outcome(&redis_key.redis_key("idem"), outcome).map_err(unavailable)?,
                )),
                Claim::InProgress => Ok(BackendClaim::InFlight(fingerprint)),
                Claim::Conflict => Err(IdempotencyError::Conflict { key: client_key }),
            }
        }
    }

    fn wait(
        &self,
        key: &RecordKey,
        in_flight: Fingerprint,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Option<T>, IdempotencyError>> + Send {
        let redis_key = RedisKey::from_record(key);
        let client_key = key.client_key().to_owned();
        async move {
            let fp = in_flight.to_string();
            let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
            loop {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    return Err(IdempotencyError::InProgress { key: client_key });
                }
                backoff.wait(left).await;
                let Some(record) = self
                    .idempotency()
                    .replay(&redis_key)
                    .await
                    .map_err(unavailable)?
                else {
                    return Ok(None); // released or expired: claim again
                };
                match record.state {
                    IdemState::Running => continue,
                    IdemState::Done { outcome } if record.fp == fp => {
                        let outcome = decode_outcome(&redis_key.redis_key("idem"), outcome);
                        return outcome.map(Some).map_err(unavailable);
                    }
                    IdemState::Done { .. } => return Ok(None), // the claim will report the conflict
                }
            }
        }
    }

    async fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        let RedisIdempotencyLease {
            claim,
            conn: _,
            _heartbeat,
        } = lease;
        drop(_heartbeat);
        // On failure the claim stays until its lease ends (see `RedisIdempotency::run`).
        self.idempotency()
            .complete(&claim, outcome, ttl)
            .await
            .map_err(unavailable)
    }

    fn release(&self, lease: Self::Lease) {
        let RedisIdempotencyLease {
            claim,
            conn,
            _heartbeat,
        } = lease;
        // Dropping an armed guard releases in the background (Drop-safe, never blocks).
        drop(ReleaseOnDrop::new(
            &idempotency::RELEASE,
            conn,
            claim.redis_key().to_owned(),
            claim.token().to_owned(),
        ));
    }
}

/// A [`RedisStore`] for the outcomes (type `T`) of `#[idempotent]` functions: the value of
/// `store = …`. Build it in a `static` next to the store, or from an `Arc` the application holds.
///
/// ```
/// use std::sync::Arc;
/// use racefree_runtime::redis::{RedisIdempotencyStore, RedisStore};
///
/// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
/// static RECEIPTS: RedisIdempotencyStore<String> = RedisIdempotencyStore::new(&REDIS);
///
/// let shared = Arc::new(RedisStore::new("redis://127.0.0.1/"));
/// let orders: RedisIdempotencyStore<u64> = RedisIdempotencyStore::shared(shared);
/// # drop(orders);
/// ```
pub struct RedisIdempotencyStore<T> {
    store: Source,
    _outcome: std::marker::PhantomData<fn() -> T>,
}

enum Source {
    Static(&'static RedisStore),
    Shared(std::sync::Arc<RedisStore>),
}

impl<T> RedisIdempotencyStore<T> {
    /// Outcomes of type `T` in the `static` store `store`.
    pub const fn new(store: &'static RedisStore) -> Self {
        RedisIdempotencyStore {
            store: Source::Static(store),
            _outcome: std::marker::PhantomData,
        }
    }

    /// Outcomes of type `T` in a store the application shares.
    pub fn shared(store: std::sync::Arc<RedisStore>) -> Self {
        RedisIdempotencyStore {
            store: Source::Shared(store),
            _outcome: std::marker::PhantomData,
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &RedisStore {
        match &self.store {
            Source::Static(store) => store,
            Source::Shared(store) => store,
        }
    }
}

impl<T> IdempotencyBackend<T> for RedisIdempotencyStore<T>
where
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = RedisIdempotencyLease;
    type InFlight = Fingerprint;

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<BackendClaim<T, Self::Lease, Self::InFlight>, IdempotencyError>>
           + Send {
        IdempotencyBackend::<T>::claim(self.store(), key, fingerprint)
    }

    fn wait(
        &self,
        key: &RecordKey,
        in_flight: Fingerprint,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Option<T>, IdempotencyError>> + Send {
        IdempotencyBackend::<T>::wait(self.store(), key, in_flight, deadline)
    }

    fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), IdempotencyError>> + Send {
        IdempotencyBackend::<T>::complete(self.store(), lease, outcome, ttl)
    }

    fn release(&self, lease: Self::Lease) {
        IdempotencyBackend::<T>::release(self.store(), lease)
    }
}

/// One named family of sequences in a [`RedisStore`]: the `store = …` of `#[sequenced]`.
#[derive(Debug, Clone, Copy)]
pub struct RedisSequence<'s> {
    store: &'s RedisStore,
    name: &'s str,
}

impl RedisStore {
    /// The sequences named `name` (one per key), for `#[sequenced(store = REDIS.sequence("…"))]`.
    ///
    /// ```
    /// use racefree_runtime::redis::RedisStore;
    ///
    /// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
    /// let orders = REDIS.sequence("orders::next_no");
    /// # drop(orders);
    /// ```
    pub fn sequence<'s>(&'s self, name: &'s str) -> RedisSequence<'s> {
        RedisSequence { store: self, name }
    }
}

impl RedisSequence<'_> {
    /// The Redis key of `key` in this family (its JSON encoding names it). A key that does
    /// not encode (e.g. a map with non-string keys) is an error, never a shared fallback key.
    pub fn key<K: Serialize>(&self, key: &K) -> Result<RedisKey, RedisStoreError> {
        let text = serde_json::to_string(key).map_err(|e| RedisStoreError::Serialize {
            reason: format!("sequence key: {e}"),
        })?;
        Ok(RedisKey::new(self.name, None, text))
    }
}

/// A key of a [`RedisSequence`] held for one `#[sequenced]` call.
pub struct RedisSequenceLease<'s> {
    held: HeldKey<'s>,
}

impl<'s, K: Serialize> SequenceBackend<K> for RedisSequence<'s> {
    type Lease<'a>
        = RedisSequenceLease<'a>
    where
        Self: 'a;

    fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Self::Lease<'_>, SequenceError>> + Send {
        let key = self.key(&key);
        async move {
            let key = key.map_err(|err| SequenceError::Store(Box::new(err)))?;
            match self.store.sequences().hold(&key, 0, deadline).await {
                Ok(held) => Ok(RedisSequenceLease { held }),
                Err(HoldError::Timeout) => Err(SequenceError::Timeout),
                Err(HoldError::Reentrant) => Err(SequenceError::Reentrant),
                Err(HoldError::Store(err)) => Err(SequenceError::Store(Box::new(err))),
            }
        }
    }
}

impl SequenceLease for RedisSequenceLease<'_> {
    fn holder(&self) -> Holder {
        self.held.holder
    }

    fn fence(&self) -> u64 {
        self.held.ticket.fence()
    }

    fn next_async(&mut self) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send {
        std::future::ready(Ok(self.held.ticket.last().map(|n| n + 1)))
    }

    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        self.held.commit(used).await.map_err(|err| match err {
            RedisStoreError::LeaseLost { .. } => SequenceError::LeaseLost,
            other => SequenceError::Store(Box::new(other)),
        })
    }
}
