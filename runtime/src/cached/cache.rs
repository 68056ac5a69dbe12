//! The memo cache behind `#[cached]`: a concurrent map with optional TTL and capacity, and a
//! single-flight registry in front of the function body.
//!
//! # What it promises
//! - **One execution per cold key.** [`Cache::lookup_or_lead`] is the per-key double check: look
//!   up, else join the key's flight; the first caller becomes the lead (and looks up once more,
//!   because another lead may have filled the key in between), the others wait for the lead's
//!   value. Different keys never wait for each other's computation.
//! - **Failures are not shared.** When the lead ends without a value (an `Err`/`None` result, a
//!   panic, a dropped future), its waiters wake up and one of them becomes the next lead: each
//!   waiter gets its own attempt, one at a time, instead of a copy of somebody else's error.
//!   With [`share_errors`](CacheConfig::share_errors) ([`Cache::answer`] and
//!   [`CacheLead::fail_with`]) they get a clone of the lead's error instead.
//! - **Refresh-ahead, at most one per entry.** With a [`refresh`](CacheConfig::refresh) age,
//!   [`Cache::answer`] returns the value of an entry that old at once, and hands exactly one
//!   caller a [`CacheRefresh`]: the hit that sets the entry's refresh bit (a `fetch_or`, so of
//!   any number of concurrent hits one wins). The refresh holds the key's flight, so callers
//!   that find the entry expired meanwhile wait for it. Its value replaces only the entry it was
//!   started from (with `refresh`, each insert gets a deadline of its own): after an
//!   invalidation, a `clear`, an eviction or a newer value it is dropped. A failed or dropped
//!   refresh clears the bit, so a later hit may try again. [`Cache::lookup_or_lead`] does not
//!   refresh.
//! - **Stale on error.** With [`stale_on_error`](CacheConfig::stale_on_error), an expired entry
//!   is kept that much longer (never returned by a hit); [`CacheLead::fail`] hands it to the
//!   failed lead and its waiters instead of nothing, counted in [`CacheStats::stale_served`].
//! - **Bounded.** With a TTL, expired entries are never returned and are purged as the cache
//!   grows; with a capacity, the entry count is kept at or below it after every insert.
//! - **A TTL is exact.** An entry is returned until `ttl` has passed since it was inserted and
//!   never after; it is not dropped before. The hit path reads a coarse clock and confirms
//!   with the precise one only in the last two ticks (1–8 ms) of an entry's life (see
//!   [`clock`]).
//! - **Capacity never evicts what it is inserting.** Room is made *before* a new key goes in,
//!   so the key just computed is always there right after; `clear()` and inserts take the same
//!   lock, so no entry ever escapes the eviction ring.
//! - **A sync waiter never hangs on an async leader it would block.** A sync call that finds
//!   its key being computed by an async call of its own thread's current-thread runtime panics
//!   with the reason instead of blocking forever; on a multi-thread runtime it waits inside
//!   `block_in_place` (see [`blocking`](crate::sync::blocking)).
//!
//! # The hit path writes no shared cache line
//! A hit is one `papaya` read, one clone, one bump of this thread's own counter slot
//! ([`stats`](super::stats)), and only when configured a coarse clock read (TTL, see
//! [`clock`]) and a visited bit (capacity). None of it writes memory another core reads:
//! - **The map read** pins `papaya`'s epoch guard, which is a store to this thread's own
//!   reservation slot (on Linux a `membarrier`-backed light barrier, so no fence), then probes
//!   with loads only; unpinning swaps that slot back (a locked `xchg`, but on a line only this
//!   thread writes). A `DashMap` read instead takes its shard's reader lock: a locked
//!   read-modify-write on a word every core's hits share, which is why its hits did not get
//!   faster with a second core.
//! - **The TTL check** loads the entry's stamp and reads the clock; it writes only to remove an
//!   entry it found expired. With `refresh`, the age check compares the same stamp and clock
//!   reading; only the hit that finds the entry due writes (its refresh bit), once.
//! - **The per-call answer** ([`served`](super::served)) is one load of a `const`
//!   thread-local; it writes (to that thread-local) only inside a tracking scope.
//! - **The CLOCK visited bit** is set with `fetch_or` only when it is not set yet, so a hot key
//!   is written once per pass of the eviction hand, not once per hit.
//! - **The hit counter** is a per-thread slot bumped with a plain load and store.
//!
//! Why `papaya` and not `scc::HashIndex`, the other lock-free-read map `benches/scaling.rs`
//! measures: both write no shared line on a read, and on the loaded 2-core machine the bench
//! ran on their figures were within its noise of each other (`HashIndex` scaled better in the
//! raw runs, `racefree` on `papaya` scaled 1.3–1.8× from 1 to 2 threads where `DashMap` did
//! 0.8–1.1×). By construction `HashIndex`'s guard is a full barrier (`lock xchg`) on every
//! read and it cannot replace a value in place (an insert of a present key fails; an update
//! copies), while `papaya`'s guard costs a store to pin and a swap on a thread-owned line to
//! unpin, its `insert`/`remove_if`/`retain` are the operations this cache already used, and
//! its memory per entry is lower (1M `u64` entries: `HashIndex` 71 MB, `papaya` 43 MB with the
//! growth below, against `DashMap`'s 36 MB). A quieter machine may reverse the speed figures.
//! What it costs: each entry is its own heap allocation behind a pointer (one more dependent
//! load per hit), and writes are slower: a replaced or removed entry is retired through the
//! epoch collector, which now and then issues a process-wide barrier. The single flight and
//! the eviction ring keep their locks (writes dominate there).
//!
//! # Memory
//! An entry is the key, the value and one `u64` stamp (deadline and flag bits; with `refresh`
//! the deadline also names the insert, so no sequence number is stored). The table grows in
//! one blocking copy (`papaya::ResizeMode::Blocking`: writers wait for it and help; plain
//! reads go on, a hit that removes an expired entry is a write), which the cache starts itself
//! once the table is 3/4 full (papaya would at its probe limit, about 85%, so between the two
//! the table is twice papaya's). An outgrown table is retired into the batch of whichever
//! writer finished the copy, and papaya frees a batch only once it is full: a cache that only
//! gains keys never fills one, and kept every table it outgrew (1M `u64` entries: 70 MB
//! instead of 43 MB). So after a growth the next checks of the cache's writers (a few per
//! core) flush their batches to the epoch collector. Best effort: a flush with more threads
//! inside the map at that moment than objects in the batch does nothing, and a writer that
//! adds no more keys keeps what it holds until its batch fills. `tests/cached_alloc.rs`
//! counts the tables left alive after one thread's fill.
//!
//! Why not moka: its `get` records every access in a buffer for its admission policy and costs
//! several times a plain map read; `#[cached]` hits must cost about what a hand-written map
//! would. The capacity policy is CLOCK (second chance): inserts append to a FIFO ring, eviction
//! skips and clears entries that were hit since their last pass (a hit racing the hand may be
//! evicted anyway: CLOCK is an approximation). `benches/cached.rs` and `benches/scaling.rs`
//! show the numbers.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::served::{record, Served};
use super::stats::{CacheStats, Counters};
use super::store::Outcome;
use crate::sync::blocking::Owner;
use crate::sync::clock;
use crate::sync::single_flight::{Join, Lead, SingleFlight};
pub use crate::sync::RandomState;
use crate::telemetry::{outcome, Meter, Started};

const VISITED: u64 = 1 << 63;
// Set by the one hit that starts the entry's background refresh; cleared if the refresh fails,
// so that a later hit may try again (one at a time).
const REFRESHING: u64 = 1 << 62;
const DEADLINE: u64 = !(VISITED | REFRESHING);
// 100 years: a longer `ttl` lives this long (forever, in practice), which keeps a deadline
// below `DEADLINE` for the first 46 years of the monotonic clock.
const LONGEST_TTL: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;

/// How a cache is bounded. `const` so that generated code can build it in a `static`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long an entry lives after it is inserted.
    pub ttl: Option<Duration>,
    /// The most entries the cache keeps.
    pub capacity: Option<usize>,
    /// Refresh-ahead: once an entry is this old, a hit still returns it at once and starts one
    /// background recompute of its key ([`Answer::Refresh`]). Needs a `ttl`, and must be
    /// shorter than it.
    pub refresh: Option<Duration>,
    /// When the recompute of an expired entry fails, the entry is served instead of the error
    /// for up to this long past its `ttl` (it is kept that long). Needs a `ttl`.
    pub stale_on_error: Option<Duration>,
    /// Waiters of a lead that failed receive its error ([`Answer::Failed`]) instead of
    /// computing again one by one.
    pub share_errors: bool,
}

impl CacheConfig {
    /// Unbounded, no expiry.
    pub const fn new() -> Self {
        CacheConfig {
            ttl: None,
            capacity: None,
            refresh: None,
            stale_on_error: None,
            share_errors: false,
        }
    }

    /// Entries expire `ttl` after insertion.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// At most `capacity` entries are kept (CLOCK eviction).
    pub const fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Entries older than `refresh` are recomputed in the background on their next hit (see
    /// [`CacheConfig::refresh`](CacheConfig#structfield.refresh)).
    pub const fn refresh(mut self, refresh: Duration) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// A failed recompute serves the expired entry for up to `grace` past its TTL.
    pub const fn stale_on_error(mut self, grace: Duration) -> Self {
        self.stale_on_error = Some(grace);
        self
    }

    /// Waiters of a failed lead receive its error.
    pub const fn share_errors(mut self) -> Self {
        self.share_errors = true;
        self
    }
}

/// A lead's error handed to its waiters (`share_errors`): type-erased, because the cache
/// knows only the value type. [`into_error`](SharedError::into_error) gives each waiter its
/// own clone.
#[derive(Clone)]
pub struct SharedError {
    error: Arc<dyn Any + Send + Sync>,
    // Clones `error` as the type it was made from: the `Clone` bound is checked where the
    // lead hands the error over, once, and a waiter needs only to name the type.
    clone: fn(&(dyn Any + Send + Sync)) -> Box<dyn Any>,
}

/// What an error type needs so that waiters can receive the lead's error: each gets a clone.
#[diagnostic::on_unimplemented(
    message = "`share_errors` hands the failed caller's error to every waiter, so `{Self}` must be `Clone + Send + Sync + 'static`",
    label = "this error type is not `Clone + Send + Sync + 'static`",
    note = "derive or implement `Clone` for the error, or wrap it: `Result<T, std::sync::Arc<{Self}>>`, or remove `share_errors` (waiters then compute again, one at a time)"
)]
pub trait ShareableError: Clone + Send + Sync + 'static {}

impl<E: Clone + Send + Sync + 'static> ShareableError for E {}

impl SharedError {
    /// Wraps the lead's error.
    pub fn new<E: ShareableError>(error: E) -> Self {
        fn clone<E: Clone + 'static>(error: &(dyn Any + Send + Sync)) -> Box<dyn Any> {
            let error: &E = error.downcast_ref().expect("made from an E");
            Box::new(error.clone())
        }
        SharedError {
            error: Arc::new(error),
            clone: clone::<E>,
        }
    }

    /// The lead's error, cloned.
    ///
    /// # Panics
    /// If the lead's error was not an `E`: only possible for a generic function whose error
    /// type varies while its key and value types do not (they then share one cache).
    pub fn into_error<E: 'static>(self) -> E {
        match (self.clone)(&*self.error).downcast::<E>() {
            Ok(error) => *error,
            Err(_) => panic!(
                "share_errors: the failed caller's error is not a `{}` (a generic function whose error type is not determined by its key and value types shares one cache across error types)",
                std::any::type_name::<E>()
            ),
        }
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedError(..)")
    }
}

// What a lead hands its waiters.
#[derive(Clone)]
enum Landed<V> {
    Value(V),
    // The recompute failed; this is the expired entry, within `stale_on_error`.
    Stale(V),
    Error(SharedError),
}

struct Slot<V> {
    value: V,
    // Bit 63: hit since the CLOCK hand last passed. Bits 0..62: deadline on `clock::now_nanos`,
    // 0 for none. Bit 62: a hit started this entry's refresh.
    //
    // With `refresh` the deadline also names the insert that made the entry (no two inserts
    // of the cache get the same one, see `Cache::name_insert`): a refresh replaces only the
    // entry it started from, so an invalidation (or any newer value) during the refresh wins.
    // A number of its own would cost 8 bytes per entry (a quarter of a `u64` entry).
    stamp: AtomicU64,
}

impl<V> Slot<V> {
    // Whether the insert named `insert` (see `stamp`) made this entry.
    #[inline]
    fn made_by(&self, insert: u64) -> bool {
        self.stamp.load(Relaxed) & DEADLINE == insert
    }
}

/// A concurrent memo cache with per-key single flight, optional TTL and capacity.
///
/// Use it directly, or own one in a struct and point `#[cached(store = self.field)]` at it.
///
/// ```
/// use std::time::Duration;
/// use racefree_runtime::Cache;
///
/// let cache: Cache<u64, String> = Cache::builder().ttl(Duration::from_secs(60)).capacity(1_000).build();
/// let v = cache.get_with(7, || "seven".to_owned());
/// assert_eq!(v, "seven");
/// assert_eq!(cache.get_with(7, || unreachable!()), "seven");
/// assert_eq!(cache.stats().executions, 1);
/// assert_eq!(cache.stats().hits, 1);
/// ```
pub struct Cache<K, V, S = RandomState> {
    entries: papaya::HashMap<K, Slot<V>, S>,
    flights: SingleFlight<K, Landed<V>, S>,
    config: CacheConfig,
    // `ttl - refresh` in nanoseconds: an entry is due for refresh this long before its deadline.
    refresh_before_deadline: Option<u64>,
    // `stale_on_error` in nanoseconds (0: none): how long past its deadline an entry is kept.
    grace: u64,
    // The deadline of the latest insert, with `refresh` only (see `Slot::stamp`).
    last_deadline: AtomicU64,
    // The CLOCK ring; present only with a capacity.
    ring: Option<Mutex<VecDeque<K>>>,
    inserts_since_sweep: AtomicUsize,
    // Keys added, the largest table `grow_now_and_then` asked for, and how many of its next
    // checks flush (see there).
    new_keys: AtomicUsize,
    grown_to: AtomicUsize,
    flushes_due: AtomicUsize,
    left_by_last_sweep: AtomicUsize,
    counters: Counters,
    // What `metrics` sees (feature `metrics`; nothing otherwise): registered at creation.
    meter: Meter,
    name: &'static str,
}

/// What [`Cache::lookup_or_lead`] found.
pub enum Lookup<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    /// The value, from the cache or from the lead this caller waited for.
    Hit(V),
    /// Nobody has the value: this caller computes it and must finish the [`CacheLead`].
    Lead(CacheLead<'a, K, V, S>),
}

/// What [`Cache::answer`] found: a [`Lookup`] plus what refresh-ahead and `share_errors` add.
/// This is what `#[cached]` expansions match on.
pub enum Answer<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    /// The value, from the cache (fresh, or stale within `stale_on_error`) or from the lead
    /// this caller waited for.
    Hit(V),
    /// The cached value, past its `refresh` age, and the duty to recompute it in the
    /// background: [`CacheRefresh::spawn`] (or dropping it, which skips this refresh).
    Refresh(V, CacheRefresh<'a, K, V, S>),
    /// The lead this caller waited for failed with this error (`share_errors` only).
    Failed(SharedError),
    /// Nobody has the value: this caller computes it and must finish the [`CacheLead`].
    Lead(CacheLead<'a, K, V, S>),
}

/// The duty to recompute one key of a [`Cache`] in the background, handed out by a hit past
/// the `refresh` age; at most one exists per key. While it lives, callers that find the key
/// expired wait for it as for any lead. On success the new value replaces the entry it was
/// started from, unless that entry was invalidated or replaced meanwhile (then it is dropped
/// and waiters compute again); on failure the entry keeps its value and a later hit may start
/// another refresh.
pub struct CacheRefresh<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    cache: &'a Cache<K, V, S>,
    // `None` once finished.
    lead: Option<Lead<'a, K, Landed<V>, S>>,
    // The deadline naming the insert it started from (see `Slot::stamp`).
    insert: u64,
}

/// The duty to compute one key of a [`Cache`]. [`complete`](CacheLead::complete) stores the
/// value and hands it to the waiters; dropping the lead (error, panic, cancellation) lets one
/// waiter take over.
pub struct CacheLead<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    cache: &'a Cache<K, V, S>,
    lead: Lead<'a, K, Landed<V>, S>,
}

/// Builds a [`Cache`]; the key and value types come from where the cache goes.
pub struct CacheBuilder<K, V> {
    config: CacheConfig,
    name: &'static str,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> CacheBuilder<K, V> {
    /// Entries expire `ttl` after insertion.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = Some(ttl);
        self
    }

    /// At most `capacity` entries are kept. Panics if `capacity` is 0 (`#[cached]` rejects that
    /// at compile time).
    pub fn capacity(mut self, capacity: usize) -> Self {
        assert!(capacity > 0, "a cache capacity must be at least 1");
        self.config.capacity = Some(capacity);
        self
    }

    /// A name for `tracing` events.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The cache.
    pub fn build(self) -> Cache<K, V>
    where
        K: Eq + Hash + Clone,
        V: Clone,
    {
        Cache::with_config_and_hasher(self.config, self.name, RandomState::default())
    }
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("config", &self.config)
            .field("name", &self.name)
            .finish()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    /// An unbounded cache without expiry.
    pub fn new() -> Self {
        Self::with_config(CacheConfig::new())
    }

    /// A builder for TTL and capacity.
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder {
            config: CacheConfig::new(),
            name: "",
            types: PhantomData,
        }
    }

    /// A cache bounded by `config`.
    pub fn with_config(config: CacheConfig) -> Self {
        Self::with_config_and_hasher(config, "", RandomState::default())
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Cache<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V, S> Cache<K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
{
    /// A cache bounded by `config`, named `name` in `tracing` events, hashing with `hasher`.
    ///
    /// `hasher` must spread keys over the low bits of the hash (any well-mixing hash; not an
    /// identity or truncating one). The table probes from the low bits, and when a key finds no
    /// free slot within its probe limit in a table under half full, `papaya` 0.2.5 replaces the
    /// table by one of the same size, in which the same key fails again: the insert never
    /// returns and allocates a table per turn. [`RandomState`] (the default) is chosen for this.
    ///
    /// # Panics
    /// If `config` has a `refresh` or `stale_on_error` without a `ttl`, or a `refresh` not
    /// shorter than its `ttl` (`#[cached]` rejects these at compile time).
    pub fn with_config_and_hasher(config: CacheConfig, name: &'static str, hasher: S) -> Self {
        let refresh_before_deadline = config.refresh.map(|refresh| {
            let ttl = config.ttl.expect("a cache `refresh` needs a `ttl`");
            assert!(
                refresh < ttl,
                "a cache `refresh` must be shorter than its `ttl`"
            );
            // From the ttl a deadline is made with (at most `LONGEST_TTL`).
            saturating_nanos(ttl)
                .min(LONGEST_TTL)
                .saturating_sub(saturating_nanos(refresh))
        });
        if config.stale_on_error.is_some() {
            assert!(config.ttl.is_some(), "`stale_on_error` needs a `ttl`");
        }
        Cache {
            entries: papaya::HashMap::builder()
                .hasher(hasher.clone())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            flights: SingleFlight::with_hasher(hasher),
            config,
            refresh_before_deadline,
            grace: config.stale_on_error.map_or(0, saturating_nanos),
            last_deadline: AtomicU64::new(0),
            ring: config
                .capacity
                .map(|c| Mutex::new(VecDeque::with_capacity(c.min(1 << 16)))),
            inserts_since_sweep: AtomicUsize::new(0),
            new_keys: AtomicUsize::new(0),
            grown_to: AtomicUsize::new(0),
            flushes_due: AtomicUsize::new(0),
            left_by_last_sweep: AtomicUsize::new(0),
            counters: Counters::default(),
            meter: Meter::new(name, "memory"),
            name,
        }
    }

    /// The value for `key`, if present and not expired. Counts as a hit when found.
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let value = self.peek(key)?;
        self.counters.hits.bump();
        self.meter.hit();
        Some(value)
    }

    #[inline]
    fn peek<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.peek_aged(key, false).map(|(value, _)| value)
    }

    // The hit path. With `refresh` asked and configured, also says how old the entry is: the
    // check is a load of the stamp already read and the clock already read for the TTL; only
    // the one hit that finds the entry due writes (sets REFRESHING).
    #[inline]
    fn peek_aged<Q>(&self, key: &Q, refresh: bool) -> Option<(V, Age)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Pinning announces this thread in its own reservation slot; the probe only loads.
        let entries = self.entries.pin();
        let slot = entries.get(key)?;
        let stamp = slot.stamp.load(Relaxed);
        let mut age = Age::Fresh;
        if self.config.ttl.is_some() {
            let now = self.now();
            if is_expired(stamp, now) {
                // Kept while it may still be served stale or is being refreshed; `Err` means it
                // was replaced by a live entry meanwhile: nothing to remove.
                if self.removable(stamp, now) {
                    let _ = entries
                        .remove_if(key, |_, slot| self.removable(slot.stamp.load(Relaxed), now));
                }
                return None;
            }
            if let (true, Some(before)) = (refresh, self.refresh_before_deadline) {
                age = self.refresh_age(slot, stamp, before, now);
            }
        }
        // Only write the shared line when the bit is not set yet: hot keys stay read-only.
        if self.ring.is_some() && stamp & VISITED == 0 {
            slot.stamp.fetch_or(VISITED, Relaxed);
        }
        Some((slot.value.clone(), age))
    }

    #[inline]
    fn refresh_age(&self, slot: &Slot<V>, stamp: u64, before: u64, now: u64) -> Age {
        if stamp & REFRESHING != 0 {
            return Age::Refreshing;
        }
        if !clock::is_past((stamp & DEADLINE).saturating_sub(before), now) {
            return Age::Fresh;
        }
        // Of the hits that find it due, the one that sets the bit starts the refresh.
        match slot.stamp.fetch_or(REFRESHING, Relaxed) & REFRESHING {
            0 => Age::Due(stamp & DEADLINE),
            _ => Age::Refreshing,
        }
    }

    // An expired entry stays while `stale_on_error` may still serve it, and while a refresh
    // started from it runs (the refresh replaces it; its waiters find it gone otherwise).
    #[inline]
    fn removable(&self, stamp: u64, now: u64) -> bool {
        stamp & REFRESHING == 0 && is_expired_by(stamp, self.grace, now)
    }

    /// The per-key double check: the cached value, or the value of the caller computing it
    /// right now (blocking this thread until it is done), or the duty to compute it.
    ///
    /// # Panics
    /// If the caller computing the key is an async task that only this thread can run (this
    /// thread's current-thread runtime): blocking would wait forever, so it panics saying so.
    /// Make the caller async, or call it from a multi-thread runtime.
    #[inline]
    pub fn lookup_or_lead(&self, key: K) -> Lookup<'_, K, V, S> {
        if let Some(value) = self.get(&key) {
            record(Served::Hit);
            return Lookup::Hit(value);
        }
        self.miss(key, false).into_lookup()
    }

    /// [`lookup_or_lead`](Self::lookup_or_lead) for async callers: waiting awaits instead of
    /// blocking, and dropping the future while it waits leaves no trace.
    pub async fn lookup_or_lead_async(&self, key: K) -> Lookup<'_, K, V, S> {
        if let Some(value) = self.get(&key) {
            record(Served::Hit);
            return Lookup::Hit(value);
        }
        self.miss_async(key, false).await.into_lookup()
    }

    /// [`lookup_or_lead`](Self::lookup_or_lead) given the key in borrowed form (`&str` for a
    /// `String` key): a hit allocates nothing; only a miss builds the owned key.
    #[inline]
    pub fn lookup_or_lead_borrowed<Q>(
        &self,
        key: &Q,
        to_owned: impl FnOnce(&Q) -> K,
    ) -> Lookup<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.get(key) {
            Some(value) => {
                record(Served::Hit);
                Lookup::Hit(value)
            }
            None => self.miss(to_owned(key), false).into_lookup(),
        }
    }

    /// [`lookup_or_lead_borrowed`](Self::lookup_or_lead_borrowed) for async callers.
    pub async fn lookup_or_lead_borrowed_async<Q>(
        &self,
        key: &Q,
        to_owned: impl FnOnce(&Q) -> K,
    ) -> Lookup<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.get(key) {
            Some(value) => {
                record(Served::Hit);
                Lookup::Hit(value)
            }
            None => self.miss_async(to_owned(key), false).await.into_lookup(),
        }
    }

    /// [`lookup_or_lead`](Self::lookup_or_lead) with everything the cache's config adds: a hit
    /// past the `refresh` age is [`Answer::Refresh`] (for at most one caller per entry), and
    /// with `share_errors` a waiter of a failed lead gets [`Answer::Failed`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use racefree_runtime::cached::{Answer, Cache, CacheConfig};
    ///
    /// let config = CacheConfig::new().ttl(Duration::from_secs(60)).refresh(Duration::from_millis(1));
    /// let cache: &'static Cache<u64, u64> = Box::leak(Box::new(Cache::with_config(config)));
    /// let Answer::Lead(lead) = cache.answer(1) else { unreachable!() };
    /// lead.complete(10);
    /// std::thread::sleep(Duration::from_millis(5)); // past `refresh`
    /// let Answer::Refresh(value, refresh) = cache.answer(1) else { unreachable!() };
    /// assert_eq!(value, 10);                          // the current value, at once
    /// assert!(matches!(cache.answer(1), Answer::Hit(10))); // one refresh per entry
    /// refresh.run(|| Some(11));                       // or `spawn` it onto a thread
    /// assert!(matches!(cache.answer(1), Answer::Hit(11)));
    /// ```
    #[inline]
    pub fn answer(&self, key: K) -> Answer<'_, K, V, S> {
        match self.peek_aged(&key, true) {
            Some((value, age)) => self.answered_hit(value, age, || key, false),
            None => self.miss(key, true),
        }
    }

    /// [`answer`](Self::answer) for async callers. A refresh's lead is recorded as an async
    /// task of this thread, which is where [`CacheRefresh::spawn_async`] puts it.
    pub async fn answer_async(&self, key: K) -> Answer<'_, K, V, S> {
        match self.peek_aged(&key, true) {
            Some((value, age)) => self.answered_hit(value, age, || key, true),
            None => self.miss_async(key, true).await,
        }
    }

    /// [`answer`](Self::answer) given the key in borrowed form.
    #[inline]
    pub fn answer_borrowed<Q>(&self, key: &Q, to_owned: impl FnOnce(&Q) -> K) -> Answer<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.peek_aged(key, true) {
            Some((value, age)) => self.answered_hit(value, age, || to_owned(key), false),
            None => self.miss(to_owned(key), true),
        }
    }

    /// [`answer_borrowed`](Self::answer_borrowed) for async callers.
    pub async fn answer_borrowed_async<Q>(
        &self,
        key: &Q,
        to_owned: impl FnOnce(&Q) -> K,
    ) -> Answer<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.peek_aged(key, true) {
            Some((value, age)) => self.answered_hit(value, age, || to_owned(key), true),
            None => self.miss_async(to_owned(key), true).await,
        }
    }

    #[inline]
    fn answered_hit(
        &self,
        value: V,
        age: Age,
        key: impl FnOnce() -> K,
        asynchronous: bool,
    ) -> Answer<'_, K, V, S> {
        self.counters.hits.bump();
        self.meter.hit();
        match age {
            Age::Fresh => {
                record(Served::Hit);
                Answer::Hit(value)
            }
            Age::Refreshing => {
                record(Served::Refreshing);
                Answer::Hit(value)
            }
            Age::Due(insert) => {
                record(Served::Refreshing);
                match self.start_refresh(key(), insert, asynchronous) {
                    Some(refresh) => Answer::Refresh(value, refresh),
                    None => Answer::Hit(value),
                }
            }
        }
    }

    #[cold]
    fn start_refresh(
        &self,
        key: K,
        insert: u64,
        asynchronous: bool,
    ) -> Option<CacheRefresh<'_, K, V, S>> {
        // A sync refresh runs on a thread of its own, which a blocking waiter can always wait
        // for; an async one is a task of this thread's runtime (see `blocking`).
        let owner = match asynchronous {
            true => Owner::here(true),
            false => Owner::unknown(),
        };
        match self.flights.join_as(key, owner) {
            // Somebody computes the key already; its value will replace this one.
            Join::Follow(_) => None,
            Join::Lead(lead) => Some(CacheRefresh {
                cache: self,
                lead: Some(lead),
                insert,
            }),
        }
    }

    // The miss path: join the key's flight, wait for its lead or become it. `errors`: the
    // caller can take `Answer::Failed` (otherwise a shared error is treated as no value).
    // Out of line, so that a hit does not pay for its stack frame.
    #[inline(never)]
    fn miss(&self, key: K, errors: bool) -> Answer<'_, K, V, S> {
        let mut waited = false;
        loop {
            match self.join(&key, false) {
                Step::Done(answer) => return answer,
                Step::Wait(flight) => {
                    self.note_wait(&mut waited);
                    let started = Started::now();
                    let landing = flight.wait_checked().unwrap_or_else(|error| {
                        panic!("#[cached] {}: {error}", self.name);
                    });
                    self.meter.flight_waited(started);
                    if let Some(answer) = self.landed(landing, errors) {
                        return answer;
                    }
                }
            }
        }
    }

    async fn miss_async(&self, key: K, errors: bool) -> Answer<'_, K, V, S> {
        let mut waited = false;
        loop {
            match self.join(&key, true) {
                Step::Done(answer) => return answer,
                Step::Wait(flight) => {
                    self.note_wait(&mut waited);
                    let started = Started::now();
                    let landing = flight.wait_async().await;
                    self.meter.flight_waited(started);
                    if let Some(answer) = self.landed(landing, errors) {
                        return answer;
                    }
                }
            }
        }
    }

    // What a waiter takes from its lead's landing; `None`: no value, compute again.
    fn landed(&self, landing: &Option<Landed<V>>, errors: bool) -> Option<Answer<'_, K, V, S>> {
        match landing {
            Some(Landed::Value(value)) => {
                record(Served::Waited);
                Some(Answer::Hit(value.clone()))
            }
            Some(Landed::Stale(value)) => {
                self.counters.stale_served.fetch_add(1, Relaxed);
                record(Served::Stale);
                Some(Answer::Hit(value.clone()))
            }
            Some(Landed::Error(error)) if errors => {
                record(Served::Waited);
                Some(Answer::Failed(error.clone()))
            }
            Some(Landed::Error(_)) | None => None,
        }
    }

    fn join(&self, key: &K, asynchronous: bool) -> Step<'_, K, V, S> {
        match self.flights.join_as(key.clone(), Owner::here(asynchronous)) {
            Join::Follow(flight) => Step::Wait(flight),
            Join::Lead(lead) => {
                // Second check, now that we own the key: a lead that finished between our
                // first look and our join has already filled it.
                if let Some(value) = self.get(key) {
                    lead.complete(Landed::Value(value.clone()));
                    record(Served::Hit);
                    return Step::Done(Answer::Hit(value));
                }
                self.counters.executions.fetch_add(1, Relaxed);
                self.meter.executed();
                tracing::debug!(target: "racefree", function = self.name, outcome = outcome::EXECUTED, "cache miss: executing");
                Step::Done(Answer::Lead(CacheLead { cache: self, lead }))
            }
        }
    }

    fn note_wait(&self, waited: &mut bool) {
        if !*waited {
            *waited = true;
            self.counters.coalesced.fetch_add(1, Relaxed);
            self.meter.cache_waited();
            tracing::debug!(target: "racefree", function = self.name, outcome = outcome::WAITED, "cache miss: waiting for the caller computing it");
        }
    }

    /// The value for `key`, computing it with `compute` if absent (once, however many callers
    /// ask at the same time).
    pub fn get_with(&self, key: K, compute: impl FnOnce() -> V) -> V {
        match self.lookup_or_lead(key) {
            Lookup::Hit(value) => value,
            Lookup::Lead(lead) => {
                let value = compute();
                lead.complete(value.clone());
                value
            }
        }
    }

    /// Like [`get_with`](Self::get_with), but an `Err` is returned to this caller and not
    /// cached; a waiter then computes again.
    pub fn try_get_with<E>(&self, key: K, compute: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        match self.lookup_or_lead(key) {
            Lookup::Hit(value) => Ok(value),
            Lookup::Lead(lead) => {
                let value = compute()?;
                lead.complete(value.clone());
                Ok(value)
            }
        }
    }

    /// Async [`get_with`](Self::get_with).
    pub async fn get_with_async<F>(&self, key: K, compute: F) -> V
    where
        F: std::future::Future<Output = V>,
    {
        match self.lookup_or_lead_async(key).await {
            Lookup::Hit(value) => value,
            Lookup::Lead(lead) => {
                let value = compute.await;
                lead.complete(value.clone());
                value
            }
        }
    }

    /// Stores `value` for `key`, replacing any previous value. With a capacity, room is made
    /// first, so the entry inserted is never the one evicted.
    pub fn insert(&self, key: K, value: V) {
        let slot = self.new_slot(value);
        let added = match &self.ring {
            None => self.entries.pin().insert(key, slot).is_none(),
            Some(ring) => {
                let ring_key = key.clone();
                // The map and the ring change together under the ring's lock, as in `clear`.
                let mut ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let entries = self.entries.pin();
                let added = !entries.contains_key(&key);
                if added {
                    self.make_room(&mut ring);
                    ring.push_back(ring_key);
                }
                entries.insert(key, slot);
                added
            }
        };
        if added {
            self.grow_now_and_then();
        }
        if self.config.ttl.is_some() {
            self.sweep_now_and_then();
        }
    }

    // After an insert that added a key: grows the table itself, so that the table it outgrew
    // is freed at once instead of staying allocated (see "# Memory" in the module docs).
    // Checked on every 256th new key of the cache: `len` sums papaya's per-CPU counters.
    #[inline]
    fn grow_now_and_then(&self) {
        let added = self.new_keys.fetch_add(1, Relaxed).wrapping_add(1);
        if !added.is_multiple_of(256) {
            return;
        }
        let len = self.entries.len();
        let table = table_for(len);
        if len >= SMALLEST_GROWN && table > self.grown_to.fetch_max(table, Relaxed) {
            // A blocking copy (`ResizeMode::Blocking`) that this thread starts; other writers
            // help, and whichever copies the last chunk retires the old table into its own
            // batch. So the next few checks, on whatever thread, flush theirs too.
            self.entries.pin().reserve(0);
            self.flushes_due.store(flushes_per_growth(), Relaxed);
        }
        let due = self
            .flushes_due
            .fetch_update(Relaxed, Relaxed, |due| due.checked_sub(1));
        if due.is_ok() {
            // Hands this thread's batch to the collector now. Best effort: with more threads
            // inside the map at this moment than objects in the batch, it stays until a later
            // flush or a full batch.
            papaya::Guard::flush(&self.entries.guard());
        }
    }

    fn new_slot(&self, value: V) -> Slot<V> {
        let stamp = match self.config.ttl {
            // From the precise clock; never 0, which would mean "no deadline".
            Some(ttl) => {
                let ttl = saturating_nanos(ttl).min(LONGEST_TTL);
                self.name_insert(clock::deadline_after(ttl).clamp(1, DEADLINE))
            }
            None => 0,
        };
        Slot {
            value,
            stamp: AtomicU64::new(stamp),
        }
    }

    // With `refresh`, moves `deadline` past the latest insert's, so that it names this insert
    // alone (by at most a nanosecond per insert racing it). `LONGEST_TTL` keeps it below
    // `DEADLINE`: the monotonic clock would have to run for 46 years first.
    #[inline]
    fn name_insert(&self, deadline: u64) -> u64 {
        if self.refresh_before_deadline.is_none() {
            return deadline;
        }
        let mut last = self.last_deadline.load(Relaxed);
        loop {
            let named = deadline.max(last + 1).min(DEADLINE);
            match self
                .last_deadline
                .compare_exchange_weak(last, named, Relaxed, Relaxed)
            {
                Ok(_) => return named,
                Err(newer) => last = newer,
            }
        }
    }

    // A refresh's value goes in only over the entry it started from: not after an
    // invalidation, a `clear`, an eviction or a newer value. The key is in the map (and the
    // ring) already, so no room is made.
    fn replace_if_current(&self, key: &K, insert: u64, value: &V) -> bool {
        let entries = self.entries.pin();
        let fresh = self.new_slot(value.clone());
        let mut fresh = Some(fresh);
        let replaced = entries.compute(key.clone(), |entry| match entry {
            Some((_, slot)) if slot.made_by(insert) => {
                match fresh.take() {
                    Some(slot) => papaya::Operation::Insert(slot),
                    // A retry of the CAS: build the entry again.
                    None => papaya::Operation::Insert(self.new_slot(value.clone())),
                }
            }
            _ => papaya::Operation::Abort(()),
        });
        matches!(replaced, papaya::Compute::Updated { .. })
    }

    // The expired entry for `key` if `stale_on_error` may still serve it.
    fn stale(&self, key: &K) -> Option<V> {
        if self.grace == 0 {
            return None;
        }
        let entries = self.entries.pin();
        let slot = entries.get(key)?;
        let now = self.now();
        (!is_expired_by(slot.stamp.load(Relaxed), self.grace, now)).then(|| slot.value.clone())
    }

    // CLOCK: walk the ring from the front; an entry hit since the last pass loses its mark and
    // goes to the back, any other (or an expired one) is evicted, until one more entry fits.
    // Terminates within two passes. Runs before the new key is in the map and the ring, so it
    // cannot pick the new key.
    fn make_room(&self, ring: &mut VecDeque<K>) {
        let Some(capacity) = self.config.capacity else {
            return;
        };
        let now = self.config.ttl.map(|_| self.now());
        let entries = self.entries.pin();
        while entries.len() >= capacity {
            let Some(key) = ring.pop_front() else { break };
            let mut second_chance = false;
            // `Err` is the second chance (or a key no longer stored): nothing removed.
            let removed = entries.remove_if(&key, |_, slot| {
                let stamp = slot.stamp.load(Relaxed);
                if now.is_some_and(|now| is_expired(stamp, now)) || stamp & VISITED == 0 {
                    return true;
                }
                slot.stamp.fetch_and(!VISITED, Relaxed);
                second_chance = true;
                false
            });
            if let Ok(Some(_)) = removed {
                self.meter.evicted(1);
            }
            if second_chance {
                ring.push_back(key);
            }
        }
        // Keys invalidated and inserted again stand in the ring twice; keep it near the map's size.
        if ring.len() > 2 * capacity + 64 {
            let mut seen = HashSet::with_capacity(ring.len());
            ring.retain(|k| entries.contains_key(k) && seen.insert(k.clone()));
        }
    }

    // Amortized O(1): a full sweep once as many entries were inserted as the last sweep left
    // behind, and at least 1024 inserts apart.
    fn sweep_now_and_then(&self) {
        let inserted = self.inserts_since_sweep.fetch_add(1, Relaxed) + 1;
        if inserted < 1024 || inserted < self.left_by_last_sweep.load(Relaxed) {
            return;
        }
        self.inserts_since_sweep.store(0, Relaxed);
        self.purge_expired();
        self.left_by_last_sweep.store(self.entries.len(), Relaxed);
    }

    /// Removes every expired entry now. (They are also removed lazily.)
    pub fn purge_expired(&self) {
        if self.config.ttl.is_none() {
            return;
        }
        let now = self.now();
        self.entries
            .pin()
            .retain(|_, slot| !self.removable(slot.stamp.load(Relaxed), now));
    }

    /// Removes `key`; `true` if it was there. A computation under way is not interrupted and
    /// will store its value when it finishes.
    pub fn invalidate<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.pin().remove(key).is_some()
    }

    /// Removes every entry. With a capacity, atomic with respect to inserts: an insert lands
    /// wholly before (and is removed) or wholly after (and stays, evictable as any other).
    pub fn clear(&self) {
        match &self.ring {
            None => self.entries.pin().clear(),
            Some(ring) => {
                let mut ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                self.entries.pin().clear();
                ring.clear();
            }
        }
    }

    /// `true` if the eviction ring tracks every stored entry (always `true` without a
    /// capacity): the invariant that keeps the capacity honest. Walks both; for tests.
    pub fn ring_covers_entries(&self) -> bool {
        let Some(ring) = &self.ring else { return true };
        let ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let tracked: HashSet<&K> = ring.iter().collect();
        self.entries
            .pin()
            .iter()
            .all(|(key, _)| tracked.contains(key))
    }

    /// Entries stored (expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys being computed right now: the size of the per-key lock registry.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Hits, coalesced waits and executions so far.
    pub fn stats(&self) -> CacheStats {
        self.counters.snapshot()
    }

    /// Sets the stats back to zero.
    pub fn reset_stats(&self) {
        self.counters.reset();
    }

    /// How this cache is bounded.
    pub fn config(&self) -> CacheConfig {
        self.config
    }

    #[inline]
    fn now(&self) -> u64 {
        crate::sync::clock::now_nanos()
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Clone> Cache<K, V, S> {
    // A refresh that failed or was dropped: the entry may start another one.
    fn end_refresh(&self, key: &K, insert: u64) {
        if let Some(slot) = self.entries.pin().get(key) {
            if slot.made_by(insert) {
                slot.stamp.fetch_and(!REFRESHING, Relaxed);
            }
        }
    }
}

enum Step<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone> {
    Done(Answer<'a, K, V, S>),
    Wait(Arc<crate::sync::flight::Flight<Landed<V>>>),
}

// How old a hit's entry is, for refresh-ahead.
#[derive(Clone, Copy)]
enum Age {
    Fresh,
    // Past `refresh`, and a refresh is under way.
    Refreshing,
    // Past `refresh`: this caller starts the refresh of the entry its insert named by this
    // deadline made (see `Slot::stamp`).
    Due(u64),
}

impl<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone> Answer<'a, K, V, S> {
    // A miss without `errors` never answers `Failed`, and no miss answers `Refresh`.
    fn into_lookup(self) -> Lookup<'a, K, V, S> {
        match self {
            Answer::Hit(value) | Answer::Refresh(value, _) => Lookup::Hit(value),
            Answer::Lead(lead) => Lookup::Lead(lead),
            Answer::Failed(_) => unreachable!("a lookup that does not take errors was given one"),
        }
    }
}

impl<K, V, S> CacheLead<'_, K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
{
    /// Stores `value`, then hands it to every waiter.
    pub fn complete(self, value: V) {
        self.cache.insert(self.lead.key().clone(), value.clone());
        self.lead.complete(Landed::Value(value));
        record(Served::Executed);
    }

    /// Gives up without a value: one waiter becomes the next lead. (Dropping does the same.)
    pub fn abandon(self) {
        tracing::debug!(target: "racefree", function = self.cache.name, "no value to cache; releasing the key");
        record(Served::Executed);
    }

    /// The computation failed: with `stale_on_error`, the expired entry if it is still within
    /// its grace, which every waiter gets too (counted in [`CacheStats::stale_served`]);
    /// otherwise `None`, as [`abandon`](Self::abandon).
    pub fn fail(self) -> Option<V> {
        match self.cache.stale(self.lead.key()) {
            Some(value) => Some(self.serve_stale(value)),
            None => {
                self.abandon();
                None
            }
        }
    }

    /// [`fail`](Self::fail) with the error: if there is no stale value to serve and the cache
    /// shares errors, every waiter gets a clone of `error` ([`Answer::Failed`]).
    pub fn fail_with<E: ShareableError>(self, error: &E) -> Option<V> {
        if let Some(value) = self.cache.stale(self.lead.key()) {
            return Some(self.serve_stale(value));
        }
        if self.cache.config.share_errors {
            tracing::debug!(target: "racefree", function = self.cache.name, "failed; handing the error to the waiters");
            self.lead
                .complete(Landed::Error(SharedError::new(error.clone())));
            record(Served::Executed);
            return None;
        }
        self.abandon();
        None
    }

    fn serve_stale(self, value: V) -> V {
        tracing::debug!(target: "racefree", function = self.cache.name, "failed; serving the expired value (stale_on_error)");
        self.cache.counters.stale_served.fetch_add(1, Relaxed);
        self.lead.complete(Landed::Stale(value.clone()));
        record(Served::Stale);
        value
    }
}

impl<K, V, S> CacheRefresh<'_, K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
{
    /// Runs the recompute on this thread, then replaces the entry with its value, or keeps the
    /// old value if it failed (an `Err`/`None` outcome).
    pub fn run<R: Outcome<Value = V>>(mut self, body: impl FnOnce() -> R) {
        self.starting();
        let outcome = body();
        self.finish(outcome.cached_value());
    }

    /// [`run`](Self::run) for a future.
    pub async fn run_async<R: Outcome<Value = V>>(mut self, body: impl Future<Output = R>) {
        self.starting();
        let outcome = body.await;
        self.finish(outcome.cached_value());
    }

    // Counted when it runs: a refresh skipped (no thread, no runtime) ran nothing.
    fn starting(&self) {
        self.cache.counters.executions.fetch_add(1, Relaxed);
        self.cache.counters.refreshes.fetch_add(1, Relaxed);
        self.cache.meter.executed();
        tracing::debug!(target: "racefree", function = self.cache.name, "refresh-ahead: recomputing in the background");
    }

    fn finish(&mut self, value: Option<&V>) {
        let Some(lead) = self.lead.take() else { return };
        match value {
            Some(value)
                if self
                    .cache
                    .replace_if_current(lead.key(), self.insert, value) =>
            {
                lead.complete(Landed::Value(value.clone()));
            }
            Some(_) => {
                // Invalidated (or replaced) while it ran: its value may predate that. Waiters
                // compute again.
                tracing::debug!(target: "racefree", function = self.cache.name, "refresh-ahead: entry invalidated meanwhile; value dropped");
            }
            None => {
                self.cache.counters.refresh_failures.fetch_add(1, Relaxed);
                tracing::debug!(target: "racefree", function = self.cache.name, "refresh-ahead failed; keeping the current value");
                self.cache.end_refresh(lead.key(), self.insert);
            }
        }
    }
}

impl<K, V, S> CacheRefresh<'static, K, V, S>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
{
    /// Runs the recompute on a new thread (named `racefree-refresh`). If no thread can be
    /// started, the refresh is skipped.
    pub fn spawn<R: Outcome<Value = V>>(self, body: impl FnOnce() -> R + Send + 'static) {
        let name = self.cache.name;
        // On failure the closure, and with it the refresh, is dropped: skipped.
        let spawned = std::thread::Builder::new()
            .name("racefree-refresh".to_owned())
            .spawn(move || self.run(body));
        if let Err(error) = spawned {
            tracing::warn!(target: "racefree", function = name, %error, "refresh-ahead: no thread for the refresh; skipped");
        }
    }

    /// Runs the recompute as a task of the caller's Tokio runtime (`tokio::spawn`). Outside a
    /// Tokio runtime (another executor, `futures::executor::block_on`) nothing can run it in
    /// the background: the refresh is skipped and the entry is recomputed when its TTL ends, as
    /// without `refresh`.
    pub fn spawn_async<R, F>(self, body: F)
    where
        R: Outcome<Value = V> + Send + 'static,
        F: Future<Output = R> + Send + 'static,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.run_async(body));
            }
            Err(_) => {
                tracing::debug!(target: "racefree", function = self.cache.name, "refresh-ahead: not inside a Tokio runtime; skipped");
            }
        }
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Clone> Drop for CacheRefresh<'_, K, V, S> {
    fn drop(&mut self) {
        // Dropped without running (or unwinding out of the body): the entry may refresh again;
        // dropping the lead wakes any waiter to compute.
        if let Some(lead) = self.lead.take() {
            self.cache.end_refresh(lead.key(), self.insert);
        }
    }
}

// `now` is a coarse reading; `clock::is_past` confirms with the precise clock near the deadline.
#[inline]
fn is_expired(stamp: u64, now: u64) -> bool {
    is_expired_by(stamp, 0, now)
}

// Past the deadline by more than `extra` nanoseconds.
#[inline]
fn is_expired_by(stamp: u64, extra: u64, now: u64) -> bool {
    let deadline = stamp & DEADLINE;
    deadline != 0 && clock::is_past(deadline.saturating_add(extra), now)
}

// Below this many entries the cache leaves growing to papaya (its small outgrown tables go
// with the first flush).
const SMALLEST_GROWN: usize = 3 << 10;

// Checks that flush after a growth: enough that the writer that finished the copy is likely
// among them (each flush is a process-wide barrier, a few per growth cost nothing).
fn flushes_per_growth() -> usize {
    static FLUSHES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FLUSHES.get_or_init(|| {
        2 * std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get)
    })
}

// The table papaya's `reserve` grows to for `len` entries (`papaya::raw::probe::entries_for`:
// at most 3/4 full).
fn table_for(len: usize) -> usize {
    (len.saturating_mul(8) / 6).next_power_of_two()
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<K, V, S> fmt::Debug for Cache<K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish()
    }
}
