//! The function-owned sequencers of `#[sequenced]`, reachable without naming their key type.
//!
//! Like `#[cached]`'s handle: a `static` must name its type and the user never spells the key
//! type, so the generated `static` holds a [`SequenceHandle`] that creates the typed
//! [`Sequencer<K>`] on first use, with `K` inferred at the call site (a generic function gets
//! one per concrete key type). The generated `fn <name>_sequence()` finds the same handle by
//! the function's id.

use super::error::SequenceError;
use super::sequencer::Sequencer;
use crate::function::{FunctionCell, Home, PerType, Registry};
use std::hash::Hash;

trait ErasedSequencer: Send + Sync {
    fn locked(&self) -> usize;
    fn counters(&self) -> usize;
}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> ErasedSequencer for Sequencer<K> {
    fn locked(&self) -> usize {
        Sequencer::locked(self)
    }
    fn counters(&self) -> usize {
        Sequencer::counters(self)
    }
}

/// The sequences of one `#[sequenced]` function, as returned by the generated
/// `fn <name>_sequence()`. Keys are given as the function builds them (`key = ...`'s value;
/// `()` for a function without `key`).
///
/// ```
/// use racefree_runtime::sequenced::SequenceCell;
/// use racefree_runtime::{SequenceBackend, SequenceLease};
///
/// // What `#[sequenced(key = desk)] fn ticket(desk: u8, seq: Seq)` declares; its generated
/// // `ticket_sequence()` returns `TICKET.handle()`.
/// static TICKET: SequenceCell = SequenceCell::new("demo::ticket");
/// let sequence = TICKET.handle();
///
/// let mut lease = sequence.sequencer::<u8>().acquire(1, None).unwrap();   // a call for desk 1
/// let n = lease.next().unwrap().unwrap_or(1);
/// lease.commit(n).unwrap();
///
/// assert_eq!(sequence.next(&1_u8), Some(2));
/// sequence.reset(&1_u8).unwrap();                  // back to `start` for desk 1
/// assert_eq!(sequence.next(&1_u8), None);
/// assert_eq!(sequence.locked(), 0);                // no key held: no lock entries left
/// ```
pub struct SequenceHandle {
    name: &'static str,
    sequencers: PerType<dyn ErasedSequencer>,
}

impl SequenceHandle {
    /// The function's sequencer for keys of type `K`, created on first use.
    #[inline]
    pub fn sequencer<K: Eq + Hash + Clone + Send + Sync + 'static>(&self) -> &'static Sequencer<K> {
        self.sequencers
            .get_or_create(|| Sequencer::named(self.name), |sequencer| sequencer)
    }

    fn each(&self) -> Vec<&'static dyn ErasedSequencer> {
        self.sequencers.each()
    }

    /// The number the key's next successful call gets; `None` if it has none yet.
    pub fn next<K: Eq + Hash + Clone + Send + Sync + 'static>(&self, key: &K) -> Option<u64> {
        self.sequencer::<K>().next(key)
    }

    /// Forgets the key's counter (its next call starts at `start` again) and returns what its
    /// next number would have been. Waits for the key like a call does.
    pub fn reset<K: Eq + Hash + Clone + Send + Sync + 'static>(
        &self,
        key: &K,
    ) -> Result<Option<u64>, SequenceError> {
        self.sequencer::<K>().reset(key)
    }

    /// Makes `next` the key's next number. Waits for the key like a call does.
    pub fn set_next<K: Eq + Hash + Clone + Send + Sync + 'static>(
        &self,
        key: &K,
        next: u64,
    ) -> Result<(), SequenceError> {
        self.sequencer::<K>().set_next(key, next)
    }

    /// Callers queued for the key behind its holder.
    pub fn waiting<K: Eq + Hash + Clone + Send + Sync + 'static>(&self, key: &K) -> usize {
        self.sequencer::<K>().waiting(key)
    }

    /// Keys held or waited for right now, over all key types; 0 when the function is idle.
    pub fn locked(&self) -> usize {
        self.each().iter().map(|s| s.locked()).sum()
    }

    /// Keys that have a counter, over all key types.
    pub fn counters(&self) -> usize {
        self.each().iter().map(|s| s.counters()).sum()
    }

    /// The function these sequences belong to (`module::path::name@line:column`).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for SequenceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceHandle")
            .field("name", &self.name)
            .field("locked", &self.locked())
            .field("counters", &self.counters())
            .finish()
    }
}

impl Home for SequenceHandle {
    type Config = ();
    fn open(id: &'static str, _: ()) -> Self {
        SequenceHandle {
            name: id,
            sequencers: PerType::new(),
        }
    }
    fn registry() -> &'static Registry<Self> {
        static REGISTRY: Registry<SequenceHandle> = Registry::new();
        &REGISTRY
    }
}

/// The `static` a `#[sequenced]` expansion declares.
#[doc(hidden)]
pub type SequenceCell = FunctionCell<SequenceHandle>;

impl SequenceCell {
    #[doc(hidden)]
    pub const fn new(id: &'static str) -> Self {
        FunctionCell::with_config(id, ())
    }
}
