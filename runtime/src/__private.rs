//! Everything generated code needs, and nothing else: the one door between the macros and the
//! runtime. Not a public API; the facade re-exports it as `racefree::__private`.

pub use crate::cached::{Always, AsyncCacheStore, CacheCell, CacheConfig, CacheStore, Lookup};
pub use crate::function::{function_name, function_scope, implementor};
pub use crate::idempotent::call::{begin, begin_blocking, Begin, Call, Policy, StoreRef};
pub use crate::idempotent::{IdempotencyCell, IdempotencyConfig, StableHasher};
pub use crate::sequenced::key::{sequence_failed, KeyByRef, KeyByValue, KeyWrap};
pub use crate::sequenced::{SequenceBackend, SequenceCell, SequenceLease};

use crate::sequenced::{Seq, SequenceError};

/// The `Seq` a call was given: its number and fencing token.
#[inline]
pub fn seq(number: u64, fence: u64) -> Seq {
    Seq::new(number, fence)
}

/// The `Seq` a call is about to be given, or `Exhausted` if the number cannot be committed.
#[inline]
pub fn issue_seq(number: u64, fence: u64) -> Result<Seq, SequenceError> {
    Seq::issue(number, fence)
}
