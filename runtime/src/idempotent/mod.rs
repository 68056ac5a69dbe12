//! `#[idempotent]`: record keys ([`key`]), the store contract ([`backend`]), the in-process
//! store ([`memory`]), the protocol a call runs ([`call`]), the function-owned [`handle`],
//! request [`fingerprint`]s, the [`replay`] flag, and why a call was refused ([`error`]).
//!
//! One record per (function, scope, key): **in flight** while a caller runs the body, **done**
//! with the body's outcome until its `ttl` passes. The promises of the in-process store are in
//! [`memory`]'s docs; what a shared store (Redis, SQL) adds is in its backend's module docs.

pub mod backend;
pub mod call;
pub mod error;
pub mod fingerprint;
pub mod handle;
pub mod key;
pub mod memory;
pub mod replay;

pub use backend::{BlockingIdempotencyBackend, Claim, IdempotencyBackend};
pub use error::IdempotencyError;
pub use fingerprint::{Fingerprint, StableHasher};
pub use handle::{IdempotencyCell, IdempotencyHandle, StorableError};
pub use key::{IntoIdempotencyKey, RecordKey};
pub use memory::{
    IdempotencyConfig, IdempotencyStats, IdempotencyStore, IdempotencyStoreBuilder, ManualClock,
    StoreClaim, StoreLease, DEFAULT_CAPACITY,
};
pub use replay::Replay;
