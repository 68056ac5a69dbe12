//! Values in Redis with a TTL, computed once per cold key across every process.
//!
//! # Protocol (Redis keys `rf:{tag}:val` and `rf:{tag}:fill`, one slot)
//! 1. In-process single flight: concurrent callers of one key in one process share one lead
//!    ([`SingleFlight`](crate::sync::single_flight::SingleFlight)), so a process sends one request
//!    per key, not one per caller.
//! 2. The lead runs one Lua script: the value if present (a hit: 1 round trip); otherwise it
//!    tries `SET fill <token> NX PX <lease>`. The winner computes (heartbeat extending its lease)
//!    and stores the value with `PX ttl` while freeing the fill lock, in one more script; the
//!    others retry with jittered backoff capped by the fill lock's remaining lease until the
//!    value is there or the lock is free (its holder failed or died: one of them takes over).
//!
//! Errors are never cached: a failed computation frees the fill lock and is returned to its
//! caller only; the waiters try for themselves, one at a time.
//!
//! # Invalidation wins over a fill in flight
//! Each key has a generation counter (`rf:{tag}:gen`). The lead reads it when it takes the
//! fill lock; [`RedisCache::invalidate`] deletes the value and increments it; the fill stores
//! its value only if the generation is still the one it started under. A value computed from
//! data older than an invalidation is returned to its own caller but never stored. Generation
//! counters expire a day after their last invalidation, so a fill running longer than a day
//! across an invalidation could still store its value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connection::Lua;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::envelope::{decode_value, encode_value};
use super::lease::{owner_token, Backoff, Heartbeat, ReleaseOnDrop, EXTEND_LOCK, RELEASE_LOCK};
use super::{RedisKey, RedisStore, RedisStoreError};
use crate::sync::single_flight::{Join, SingleFlight};
use crate::telemetry::{self, Meter, Started};

// KEYS: value, fill lock, generation. The lead gets the generation it fills under.
pub(super) static GET_OR_LOCK: Lua = Lua::new(
    r#"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
  or redis.call('GET', KEYS[2]) == ARGV[1] then
  return {2, redis.call('GET', KEYS[3]) or '0'}
end
return {3, tostring(redis.call('PTTL', KEYS[2]))}
"#,
);

// KEYS: value, fill lock, generation. ARGV: token, value, ttl ms, generation at the start.
pub(super) static FILL: Lua = Lua::new(
    r#"
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if mine then redis.call('DEL', KEYS[2]) end
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return 2 end
if mine then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3])
return 0
"#,
);

// KEYS: value, generation.
pub(super) static INVALIDATE: Lua = Lua::new(
    r#"
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
return 1
"#,
);

/// How [`RedisCache::get_or_compute`] treats one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// How long a value lives in Redis.
    pub ttl: Duration,
    /// How long a caller waits for another process's computation before giving up with
    /// [`RedisStoreError::Timeout`].
    pub max_wait: Duration,
}

impl CacheOptions {
    /// Values live `ttl`; waiters wait up to 60 s.
    pub const fn new(ttl: Duration) -> Self {
        CacheOptions {
            ttl,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// Why a cached call produced no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum CachedError<E> {
    /// Redis failed.
    Store(RedisStoreError),
    /// This caller's own computation failed (never a copy of somebody else's error).
    Body(E),
}

impl<E> From<RedisStoreError> for CachedError<E> {
    fn from(err: RedisStoreError) -> Self {
        CachedError::Store(err)
    }
}

/// The cache operations of a [`RedisStore`] (see [`RedisStore::cache`]).
#[derive(Debug, Clone, Copy)]
pub struct RedisCache<'s> {
    store: &'s RedisStore,
}

impl RedisStore {
    /// A TTL cache with cross-process single flight on this store.
    pub fn cache(&self) -> RedisCache<'_> {
        RedisCache { store: self }
    }
}

enum Found {
    Value(Vec<u8>),
    /// This caller fills, under this generation.
    Lead(String),
    Held(Duration),
}

impl<'s> RedisCache<'s> {
    /// The cached value of `key`, or `compute`'s value after exactly one process computed it.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use std::time::Duration;
    /// use racefree_runtime::redis::{CacheOptions, RedisKey, RedisStore};
    ///
    /// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
    /// let key = RedisKey::new("rates::load", None, "EUR");
    /// let rate: Result<f64, _> = REDIS
    ///     .cache()
    ///     .get_or_compute(&key, CacheOptions::new(Duration::from_secs(300)), || async {
    ///         Ok::<_, std::io::Error>(1.08)
    ///     })
    ///     .await;
    /// # drop(rate); }
    /// ```
    pub async fn get_or_compute<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        options: CacheOptions,
        compute: F,
    ) -> Result<T, CachedError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        self.get_or_compute_metered(key, options, compute, &Meter::DISABLED)
            .await
    }

    // `get_or_compute`, reporting to `meter` (a `RedisCacheStore`'s function).
    async fn get_or_compute_metered<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        options: CacheOptions,
        compute: F,
        meter: &Meter,
    ) -> Result<T, CachedError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let val = key.redis_key("val");
        let fills: &SingleFlight<String, Arc<str>> =
            self.store.fills.get_or_init(SingleFlight::new);
        let mut compute = Some(compute);
        // A call that waits is counted once, however many leads it waits for.
        let mut waited = false;
        loop {
            match fills.join(val.clone()) {
                Join::Follow(flight) => {
                    if !std::mem::replace(&mut waited, true) {
                        meter.cache_waited();
                    }
                    let started = Started::now();
                    let landed = flight.wait_async().await;
                    meter.flight_waited(started);
                    match landed {
                        Some(text) => return Ok(decode_value(&val, text.as_bytes())?),
                        // The lead failed: try again, possibly as the next lead.
                        None => continue,
                    }
                }
                Join::Lead(lead) => {
                    let compute = compute
                        .take()
                        .expect("a caller leads at most once: leading ends the loop");
                    let (text, value) =
                        self.fill(key, options, compute, meter, &mut waited).await?;
                    lead.complete(text);
                    return Ok(value);
                }
            }
        }
    }

    async fn fill<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        options: CacheOptions,
        compute: F,
        meter: &Meter,
        // The call's: counted once however many leads it waits for, here or in this process.
        waited: &mut bool,
    ) -> Result<(Arc<str>, T), CachedError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let (val, lock, gen) = (
            key.redis_key("val"),
            key.redis_key("fill"),
            key.redis_key("gen"),
        );
        let lease = self.store.store_options().lease;
        let token = owner_token();
        let started = Instant::now();
        let wait_started = Started::now();
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        let mut granted;
        // Waiting for another process's fill: its value is not a hit of this call.
        let mut waited_here = false;
        let generation = loop {
            granted = Instant::now();
            match self.get_or_lock(&val, &lock, &gen, &token, lease).await? {
                Found::Value(raw) => {
                    if waited_here {
                        meter.flight_waited(wait_started);
                    }
                    if !*waited {
                        meter.hit();
                    }
                    let value: T = decode_value(&val, &raw)?;
                    let text =
                        String::from_utf8(raw).map_err(|e| RedisStoreError::Undecodable {
                            key: val.clone(),
                            reason: e.to_string(),
                        })?;
                    return Ok((text.into(), value));
                }
                Found::Lead(generation) => break generation,
                Found::Held(remaining) => {
                    waited_here = true;
                    if !std::mem::replace(waited, true) {
                        meter.cache_waited();
                    }
                    let waited = started.elapsed();
                    if waited >= options.max_wait {
                        return Err(RedisStoreError::Timeout {
                            after: options.max_wait,
                        }
                        .into());
                    }
                    backoff
                        .wait(Some(remaining.min(options.max_wait - waited)))
                        .await;
                }
            }
        };

        let conn = self.store.connection().await?;
        let guard = ReleaseOnDrop::new(&RELEASE_LOCK, conn.clone(), lock.clone(), token.clone());
        let heartbeat = Heartbeat::start(
            &EXTEND_LOCK,
            conn,
            lock.clone(),
            token.clone(),
            lease,
            (granted, lease),
            self.store.store_options().command_timeout,
        );
        meter.executed();
        let computed = compute().await;
        drop(heartbeat);
        // On any early return below the guard frees the fill lock in the background.
        let value = computed.map_err(CachedError::Body)?;
        let text = encode_value(&value)?;
        // A value no hit could decode is not stored: every hit would be `Undecodable`.
        if let Err(error) = decode_value::<T>(&val, text.as_bytes()) {
            return Err(RedisStoreError::Serialize {
                reason: crate::backends::not_replayable(&error),
            }
            .into());
        }
        let ttl_ms = options.ttl.as_millis().max(1) as u64;
        let ttl_ms = ttl_ms.to_string();
        self.store
            .eval::<i64>(
                &FILL,
                &[&val, &lock, &gen],
                &[&token, &text, &ttl_ms, &generation],
                true,
            )
            .await?;
        guard.disarm();
        Ok((text.into(), value))
    }

    async fn get_or_lock(
        &self,
        val: &str,
        lock: &str,
        gen: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Found, RedisStoreError> {
        let lease_ms = lease.as_millis().max(1).to_string();
        let (found, payload): (i64, Vec<u8>) = self
            .store
            .eval(&GET_OR_LOCK, &[val, lock, gen], &[token, &lease_ms], true)
            .await?;
        Ok(match found {
            1 => Found::Value(payload),
            2 => Found::Lead(String::from_utf8_lossy(&payload).into_owned()),
            _ => {
                let ms = std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0);
                Found::Held(Duration::from_millis(ms.max(0) as u64))
            }
        })
    }

    /// Removes `key`'s value, so the next call computes again; a fill in flight (started
    /// before this) does not store its value.
    pub async fn invalidate(&self, key: &RedisKey) -> Result<(), RedisStoreError> {
        let (val, gen) = (key.redis_key("val"), key.redis_key("gen"));
        self.store
            .eval::<i64>(&INVALIDATE, &[&val, &gen], &[], true)
            .await
            .map(drop)
    }
}

/// One function's values in Redis, for `#[cached(store = ...)]`: a [`RedisStore`], a name that
/// prefixes the function's keys (so functions sharing a store never see each other's values),
/// and the values' TTL. Build it as a `static` next to the store:
///
/// ```no_run
/// use std::time::Duration;
/// use racefree_runtime::redis::{RedisCacheStore, RedisStore, RedisStoreError};
///
/// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
/// static RATES: RedisCacheStore = RedisCacheStore::new(&REDIS, "rates", Duration::from_secs(300));
///
/// // #[cached(key = currency.to_owned(), store = RATES)]
/// // async fn rate(currency: &str) -> Result<f64, ApiError> { … }   // ApiError: From<RedisStoreError>
/// ```
/// Keys are encoded as JSON (`K: Serialize`) and values as the versioned envelope
/// (`T: Serialize + DeserializeOwned`). It serves async functions returning `Result<T, E>` with
/// `E: From<RedisStoreError>`: Redis failing is an `Err` of the function, never a panic and
/// never a silent second computation. A sync function cannot use it (no method `run_cached`).
#[derive(Debug, Clone, Copy)]
pub struct RedisCacheStore<'s> {
    store: &'s RedisStore,
    name: &'static str,
    options: CacheOptions,
}

impl<'s> RedisCacheStore<'s> {
    /// Values of the function family `name` on `store`, living `ttl`.
    pub const fn new(store: &'s RedisStore, name: &'static str, ttl: Duration) -> Self {
        RedisCacheStore {
            store,
            name,
            options: CacheOptions::new(ttl),
        }
    }

    /// How long a caller waits for another process's computation before failing with
    /// [`RedisStoreError::Timeout`] (default 60 s).
    pub const fn max_wait(mut self, max_wait: Duration) -> Self {
        self.options.max_wait = max_wait;
        self
    }

    fn key<K: Serialize>(&self, key: &K) -> Result<RedisKey, RedisStoreError> {
        let text = serde_json::to_string(key).map_err(|e| RedisStoreError::Serialize {
            reason: e.to_string(),
        })?;
        Ok(RedisKey::new(self.name, None, text))
    }

    /// Removes `key`'s value, so the next call computes again.
    pub async fn invalidate<K: Serialize>(&self, key: &K) -> Result<(), RedisStoreError> {
        self.store.cache().invalidate(&self.key(key)?).await
    }
}

impl<K, T, E> crate::cached::AsyncCacheStore<K, Result<T, E>> for RedisCacheStore<'_>
where
    K: Serialize,
    T: Serialize + DeserializeOwned,
    E: From<RedisStoreError>,
{
    async fn run_cached_async(
        &self,
        key: K,
        body: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let meter = Meter::shared(self.name, "redis");
        let key = self
            .key(&key)
            .inspect_err(|error| meter.store_error(telemetry::redis_error_kind(error)))?;
        match self
            .store
            .cache()
            .get_or_compute_metered(&key, self.options, || body, &meter)
            .await
        {
            Ok(value) => Ok(value),
            Err(CachedError::Store(error)) => {
                meter.store_error(telemetry::redis_error_kind(&error));
                Err(E::from(error))
            }
            Err(CachedError::Body(error)) => Err(error),
        }
    }
}
