//! A Redis store for `#[idempotent]`, `#[sequenced]` and `#[cached]`: the same guarantees
//! across worker processes and machines (feature `redis`).
//!
//! - [`RedisStore`]: one lazily connected server or cluster, usable as a `static` or an `Arc`.
//! - [`RedisIdempotency`]: atomic claim (`SET NX PX GET`), token-checked completion and
//!   release, lease heartbeat, replay with one `GET`, `Conflict` on another fingerprint.
//! - [`RedisSequences`]: a lease lock with a fencing token and a counter committed only by the
//!   current holder of a successful call, so numbers are gap-free.
//! - [`RedisCache`]: values with a TTL; one process computes a cold key, the others wait for it.
//!
//! One file per attribute holds that attribute's whole protocol: `idempotency.rs` (claim,
//! complete, release, replay, and the `IdempotencyBackend` the attribute calls),
//! `sequence.rs` (lock, fence, counter, commit, and the `SequenceBackend`), `cache.rs` (fill
//! lock and value). Beside them: `connection.rs` (the counted connection), `lease.rs` (owner
//! tokens, heartbeats, backoff, this process's FIFO turn), `envelope.rs` (versioned records),
//! `keys.rs` (hash-tagged key names), `store.rs` (the lazily connected store).
//!
//! Every Redis key of one logical key shares one hash tag ([`RedisKey`]), so the multi-key
//! scripts work on Redis Cluster. Records are versioned JSON ([`envelope`]). Failures are
//! [`RedisStoreError`]s: every command has a deadline, token-checked commands are re-sent
//! after a lost connection, and nothing ever reports "free" when it does not know.
//!
//! # With the attributes
//! - `#[idempotent(store = RECEIPTS)]` with `static RECEIPTS: RedisIdempotencyStore<Receipt> =
//!   RedisIdempotencyStore::new(&REDIS);` ([`RedisIdempotencyStore`] names the outcome type,
//!   which must be `Serialize + DeserializeOwned`).
//! - `#[sequenced(store = REDIS.sequence("orders::next_no"))]` ([`RedisStore::sequence`] names
//!   the family of sequences, because the attribute passes only the key).
//! - `#[cached(store = REDIS_CACHE)]` with a [`RedisCacheStore`] (async functions returning
//!   `Result<T, E>` with `E: From<RedisStoreError>`), or [`RedisCache::get_or_compute`] directly.
//!
//! # Async only
//! Every operation is `async` and needs a Tokio runtime (the lease heartbeat is a Tokio task).
//! A sync `#[idempotent]` function with a Redis store does not compile ("cannot be used from a
//! sync `fn`"); a sync `#[sequenced]` function with one fails every call with
//! `SequenceError::Store` ("make the function `async`"). Blocking a thread on Redis from inside
//! an async runtime is the classic way to stall one, so there is deliberately no blocking
//! bridge; sync code keeps the in-process stores.
//!
//! Requires Redis 7.0 or newer (`SET … NX GET`).
//!
//! # Leases need a running runtime
//! A claim or a sequence lock is kept alive by a heartbeat task on the caller's Tokio runtime,
//! which extends the lease every third of it (default lease 10 s, [`RedisStore::lease`]). A
//! body that blocks every worker thread of that runtime for longer than the lease starves the
//! heartbeat: the lease runs out and another process may take the key over while the body is
//! still running, exactly as if this process had frozen. Keep blocking work in
//! `spawn_blocking`, or give the store a lease longer than the longest such stall.

mod cache;
mod connection;
pub mod envelope;
mod error;
mod idempotency;
mod keys;
mod lease;
mod sequence;
mod store;

pub use cache::{CacheOptions, CachedError, RedisCache, RedisCacheStore};
pub use connection::Connection;
pub use error::RedisStoreError;
pub use idempotency::{
    Claim, IdempotencyOptions, IdempotentError, InFlight, Outcome, OwnerClaim, RedisIdempotency,
    RedisIdempotencyLease, RedisIdempotencyStore,
};
pub use keys::RedisKey;
pub use lease::LeaseWatch;
pub use sequence::{
    RedisSequence, RedisSequenceLease, RedisSequences, SeqTicket, SequenceOptions, SequencedError,
};
pub use store::{RedisStore, StoreOptions};

/// The `redis` driver this store is built on, for commands of your own on
/// [`RedisStore::connection`].
pub use ::redis as driver;

/// A fingerprint of `value` that is stable across processes, restarts and builds: the
/// 128-bit xxh3 of its JSON encoding, in hex.
///
/// ```
/// use racefree_runtime::redis::fingerprint_json;
///
/// assert_eq!(fingerprint_json(&("order-42", 1999)), fingerprint_json(&("order-42", 1999)));
/// assert_ne!(fingerprint_json(&("order-42", 1999)), fingerprint_json(&("order-42", 2000)));
/// ```
pub fn fingerprint_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}
