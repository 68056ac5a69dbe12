//! The runtime of [racefree](https://docs.rs/racefree). Its tree shows its two axes, which
//! attribute and which backend, and dependencies point one way (down this list):
//!
//! - [`sync`]: [flights](sync::flight), [single flight](sync::single_flight),
//!   [keyed FIFO locks](sync::keyed_locks), the [clock](sync::clock): no attribute knowledge.
//! - [`cached`]: the memo [`Cache`] of `#[cached]`, what `store =` takes, its handle and stats.
//! - [`idempotent`]: record keys, the backend contract, the in-process store, the call
//!   protocol, the handle, fingerprints, replay, errors.
//! - [`sequenced`]: [`Seq`], the backend contract, the in-process [`Sequencer`], the handle,
//!   errors.
//! - `function.rs`: the one function-owned cell all three attributes keep their stores in.
//! - `backends::redis` (feature `redis`): the Redis stores of all three attributes, one file
//!   per attribute.
//! - `backends::sql` (features `postgres`, `sqlite`): `#[idempotent]` and `#[sequenced]` whose
//!   guarantee commits in the same transaction as the body's effect, one file per attribute.
//! - `http` (feature `tower`; `axum` adds extractors): the HTTP pieces around `#[idempotent]`.
//! - [`telemetry`]: what racefree reports, the `metrics` (feature `metrics`) and the outcome
//!   words of its `tracing` events, named in one place.
//! - `__private`: the one door generated code goes through.

#![warn(missing_docs)]

#[doc(hidden)]
pub mod __private;
pub mod backends;
pub mod cached;
mod function;
#[cfg(feature = "tower")]
pub mod http;
pub mod idempotent;
pub mod sequenced;
pub mod sync;
pub mod telemetry;

pub use cached::served;
pub use cached::{
    Cache, CacheBuilder, CacheConfig, CacheHandle, CacheLead, CacheStats, Lookup, Served,
};
pub use function::{HandleKey, KeyOf, Keyed};
pub use idempotent::replay;
pub use idempotent::{
    BlockingIdempotencyBackend, Fingerprint, IdempotencyBackend, IdempotencyError,
    IdempotencyHandle, IdempotencyStats, IdempotencyStore, Replay,
};
pub use sequenced::turn;
pub use sequenced::{
    LocalSequenceLease, Seq, SequenceBackend, SequenceError, SequenceHandle, SequenceLease,
    Sequencer, Turn,
};
pub use sync::keyed_locks::{Holder, KeyGuard, KeyedLocks, LockError};

#[cfg(feature = "redis")]
pub use backends::redis;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use backends::sql;
