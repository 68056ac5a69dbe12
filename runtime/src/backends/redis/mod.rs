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
//! lock and value). Beside them: `connection.rs` (the counted connection, and the list of
//! every Lua script, all loaded at connect), `lease.rs` (owner tokens, heartbeats, backoff,
//! this process's FIFO turn), `envelope.rs` (versioned records), `keys.rs` (hash-tagged key
//! names), `store.rs` (the lazily connected store).
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
//! Requires Redis 7.0 or newer.
//!
//! # The deployment is checked on first use
//! The first command of a store reads `maxmemory-policy` and `proto-max-bulk-len` (`CONFIG
//! GET`). Unless the policy is `noeviction`, the store refuses every operation with
//! [`RedisStoreError::EvictionPolicy`] naming the policy: under `allkeys-*` a counter or an
//! outcome can be evicted (numbers restart, bodies re-run), under `volatile-*` live claims and
//! locks (they carry a TTL) can. A server whose `CONFIG` is renamed or disabled (common on
//! managed services) cannot be checked and is refused the same way ("unknown"). Opt out with
//! [`RedisStore::accept_eviction`] when the policy is known to be safe or the risk is accepted.
//! `proto-max-bulk-len` bounds the size of an outcome record (see `idempotency.rs`).
//!
//! # Leases need a running runtime
//! A claim or a sequence lock is kept alive by a heartbeat task on the caller's Tokio runtime
//! (default lease 10 s, [`RedisStore::lease`]), from the claim until the final write (completion
//! or commit) has returned. A beat is due a third of the lease after the last one that landed; a
//! slow beat still counts when its late answer comes, and an unanswered or failed one is joined
//! by another soon, so the lease survives answers delayed by up to `2/3 × lease` and an outage
//! shorter than `2/3 × lease − max(min(command timeout, lease/3), lease/12)` (6.6 s and 4.6 s
//! with the defaults; see `lease.rs`). A body that blocks every worker thread of that runtime for longer
//! starves the heartbeat: the lease runs out and another process may take the key over while
//! the body is still running, exactly as if this process had frozen. That owner's final write
//! is then refused and its caller gets `LeaseLost`, never `Ok`; its side effects are its own
//! (fence them with the claim's or ticket's fencing token). Keep blocking work in
//! `spawn_blocking`, or give the store a lease longer than the longest such stall.
//!
//! # What each failure means
//! - `Store` / `StoreUnavailable`: nothing ran and nothing was consumed.
//! - `LeaseLost`: this caller's lease ended; its write was refused; another caller's result
//!   stands.
//! - `OutcomeUnknown` / `CommitUnknown`: the final write was sent, no answer came back after
//!   the re-sends, and one read could not settle it. It may have landed (or still land).
//! - `OutcomeNotStored`: the body ran; its outcome could not be stored; the key is done.
//! - `Undecodable`: a record exists that this build cannot read; nothing ran.
//! - [`RedisStoreError::DataLost`]: the server lost its data since this process first saw it;
//!   sequences refuse until [`RedisStore::accept_data_loss`].
//!
//! # Guarantee matrix
//! "Exactly once" is per key and within the outcome's TTL; "gap-free" means every number handed
//! to a successful call is committed and none is handed out twice.
//!
//! | Deployment | `#[idempotent]` | `#[sequenced]` | `#[cached]` |
//! |---|---|---|---|
//! | One node, AOF `appendfsync always` | exactly once; a crashed owner is taken over once after its lease; a stale owner gets `LeaseLost` | gap-free, no repeats, fences only grow | one fill per cold key and TTL |
//! | One node, AOF `everysec` or RDB snapshots | a crash loses the last second (or everything since the snapshot): claims and outcomes written then are gone, and a retry runs the body again | a commit in the lost window is gone and its number is handed out again; the epoch key is older, so this is **not** detected | values lost: recomputed |
//! | One node without persistence, restarted | everything lost: every key runs again | processes running across the restart refuse with `DataLost` until `accept_data_loss()`; a process started after the restart cannot tell and numbering restarts at `start` | cold cache |
//! | Replica promoted (`REPLICAOF NO ONE`, Sentinel) | replication is asynchronous: writes the replica had not received are lost. A lost claim lets a second owner run concurrently (the first then gets `LeaseLost`); a lost outcome lets a retry run again | lost commits hand their numbers out again; lost fence increments repeat fences; not detected (the epoch key was replicated long before) | values lost: recomputed |
//! | Redis Cluster | as one node, per shard (all keys of one logical key share a hash tag, so every script runs on one shard); a shard failover as above | as one node per shard; the epoch key lives on one shard, so only that shard's data loss is detected | as one node, per shard |
//! | Server clock steps | leases are enforced by the server's clock: a forward jump ends leases early (a takeover while the owner runs; the owner gets `LeaseLost`); idempotency fencing tokens are server µs, so a backward step longer than a lease can make a later token smaller | leases as for `#[idempotent]`; fences are counters, unaffected | fill locks end early: a second fill, same value |
//! | Client clock steps | none: waits and heartbeats use the monotonic clock | none | none |
//!
//! [`Durability`] closes the `everysec` and failover windows above, at one more round trip per
//! write: with `Durability::Replicas` (`WAIT`) a claim, acquire, completion or commit counts
//! only once that many replicas have it, and with `Durability::Fsynced` (`WAITAOF`) once it is
//! fsynced; a write that does not get there is given up (claims, acquires) or reported unknown
//! (completions, commits). One server with replicas only, not on a Cluster.

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
pub use store::{Durability, RedisStore, StoreOptions};

/// The `redis` driver this store is built on, for commands of your own on
/// [`RedisStore::connection`].
pub use ::redis as driver;

/// A fingerprint of `value` that is stable across processes, restarts and builds: the
/// first 128 bits of the BLAKE3 digest of its JSON encoding (keyed like
/// [`Fingerprint`](crate::Fingerprint), so a chosen payload cannot collide with another), in hex.
///
/// ```
/// use racefree_runtime::redis::fingerprint_json;
///
/// assert_eq!(fingerprint_json(&("order-42", 1999)), fingerprint_json(&("order-42", 1999)));
/// assert_ne!(fingerprint_json(&("order-42", 1999)), fingerprint_json(&("order-42", 2000)));
/// ```
pub fn fingerprint_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    crate::Fingerprint::of_bytes(&bytes).to_string()
}
