//! Exactly-once execution per idempotency key across processes and machines.
//!
//! # Protocol (one Redis key per logical key: `rf:{tag}:idem`)
//! - **claim**: one Lua script: the record that is there — a completed outcome to replay, a
//!   running claim to wait for, another fingerprint (`Conflict`), an outcome not stored — or,
//!   if there is none, this caller's running record with a lease (`PX`) and a **fencing
//!   token**: the server's clock in µs (`TIME`). A key is taken over only after the previous
//!   owner's lease ran out, so every later owner's token is larger — unless the server's clock
//!   steps back by more than a lease (or a failover lands on a replica whose clock is that far
//!   behind). Never GET-then-SET.
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
//! # A finished body is never run again for its key
//! Once the body returned `Ok`, nothing the caller does can free the key:
//! - the completion is written by a task of its own (holding the connection, the heartbeat
//!   and the encoded record), so dropping the caller's future while the completion is being
//!   sent or re-sent does not stop it, and no release-on-drop guard is armed any more;
//! - an outcome that cannot be stored — serde cannot encode it (e.g. a map with tuple keys),
//!   or its record is larger than the server's `proto-max-bulk-len` (read on first use; Redis
//!   defaults to 512 MiB) — is replaced by a small terminal record "done, outcome not stored":
//!   the first caller keeps its value, every later caller gets `OutcomeNotStored` for the TTL;
//! - the heartbeat keeps the lease alive until the completion's last re-send has returned.
//!
//! # A caller dropped *during* the body
//! releases the key (in the background, token-checked), exactly like the in-process store: the
//! body did not finish, so a retry may run it from the start at once, rather than waiting a
//! whole lease. A body whose partial effects must not be repeated should make them
//! idempotent, or run them in a task of its own (`tokio::spawn`) so that dropping the caller
//! does not cut them off half-way.
//!
//! # A lost lease is never reported as success
//! An owner that was frozen (or cut off) past its lease finds, at completion, another owner's
//! record or none: its completion writes nothing and the caller gets `LeaseLost`; the
//! successor's outcome stands. [`RedisIdempotency::run_watched`] hands the body a
//! [`LeaseWatch`] that fires as soon as the heartbeat finds the lease gone.
//!
//! # Waiting for another owner
//! A waiter subscribes to the key's wake-up channel (`<key>:wake`; one server only) and looks
//! at the record as soon as the owner's completion or release publishes there (a completed
//! record of up to 64 KiB is the message itself, so the waiter returns without a `GET`), with jittered
//! polling as the fallback: every 100 ms while subscribed (for a claim that simply expires: a
//! crashed owner publishes nothing), 2 ms growing to 100 ms on a Cluster or when the pub/sub
//! connection cannot be made.
//!
//! # Unknown outcomes
//! If no answer to the completion comes back after its re-sends, one read decides when it can:
//! our done record → success; another owner's record or none → `LeaseLost`; our running
//! record (the write may still be queued) → `OutcomeUnknown`. The claim then stays until its
//! lease ends; a later call replays if the write landed and executes again if it did not.
//! If Redis refuses the write outright (e.g. out of memory under `noeviction`), the claim
//! likewise stays until its lease ends and a retry executes again.

use std::future::Future;
use std::time::{Duration, Instant};

use super::connection::Lua;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::envelope::{decode_outcome, IdemRecord, IdemState};
use super::lease::{
    finish_final_write, outlive_caller, owner_token, wait_for_key, FinalWriteKeys, Heartbeat,
    LeaseWatch, Look, ReleaseOnDrop,
};
use super::store::Detached;
use super::{RedisKey, RedisStore, RedisStoreError};
use crate::idempotent::{
    Claim as BackendClaim, Fingerprint, IdempotencyBackend, IdempotencyError, RecordKey,
};

/// The claim: the record that is there, or ours, written with the server's clock (µs) as its
/// fencing token. Takeovers happen at least a lease apart, so the token of every later owner
/// of a key is larger, unless the server's clock steps back by more than a lease.
pub(super) static CLAIM: Lua = Lua::new(
    r#"
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local now = redis.call('TIME')
local fence = now[1] .. string.format('%06d', tonumber(now[2]))
local record = (string.gsub(ARGV[1], '"fence":"%?"', '"fence":"' .. fence .. '"', 1))
redis.call('SET', KEYS[1], record, 'PX', ARGV[2])
return {1, fence}
"#,
);

pub(crate) static EXTEND: Lua = Lua::new(
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
);

pub(super) static COMPLETE: Lua = Lua::new(
    r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or rec.owner ~= ARGV[1] then return 0 end
if rec.state == 'running' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if ARGV[4] == '2' then redis.call('PUBLISH', KEYS[1] .. ':wake', ARGV[2])
  elseif ARGV[4] == '1' then redis.call('PUBLISH', KEYS[1] .. ':wake', '1') end
end
return 1
"#,
);

pub(crate) static RELEASE: Lua = Lua::new(
    r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec.state == 'running' and rec.owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[1] .. ':wake', '0')
  return 1
end
return 0
"#,
);

/// The largest completed record a completion publishes on its wake-up channel (larger ones
/// publish a bare hint, and waiters `GET` the record).
const PUBLISHED_RECORD_MAX: usize = 64 * 1024;

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
    /// The body ran for this key, but its outcome could not be stored: the reason.
    NotStored(String),
}

/// Proof of ownership of one idempotency key: the Redis key and the owner token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerClaim {
    key: String,
    token: String,
    fingerprint: String,
    fence: u64,
    // When the claim was sent: its lease runs at least until then + the lease.
    granted: Instant,
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
            fence: 0,
            granted: Instant::now(),
        }
    }

    /// The fencing token of this claim: larger than that of every earlier owner of the key
    /// (it is the server's clock in µs at the claim; see the module docs). Hand it to the
    /// systems the body writes to, so they refuse writes of a stale owner.
    pub fn fence(&self) -> u64 {
        self.fence
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
    /// Redis failed before the body ran; see [`RedisStoreError`].
    Store(RedisStoreError),
    /// The body returned `Err`; nothing was stored and the key is free again.
    Body(E),
    /// The body ran, but this caller's lease ran out before its outcome was recorded (the
    /// process froze or was cut off past the lease, and another caller may have taken the key
    /// over). Nothing was written: the key's result is the successor's, not this one.
    LeaseLost {
        /// The logical key.
        key: String,
    },
    /// The body ran and its completion was sent, but whether it was recorded is unknown (no
    /// answer after the re-sends). A later call replays it if it landed.
    OutcomeUnknown {
        /// The logical key.
        key: String,
        /// The last failure seen.
        source: RedisStoreError,
    },
    /// An earlier call ran the body, but its outcome could not be stored (too large, not
    /// encodable): the key is done and the body does not run again while the record lives.
    OutcomeNotStored {
        /// The logical key.
        key: String,
        /// Why the outcome was not stored.
        reason: String,
    },
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
    /// One atomic claim attempt (one script: `GET`, else `SET … PX` with a fencing token):
    /// ownership, or what holds the key instead.
    pub async fn claim(
        &self,
        key: &RedisKey,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<Claim, RedisStoreError> {
        let redis_key = key.redis_key("idem");
        let token = owner_token();
        let record = IdemRecord::running(&token, fingerprint)
            .with_fence("?")
            .encode()?;
        let lease_ms = lease.as_millis().max(1).to_string();
        let granted = Instant::now();
        // Re-sending is safe: if the first attempt landed, the retry finds our own record.
        let (claimed, found): (i64, Vec<u8>) = self
            .store
            .eval(&CLAIM, &[&redis_key], &[&record, &lease_ms], true)
            .await?;
        let owner = |fence: u64| {
            Claim::Owner(OwnerClaim {
                key: redis_key.clone(),
                token: token.clone(),
                fingerprint: fingerprint.to_owned(),
                fence,
                granted,
            })
        };
        if claimed == 1 {
            let fence = std::str::from_utf8(&found)
                .ok()
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            return self.durable(owner(fence)).await;
        }
        let existing = IdemRecord::decode(&redis_key, &found)?;
        Ok(match existing.state {
            IdemState::Running if existing.owner == token => {
                return self.durable(owner(existing.fence().unwrap_or(0))).await
            }
            _ if existing.fp != fingerprint => Claim::Conflict,
            IdemState::Running => Claim::InProgress,
            IdemState::Done { outcome } => Claim::Replay(outcome),
            IdemState::NotStored { reason } => Claim::NotStored(reason),
        })
    }

    /// A claim counts once it reached the store's `Durability`; one that did not is given up.
    async fn durable(&self, claim: Claim) -> Result<Claim, RedisStoreError> {
        let Claim::Owner(owner) = &claim else {
            return Ok(claim);
        };
        if let Err(err) = self.store.detached().await?.confirm().await {
            let _ = self.release(owner).await;
            return Err(err);
        }
        Ok(claim)
    }

    /// Stores `outcome` for `ttl` if `claim` still owns the key; [`RedisStoreError::LeaseLost`]
    /// (and nothing written) if its lease ended and the key moved on. An outcome that cannot be
    /// stored marks the key "done, outcome not stored" and returns
    /// [`RedisStoreError::OutcomeNotStored`]; an answer lost after the re-sends that one read
    /// cannot settle is [`RedisStoreError::OutcomeUnknown`].
    ///
    /// Unlike the attribute's path, this cannot check that the outcome's JSON decodes back
    /// into the type a replay asks for (it knows only `T: Serialize`): an outcome that encodes
    /// but does not decode (a NaN `f64`, written as `null`) is stored, and its replays are
    /// `Undecodable`. Check such values before calling it.
    ///
    /// The write is finished by a task of its own: dropping this future does not stop it.
    pub async fn complete<T: Serialize + ?Sized>(
        &self,
        claim: &OwnerClaim,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), RedisStoreError> {
        let detached = self.store.detached().await?;
        let max = self.store.max_record_bytes().await?;
        // The caller's type is not known here (`T` may not be `DeserializeOwned`): what it
        // encodes to is stored as it is.
        Completion::new(detached, max, claim, (outcome, |_| Ok(())), ttl, None)?
            .spawn()
            .await
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

    /// Waits until `key`'s record is no longer a running claim, or `deadline` passes. Wakes on
    /// the completion's or release's pub/sub hint (one server), with jittered polling as the
    /// fallback (and the only way on a Cluster, or for a claim that simply expires).
    async fn wait_settled(
        &self,
        key: &RedisKey,
        deadline: Option<Instant>,
    ) -> Result<Settled, RedisStoreError> {
        let redis_key = key.redis_key("idem");
        let channel = format!("{redis_key}:wake");
        let polls = (Duration::from_millis(2), Duration::from_millis(100));
        let redis_key = &redis_key;
        let settled = wait_for_key(
            self.store,
            &channel,
            polls,
            deadline,
            |published| async move {
                // A completion that published its record: read from the message, not Redis.
                if let Some(record) =
                    published.and_then(|raw| IdemRecord::decode(redis_key, &raw).ok())
                {
                    if record.state != IdemState::Running {
                        return Ok::<_, RedisStoreError>(Look::Done(Settled::Record(record)));
                    }
                }
                Ok(match self.replay(key).await? {
                    None => Look::Done(Settled::Gone),
                    Some(record) if record.state != IdemState::Running => {
                        Look::Done(Settled::Record(record))
                    }
                    Some(_) => Look::Again(None),
                })
            },
        )
        .await?;
        Ok(settled.unwrap_or(Settled::TimedOut))
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
        self.run_watched(key, fingerprint, options, |_| body())
            .await
    }

    /// [`run`](Self::run), handing the body a [`LeaseWatch`] that fires once the claim's lease
    /// is lost, so that a body can stop work whose outcome would be rejected.
    pub async fn run_watched<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        fingerprint: &str,
        options: IdempotencyOptions,
        body: F,
    ) -> Result<Outcome<T>, IdempotentError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(LeaseWatch) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let lease = self.store.store_options().lease;
        let started = Instant::now();
        let logical = || key.tag().to_owned();
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
                Claim::Conflict => return Err(IdempotentError::Conflict { key: logical() }),
                Claim::NotStored(reason) => {
                    return Err(IdempotentError::OutcomeNotStored {
                        key: logical(),
                        reason,
                    })
                }
                Claim::InProgress => {
                    if options.in_flight == InFlight::Reject {
                        return Err(IdempotentError::InProgress { key: logical() });
                    }
                    let deadline = started + options.max_wait;
                    match self.wait_settled(key, Some(deadline)).await? {
                        Settled::TimedOut => {
                            return Err(IdempotentError::InProgress { key: logical() })
                        }
                        Settled::Record(IdemRecord {
                            fp,
                            state: IdemState::Done { outcome },
                            ..
                        }) if fp == fingerprint => {
                            let value = decode_outcome(&key.redis_key("idem"), outcome)?;
                            return Ok(Outcome {
                                value,
                                replayed: true,
                            });
                        }
                        // Claim again: it conflicts, reports the outcome not stored, or takes
                        // over a key that was released or expired.
                        Settled::Record(_) | Settled::Gone => {}
                    }
                }
            }
        };

        let detached = self.store.detached().await?;
        let max = self.store.max_record_bytes().await?;
        // Armed only while the body runs: a body cancelled or panicking gives the key up.
        let guard = ReleaseOnDrop::new(
            &RELEASE,
            detached.conn.clone(),
            claim.key.clone(),
            claim.token.clone(),
        );
        let heartbeat = start_heartbeat(&detached, &claim);
        let result = body(heartbeat.watch(claim.fence)).await;
        match result {
            Ok(value) => {
                // From here on the key is never freed: the completion finishes on its own.
                guard.disarm();
                let completion = Completion::new(
                    detached,
                    max,
                    &claim,
                    (&value, decodes_as::<T>),
                    options.ttl,
                    Some(heartbeat),
                )?;
                match completion.spawn().await {
                    Ok(()) => Ok(Outcome {
                        value,
                        replayed: false,
                    }),
                    Err(RedisStoreError::OutcomeNotStored { reason, .. }) => {
                        tracing::warn!(key = %claim.key, %reason, "idempotent outcome not stored; later calls get OutcomeNotStored");
                        Ok(Outcome {
                            value,
                            replayed: false,
                        })
                    }
                    Err(RedisStoreError::LeaseLost { .. }) => {
                        Err(IdempotentError::LeaseLost { key: logical() })
                    }
                    Err(RedisStoreError::OutcomeUnknown { source, .. }) => {
                        Err(IdempotentError::OutcomeUnknown {
                            key: logical(),
                            source: *source,
                        })
                    }
                    Err(other) => Err(IdempotentError::Store(other)),
                }
            }
            Err(err) => {
                drop(heartbeat);
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

fn start_heartbeat(detached: &Detached, claim: &OwnerClaim) -> Heartbeat {
    Heartbeat::start(
        &EXTEND,
        detached.conn.clone(),
        claim.key.clone(),
        claim.token.clone(),
        detached.options.lease,
        (claim.granted, detached.options.lease),
        detached.options.command_timeout,
    )
}

/// How a wait for somebody else's claim ended.
enum Settled {
    /// The record is no longer a running claim.
    Record(IdemRecord),
    /// There is no record: released, or its lease expired.
    Gone,
    /// The deadline passed first.
    TimedOut,
}

/// The final write of a finished body, owned so that a task of its own can finish it.
struct Completion {
    detached: Detached,
    key: String,
    token: String,
    record: String,
    ttl_ms: String,
    // Why the outcome itself is not in `record`, if it is not.
    not_stored: Option<String>,
    // Kept beating until the write has returned.
    heartbeat: Option<Heartbeat>,
    // The wake-up hint (one node; a Cluster's waiters poll): "2" publishes the record itself
    // (small ones), "1" a bare hint, "0" nothing.
    wake: &'static str,
}

/// Whether an outcome's JSON decodes back into the outcome's type, which a replay needs.
type Replayable = fn(&serde_json::Value) -> Result<(), serde_json::Error>;

/// [`Replayable`] for outcomes of type `T`.
fn decodes_as<T: DeserializeOwned>(json: &serde_json::Value) -> Result<(), serde_json::Error> {
    T::deserialize(json).map(drop)
}

impl Completion {
    /// Encodes `outcome`, or the "done, outcome not stored" record if it cannot be stored
    /// (not encodable, its JSON refused by `replayable`, or a record longer than `max` bytes).
    /// Synchronous, so that nothing can cancel the step between a finished body and its
    /// spawned write.
    fn new<T: Serialize + ?Sized>(
        detached: Detached,
        max: u64,
        claim: &OwnerClaim,
        (outcome, replayable): (&T, Replayable),
        ttl: Duration,
        heartbeat: Option<Heartbeat>,
    ) -> Result<Completion, RedisStoreError> {
        let encoded = serde_json::to_value(outcome)
            .map_err(|e| format!("the outcome cannot be encoded as JSON: {e}"))
            .and_then(|outcome| match replayable(&outcome) {
                Ok(()) => Ok(outcome),
                Err(error) => Err(crate::backends::not_replayable(&error)),
            })
            .and_then(|outcome| {
                IdemRecord::done(&claim.token, &claim.fingerprint, outcome)
                    .with_fence(claim.fence.to_string())
                    .encode()
                    .map_err(|e| e.to_string())
            })
            .and_then(|record| match record.len() as u64 {
                len if len > max => Err(format!(
                    "its record of {len} bytes exceeds the server's proto-max-bulk-len of {max} bytes"
                )),
                _ => Ok(record),
            });
        let (record, not_stored) = match encoded {
            Ok(record) => (record, None),
            Err(reason) => (
                IdemRecord::not_stored(&claim.token, &claim.fingerprint, reason.clone())
                    .with_fence(claim.fence.to_string())
                    .encode()?,
                Some(reason),
            ),
        };
        let wake = match record.len() {
            _ if detached.conn.is_cluster() => "0",
            len if len <= PUBLISHED_RECORD_MAX => "2",
            _ => "1",
        };
        Ok(Completion {
            key: claim.key.clone(),
            token: claim.token.clone(),
            record,
            ttl_ms: ttl.as_millis().max(1).to_string(),
            not_stored,
            heartbeat,
            wake,
            detached,
        })
    }

    /// Writes the record on a task of its own and waits for it; the write goes on if this
    /// future is dropped.
    async fn spawn(self) -> Result<(), RedisStoreError> {
        outlive_caller(self.key.clone(), "completion", self.write()).await
    }

    async fn write(self) -> Result<(), RedisStoreError> {
        let written: Result<i64, _> = self
            .detached
            .eval(
                &COMPLETE,
                &[&self.key],
                &[&self.token, &self.record, &self.ttl_ms, self.wake],
                true,
            )
            .await;
        let keys = FinalWriteKeys {
            record: &self.key,
            lease: &self.key,
        };
        let result =
            finish_final_write(&self.detached, written, keys, |last| self.settle(last)).await;
        drop(self.heartbeat);
        match (result, self.not_stored) {
            (Ok(()), Some(reason)) => Err(RedisStoreError::OutcomeNotStored {
                key: self.key,
                reason,
            }),
            (result, _) => result,
        }
    }

    /// No answer after the re-sends: one read decides if it can.
    async fn settle(&self, last: RedisStoreError) -> Result<(), RedisStoreError> {
        let unknown = |source| RedisStoreError::OutcomeUnknown {
            key: self.key.clone(),
            source: Box::new(source),
        };
        let found: Option<Vec<u8>> = match self
            .detached
            .run(|mut conn| {
                let cmd = redis::cmd("GET").arg(&self.key).to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await
        {
            Ok(found) => found,
            Err(_) => return Err(unknown(last)),
        };
        let record = found.and_then(|raw| IdemRecord::decode(&self.key, &raw).ok());
        match record {
            Some(record) if record.owner == self.token => match record.state {
                IdemState::Running => Err(unknown(last)),
                IdemState::Done { .. } | IdemState::NotStored { .. } => Ok(()),
            },
            _ => Err(RedisStoreError::LeaseLost {
                key: self.key.clone(),
            }),
        }
    }
}

// ---- The store behind `#[idempotent(store = ...)]` ----

fn unavailable(err: RedisStoreError) -> IdempotencyError {
    IdempotencyError::StoreUnavailable {
        reason: err.to_string(),
    }
}

/// The attribute's error for a store failure on `client_key`: undecodable records, lost leases,
/// unknown and unstored outcomes keep their own variants; the rest means "unavailable".
fn refused(client_key: &str, err: RedisStoreError) -> IdempotencyError {
    let key = client_key.to_owned();
    match err {
        RedisStoreError::Undecodable { reason, .. } => {
            IdempotencyError::Undecodable { key, reason }
        }
        RedisStoreError::LeaseLost { .. } => IdempotencyError::LeaseLost { key },
        RedisStoreError::OutcomeNotStored { reason, .. } => {
            IdempotencyError::OutcomeNotStored { key, reason }
        }
        RedisStoreError::OutcomeUnknown { source, .. } => IdempotencyError::OutcomeUnknown {
            key,
            reason: source.to_string(),
        },
        other => unavailable(other),
    }
}

/// A claim on an idempotency key in Redis, kept alive by a heartbeat until completed or released.
pub struct RedisIdempotencyLease {
    claim: OwnerClaim,
    client_key: String,
    detached: Detached,
    max_record: u64,
    heartbeat: Heartbeat,
}

impl RedisIdempotencyLease {
    /// A watch on this claim's lease: fires once the heartbeat finds it lost.
    pub fn watch(&self) -> LeaseWatch {
        self.heartbeat.watch(self.claim.fence)
    }

    /// The claim's fencing token (see [`OwnerClaim::fence`]).
    pub fn fence(&self) -> u64 {
        self.claim.fence
    }
}

impl<T> IdempotencyBackend<T> for RedisStore
where
    T: Serialize + DeserializeOwned + Send + Sync,
{
    type Lease = RedisIdempotencyLease;
    type InFlight = Fingerprint;
    const STORE: &'static str = "redis";

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
            let refuse = |err| refused(&client_key, err);
            match self
                .idempotency()
                .claim(&redis_key, &fp, lease)
                .await
                .map_err(refuse)?
            {
                Claim::Owner(claim) => {
                    let detached = self.detached().await.map_err(refuse)?;
                    let max_record = self.max_record_bytes().await.map_err(refuse)?;
                    let heartbeat = start_heartbeat(&detached, &claim);
                    Ok(BackendClaim::Execute(RedisIdempotencyLease {
                        claim,
                        client_key,
                        detached,
                        max_record,
                        heartbeat,
                    }))
                }
                Claim::Replay(outcome) => Ok(BackendClaim::Replay(
                    decode_outcome(&redis_key.redis_key("idem"), outcome).map_err(refuse)?,
                )),
                Claim::InProgress => Ok(BackendClaim::InFlight(fingerprint)),
                Claim::Conflict => Err(IdempotencyError::Conflict { key: client_key }),
                Claim::NotStored(reason) => Err(IdempotencyError::OutcomeNotStored {
                    key: client_key,
                    reason,
                }),
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
            let refuse = |err| refused(&client_key, err);
            match self
                .idempotency()
                .wait_settled(&redis_key, deadline)
                .await
                .map_err(refuse)?
            {
                Settled::TimedOut => Err(IdempotencyError::InProgress { key: client_key }),
                Settled::Gone => Ok(None), // released or expired: claim again
                Settled::Record(record) => match record.state {
                    IdemState::Done { outcome } if record.fp == fp => {
                        let outcome = decode_outcome(&redis_key.redis_key("idem"), outcome);
                        outcome.map(Some).map_err(refuse)
                    }
                    // The claim reports the conflict, or the outcome that was not stored.
                    _ => Ok(None),
                },
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
            client_key,
            detached,
            max_record,
            heartbeat,
        } = lease;
        // Encoded and spawned in this first poll: a caller dropped from here on cannot stop
        // the write, and the heartbeat beats until it returns.
        let completion = Completion::new(
            detached,
            max_record,
            &claim,
            (outcome, decodes_as::<T>),
            ttl,
            Some(heartbeat),
        )
        .map_err(|err| refused(&client_key, err))?;
        completion
            .spawn()
            .await
            .map_err(|err| refused(&client_key, err))
    }

    fn release(&self, lease: Self::Lease) {
        let RedisIdempotencyLease {
            claim,
            detached,
            heartbeat,
            ..
        } = lease;
        drop(heartbeat);
        // Dropping an armed guard releases in the background (Drop-safe, never blocks).
        drop(ReleaseOnDrop::new(
            &RELEASE,
            detached.conn,
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
    const STORE: &'static str = "redis";

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
