//! The contract every idempotency store fulfils: [`IdempotencyBackend`] (async) and
//! [`BlockingIdempotencyBackend`] (for sync functions), and the [`Claim`] they answer with.

use std::future::Future;
use std::time::{Duration, Instant};

use super::error::IdempotencyError;
use super::fingerprint::Fingerprint;
use super::key::RecordKey;

/// What a backend found when asked to claim a key.
#[derive(Debug)]
pub enum Claim<T, L, W> {
    /// No live record: the key is now in flight for this caller, who must run the body and then
    /// complete or release the lease.
    Execute(L),
    /// A stored outcome with the same fingerprint: return it, run nothing.
    Replay(T),
    /// Another caller with the same fingerprint holds the key right now: wait on this, or
    /// reject.
    InFlight(W),
}

/// The contract of an idempotency store, as the `#[idempotent]` expansion drives it:
///
/// ```text
/// loop {
///     match claim(key, fingerprint) {
///         Execute(lease)  => { run the body; complete(lease, &outcome, ttl) or release(lease) }
///         Replay(outcome) => return outcome,
///         InFlight(w)     => wait(w, deadline): Some(outcome) => return it, None => claim again,
///         Err(e)          => refuse with e (Conflict, StoreUnavailable, ...)
///     }
/// }
/// ```
///
/// Methods are async so that a networked store (Redis) fits; an in-process store answers at
/// once. `T` is what is stored: the `Ok` value, or the whole `Result` with `store_errors`.
/// Sync functions need [`BlockingIdempotencyBackend`] as well.
///
/// ```
/// use racefree_runtime::{IdempotencyBackend, IdempotencyStore, Fingerprint};
/// use racefree_runtime::idempotent::{Claim, RecordKey};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = IdempotencyStore::<u64>::new();
/// let key = RecordKey::new("docs::pay", None, "k-1");
/// let request = Fingerprint::of(&("alice", 10_u64));
/// let Ok(Claim::Execute(lease)) = store.claim(&key, request).await else { unreachable!() };
/// store.complete(lease, &99, Duration::from_secs(60)).await.unwrap();
/// assert!(matches!(store.claim(&key, request).await, Ok(Claim::Replay(99))));
/// assert!(store.claim(&key, Fingerprint::of(&("mallory", 10_u64))).await.is_err()); // Conflict
/// # });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store for outcomes of type `{T}`",
    label = "`store = ...` must be an idempotency store",
    note = "the in-process `racefree::IdempotencyStore<T>` needs the outcome `{T}` to be `Clone`; a Redis or SQL store needs it to be `Serialize + Deserialize` (derive them with serde)"
)]
pub trait IdempotencyBackend<T>: Sync {
    /// Proof of a claim: the right and duty to run the body for one key.
    type Lease: Send;
    /// What a caller needs to wait for a claim held by somebody else.
    type InFlight: Send;

    /// The kind of store, as the `store` label of racefree's metrics names it (feature
    /// `metrics`, see [`telemetry`](crate::telemetry)): `memory`, `redis`, `postgres`,
    /// `sqlite`; `custom` unless a store of your own says otherwise.
    const STORE: &'static str = "custom";

    /// Atomically, for `key`:
    /// - no record, or an expired one → record "in flight with `fingerprint`" and return
    ///   [`Claim::Execute`]; no other caller can get `Execute` for the key until the lease is
    ///   completed, released or (for stores that lease with a timeout) has expired;
    /// - done with the same fingerprint → [`Claim::Replay`] with the stored outcome;
    /// - in flight with the same fingerprint → [`Claim::InFlight`];
    /// - either state with another fingerprint → `Err(IdempotencyError::Conflict)`, leaving the
    ///   record as it was;
    /// - the store cannot answer → `Err(IdempotencyError::StoreUnavailable)`.
    ///
    /// Must be one atomic step (an entry operation, a Lua script, `SET NX`), never a read
    /// followed by a write.
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> impl Future<Output = Result<Claim<T, Self::Lease, Self::InFlight>, IdempotencyError>> + Send;

    /// Waits until the claim behind `in_flight` (found for `key`) ends or `deadline` passes
    /// (`None`: no deadline).
    /// Returns `Some(outcome)` if it ended with an outcome this caller may return as a replay,
    /// `None` if the caller should claim again (the owner released, or the store cannot hand
    /// the outcome over and a new claim will replay it). At the deadline it returns
    /// `Err(IdempotencyError::InProgress)`. Dropping the future must leave nothing behind.
    fn wait(
        &self,
        key: &RecordKey,
        in_flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Option<T>, IdempotencyError>> + Send;

    /// Stores `outcome` for the leased key until `ttl` passes, then ends the claim: from now on
    /// claims with the same fingerprint get `Replay`, and waiters wake up. Storing must happen
    /// before waking, so that a waiter that claims again replays rather than executes.
    fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), IdempotencyError>> + Send;

    /// `true` if [`complete`](Self::complete) commits the body's effect together with the
    /// outcome (a SQL store: the lease is the transaction the body wrote in). A failed
    /// `complete` then means the effect did not happen, or may not have, and the caller must get
    /// that error instead of the outcome. `false` (the default): the effect happened whatever
    /// the store did, so the caller gets its outcome and the failure is logged.
    const COMPLETE_COMMITS_EFFECT: bool = false;

    /// The lease of a call without a key (it runs without idempotency). `None`, the default,
    /// for stores whose leases only guard a key; a store whose lease is the transaction the
    /// body writes in (a SQL store) opens one here, so that the body has its transaction
    /// either way. [`complete`](Self::complete) and [`release`](Self::release) then end it.
    fn lease_without_key(
        &self,
    ) -> impl Future<Output = Result<Option<Self::Lease>, IdempotencyError>> + Send {
        std::future::ready(Ok(None))
    }

    /// Ends the claim without an outcome (an error not stored, a panic, a dropped future): the
    /// key becomes claimable again and waiters wake up so that one of them claims it. Called
    /// from `Drop`, so it must not block or panic; a networked store may finish the release in
    /// the background, but the key must become claimable at the latest when the lease expires.
    fn release(&self, lease: Self::Lease);
}

/// A store sync functions can use: the same contract as [`IdempotencyBackend`], answered by
/// blocking the calling thread.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used from a sync `fn`",
    label = "this store only offers async operations",
    note = "make the function `async`, or use the in-process `racefree::IdempotencyStore`"
)]
pub trait BlockingIdempotencyBackend<T>: IdempotencyBackend<T> {
    /// [`IdempotencyBackend::claim`], blocking.
    fn claim_blocking(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, Self::Lease, Self::InFlight>, IdempotencyError>;

    /// [`IdempotencyBackend::wait`], blocking the thread.
    fn wait_blocking(
        &self,
        key: &RecordKey,
        in_flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> Result<Option<T>, IdempotencyError>;

    /// [`IdempotencyBackend::complete`], blocking.
    fn complete_blocking(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError>;
}
