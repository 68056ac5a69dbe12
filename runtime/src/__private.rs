//! Everything generated code needs, and nothing else: the one door between the macros and the
//! runtime. Not a public API; the facade re-exports it as `racefree::__private`.

pub use crate::cached::{
    Always, Answer, AsyncCacheStore, AsyncCacheStoreRef, CacheCell, CacheConfig, CacheStore,
    CacheStoreRef, Lookup,
};
pub use crate::function::{function_name, function_scope, implementor};
pub use crate::idempotent::call::{
    begin, begin_blocking, claim_records, Begin, Call, Policy, StoreRef,
};
pub use crate::idempotent::fingerprint::ProcessHasher;
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

/// The transaction a `tx: PgTx<'_>` / `tx: SqliteTx<'_>` parameter of an `#[idempotent]` body
/// receives: the execution's lease is the store's transaction. A SQL store opens one for every
/// call, with or without a key.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[inline]
pub fn idempotent_tx<'e, B, T, D>(
    execution: &'e mut crate::idempotent::call::Execution<'_, B, T>,
) -> crate::backends::sql::Tx<'e, D>
where
    B: crate::idempotent::IdempotencyBackend<T>,
    B::Lease: crate::backends::sql::InTransaction<D>,
    D: crate::backends::sql::Dialect,
{
    let lease = execution
        .lease_mut()
        .expect("a SQL store opens a transaction for every call");
    crate::backends::sql::Tx::of(lease)
}

/// The transaction a `tx` parameter of a `#[sequenced]` body receives: the lease's.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[inline]
pub fn sequence_tx<L, D>(lease: &mut L) -> crate::backends::sql::Tx<'_, D>
where
    L: crate::backends::sql::InTransaction<D>,
    D: crate::backends::sql::Dialect,
{
    crate::backends::sql::Tx::of(lease)
}
