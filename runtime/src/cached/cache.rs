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
//!   with loads only. A `DashMap` read instead takes its shard's reader lock: a locked
//!   read-modify-write on a word every core's hits share, which is why its hits did not get
//!   faster with a second core.
//! - **The TTL check** loads the entry's stamp and reads the clock; it writes only to remove an
//!   entry it found expired.
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
//! copies), while `papaya`'s guard costs a plain store and its `insert`/`remove_if`/`retain`
//! are the operations this cache already used. A quieter machine may reverse this. What it costs:
//! each entry is its own heap allocation behind a pointer (one more dependent load per hit, and
//! more memory per entry than an inline table), and writes are slower: a replaced or removed
//! entry is retired through the epoch collector, which now and then issues a process-wide
//! barrier. The single flight and the eviction ring keep their locks (writes dominate there).
//!
//! Why not moka: its `get` records every access in a buffer for its admission policy and costs
//! several times a plain map read; `#[cached]` hits must cost about what a hand-written map
//! would. The capacity policy is CLOCK (second chance): inserts append to a FIFO ring, eviction
//! skips and clears entries that were hit since their last pass (a hit racing the hand may be
//! evicted anyway: CLOCK is an approximation). `benches/cached.rs` and `benches/scaling.rs`
//! show the numbers.

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use super::stats::{CacheStats, Counters};
use crate::sync::blocking::Owner;
use crate::sync::clock;
use crate::sync::single_flight::{Join, Lead, SingleFlight};
pub use crate::sync::RandomState;

const VISITED: u64 = 1 << 63;
const DEADLINE: u64 = !VISITED;

/// How a cache is bounded. `const` so that generated code can build it in a `static`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long an entry lives after it is inserted.
    pub ttl: Option<Duration>,
    /// The most entries the cache keeps.
    pub capacity: Option<usize>,
}

impl CacheConfig {
    /// Unbounded, no expiry.
    pub const fn new() -> Self {
        CacheConfig {
            ttl: None,
            capacity: None,
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
}

struct Slot<V> {
    value: V,
    // Bit 63: hit since the CLOCK hand last passed. Bits 0..63: deadline on `clock::now_nanos`,
    // 0 for none.
    stamp: AtomicU64,
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
    flights: SingleFlight<K, V, S>,
    config: CacheConfig,
    // The CLOCK ring; present only with a capacity.
    ring: Option<Mutex<VecDeque<K>>>,
    inserts_since_sweep: AtomicUsize,
    left_by_last_sweep: AtomicUsize,
    counters: Counters,
    name: &'static str,
}

/// What [`Cache::lookup_or_lead`] found.
pub enum Lookup<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    /// The value, from the cache or from the lead this caller waited for.
    Hit(V),
    /// Nobody has the value: this caller computes it and must finish the [`CacheLead`].
    Lead(CacheLead<'a, K, V, S>),
}

/// The duty to compute one key of a [`Cache`]. [`complete`](CacheLead::complete) stores the
/// value and hands it to the waiters; dropping the lead (error, panic, cancellation) lets one
/// waiter take over.
pub struct CacheLead<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    cache: &'a Cache<K, V, S>,
    lead: Lead<'a, K, V, S>,
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
    pub fn with_config_and_hasher(config: CacheConfig, name: &'static str, hasher: S) -> Self {
        Cache {
            entries: papaya::HashMap::with_hasher(hasher.clone()),
            flights: SingleFlight::with_hasher(hasher),
            config,
            ring: config
                .capacity
                .map(|c| Mutex::new(VecDeque::with_capacity(c.min(1 << 16)))),
            inserts_since_sweep: AtomicUsize::new(0),
            left_by_last_sweep: AtomicUsize::new(0),
            counters: Counters::default(),
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
        Some(value)
    }

    #[inline]
    fn peek<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Pinning announces this thread in its own reservation slot; the probe only loads.
        let entries = self.entries.pin();
        let slot = entries.get(key)?;
        let stamp = slot.stamp.load(Relaxed);
        if self.config.ttl.is_some() {
            let now = self.now();
            if is_expired(stamp, now) {
                // `Err` means it was replaced by a live entry meanwhile: nothing to remove.
                let _ = entries.remove_if(key, |_, slot| is_expired(slot.stamp.load(Relaxed), now));
                return None;
            }
        }
        // Only write the shared line when the bit is not set yet: hot keys stay read-only.
        if self.ring.is_some() && stamp & VISITED == 0 {
            slot.stamp.fetch_or(VISITED, Relaxed);
        }
        Some(slot.value.clone())
    }

    /// The per-key double check: the cached value, or the value of the caller computing it
    /// right now (blocking this thread until it is done), or the duty to compute it.
    ///
    /// # Panics
    /// If the caller computing the key is an async task that only this thread can run (this
    /// thread's current-thread runtime): blocking would wait forever, so it panics saying so.
    /// Make the caller async, or call it from a multi-thread runtime.
    pub fn lookup_or_lead(&self, key: K) -> Lookup<'_, K, V, S> {
        if let Some(value) = self.get(&key) {
            return Lookup::Hit(value);
        }
        let mut waited = false;
        loop {
            match self.join(&key, false) {
                Step::Done(lookup) => return lookup,
                Step::Wait(flight) => {
                    self.note_wait(&mut waited);
                    let landing = flight.wait_checked().unwrap_or_else(|error| {
                        panic!("#[cached] {}: {error}", self.name);
                    });
                    if let Some(value) = landing {
                        return Lookup::Hit(value.clone());
                    }
                }
            }
        }
    }

    /// [`lookup_or_lead`](Self::lookup_or_lead) for async callers: waiting awaits instead of
    /// blocking, and dropping the future while it waits leaves no trace.
    pub async fn lookup_or_lead_async(&self, key: K) -> Lookup<'_, K, V, S> {
        if let Some(value) = self.get(&key) {
            return Lookup::Hit(value);
        }
        let mut waited = false;
        loop {
            match self.join(&key, true) {
                Step::Done(lookup) => return lookup,
                Step::Wait(flight) => {
                    self.note_wait(&mut waited);
                    if let Some(value) = flight.wait_async().await {
                        return Lookup::Hit(value.clone());
                    }
                }
            }
        }
    }

    /// [`lookup_or_lead`](Self::lookup_or_lead) given the key in borrowed form (`&str` for a
    /// `String` key): a hit allocates nothing; only a miss builds the owned key.
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
            Some(value) => Lookup::Hit(value),
            None => self.lookup_or_lead(to_owned(key)),
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
            Some(value) => Lookup::Hit(value),
            None => self.lookup_or_lead_async(to_owned(key)).await,
        }
    }

    fn join(&self, key: &K, asynchronous: bool) -> Step<'_, K, V, S> {
        match self.flights.join_as(key.clone(), Owner::here(asynchronous)) {
            Join::Follow(flight) => Step::Wait(flight),
            Join::Lead(lead) => {
                // Second check, now that we own the key: a lead that finished between our
                // first look and our join has already filled it.
                if let Some(value) = self.get(key) {
                    lead.complete(value.clone());
                    return Step::Done(Lookup::Hit(value));
                }
                self.counters.executions.fetch_add(1, Relaxed);
                tracing::debug!(target: "racefree", cache = self.name, "cache miss: executing");
                Step::Done(Lookup::Lead(CacheLead { cache: self, lead }))
            }
        }
    }

    fn note_wait(&self, waited: &mut bool) {
        if !*waited {
            *waited = true;
            self.counters.coalesced.fetch_add(1, Relaxed);
            tracing::debug!(target: "racefree", cache = self.name, "cache miss: waiting for the caller computing it");
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
        let stamp = match self.config.ttl {
            // From the precise clock; never 0, which would mean "no deadline".
            Some(ttl) => clock::deadline_after(saturating_nanos(ttl)).clamp(1, DEADLINE),
            None => 0,
        };
        let slot = Slot {
            value,
            stamp: AtomicU64::new(stamp),
        };
        match &self.ring {
            None => {
                self.entries.pin().insert(key, slot);
            }
            Some(ring) => {
                let ring_key = key.clone();
                // The map and the ring change together under the ring's lock, as in `clear`.
                let mut ring = ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let entries = self.entries.pin();
                if !entries.contains_key(&key) {
                    self.make_room(&mut ring);
                    ring.push_back(ring_key);
                }
                entries.insert(key, slot);
            }
        }
        if self.config.ttl.is_some() {
            self.sweep_now_and_then();
        }
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
            let _ = entries.remove_if(&key, |_, slot| {
                let stamp = slot.stamp.load(Relaxed);
                if now.is_some_and(|now| is_expired(stamp, now)) || stamp & VISITED == 0 {
                    return true;
                }
                slot.stamp.fetch_and(!VISITED, Relaxed);
                second_chance = true;
                false
            });
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
            .retain(|_, slot| !is_expired(slot.stamp.load(Relaxed), now));
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

enum Step<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone> {
    Done(Lookup<'a, K, V, S>),
    Wait(std::sync::Arc<crate::sync::flight::Flight<V>>),
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
        self.lead.complete(value);
    }

    /// Gives up without a value: one waiter becomes the next lead. (Dropping does the same.)
    pub fn abandon(self) {
        tracing::debug!(target: "racefree", cache = self.cache.name, "no value to cache; releasing the key");
    }
}

// `now` is a coarse reading; `clock::is_past` confirms with the precise clock near the deadline.
#[inline]
fn is_expired(stamp: u64, now: u64) -> bool {
    let deadline = stamp & DEADLINE;
    deadline != 0 && clock::is_past(deadline, now)
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
