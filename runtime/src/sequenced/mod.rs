//! `#[sequenced]`: [`Seq`], the numbers' contract ([`SequenceBackend`], [`SequenceLease`]),
//! the in-process [`Sequencer`], the function-owned [`SequenceHandle`], and [`SequenceError`].
//!
//! # What it promises
//! A call takes the key's lock ([`KeyedLocks`](crate::sync::keyed_locks::KeyedLocks): FIFO, one holder at a time), reads the key's
//! next number, runs with it, and [commits](SequenceLease::commit) the number only if it
//! succeeded. A failed, panicking or cancelled call commits nothing, so the next caller gets
//! the same number: numbers are unique, contiguous, and their order is the order in which the
//! calls finished.
//!
//! The counters live apart from the locks: a lock entry vanishes when its key is idle, the
//! key's counter stays (one `u64` per key ever numbered) until [`Sequencer::reset`].
//!
//! # What it does not promise
//! The numbers live in this process's memory: they restart when the process does, and two
//! processes have two sequences. For one sequence across processes, pass a store that
//! implements [`SequenceBackend`] over shared storage (`store = ...`).

pub mod error;
pub mod handle;
pub mod key;
pub mod sequencer;
pub mod turn;

use std::future::Future;
use std::time::Instant;

pub use error::SequenceError;
pub use handle::{SequenceCell, SequenceHandle};
pub use sequencer::{LocalSequenceLease, Sequencer};
pub use turn::Turn;

use crate::sync::keyed_locks::Holder;

/// The sequence number of one `#[sequenced]` call, supplied by the attribute through a
/// `seq: Seq` parameter that callers do not pass.
///
/// ```
/// use racefree_runtime::Seq;
///
/// let seq = Seq::new(7, 1);                 // the attribute makes these; `new` is for tests
/// assert_eq!(seq.get(), 7);
/// assert_eq!(u64::from(seq), 7);
/// assert_eq!(format!("WO-{seq:05}"), "WO-00007");   // Display formats the number
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Seq {
    number: u64,
    fence: u64,
}

impl Seq {
    #[doc(hidden)]
    pub fn new(number: u64, fence: u64) -> Seq {
        Seq { number, fence }
    }

    /// The number a call is about to run with, unless it is the last `u64`: a call that used
    /// `u64::MAX` could not commit a next number, so the sequence ends just before it
    /// ([`SequenceError::Exhausted`], before the body runs).
    #[doc(hidden)]
    pub fn issue(number: u64, fence: u64) -> Result<Seq, SequenceError> {
        match number {
            u64::MAX => Err(SequenceError::Exhausted),
            number => Ok(Seq { number, fence }),
        }
    }

    /// The number: the key's previous successful call's number plus one (`start` for the first).
    pub fn get(self) -> u64 {
        self.number
    }

    /// A fencing token: it grows with every holding of the key, so a storage layer that remembers
    /// the highest token it has seen can refuse a write from a caller whose hold on the key has
    /// ended (a paused process whose lease expired). In-process it is the holder's number; a
    /// distributed store supplies its own.
    pub fn fence(self) -> u64 {
        self.fence
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.number, f)
    }
}

impl From<Seq> for u64 {
    fn from(seq: Seq) -> u64 {
        seq.number
    }
}

/// Where a `#[sequenced]` function takes its key's lock and numbers: [`Sequencer`] in this
/// process, or a shared store (`store = ...`). The generated code calls, in this order:
/// [`acquire`](SequenceBackend::acquire) (or `acquire_async`), then on the lease
/// [`next`](SequenceLease::next), runs the body, [`commit`](SequenceLease::commit)s when the
/// body succeeded, and drops the lease.
///
/// An implementation must guarantee:
/// - `acquire`: when it returns `Ok`, no other lease on the key is valid until this one is
///   dropped (or, for a store with expiring leases, until it expires, after which `commit`
///   must fail); waiters get the key in arrival order as far as the store can tell; the
///   lease's [`fence`](SequenceLease::fence) is larger than every earlier lease's on the key.
///   At `deadline` it gives up with [`SequenceError::Timeout`], leaving no trace of the wait.
///   A dropped `acquire_async` future leaves no trace either.
/// - `next`: the number the key's next successful call gets, or `None` for a key never
///   committed (the caller then uses its `start`).
/// - `commit(used)`: makes `used + 1` the key's next number, atomically with checking that the
///   lease is still held ([`SequenceError::LeaseLost`] otherwise, committing nothing).
/// - dropping a lease releases the key, whether or not it committed.
///
/// A store that can only work asynchronously keeps the default blocking methods, which fail
/// with [`SequenceError::Store`]; sync functions then cannot use it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a sequence store for keys of type `{K}`",
    label = "`store = ...` must be a `racefree::Sequencer` or a shared sequence store",
    note = "the key `{K}` must be `Eq + Hash + Clone` (a Redis store also needs it to be `Serialize`); an argument that is a handle (a pool, a client) does not belong in `key = ...`"
)]
pub trait SequenceBackend<K> {
    /// The right to the key, held until dropped.
    type Lease<'a>: SequenceLease
    where
        Self: 'a;

    /// Takes the key, blocking the thread while another caller holds it, at most until `deadline`.
    fn acquire(&self, key: K, deadline: Option<Instant>) -> Result<Self::Lease<'_>, SequenceError> {
        let _ = (key, deadline);
        Err(blocking_unsupported())
    }

    /// Takes the key, waiting asynchronously, at most until `deadline`.
    fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Self::Lease<'_>, SequenceError>> + Send;
}

/// A held key of a [`SequenceBackend`]. See there for what each method must guarantee.
pub trait SequenceLease {
    /// The kind of store this lease is from, as the `store` label of racefree's metrics names
    /// it (feature `metrics`, see [`telemetry`](crate::telemetry)): `memory`, `redis`,
    /// `postgres`, `sqlite`; `custom` unless a store of your own says otherwise.
    const STORE: &'static str = "custom";

    /// This holding, for re-entry detection: the generated code runs the body under it
    /// ([`Holder::enter`], [`Holder::within`]).
    fn holder(&self) -> Holder;

    /// The fencing token of this holding.
    fn fence(&self) -> u64;

    /// `Some(true)` if this call waited for another holding of its key before it got it,
    /// `Some(false)` if the key was free, `None` if the store cannot tell (what
    /// [`turn::track`] reports as [`Turn::Unknown`]).
    fn waited(&self) -> Option<bool> {
        None
    }

    /// The key's next number, `None` if the key has none yet.
    fn next(&mut self) -> Result<Option<u64>, SequenceError> {
        Err(blocking_unsupported())
    }

    /// The key's next number, `None` if the key has none yet.
    fn next_async(&mut self) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send;

    /// Consumes `used`: the key's next number becomes `used + 1`.
    fn commit(self, used: u64) -> Result<(), SequenceError>
    where
        Self: Sized,
    {
        let _ = used;
        Err(blocking_unsupported())
    }

    /// Consumes `used`: the key's next number becomes `used + 1`.
    fn commit_async(self, used: u64) -> impl Future<Output = Result<(), SequenceError>> + Send
    where
        Self: Sized;
}

// `store = &SEQUENCER` and `store = SEQUENCER` both work.
impl<K, T: SequenceBackend<K> + Sync + ?Sized> SequenceBackend<K> for &T {
    type Lease<'a>
        = T::Lease<'a>
    where
        Self: 'a;

    fn acquire(&self, key: K, deadline: Option<Instant>) -> Result<Self::Lease<'_>, SequenceError> {
        (**self).acquire(key, deadline)
    }

    fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Self::Lease<'_>, SequenceError>> + Send {
        (**self).acquire_async(key, deadline)
    }
}

fn blocking_unsupported() -> SequenceError {
    SequenceError::Store(
        "this sequence store works only asynchronously: make the #[sequenced] function `async`"
            .into(),
    )
}
