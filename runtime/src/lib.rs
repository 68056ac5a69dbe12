//! The runtime of [racefree](https://docs.rs/racefree): small pieces with one job each and no
//! knowledge of the macros that use them.
//!
//! - [`flight`]: a one-shot cell a leader completes and followers wait on (sync or async).
//! - [`single_flight`]: the per-key registry of flights: at most one computation per key.
//! - [`cache`]: the memo cache of `#[cached]` (TTL, capacity, stats) over the two above;
//!   [`cache_store`] what `#[cached(store = ...)]` accepts; [`clock`] the clock TTLs read.
//! - [`handle`]: the type-erased home of a function's own cache (`erased.rs` holds what the
//!   three attributes' homes share).
//! - [`stats`]: hit/coalesced/execution counters.
//! - [`keyed_locks`]: per-key FIFO locks with re-entry detection, for threads and tasks.
//! - [`sequencer`]: gap-free per-key numbers under those locks, and the store trait.
//! - [`idempotency`]: idempotency records: the backend contract and the in-process store;
//!   [`idempotency_call`] the protocol an `#[idempotent]` call runs, [`idempotency_handle`] the
//!   home of a function's own store, [`fingerprint`] stable request fingerprints, [`replay`]
//!   the replayed flag, [`error`] why a call was refused.
//! - `http` (feature `axum`): the HTTP pieces around `#[idempotent]`.
//! - `redis` (feature `redis`): the Redis stores of all three attributes.

#![warn(missing_docs)]

pub mod cache;
pub mod cache_store;
pub mod clock;
mod erased;
pub mod error;
pub mod fingerprint;
pub mod flight;
pub mod handle;
#[cfg(feature = "axum")]
pub mod http;
pub mod idempotency;
pub mod idempotency_call;
pub mod idempotency_handle;
pub mod keyed_locks;
#[cfg(feature = "redis")]
pub mod redis;
pub mod replay;
pub mod sequence_error;
pub mod sequence_handle;
pub mod sequencer;
pub mod single_flight;
pub mod stats;

pub use cache::{Cache, CacheBuilder, CacheConfig, CacheLead, Lookup};
pub use error::IdempotencyError;
pub use fingerprint::Fingerprint;
pub use handle::{CacheHandle, HandleCell};
pub use idempotency::{
    BlockingIdempotencyBackend, IdempotencyBackend, IdempotencyStats, IdempotencyStore,
};
pub use idempotency_handle::IdempotencyHandle;
pub use keyed_locks::{Holder, KeyGuard, KeyedLocks};
pub use replay::Replay;
pub use sequence_error::SequenceError;
pub use sequence_handle::{SequenceCell, SequenceHandle};
pub use sequencer::{Seq, SequenceBackend, SequenceLease, Sequencer, SequencerLease};
pub use stats::CacheStats;
