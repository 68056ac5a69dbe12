//! The in-process [`Sequencer`]: per-key FIFO locks from `sync/` and a counter per key.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::time::Instant;

use dashmap::DashMap;

use super::{SequenceBackend, SequenceError, SequenceLease};
use crate::sync::keyed_locks::{Holder, KeyGuard, KeyedLocks, LockError, RandomState};

impl From<LockError> for SequenceError {
    fn from(error: LockError) -> Self {
        match error {
            LockError::Timeout => SequenceError::Timeout,
            LockError::WouldDeadlock => SequenceError::WouldDeadlock,
            LockError::Reentrant => SequenceError::Reentrant,
        }
    }
}

/// In-process per-key sequences: a [`KeyedLocks`] registry and a counter per key.
///
/// `#[sequenced]` functions own one each (reach it with the generated `<name>_sequence()`);
/// build one yourself to share a sequence between functions (`store = &SEQUENCER`).
///
/// ```
/// use racefree_runtime::{SequenceBackend, SequenceLease, Sequencer};
///
/// let orders = Sequencer::new();
/// let mut lease = orders.acquire("eu", None).unwrap();
/// let n = lease.next().unwrap().unwrap_or(1000);    // first number: the start, 1000
/// lease.commit(n).unwrap();
/// assert_eq!(orders.next(&"eu"), Some(1001));
/// assert!(orders.is_idle());
/// ```
pub struct Sequencer<K, S = RandomState> {
    name: &'static str,
    locks: KeyedLocks<K, S>,
    counters: DashMap<K, u64, S>,
}

impl<K: Eq + Hash + Clone> Sequencer<K> {
    /// An empty sequencer.
    pub fn new() -> Self {
        Self::named("racefree::Sequencer")
    }

    /// An empty sequencer named in its `tracing` events.
    pub fn named(name: &'static str) -> Self {
        Self::with_hasher(name, RandomState::default())
    }
}

impl<K: Eq + Hash + Clone> Default for Sequencer<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> Sequencer<K, S> {
    /// An empty sequencer with the given hasher.
    pub fn with_hasher(name: &'static str, hasher: S) -> Self {
        Sequencer {
            name,
            locks: KeyedLocks::with_hasher(hasher.clone()),
            counters: DashMap::with_hasher(hasher),
        }
    }

    /// The number the key's next successful call gets; `None` for a key never numbered (its
    /// first call uses `start`). A snapshot: a call running now may change it. Takes the key
    /// borrowed too (`&str` for a `String` key).
    pub fn next<Q>(&self, key: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.counters.get(key).map(|next| *next)
    }

    /// Forgets the key's counter, so that its next call starts from `start` again. Waits for
    /// the key like a call does (see [`KeyedLocks::lock`] for what a blocking wait does inside
    /// an async runtime; from async code use [`reset_async`](Sequencer::reset_async)); fails
    /// with [`SequenceError::Reentrant`] from inside the key's own body.
    pub fn reset(&self, key: &K) -> Result<Option<u64>, SequenceError> {
        let _guard = self.locks.lock(key.clone(), None)?;
        Ok(self.counters.remove(key).map(|(_, next)| next))
    }

    /// [`reset`](Sequencer::reset) for async callers: waits for the key asynchronously.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use racefree_runtime::{SequenceBackend, SequenceLease, Sequencer};
    ///
    /// let orders = Sequencer::new();
    /// let mut lease = orders.acquire_async("eu", None).await.unwrap();
    /// let n = lease.next_async().await.unwrap().unwrap_or(1);
    /// lease.commit_async(n).await.unwrap();
    /// assert_eq!(orders.reset_async(&"eu").await.unwrap(), Some(2));
    /// # }
    /// ```
    pub async fn reset_async(&self, key: &K) -> Result<Option<u64>, SequenceError> {
        let _guard = self.locks.lock_async(key.clone(), None).await?;
        Ok(self.counters.remove(key).map(|(_, next)| next))
    }

    /// Makes `next` the key's next number. Waits for the key like [`reset`](Sequencer::reset).
    pub fn set_next(&self, key: &K, next: u64) -> Result<(), SequenceError> {
        let _guard = self.locks.lock(key.clone(), None)?;
        self.counters.insert(key.clone(), next);
        Ok(())
    }

    /// [`set_next`](Sequencer::set_next) for async callers: waits for the key asynchronously.
    pub async fn set_next_async(&self, key: &K, next: u64) -> Result<(), SequenceError> {
        let _guard = self.locks.lock_async(key.clone(), None).await?;
        self.counters.insert(key.clone(), next);
        Ok(())
    }

    /// Keys held or waited for right now; 0 when every key is idle.
    pub fn locked(&self) -> usize {
        self.locks.len()
    }

    /// `true` when no key is held or waited for.
    pub fn is_idle(&self) -> bool {
        self.locks.is_empty()
    }

    /// Callers queued for the key behind its holder. Takes the key borrowed too.
    pub fn waiting<Q>(&self, key: &Q) -> usize
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.locks.waiting(key)
    }

    /// Keys that have a counter.
    pub fn counters(&self) -> usize {
        self.counters.len()
    }

    /// The per-key lock registry.
    pub fn locks(&self) -> &KeyedLocks<K, S> {
        &self.locks
    }
}

impl<K, S> SequenceBackend<K> for Sequencer<K, S>
where
    K: Eq + Hash + Clone + Send + Sync,
    S: BuildHasher + Clone + Send + Sync,
{
    type Lease<'a>
        = LocalSequenceLease<'a, K, S>
    where
        Self: 'a;

    fn acquire(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> Result<LocalSequenceLease<'_, K, S>, SequenceError> {
        let guard = self.locks.lock(key, deadline)?;
        Ok(LocalSequenceLease {
            sequencer: self,
            guard,
        })
    }

    async fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> Result<LocalSequenceLease<'_, K, S>, SequenceError> {
        let guard = self.locks.lock_async(key, deadline).await?;
        Ok(LocalSequenceLease {
            sequencer: self,
            guard,
        })
    }
}

/// A held key of a [`Sequencer`].
pub struct LocalSequenceLease<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone = RandomState> {
    sequencer: &'a Sequencer<K, S>,
    guard: KeyGuard<'a, K, S>,
}

impl<K, S> LocalSequenceLease<'_, K, S>
where
    K: Eq + Hash + Clone,
    S: BuildHasher + Clone,
{
    fn commit_now(&self, used: u64) {
        let key = self.guard.key();
        match self.sequencer.counters.get_mut(key) {
            // `Seq::issue` never hands out `u64::MAX`: `used + 1` fits.
            Some(mut next) => *next = used.saturating_add(1),
            None => {
                self.sequencer
                    .counters
                    .insert(key.clone(), used.saturating_add(1));
            }
        }
        tracing::debug!(target: "racefree", sequencer = self.sequencer.name, seq = used, outcome = crate::telemetry::outcome::EXECUTED, "committed");
    }
}

impl<K, S> SequenceLease for LocalSequenceLease<'_, K, S>
where
    K: Eq + Hash + Clone + Send + Sync,
    S: BuildHasher + Clone + Send + Sync,
{
    const STORE: &'static str = "memory";

    fn holder(&self) -> Holder {
        self.guard.holder()
    }

    fn fence(&self) -> u64 {
        self.guard.holder().get()
    }

    fn waited(&self) -> Option<bool> {
        Some(self.guard.waited())
    }

    fn next(&mut self) -> Result<Option<u64>, SequenceError> {
        Ok(self.sequencer.next(self.guard.key()))
    }

    async fn next_async(&mut self) -> Result<Option<u64>, SequenceError> {
        Ok(self.sequencer.next(self.guard.key()))
    }

    fn commit(self, used: u64) -> Result<(), SequenceError> {
        self.commit_now(used);
        Ok(())
    }

    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        self.commit_now(used);
        Ok(())
    }
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, S: BuildHasher + Clone> std::fmt::Debug
    for Sequencer<K, S>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("name", &self.name)
            .field("locked", &self.locked())
            .field("counters", &self.counters())
            .finish()
    }
}
