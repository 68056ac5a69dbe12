//! Exactly-once execution per idempotency key across processes and machines.
//!
//! # Protocol (one Redis key per logical key: `rf:{tag}:idem`)
//! - **claim**: one `SET key <running record> NX PX <lease> GET`. `nil` means this caller owns
//!   the key; otherwise Redis hands back the record that is there, in the same round trip: a
//!   completed outcome to replay, a running claim to wait for, or another fingerprint
//!   (`Conflict`). Never GET-then-SET.
//! - **heartbeat**: while the body runs, the owner extends the lease every third of it (Lua,
//!   token-checked). A crashed owner stops extending; after the lease the key is free and the
//!   next claim (exactly one, `SET NX` decides) takes over.
//! - **complete**: a Lua script replaces the running record with the outcome (kept for `ttl`)
//!   only if the record still carries the caller's owner token. A stale owner — its lease
//!   ended, somebody else took over — gets [`RedisStoreError::LeaseLost`] and overwrites nothing.
//! - **release**: on `Err`, panic or cancellation, a token-checked Lua script deletes the claim,
//!   so a retry (or one waiter) executes next.
//! - **replay**: one `GET`.
//!
//! First execution therefore costs 2 round trips (claim + complete), a replay 1.
//!
//! # What it does not promise
//! If Redis is unreachable when the outcome is to be stored (after a few re-sends), the caller
//! gets the typed error and the claim stays until its lease ends; a later call then executes
//! again. And a body that outlives its lease (the process was frozen longer than the lease) may
//! overlap with the next owner: its completion is rejected, but its side effects are its own;
//! bodies that write elsewhere should fence those writes or choose a lease well above their
//! longest pause.

use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::Script;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::connection::Connection;
use super::envelope::{decode_outcome, IdemRecord, IdemState};
use super::lease::{owner_token, Backoff, Heartbeat, ReleaseOnDrop};
use super::{RedisKey, RedisStore, RedisStoreError};
use crate::idempotent::{
    Claim as BackendClaim, Fingerprint, IdempotencyBackend, IdempotencyError, RecordKey,
};

pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec.state == 'running' and rec.owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or rec.owner ~= ARGV[1] then return 0 end
if rec.state == 'running' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"#,
    )
});

pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec.state == 'running' and rec.owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#,
    )
});

/// What [`RedisIdempotency::claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// This caller owns the key: run the body, then [`complete`](RedisIdempotency::complete)
    /// or [`release`](RedisIdempotency::release).
    Owner(OwnerClaim),
    /// The key completed earlier with the same fingerprint: this is its outcome.
    Replay(serde_json::Value),
    /// Somebody else holds the key and is running the body.
    InProgress,
    /// The key is claimed or completed by a request with another fingerprint.
    Conflict,
}

/// Proof of ownership of one idempotency key: the Redis key and the owner token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerClaim {
    key: String,
    token: String,
    fingerprint: String,
}

impl OwnerClaim {
    /// Rebuilds a claim from its parts, e.g. to finish (or, in tests, to impersonate) an owner
    /// whose token was persisted. Every write with it is still token-checked by Redis.
    pub fn from_parts(
        key: &RedisKey,
        token: impl Into<String>,
        fingerprint: impl Into<String>,
    ) -> Self {
        OwnerClaim {
            key: key.redis_key("idem"),
            token: token.into(),
            fingerprint: fingerprint.into(),
        }
    }

    /// The owner token this claim writes with.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The Redis key of the claim.
    pub fn redis_key(&self) -> &str {
        &self.key
    }
}

/// What a waiter does when the key is running elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InFlight {
    /// Wait (jittered backoff, bounded by `max_wait`) for the owner's outcome.
    #[default]
    Wait,
    /// Fail at once with [`IdempotentError::InProgress`].
    Reject,
}

/// How [`RedisIdempotency::run`] treats one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyOptions {
    /// How long a completed outcome is replayed.
    pub ttl: Duration,
    /// What to do while another caller runs the body.
    pub in_flight: InFlight,
    /// How long a waiter waits for a live owner before giving up with `InProgress`.
    pub max_wait: Duration,
}

impl IdempotencyOptions {
    /// 24 h outcomes, wait up to 60 s.
    pub const fn new() -> Self {
        IdempotencyOptions {
            ttl: Duration::from_secs(24 * 3600),
            in_flight: InFlight::Wait,
            max_wait: Duration::from_secs(60),
        }
    }
}

impl Default for IdempotencyOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of one idempotent call: the value and whether it was replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    /// The body's `Ok` value, fresh or replayed.
    pub value: T,
    /// `true` when the value came from an earlier execution (`Idempotency-Replayed: true`).
    pub replayed: bool,
}

/// Why an idempotent call produced no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum IdempotentError<E> {
    /// Same key, different request.
    Conflict {
        /// The logical key.
        key: String,
    },
    /// Another caller runs the body (`Reject`), or did not finish within `max_wait`.
    InProgress {
        /// The logical key.
        key: String,
    },
    /// Redis failed; see [`RedisStoreError`].
    Store(RedisStoreError),
    /// The body returned `Err`; nothing was stored and the key is free again.
    Body(E),
}

impl<E> From<RedisStoreError> for IdempotentError<E> {
    fn from(err: RedisStoreError) -> Self {
        IdempotentError::Store(err)
    }
}

/// The idempotency operations of a [`RedisStore`] (see [`RedisStore::idempotency`]).
#[derive(Debug, Clone, Copy)]
pub struct RedisIdempotency<'s> {
    store: &'s RedisStore,
}

impl RedisStore {
    /// Idempotency claims, completions and replays on this store.
    pub fn idempotency(&self) -> RedisIdempotency<'_> {
        RedisIdempotency { store: self }
    }
}

impl<'s> RedisIdempotency<'s> {
    /// One atomic claim attempt (`SET NX PX GET`): ownership, or what holds the key instead.
    pub async fn claim(
        &self,
        key: &RedisKey,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<Claim, RedisStoreError> {
        let redis_key = key.redis_key("idem");
        let token = owner_token();
        let record = IdemRecord::running(&token, fingerprint).encode()?;
        let lease_ms = lease.as_millis().max(1) as u64;
        // Re-sending is safe: if the first attempt landed, the retry finds our own token.
        let found: Option<Vec<u8>> = self
            .store
            .run_retrying(|mut conn| {
                let cmd = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(&record)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms)
                    .arg("GET")
                    .to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await?;
        let Some(raw) = found else {
            return Ok(Claim::Owner(OwnerClaim {
                key: redis_key,
                token,
                fingerprint: fingerprint.to_owned(),
            }));
        };
        let existing = IdemRecord::decode(&redis_key, &raw)?;
        Ok(match existing.state {
            IdemState::Running if existing.owner == token => Claim::Owner(OwnerClaim {
                key: redis_key,
                token,
                fingerprint: fingerprint.to_owned(),
            }),
            _ if existing.fp != fingerprint => Claim::Conflict,
            IdemState::Running => Claim::InProgress,
            IdemState::Done { outcome } => Claim::Replay(outcome),
        })
    }

    /// Stores `outcome` for `ttl` if `claim` still owns the key; [`RedisStoreError::LeaseLost`]
    /// (and nothing written) if its lease ended and the key moved on.
    pub async fn complete<T: Serialize + ?Sized>(
        &self,
        claim: &OwnerClaim,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), RedisStoreError> {
        let outcome = serde_json::to_value(outcome).map_err(|e| RedisStoreError::Serialize {
            reason: e.to_string(),
        })?;
        let record = IdemRecord::done(&claim.token, &claim.fingerprint, outcome).encode()?;
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let done: i64 = self
            .store
            .eval(
                &COMPLETE,
                &[&claim.key],
                &[&claim.token, &record, &ttl_ms],
                true,
            )
            .await?;
        if done == 1 {
            Ok(())
        } else {
            Err(RedisStoreError::LeaseLost {
                key: claim.key.clone(),
            })
        }
    }

    /// Gives the key up (the body failed): `true` if the claim was still ours and is gone.
    pub async fn release(&self, claim: &OwnerClaim) -> Result<bool, RedisStoreError> {
        let released: i64 = self
            .store
            .eval(&RELEASE, &[&claim.key], &[&claim.token], true)
            .await?;
        Ok(released == 1)
    }

    /// Extends the claim's lease to `lease` from now; `false` if it is no longer ours.
    pub async fn extend(
        &self,
        claim: &OwnerClaim,
        lease: Duration,
    ) -> Result<bool, RedisStoreError> {
        let lease_ms = lease.as_millis().max(1).to_string();
        let extended: i64 = self
            .store
            .eval(&EXTEND, &[&claim.key], &[&claim.token, &lease_ms], true)
            .await?;
        Ok(extended == 1)
    }

    /// The stored record of `key`, if any (one `GET`).
    pub async fn replay(&self, key: &RedisKey) -> Result<Option<IdemRecord>, RedisStoreError> {
        let redis_key = key.redis_key("idem");
        let raw: Option<Vec<u8>> = self
            .store
            .run_retrying(|mut conn| {
                let cmd = redis::cmd("GET").arg(&redis_key).to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await?;
        raw.map(|raw| IdemRecord::decode(&redis_key, &raw))
            .transpose()
    }

    /// Runs `body` at most once per key across every process sharing the store, and replays
    /// its `Ok` outcome to every other caller with the same `fingerprint`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use racefree_runtime::redis::{IdempotencyOptions, RedisKey, RedisStore};
    ///
    /// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
    /// let key = RedisKey::new("payments::charge", None, "order-42");
    /// let outcome = REDIS
    ///     .idempotency()
    ///     .run(&key, "fp-of-the-request", IdempotencyOptions::new(), || async {
    ///         Ok::<_, std::io::Error>(String::from("charge-1"))
    ///     })
    ///     .await
    ///     .map_err(|e| format!("{e:?}"))?;
    /// println!("{} (replayed: {})", outcome.value, outcome.replayed);
    /// # Ok(()) }
    /// ```
    pub async fn run<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        fingerprint: &str,
        options: IdempotencyOptions,
        body: F,
    ) -> Result<Outcome<T>, IdempotentError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let lease = self.store.store_options().lease;
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        let claim = loop {
            match self.claim(key, fingerprint, lease).await? {
                Claim::Owner(claim) => break claim,
                Claim::Replay(outcome) => {
                    let value = decode_outcome(&key.redis_key("idem"), outcome)?;
                    return Ok(Outcome {
                        value,
                        replayed: true,
                    });
                }
                Claim::Conflict => {
                    return Err(IdempotentError::Conflict {
                        key: key.tag().to_owned(),
                    })
                }
                Claim::InProgress => {
                    let waited = started.elapsed();
                    if options.in_flight == InFlight::Reject || waited >= options.max_wait {
                        return Err(IdempotentError::InProgress {
                            key: key.tag().to_owned(),
                        });
                    }
                    backoff.wait(Some(options.max_wait - waited)).await;
                }
            }
        };

        let conn = self.store.connection().await?;
        let guard = ReleaseOnDrop::new(
            &RELEASE,
            conn.clone(),
            claim.key.clone(),
            claim.token.clone(),
        );
        let heartbeat =
            Heartbeat::start(&EXTEND, conn, claim.key.clone(), claim.token.clone(), lease);
        let result = body().await;
        drop(heartbeat);
        match result {
            Ok(value) => match self.complete(&claim, &value, options.ttl).await {
                Ok(()) => {
                    guard.disarm();
                    Ok(Outcome {
                        value,
                        replayed: false,
                    })
                }
                // A value that cannot be serialized: the guard gives the key up at once.
                Err(err @ RedisStoreError::Serialize { .. }) => Err(err.into()),
                // Rejected as stale (a release would be rejected too), or unknown after the
                // re-sends: the claim then stays until its lease ends, rather than inviting the
                // next caller to execute again right away.
                Err(err) => {
                    guard.disarm();
                    Err(err.into())
                }
            },
            Err(err) => {
                let released = self.release(&claim).await;
                guard.disarm();
                if let Err(store) = released {
                    tracing::warn!(key = %claim.key, error = %store, "releasing a failed claim; its lease will end it");
                }
                Err(IdempotentError::Body(err))
            }
        }
    }
}

// ---- The store behind `#[idempotent(store = ...)]` ----

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
                        &EXTEND,
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
            &RELEASE,
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
