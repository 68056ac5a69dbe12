//! A registry of per-key FIFO locks, for blocking threads and async tasks alike: the lock of
//! `#[sequenced]`.
//!
//! # What it promises
//! - **Mutual exclusion per key.** At most one [`KeyGuard`] per key exists at a time. Different
//!   keys never wait for each other.
//! - **FIFO, no barging.** Callers that find the key held queue up; a release hands the lock
//!   straight to the front of the queue, so a caller arriving at that moment cannot overtake it.
//! - **Nothing left behind.** The registry holds an entry only while a key is held or waited for.
//!   A waiter that times out or whose future is dropped removes itself from the queue, and if
//!   the lock had already been handed to it, hands it on. Idle keys cost nothing.
//! - **Re-entry is an error, not a deadlock**, where it can be seen: acquiring a key from inside
//!   code running under that key's guard (see [`Holder::enter`] and [`Holder::within`]) fails with
//!   [`LockError::Reentrant`].
//! - **A blocking wait that could never end fails instead**: [`lock`](KeyedLocks::lock) called
//!   where the holder, or a caller queued ahead, is an async task that only this thread can run
//!   fails with [`LockError::WouldDeadlock`]; on a multi-thread runtime's worker it waits inside
//!   `block_in_place` (the rule is [`blocking`]'s).
//! - **A panicking `Clone` leaves nothing behind.** The key is cloned before a caller enters
//!   the queue, so a panic there unwinds with the registry unchanged. `Hash` and `Eq` run under
//!   the map's shard lock when a caller arrives; a panic there changes nothing either. Should
//!   they panic when a caller leaves (a release, a timeout, a dropped future), its entry is
//!   found by identity instead, walking the map, and the key is handed on or freed as usual
//!   before the panic goes on.
//!
//! # How
//! A key's whole state (holder, queue) lives in the `DashMap` value, and every transition
//! (arrive, release, leave) happens under that key's shard lock through the map's entry API.
//! So creating and removing the entry is atomic with respect to arrivals: there is never a
//! second state for the same key. Nobody waits while holding the shard lock: a waiter waits on
//! its own [`Event`], which gives both a blocking `wait` and an `.await`.
//!
//! # Limits of re-entry detection
//! Re-entry is recognised when the inner call runs *inside* the outer call's body: on the same
//! thread for sync code, or polled from within the outer body's future for async code (also
//! through `join!` and `select!` inside the body). "Inside" means in the same Tokio task (or
//! outside any task) as the body: a sync body that drives a runtime (`rt.block_on`) which polls
//! *other* tasks does not make those tasks re-entrant; their calls simply queue. It is not recognised when the body hands the
//! work to another thread or spawns a task that takes the same key and then waits for it: that
//! deadlocks, and a `timeout` is the way out. Two futures of one task that take the same key
//! side by side (`join!(f(k), f(k))` outside any body) are not re-entry: they simply queue.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use event_listener::{Event, Listener};

use super::blocking::{self, Owner, WouldDeadlock};

pub use super::RandomState;

/// Why a key could not be locked. The caller left the queue either way.
///
/// ```
/// use std::time::{Duration, Instant};
/// use racefree_runtime::sync::keyed_locks::{KeyedLocks, LockError};
///
/// let locks = KeyedLocks::new();
/// let _held = locks.lock("stream-1", None).unwrap();
/// let deadline = Instant::now() + Duration::from_millis(10);
/// assert_eq!(locks.lock("stream-1", Some(deadline)).err(), Some(LockError::Timeout));
/// assert_eq!(locks.waiting(&"stream-1"), 0);            // the timed-out caller left the queue
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockError {
    /// The key stayed held past the deadline.
    Timeout,
    /// The code asking already holds the key (see the module's limits of re-entry detection):
    /// waiting would never end.
    Reentrant,
    /// A blocking caller would wait for an async task that only its own thread can run (see
    /// [`blocking`]): waiting would never end. The caller left the queue.
    WouldDeadlock,
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockError::Timeout => "timed out waiting for the key",
            LockError::Reentrant => "the key is already held by the code asking for it",
            LockError::WouldDeadlock => "a blocking wait for the key would never end: its holder is an async task of this thread",
        })
    }
}

impl std::error::Error for LockError {}

/// One holding of one key: a process-unique, ever-increasing number given when a caller
/// arrives (under the key's shard lock, so a key's holders are numbered in the order they get
/// the lock). It doubles as the in-process fencing token and as the identity re-entry is
/// checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Holder(u64);

static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    // The holders whose guarded code is running on this thread right now, innermost last, each
    // with the Tokio task it runs in (`None`: outside any task). A task that the guarded code
    // polls (a sync body driving `rt.block_on`) has another id, so it is not taken for the
    // guarded code itself.
    static RUNNING: RefCell<Vec<(Holder, Option<tokio::task::Id>)>> =
        const { RefCell::new(Vec::new()) };
}

/// The flag that sets a [tagged](Holder::tagged) holder apart from every counted one.
const TAGGED: u64 = 1 << 63;

impl Holder {
    /// A fresh holder, never handed out before.
    pub fn next() -> Holder {
        Holder(NEXT_HOLDER.fetch_add(1, Ordering::Relaxed))
    }

    /// The holder that stands for a *name* rather than one holding (e.g. the hash of an
    /// `#[idempotent]` record key): every code running under it for that name has the same
    /// holder, and none equals a [`next`](Holder::next) one.
    pub(crate) fn tagged(hash: u64) -> Holder {
        Holder(hash | TAGGED)
    }

    /// The number, e.g. as a fencing token.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `true` if the calling code runs under this holder ([`enter`](Holder::enter),
    /// [`within`](Holder::within)).
    pub fn is_running_here(self) -> bool {
        RUNNING.with(|running| {
            let running = running.borrow();
            !running.is_empty() && {
                let task = tokio::task::try_id();
                running.iter().any(|&(h, t)| h == self && t == task)
            }
        })
    }

    /// `true` if no code runs under any holder on this thread right now (then
    /// [`is_running_here`](Holder::is_running_here) is `false` for every holder).
    #[inline]
    pub(crate) fn none_running_here() -> bool {
        RUNNING.with(|running| running.borrow().is_empty())
    }

    /// Marks the current thread as running under this holder until the returned value is
    /// dropped: for a sync body.
    ///
    /// ```
    /// use racefree_runtime::sync::keyed_locks::Holder;
    ///
    /// let holder = Holder::next();
    /// let entered = holder.enter();
    /// assert!(holder.is_running_here());
    /// drop(entered);
    /// assert!(!holder.is_running_here());
    /// ```
    pub fn enter(self) -> Entered {
        self.push();
        Entered {
            holder: self,
            _not_send: std::marker::PhantomData,
        }
    }

    /// [`enter`](Holder::enter) for a value that must be `Send` (it lives in a struct an async
    /// caller holds too): the returned mark must still be dropped on the thread that made it,
    /// or the thread keeps running under the holder.
    pub(crate) fn enter_sendable(self) -> EnteredMark {
        self.push();
        EnteredMark { holder: self }
    }

    fn push(self) {
        let task = tokio::task::try_id();
        RUNNING.with(|running| running.borrow_mut().push((self, task)));
    }

    fn pop(self) {
        RUNNING.with(|running| {
            let mut running = running.borrow_mut();
            if let Some(at) = running.iter().rposition(|(h, _)| *h == self) {
                running.remove(at);
            }
        });
    }

    /// Runs `future` as running under this holder, on whichever thread polls it: for an async
    /// body.
    pub fn within<F: Future>(self, future: F) -> Within<F> {
        Within {
            holder: self,
            future,
        }
    }
}

/// The thread runs under a [`Holder`] while this lives. See [`Holder::enter`].
#[must_use = "the holder is entered only while this value lives"]
#[derive(Debug)]
pub struct Entered {
    holder: Holder,
    // Leaving must happen on the thread that entered.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.holder.pop();
    }
}

/// See [`Holder::enter_sendable`].
#[derive(Debug)]
pub(crate) struct EnteredMark {
    holder: Holder,
}

impl Drop for EnteredMark {
    fn drop(&mut self) {
        self.holder.pop();
    }
}

pin_project_lite::pin_project! {
    /// A future that runs under a [`Holder`] each time it is polled. See [`Holder::within`].
    ///
    /// The body's future is pinned in place (a safe projection by `pin-project-lite`), which
    /// saves the allocation `Box::pin` would cost on every async call.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless awaited"]
    pub struct Within<F> {
        holder: Holder,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.holder.enter();
        this.future.poll(cx)
    }
}

/// How a queued caller is told the lock is now its own.
#[derive(Debug)]
struct Waiter {
    holder: Holder,
    owner: Owner,
    granted: AtomicBool,
    event: Event,
}

/// How many times a blocking waiter checks its grant before it parks. A hand-off to a parked
/// thread costs a wake-up (microseconds); short bodies release sooner than that, so a brief
/// spin turns most contended hand-offs into a cache-line transfer.
const SPINS: u32 = 64;

impl Waiter {
    fn is_granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    fn spin_until_granted(&self) -> bool {
        for spin in 0..SPINS {
            if self.is_granted() {
                return true;
            }
            if spin < SPINS / 2 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.is_granted()
    }

    /// Blocks until granted or `deadline` passes; `true` if granted.
    fn wait(&self, deadline: Option<Instant>) -> bool {
        if self.spin_until_granted() {
            return true;
        }
        loop {
            if self.is_granted() {
                return true;
            }
            let listener = self.event.listen();
            if self.is_granted() {
                return true;
            }
            match deadline {
                None => listener.wait(),
                Some(deadline) => {
                    if listener.wait_deadline(deadline).is_none() {
                        return self.is_granted();
                    }
                }
            }
        }
    }

    /// Resolves once granted.
    async fn granted(&self) {
        loop {
            if self.is_granted() {
                return;
            }
            let listener = self.event.listen();
            if self.is_granted() {
                return;
            }
            listener.await;
        }
    }
}

/// A key's state while it is held or waited for.
#[derive(Debug)]
struct KeyLock {
    holder: Holder,
    owner: Owner,
    queue: VecDeque<Arc<Waiter>>,
}

impl KeyLock {
    /// Hands the lock to the front waiter; `false` if nobody waits (the entry should go).
    fn hand_on(&mut self) -> bool {
        match self.queue.pop_front() {
            Some(next) => {
                self.holder = next.holder;
                self.owner = next.owner;
                next.granted.store(true, Ordering::Release);
                next.event.notify(1);
                true
            }
            None => false,
        }
    }
}

/// Per-key FIFO locks.
///
/// ```
/// use racefree_runtime::KeyedLocks;
///
/// let locks = KeyedLocks::new();
/// let guard = locks.lock("order-7".to_owned(), None).unwrap();
/// assert_eq!(locks.len(), 1);
/// drop(guard);
/// assert!(locks.is_empty());                  // idle keys leave no entry
/// ```
pub struct KeyedLocks<K, S = RandomState> {
    locks: DashMap<K, KeyLock, S>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::with_hasher(RandomState::default())
    }
}

impl<K: Eq + Hash + Clone> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`KeyedLocks::arrive`] found.
enum Arrival<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone> {
    Held(KeyGuard<'a, K, S>),
    // With the owners a blocking waiter would wait for: the holder and those queued ahead.
    Queued(Ticket<'a, K, S>, Vec<Owner>),
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> KeyedLocks<K, S> {
    /// An empty registry with the given hasher.
    pub fn with_hasher(hasher: S) -> Self {
        KeyedLocks {
            locks: DashMap::with_hasher(hasher),
        }
    }

    /// Takes the key's lock, blocking the thread while others hold it, at most until `deadline`.
    ///
    /// Fails with [`LockError::WouldDeadlock`] instead of blocking when the holder or a caller
    /// queued ahead is an async task only this thread can run; on a worker of a multi-thread
    /// Tokio runtime it waits inside `block_in_place` (see [`blocking`]).
    pub fn lock(&self, key: K, deadline: Option<Instant>) -> Result<KeyGuard<'_, K, S>, LockError> {
        match self.arrive(key, false)? {
            Arrival::Held(guard) => Ok(guard),
            Arrival::Queued(ticket, ahead) => {
                let granted = blocking::wait(&ahead, deadline.is_some(), || {
                    ticket.waiter.wait(deadline)
                })
                    .map_err(|WouldDeadlock| {
                        tracing::debug!(target: "racefree", "a blocking wait for the key would never end: left the queue");
                        LockError::WouldDeadlock
                    })?;
                ticket.finish(granted)
            }
        }
    }

    /// Takes the key's lock, waiting asynchronously, at most until `deadline` (the deadline
    /// needs a Tokio runtime with its timer). Dropping the future leaves the queue cleanly.
    pub async fn lock_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> Result<KeyGuard<'_, K, S>, LockError> {
        match self.arrive(key, true)? {
            Arrival::Held(guard) => Ok(guard),
            Arrival::Queued(ticket, _) => {
                let granted = match deadline {
                    None => {
                        ticket.waiter.granted().await;
                        true
                    }
                    Some(deadline) => {
                        tokio::time::timeout_at(deadline.into(), ticket.waiter.granted())
                            .await
                            .is_ok()
                    }
                };
                ticket.finish(granted)
            }
        }
    }

    /// Takes the key's lock if it is free right now.
    pub fn try_lock(&self, key: K) -> Option<KeyGuard<'_, K, S>> {
        match self.locks.entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(entry) => {
                let holder = Holder::next();
                let key = entry.key().clone();
                entry.insert(KeyLock {
                    holder,
                    owner: Owner::unknown(),
                    queue: VecDeque::new(),
                });
                Some(KeyGuard {
                    locks: self,
                    key: Some(key),
                    holder,
                    waited: false,
                })
            }
        }
    }

    // The one place a caller meets the key's state: hold it if free, else queue up. Everything
    // that can panic (the key's `Clone`, `Hash`, `Eq`) runs before the state changes.
    fn arrive(&self, key: K, asynchronous: bool) -> Result<Arrival<'_, K, S>, LockError> {
        let owner = Owner::here(asynchronous);
        match self.locks.entry(key) {
            Entry::Vacant(entry) => {
                let holder = Holder::next();
                let key = entry.key().clone();
                entry.insert(KeyLock {
                    holder,
                    owner,
                    queue: VecDeque::new(),
                });
                tracing::debug!(target: "racefree", fence = holder.get(), "key free: acquired");
                Ok(Arrival::Held(KeyGuard {
                    locks: self,
                    key: Some(key),
                    holder,
                    waited: false,
                }))
            }
            Entry::Occupied(mut entry) => {
                if entry.get().holder.is_running_here() {
                    return Err(LockError::Reentrant);
                }
                // Cloned before queueing: a `Clone` that panics must not leave a waiter behind
                // that no ticket will ever take out of the queue.
                let ticket_key = entry.key().clone();
                let waiter = Arc::new(Waiter {
                    holder: Holder::next(),
                    owner,
                    granted: AtomicBool::new(false),
                    event: Event::new(),
                });
                let lock = entry.get_mut();
                let ahead = match asynchronous {
                    true => Vec::new(),
                    false => std::iter::once(lock.owner)
                        .chain(lock.queue.iter().map(|w| w.owner))
                        .collect(),
                };
                lock.queue.push_back(Arc::clone(&waiter));
                let position = lock.queue.len();
                tracing::debug!(target: "racefree", position, "key held: waiting");
                Ok(Arrival::Queued(
                    Ticket {
                        locks: self,
                        key: Some(ticket_key),
                        waiter,
                    },
                    ahead,
                ))
            }
        }
    }

    // Under the key's shard lock: the holder lets go; the front waiter, if any, gets the lock.
    fn release(&self, key: &K) {
        self.locks.remove_if_mut(key, |_, lock| !lock.hand_on());
    }

    /// Keys held or waited for right now (idle keys have no entry).
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// `true` when no key is held.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Callers queued for `key`, not counting the holder.
    pub fn waiting<Q>(&self, key: &Q) -> usize
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.locks.get(key).map_or(0, |lock| lock.queue.len())
    }
}

/// A queued caller's place in line. Dropped without [`finish`](Ticket::finish) (a dropped
/// future), it leaves the queue, handing the lock on if it had been handed to it already.
struct Ticket<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone> {
    locks: &'a KeyedLocks<K, S>,
    key: Option<K>,
    waiter: Arc<Waiter>,
}

impl<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone> Ticket<'a, K, S> {
    /// After waiting: the guard if the lock is ours by now, else leave the queue (timed out).
    fn finish(mut self, granted: bool) -> Result<KeyGuard<'a, K, S>, LockError> {
        let holder = self.waiter.holder;
        // Decided under the shard lock, where grants happen: a grant that raced the deadline
        // wins, and the caller gets the lock instead of an error. The ticket keeps its key
        // until the decision is made, so that a panic in between still leaves the queue.
        let granted = granted || {
            let key = self.key.as_ref().expect("a ticket finishes once");
            let mut lock = self
                .locks
                .locks
                .get_mut(key)
                .expect("a queued key has an entry");
            let granted = self.waiter.is_granted();
            if !granted {
                lock.queue.retain(|w| !Arc::ptr_eq(w, &self.waiter));
            }
            granted
        };
        let key = self.key.take().expect("a ticket finishes once");
        if granted {
            tracing::debug!(target: "racefree", fence = holder.get(), "handed the key: acquired");
            Ok(KeyGuard {
                locks: self.locks,
                key: Some(key),
                holder,
                waited: true,
            })
        } else {
            tracing::debug!(target: "racefree", "timed out waiting for the key; left the queue");
            Err(LockError::Timeout)
        }
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> Drop for Ticket<'_, K, S> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let waiter = &self.waiter;
        // Under the shard lock, where grants happen: handed to us as we gave up, pass it on
        // (`false`: free the key); else just leave the queue.
        let leave = |lock: &mut KeyLock| -> bool {
            if waiter.is_granted() {
                lock.hand_on()
            } else {
                lock.queue.retain(|w| !Arc::ptr_eq(w, waiter));
                true
            }
        };
        super::leave(
            || {
                self.locks.locks.remove_if_mut(&key, |_, lock| !leave(lock));
            },
            || {
                self.locks.locks.retain(|_, lock| {
                    let ours = lock.holder == waiter.holder
                        || lock.queue.iter().any(|w| Arc::ptr_eq(w, waiter));
                    !ours || leave(lock)
                })
            },
        )
        .resume();
        tracing::debug!(target: "racefree", "waiter cancelled; left the queue");
    }
}

/// The lock of one key; dropping it hands the key to the next waiter or frees it.
pub struct KeyGuard<'a, K: Eq + Hash + Clone, S: BuildHasher + Clone = RandomState> {
    locks: &'a KeyedLocks<K, S>,
    key: Option<K>,
    holder: Holder,
    waited: bool,
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> KeyGuard<'_, K, S> {
    /// The key held.
    pub fn key(&self) -> &K {
        self.key.as_ref().expect("held until drop")
    }

    /// `true` if this holding queued behind another before it got the key; `false` if the key
    /// was free when it arrived.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// This holding: its number is the key's fencing token, and code run under it
    /// ([`Holder::enter`], [`Holder::within`]) cannot take the same key again.
    pub fn holder(&self) -> Holder {
        self.holder
    }
}

impl<K: Eq + Hash + Clone, S: BuildHasher + Clone> Drop for KeyGuard<'_, K, S> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let holder = self.holder;
            super::leave(
                || self.locks.release(&key),
                || {
                    self.locks
                        .locks
                        .retain(|_, lock| lock.holder != holder || lock.hand_on())
                },
            )
            .resume();
        }
    }
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, S: BuildHasher + Clone> std::fmt::Debug
    for KeyGuard<'_, K, S>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyGuard")
            .field("key", &self.key)
            .field("holder", &self.holder)
            .finish()
    }
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, S: BuildHasher + Clone> std::fmt::Debug
    for KeyedLocks<K, S>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLocks")
            .field("len", &self.len())
            .finish()
    }
}
