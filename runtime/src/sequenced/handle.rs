//! The function-owned sequencers of `#[sequenced]`, reachable without naming their key type.
//!
//! Like `#[cached]`'s handle: a `static` must name its type and the user never spells the key
//! type, so the generated `static` holds a [`SequenceHandle`] that creates the typed
//! [`Sequencer<K>`] on first use, with `K` inferred at the call site (a generic function gets
//! one per concrete key type). The generated `fn <name>_sequence()` finds the same handle by
//! the function's id.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;

use super::error::SequenceError;
use super::sequencer::Sequencer;
use crate::function::{
    ask_stores, FunctionCell, HandleKey, Home, KeyOf, Keyed, PerType, Probe, Registry,
};

type Admin<T> = Pin<Box<dyn Future<Output = Result<T, SequenceError>> + Send>>;

/// What a handle needs from a typed sequencer. Each keyed method answers `None` when the key
/// is not of the sequencer's key type (nor a borrowed form of it).
trait ErasedSequencer: Send + Sync {
    fn locked(&self) -> usize;
    fn counters(&self) -> usize;
    fn key_type(&self) -> &'static str;
    fn next(&self, key: Probe<'_>) -> Option<Option<u64>>;
    fn waiting(&self, key: Probe<'_>) -> Option<usize>;
    fn reset(&self, key: Probe<'_>) -> Option<Result<Option<u64>, SequenceError>>;
    fn set_next(&self, key: Probe<'_>, next: u64) -> Option<Result<(), SequenceError>>;
    fn reset_async(&'static self, key: Probe<'_>) -> Option<Admin<Option<u64>>>;
    fn set_next_async(&'static self, key: Probe<'_>, next: u64) -> Option<Admin<()>>;
}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> ErasedSequencer for Sequencer<K> {
    fn locked(&self) -> usize {
        Sequencer::locked(self)
    }
    fn counters(&self) -> usize {
        Sequencer::counters(self)
    }
    fn key_type(&self) -> &'static str {
        std::any::type_name::<K>()
    }
    fn next(&self, key: Probe<'_>) -> Option<Option<u64>> {
        match key.value::<K>() {
            Some(key) => Some(Sequencer::next(self, key)),
            None => Some(Sequencer::next(self, &key.to_key::<K>()?)),
        }
    }
    fn waiting(&self, key: Probe<'_>) -> Option<usize> {
        match key.value::<K>() {
            Some(key) => Some(Sequencer::waiting(self, key)),
            None => Some(Sequencer::waiting(self, &key.to_key::<K>()?)),
        }
    }
    fn reset(&self, key: Probe<'_>) -> Option<Result<Option<u64>, SequenceError>> {
        Some(Sequencer::reset(self, &key.to_key::<K>()?))
    }
    fn set_next(&self, key: Probe<'_>, next: u64) -> Option<Result<(), SequenceError>> {
        Some(Sequencer::set_next(self, &key.to_key::<K>()?, next))
    }
    fn reset_async(&'static self, key: Probe<'_>) -> Option<Admin<Option<u64>>> {
        let key = key.to_key::<K>()?;
        Some(Box::pin(async move { self.reset_async(&key).await }))
    }
    fn set_next_async(&'static self, key: Probe<'_>, next: u64) -> Option<Admin<()>> {
        let key = key.to_key::<K>()?;
        Some(Box::pin(async move {
            Sequencer::set_next_async(self, &key, next).await
        }))
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
    /// The function's sequencer for keys of type `K`, **created on first use**: this is how the
    /// function itself reaches it. To look without creating, use [`typed`](Self::typed).
    #[inline]
    pub fn sequencer<K: Eq + Hash + Clone + Send + Sync + 'static>(&self) -> &'static Sequencer<K> {
        self.sequencers
            .get_or_create(|| Sequencer::named(self.name), |sequencer| sequencer)
    }

    /// The function's sequencer for keys of type `K`, if the function has used one.
    pub fn typed<K: Eq + Hash + Clone + Send + Sync + 'static>(
        &self,
    ) -> Option<&'static Sequencer<K>> {
        self.sequencers.find()
    }

    fn each(&self) -> Vec<&'static dyn ErasedSequencer> {
        self.sequencers.each()
    }

    fn ask<R>(
        &self,
        key: Probe<'_>,
        ask: impl Fn(&'static dyn ErasedSequencer) -> Option<R>,
    ) -> Option<R> {
        ask_stores(self.name, &self.each(), key, |s| s.key_type(), ask)
            .into_iter()
            .next()
    }

    /// The number the key's next successful call gets; `None` if it has none yet. The key is
    /// given as the function builds it or, for a text key, borrowed (`"porto"`, `&"porto"`).
    ///
    /// # Panics
    /// If the function has a sequencer and `key` is of none of its key types (see
    /// [`HandleKey`]).
    pub fn next<Q: HandleKey + ?Sized>(&self, key: &Q) -> Option<u64> {
        self.ask(key.probe(), |s| s.next(key.probe())).flatten()
    }

    /// Forgets the key's counter (its next call starts at `start` again) and returns what its
    /// next number would have been. Waits for the key like a call does; from async code use
    /// [`reset_async`](Self::reset_async), which does not block the thread.
    ///
    /// # Panics
    /// As [`next`](Self::next), for a key of the wrong type.
    pub fn reset<Q: HandleKey + ?Sized>(&self, key: &Q) -> Result<Option<u64>, SequenceError> {
        self.ask(key.probe(), |s| s.reset(key.probe()))
            .unwrap_or(Ok(None))
    }

    /// [`reset`](Self::reset) for async callers: waits for the key asynchronously.
    pub fn reset_async<Q: HandleKey + ?Sized>(
        &self,
        key: &Q,
    ) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send + 'static {
        let reset = self.ask(key.probe(), |s| s.reset_async(key.probe()));
        async move {
            match reset {
                Some(reset) => reset.await,
                None => Ok(None),
            }
        }
    }

    /// Makes `next` the key's next number. Waits for the key like a call does; from async code
    /// use [`set_next_async`](Self::set_next_async).
    ///
    /// Before the function's first call there is no sequencer to check the key's type
    /// against: one is made for `K` (for `&'static str`, for `String`, as the function builds
    /// a text key).
    ///
    /// # Panics
    /// As [`next`](Self::next), for a key of the wrong type.
    pub fn set_next<K>(&self, key: &K, next: u64) -> Result<(), SequenceError>
    where
        K: HandleKey + Eq + Hash + Clone + Send + Sync + 'static,
    {
        self.first_use(key);
        self.ask(key.probe(), |s| s.set_next(key.probe(), next))
            .expect("a sequencer exists by now")
    }

    /// [`set_next`](Self::set_next) for async callers: waits for the key asynchronously.
    pub fn set_next_async<K>(
        &self,
        key: &K,
        next: u64,
    ) -> impl Future<Output = Result<(), SequenceError>> + Send + 'static
    where
        K: HandleKey + Eq + Hash + Clone + Send + Sync + 'static,
    {
        self.first_use(key);
        let set = self
            .ask(key.probe(), |s| s.set_next_async(key.probe(), next))
            .expect("a sequencer exists by now");
        set
    }

    // A sequencer for `K`'s keys if the function has none yet.
    fn first_use<K: Eq + Hash + Clone + Send + Sync + 'static>(&self, key: &K) {
        if !self.each().is_empty() {
            return;
        }
        if (key as &dyn std::any::Any).is::<&'static str>() {
            self.sequencer::<String>();
        } else {
            self.sequencer::<K>();
        }
    }

    /// Callers queued for the key behind its holder (0 before the function's first call).
    ///
    /// # Panics
    /// As [`next`](Self::next), for a key of the wrong type.
    pub fn waiting<Q: HandleKey + ?Sized>(&self, key: &Q) -> usize {
        self.ask(key.probe(), |s| s.waiting(key.probe()))
            .unwrap_or(0)
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

/// The keyed calls of [`SequenceHandle`] for a key of the function's key type `K` (or, for a
/// text key, `&str`): another type does not compile.
impl<K: ?Sized + 'static> Keyed<SequenceHandle, K> {
    /// [`SequenceHandle::next`].
    pub fn next<Q: KeyOf<K> + ?Sized>(&self, key: &Q) -> Option<u64> {
        self.handle().next(key)
    }

    /// [`SequenceHandle::reset`].
    pub fn reset<Q: KeyOf<K> + ?Sized>(&self, key: &Q) -> Result<Option<u64>, SequenceError> {
        self.handle().reset(key)
    }

    /// [`SequenceHandle::reset_async`].
    pub fn reset_async<Q: KeyOf<K> + ?Sized>(
        &self,
        key: &Q,
    ) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send + 'static {
        self.handle().reset_async(key)
    }

    /// [`SequenceHandle::set_next`].
    pub fn set_next<Q>(&self, key: &Q, next: u64) -> Result<(), SequenceError>
    where
        Q: KeyOf<K> + Eq + Hash + Clone + Send + Sync + 'static,
    {
        self.handle().set_next(key, next)
    }

    /// [`SequenceHandle::set_next_async`].
    pub fn set_next_async<Q>(
        &self,
        key: &Q,
        next: u64,
    ) -> impl Future<Output = Result<(), SequenceError>> + Send + 'static
    where
        Q: KeyOf<K> + Eq + Hash + Clone + Send + Sync + 'static,
    {
        self.handle().set_next_async(key, next)
    }

    /// [`SequenceHandle::waiting`].
    pub fn waiting<Q: KeyOf<K> + ?Sized>(&self, key: &Q) -> usize {
        self.handle().waiting(key)
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
