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

pub use crate::telemetry::{MeterCell, Started};

use crate::sequenced::{Seq, SequenceError};
use crate::telemetry::{outcome, MeterRef};

/// One `#[sequenced]` call as its function's metrics and `tracing` see it: a `sequenced` span
/// (level `debug`, fields `function` and `outcome`, `executed` or `error`) alive from before
/// the wait for the key until the call returns (never entered: the store's and the body's
/// events are not inside it), the wait timed, the store's errors counted.
pub struct SequencedCall {
    cell: &'static MeterCell,
    function: fn() -> &'static str,
    started: Started,
    // Known once the key is acquired: the lease names its store.
    meter: Option<MeterRef>,
    span: tracing::Span,
}

impl SequencedCall {
    /// Before the wait for the key.
    #[inline]
    pub fn start(cell: &'static MeterCell, function: fn() -> &'static str) -> SequencedCall {
        SequencedCall {
            cell,
            function,
            started: Started::now(),
            meter: None,
            // Only when some subscriber listens at `debug`: a disabled span still costs a
            // tenth of an uncontended call (measured in benches/sequenced.rs).
            span: match tracing::level_enabled!(tracing::Level::DEBUG) {
                true => {
                    tracing::debug_span!(target: "racefree", "sequenced", function = function(), outcome = tracing::field::Empty)
                }
                false => tracing::Span::none(),
            },
        }
    }

    /// The wait ended: how long it took (also when it timed out), that the body will run, or
    /// the store's error.
    #[inline]
    pub fn acquired<L: crate::SequenceLease>(&mut self, acquired: &Result<L, SequenceError>) {
        let meter = *self.meter.insert(self.cell.meter(self.function, L::STORE));
        match acquired {
            Ok(lease) => {
                crate::turn::record(crate::turn::Turn::of(lease.waited()));
                meter.lock_waited(self.started);
                meter.executed();
                self.span.record("outcome", outcome::EXECUTED);
            }
            Err(error) => {
                if let SequenceError::Timeout = error {
                    meter.lock_waited(self.started);
                }
                self.failed(error);
            }
        }
    }

    /// The call failed with `error` (counted if it is the store's).
    #[inline]
    pub fn failed(&self, error: &SequenceError) {
        if let Some(meter) = self.meter {
            meter.store_error(crate::telemetry::sequence_error_kind(error));
        }
        self.span.record("outcome", outcome::ERROR);
    }
}

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
