//! The in-process idempotency store, [`IdempotencyStore`], and its bounds and stats.
//!
//! One record per (function, scope, key), in one of two states:
//! - **in flight**: a caller claimed the key with a request fingerprint and is running the body;
//! - **done**: the body's outcome, kept until its deadline (`ttl`) passes.
//!
//! [`IdempotencyStore::claim_now`] is the per-key check: one atomic entry operation decides
//! between running the body (no live record), replaying (done, same fingerprint), waiting or
//! rejecting (in flight, same fingerprint) and a conflict (either state, other fingerprint).
//! Answers that change nothing (a replay, a conflict, a duplicate in flight) come from a read of
//! the record under a shared lock, without an owned key; only taking a key over writes.
//!
//! A first execution pays for what it needs and no more: the store hashes the key once and
//! copies it once, into its record; the cell its waiters wait on is made only once a duplicate
//! waits, and the outcome is cloned for waiters only if there are any.
//!
//! Under a stream of unique keys a first execution's cost is memory, not instructions: the
//! store holds one `ttl` of records, far more than the caches, and each one it stores it also
//! removes one that expired, which is cold. So each shard keeps its records in a slab and finds
//! them through an index of 8-byte entries (the cell, and half the key's hash): the index stays
//! in cache, a lease and the list of stored outcomes know their record's cell (completing,
//! releasing and purging go straight to it, and resizing the index reads no record), and a new
//! record takes the cell an expired one just left, memory its removal brought into the cache.
//! The one cold access left per first execution is reading the expired record to remove it.
//!
//! # What the in-process store promises
//! - **At most one execution per live key.** A claim decides and takes a key in one entry
//!   operation under its shard's write lock, never get-then-insert.
//! - **Conflicts change nothing.** A different fingerprint under a used key is refused without
//!   touching the record.
//! - **Failures release.** Releasing (an `Err` not stored, a panic, a dropped future) removes
//!   the in-flight record and wakes its waiters with nothing; each waiter claims again and
//!   exactly one of them runs next.
//! - **Bounded by default.** At most [`DEFAULT_CAPACITY`] (100 000) outcomes per store unless
//!   told otherwise (`#[idempotent(capacity = N)]`, [`IdempotencyStoreBuilder::capacity`], or
//!   [`IdempotencyStoreBuilder::unbounded`] to opt out). Past the bound the **oldest completed**
//!   outcome is evicted; an in-flight record never is (in-flight records are bounded by the
//!   calls running). Evictions are counted ([`IdempotencyStats::evictions`]) and reported
//!   through `tracing` (a `warn` at most once a minute), because an evicted key executes
//!   again on its next call: size the capacity above the unique keys one `ttl` sees.
//! - **Expired records go without a scan.** Outcomes are listed in the order they were stored;
//!   each store removes the expired ones at the front of that list (a few per call), so a
//!   stream of unique keys keeps the record count near what one `ttl` holds and no call walks
//!   the map. With one `ttl` per store (a function's own store) the list is in deadline order;
//!   a store shared by functions with different `ttl`s may keep an expired record behind a
//!   longer-lived one until the capacity, a claim of its key or [`purge_expired`] removes it.
//!   Expired records are never replayed either way.
//!
//! [`purge_expired`]: IdempotencyStore::purge_expired
//!
//! It does not survive the process: for retries across instances use a shared store (a
//! Redis implementation of [`IdempotencyBackend`]).

use std::collections::VecDeque;
use std::fmt;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use hashbrown::hash_table::{Entry, HashTable};

use super::backend::{BlockingIdempotencyBackend, Claim, IdempotencyBackend};
use super::error::IdempotencyError;
use super::fingerprint::Fingerprint;
use super::key::RecordKey;
use crate::sync::blocking::Owner;
use crate::sync::flight::Flight;
use crate::sync::striped::StripedCounter;
use crate::sync::RandomState;
use crate::telemetry::Meter;

/// The most outcomes an in-process store keeps unless told otherwise: 100 000, a few tens of
/// megabytes for typical outcomes (the schedule API example's records take about 800 bytes
/// each). Change it with `#[idempotent(capacity = N)]` or [`IdempotencyStoreBuilder::capacity`].
pub const DEFAULT_CAPACITY: usize = 100_000;

/// How often at most an evicting store warns through `tracing`.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How many expired outcomes one store removes at most: enough to keep up with any stream of
/// stores (each adds one), few enough that no call pays for a burst of expiries.
const PURGE_PER_STORE: usize = 16;

/// How the in-process store is bounded. `const` so generated code can build it in a `static`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// The most outcomes kept, the oldest evicted first; `None`: no bound besides expiry.
    pub capacity: Option<usize>,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl IdempotencyConfig {
    /// At most [`DEFAULT_CAPACITY`] outcomes.
    ///
    /// ```
    /// use racefree_runtime::idempotent::{IdempotencyConfig, DEFAULT_CAPACITY};
    ///
    /// assert_eq!(IdempotencyConfig::new().capacity, Some(DEFAULT_CAPACITY));
    /// assert_eq!(IdempotencyConfig::new().capacity(10).capacity, Some(10));
    /// assert_eq!(IdempotencyConfig::new().unbounded().capacity, None);
    /// ```
    pub const fn new() -> Self {
        IdempotencyConfig {
            capacity: Some(DEFAULT_CAPACITY),
        }
    }

    /// At most `capacity` outcomes are kept.
    pub const fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// No bound besides expiry: a stream of unique keys grows the store for as long as one
    /// `ttl` (and so, with a client choosing the keys, without bound).
    pub const fn unbounded(mut self) -> Self {
        self.capacity = None;
        self
    }
}

/// What an idempotency store has done since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// Claims that ran the body.
    pub executions: u64,
    /// Calls answered with a stored outcome (directly or after waiting).
    pub replays: u64,
    /// Calls that found their key in flight (each counted once, however often it waited).
    pub waits: u64,
    /// Calls refused because the key was used with another fingerprint.
    pub conflicts: u64,
    /// Completed outcomes dropped, oldest first, to stay within the capacity (not counting
    /// expired ones): each such key executes again on its next call.
    pub evictions: u64,
}

#[derive(Default)]
struct Counters {
    // Bumped by every replay, on every thread: striped, so that a replay makes no locked
    // read-modify-write and its threads share no line.
    replays: StripedCounter,
    waits: AtomicU64,
    conflicts: AtomicU64,
    evictions: AtomicU64,
    // When the last eviction warning went out, on the store's clock (0: never).
    warned_at: AtomicU64,
}

enum Record<T> {
    InFlight {
        fingerprint: Stamp,
        // Which claim this is (its shard's claim count when it was made), so that a lease
        // only ever ends its own record.
        claim: u64,
        // Who runs the body, for waiters that block.
        owner: Owner,
        // What duplicates wait on: made by the first of them (under the shared lock, hence the
        // `OnceLock`), so that an execution nobody waits for allocates none.
        waiters: OnceLock<Arc<Flight<T>>>,
    },
    // `expires`: on the store's clock, in nanoseconds. `claim`: the one that stored it, which
    // tells this outcome from a later one of the same key.
    Done {
        fingerprint: Stamp,
        outcome: T,
        expires: u64,
        claim: u64,
    },
}

/// A fingerprint as a record keeps it: a `u128` is 16-byte aligned, which made a slot 144
/// bytes (three cache lines) where 128 are used.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp([u64; 2]);

impl From<Fingerprint> for Stamp {
    #[inline(always)]
    fn from(fingerprint: Fingerprint) -> Stamp {
        let bits = fingerprint.0;
        Stamp([bits as u64, (bits >> 64) as u64])
    }
}

/// One record in its shard's slab.
struct Slot<T> {
    key: StoredKey,
    record: Record<T>,
}

/// A shard's records: a slab of slots, found through an index of small entries (see the
/// module doc).
struct Records<T> {
    index: HashTable<Locator>,
    slab: Vec<Option<Slot<T>>>,
    // Free cells of `slab`, the one freed last at the end: a new record takes the cell an
    // expired one just left, memory that its removal brought into the cache.
    free: Vec<u32>,
}

/// Where a key's record is: its cell in the slab, and the low half of the key's hash (which
/// spares reading the slot of another key whose index entry shares the tag).
#[derive(Clone, Copy)]
struct Locator {
    cell: u32,
    hash: u32,
}

/// The hash the index places a locator by: all of it from the 32 bits the locator keeps, so
/// that a resize rehashes the index without reading a slot (multiplying by an odd constant
/// spreads them over the 64 bits hashbrown reads, the top ones for its tags).
#[inline(always)]
fn index_hash(low: u32) -> u64 {
    u64::from(low).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<T> Records<T> {
    fn new() -> Records<T> {
        Records {
            index: HashTable::new(),
            slab: Vec::new(),
            free: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn slots(&self) -> impl Iterator<Item = &Slot<T>> {
        self.slab.iter().flatten()
    }

    // The slot of an index entry: always there.
    #[inline(always)]
    fn at(slab: &[Option<Slot<T>>], cell: u32) -> &Slot<T> {
        match &slab[cell as usize] {
            Some(slot) => slot,
            None => unreachable!("an index entry points at a record"),
        }
    }

    #[inline(always)]
    fn find(&self, hash: u64, key: &str) -> Option<&Slot<T>> {
        let low = hash as u32;
        let slab = &self.slab;
        let found = self.index.find(index_hash(low), |locator| {
            locator.hash == low && Self::at(slab, locator.cell).key.is(key)
        })?;
        Some(Self::at(slab, found.cell))
    }

    /// The record in `cell`, if it is there and `is` says it is the one.
    fn get_mut(&mut self, cell: u32, is: impl FnOnce(&Record<T>) -> bool) -> Option<&mut Slot<T>> {
        let slot = self.slab.get_mut(cell as usize)?.as_mut()?;
        is(&slot.record).then_some(slot)
    }

    /// Removes the record in `cell` (of a key hashed `hash`) if `is` says it is the one: its
    /// index entry goes, its cell is freed.
    fn remove(
        &mut self,
        hash: u64,
        cell: u32,
        is: impl FnOnce(&Record<T>) -> bool,
    ) -> Option<Record<T>> {
        self.get_mut(cell, is)?;
        let low = hash as u32;
        if let Ok(entry) = self
            .index
            .find_entry(index_hash(low), |locator| locator.cell == cell)
        {
            entry.remove();
        }
        let slot = self.slab[cell as usize].take()?;
        self.free.push(cell);
        Some(slot.record)
    }

    /// Keeps the records `keep` says to keep; the others are dropped here.
    fn retain(&mut self, mut keep: impl FnMut(&Record<T>) -> bool) {
        let Records { index, slab, free } = self;
        index.retain(|locator| {
            let cell = locator.cell as usize;
            let kept = slab[cell].as_ref().is_some_and(|slot| keep(&slot.record));
            if !kept {
                slab[cell] = None;
                free.push(locator.cell);
            }
            kept
        });
    }

    /// A cell for a new record: the last one freed, or a new one.
    fn vacant_cell(slab: &mut Vec<Option<Slot<T>>>, free: &mut Vec<u32>) -> u32 {
        if let Some(cell) = free.pop() {
            return cell;
        }
        let cell = u32::try_from(slab.len()).expect("fewer than 2^32 records per shard");
        slab.push(None);
        cell
    }
}

/// A record's key, only ever compared: short keys live in the slot itself, so that storing a
/// record allocates nothing and dropping one frees nothing (an old record is cold memory).
enum StoredKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Boxed(Box<[u8]>),
}

/// The longest key kept in its slot (`StoredKey` then takes 64 bytes).
const INLINE_KEY: usize = 62;

impl StoredKey {
    fn new(key: &str) -> StoredKey {
        let key = key.as_bytes();
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key);
                StoredKey::Inline { len, bytes }
            }
            _ => StoredKey::Boxed(key.into()),
        }
    }

    fn is(&self, key: &str) -> bool {
        let stored = match self {
            StoredKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            StoredKey::Boxed(bytes) => bytes,
        };
        stored == key.as_bytes()
    }
}

// Aligned so that two shards' locks never share a cache line.
#[repr(align(128))]
struct Shard<T> {
    table: RwLock<Records<T>>,
    // Claims made in this shard: the next claim's number, and its share of
    // `IdempotencyStats::executions`. Only ever written under the write lock, so it needs no
    // atomic read-modify-write (a claim number only tells records of one shard apart).
    claims: AtomicU64,
}

impl<T> Shard<T> {
    fn new() -> Shard<T> {
        Shard {
            table: RwLock::new(Records::new()),
            claims: AtomicU64::new(0),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Records<T>> {
        self.table
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // A panic under the write lock (an outcome's `Drop`) leaves the table consistent.
    fn write(&self) -> RwLockWriteGuard<'_, Records<T>> {
        self.table
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A stored outcome in the order they were stored: where its record is, and which it is.
#[derive(Debug, Clone, Copy)]
struct Listed {
    hash: u64,
    cell: u32,
    claim: u64,
    expires: u64,
}

/// The in-process idempotency store: the default of `#[idempotent]`, or shared between
/// functions with `store = <expr>`.
///
/// ```
/// use racefree_runtime::IdempotencyStore;
///
/// static PAYMENTS: std::sync::LazyLock<IdempotencyStore<u64>> =
///     std::sync::LazyLock::new(|| IdempotencyStore::builder().capacity(500_000).build());
/// assert!(PAYMENTS.is_empty());
/// assert_eq!(PAYMENTS.config().capacity, Some(500_000));
/// ```
pub struct IdempotencyStore<T> {
    // Records sharded by their key's hash (as `DashMap` does, but keeping each hash).
    shards: Box<[Shard<T>]>,
    // foldhash, seeded per process: SipHash would cost more than the rest of a replay.
    hasher: RandomState,
    config: IdempotencyConfig,
    clock: Clock,
    // Stored outcomes, oldest first.
    stored: Mutex<Outcomes>,
    counters: Counters,
    // Its evictions, for `metrics` (feature `metrics`; nothing otherwise).
    meter: Meter,
    name: &'static str,
}

/// Builds an [`IdempotencyStore`].
#[derive(Debug, Default, Clone)]
pub struct IdempotencyStoreBuilder {
    config: IdempotencyConfig,
    clock: Clock,
    name: &'static str,
}

impl IdempotencyStoreBuilder {
    /// At most `capacity` outcomes are kept (default [`DEFAULT_CAPACITY`]). Panics if
    /// `capacity` is 0.
    pub fn capacity(mut self, capacity: usize) -> Self {
        assert!(
            capacity > 0,
            "an idempotency store capacity must be at least 1"
        );
        self.config.capacity = Some(capacity);
        self
    }

    /// No bound besides expiry (see [`IdempotencyConfig::unbounded`]).
    pub fn unbounded(mut self) -> Self {
        self.config.capacity = None;
        self
    }

    /// A name for `tracing` events.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// A clock that only moves when told to, for tests of expiry: the store reads time from it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use racefree_runtime::IdempotencyStore;
    ///
    /// let (builder, clock) = IdempotencyStore::builder().manual_clock();
    /// let store: IdempotencyStore<u8> = builder.build();
    /// clock.advance(Duration::from_secs(60));
    /// # drop(store);
    /// ```
    pub fn manual_clock(mut self) -> (Self, ManualClock) {
        let hand = Arc::new(AtomicU64::new(0));
        self.clock = Clock::Manual(Arc::clone(&hand));
        (self, ManualClock(hand))
    }

    /// The store.
    pub fn build<T>(self) -> IdempotencyStore<T> {
        // As many shards as `DashMap` would have: four per core.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (0..(cores * 4).next_power_of_two())
            .map(|_| Shard::new())
            .collect();
        IdempotencyStore {
            shards,
            hasher: RandomState::default(),
            config: self.config,
            clock: self.clock,
            stored: Mutex::new(VecDeque::new()),
            counters: Counters::default(),
            meter: Meter::new(self.name, "memory"),
            name: self.name,
        }
    }
}

/// The hand of a clock made by [`IdempotencyStoreBuilder::manual_clock`].
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the store's time forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(saturating_nanos(by), Relaxed);
    }
}

/// Where a store reads the time: the runtime's clock (a coarse read, confirmed precisely in the
/// last ticks before a deadline: a `ttl` is exact, see `sync::clock`), or a [`ManualClock`].
#[derive(Debug, Clone, Default)]
enum Clock {
    #[default]
    System,
    Manual(Arc<AtomicU64>),
}

impl<T> Default for IdempotencyStore<T> {
    fn default() -> Self {
        IdempotencyStoreBuilder::default().build()
    }
}

/// What [`IdempotencyStore::claim_now`] found.
pub type StoreClaim<T> = Claim<T, StoreLease<T>, Arc<Flight<T>>>;

// Stored outcomes, oldest first.
type Outcomes = VecDeque<Listed>;

/// The claim of one key in an [`IdempotencyStore`].
#[derive(Debug)]
pub struct StoreLease<T> {
    // Where the record is (its key's hash: the shard; its cell) and which claim it is.
    hash: u64,
    cell: u32,
    fingerprint: Fingerprint,
    claim: u64,
    _outcome: PhantomData<fn() -> T>,
}

impl IdempotencyStore<()> {
    /// A builder for capacity, name and clock; [`build`](IdempotencyStoreBuilder::build) picks
    /// the outcome type. (Defined on `IdempotencyStore<()>` only so that
    /// `IdempotencyStore::builder()` needs no type annotation.)
    pub fn builder() -> IdempotencyStoreBuilder {
        IdempotencyStoreBuilder::default()
    }
}

impl<T> IdempotencyStore<T> {
    /// A store bounded by [`DEFAULT_CAPACITY`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A store bounded by `config`, named `name` in `tracing` events.
    pub fn with_config(config: IdempotencyConfig, name: &'static str) -> Self {
        IdempotencyStoreBuilder {
            config,
            clock: Clock::System,
            name,
        }
        .build()
    }

    /// Records stored, in flight and done (expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }

    /// `true` when there is no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys being executed right now.
    pub fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let records = shard.read();
                let in_flight = |slot: &&Slot<T>| matches!(slot.record, Record::InFlight { .. });
                records.slots().filter(in_flight).count()
            })
            .sum()
    }

    /// Removes every expired outcome now; in-flight records and live outcomes stay. (Expired
    /// outcomes are also purged as new ones are stored.)
    ///
    /// This walks every record; stores never need it to stay bounded.
    pub fn purge_expired(&self) {
        let now = self.now();
        let mut stored = self.outcomes();
        for shard in &self.shards {
            shard.write().retain(|record| !self.is_expired(record, now));
        }
        stored.retain(|listed| !self.is_past(listed.expires, now));
    }

    /// Forgets every outcome. Calls in flight finish and store theirs.
    pub fn clear(&self) {
        let mut stored = self.outcomes();
        for shard in &self.shards {
            shard
                .write()
                .retain(|record| matches!(record, Record::InFlight { .. }));
        }
        stored.clear();
    }

    fn shard(&self, hash: u64) -> &Shard<T> {
        // Bits that neither a table's bucket index (the low ones) nor its tag (the top 7) uses.
        &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)]
    }

    // Removes the record in `cell` if it is the in-flight (`Record::InFlight`) or stored
    // (`Record::Done`) record of a claim, whichever `is` asks for; the record is dropped by
    // the caller, outside the lock.
    fn remove(
        &self,
        hash: u64,
        cell: u32,
        is: impl FnOnce(&Record<T>) -> bool,
    ) -> Option<Record<T>> {
        self.shard(hash).write().remove(hash, cell, is)
    }

    fn outcomes(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        self.stored
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Executions, replays, waits and conflicts so far.
    pub fn stats(&self) -> IdempotencyStats {
        IdempotencyStats {
            executions: self
                .shards
                .iter()
                .map(|shard| shard.claims.load(Relaxed))
                .sum(),
            replays: self.counters.replays.get(),
            waits: self.counters.waits.load(Relaxed),
            conflicts: self.counters.conflicts.load(Relaxed),
            evictions: self.counters.evictions.load(Relaxed),
        }
    }

    /// How this store is bounded.
    pub fn config(&self) -> IdempotencyConfig {
        self.config
    }

    /// A name for `tracing` events (the function's path for a function's own store).
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn now(&self) -> u64 {
        match &self.clock {
            Clock::System => crate::sync::clock::now_nanos(),
            Clock::Manual(hand) => hand.load(Relaxed),
        }
    }

    // `now` from `self.now()`: on the system clock a coarse reading, confirmed with the precise
    // clock near the deadline (see `sync::clock`), so a `ttl` is exact.
    fn is_past(&self, deadline: u64, now: u64) -> bool {
        match &self.clock {
            Clock::System => crate::sync::clock::is_past(deadline, now),
            Clock::Manual(_) => now >= deadline,
        }
    }

    fn is_expired(&self, record: &Record<T>, now: u64) -> bool {
        matches!(record, Record::Done { expires, .. } if self.is_past(*expires, now))
    }

    /// Ends a claim without an outcome; see [`IdempotencyBackend::release`].
    pub fn release_lease(&self, lease: StoreLease<T>) {
        let StoreLease {
            hash, cell, claim, ..
        } = lease;
        // Leave the map first, then wake the waiters: each claims again and one executes.
        let mut waiters = None;
        crate::sync::cleanup(|| {
            let left = self.remove(hash, cell, |record| is_claim(record, claim));
            waiters = left.and_then(Record::into_waiters);
        });
        if let Some(waiters) = waiters {
            waiters.complete(None);
        }
    }
}

impl<T: Clone> IdempotencyStore<T> {
    /// The per-key check, in one atomic step: see [`IdempotencyBackend::claim`].
    pub fn claim_now(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<StoreClaim<T>, IdempotencyError> {
        self.claim_as(key, fingerprint, Owner::unknown)
    }

    // `owner`: who runs the body if this claim executes, for waiters that block (asked only
    // then: a replay need not know).
    #[inline]
    fn claim_as(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        owner: impl FnOnce() -> Owner,
    ) -> Result<StoreClaim<T>, IdempotencyError> {
        let hash = self.hasher.hash_one(key.as_str());
        let shard = self.shard(hash);
        // Replays, conflicts and duplicates in flight need neither an owned key nor a write lock.
        if let Some(slot) = shard.read().find(hash, key.as_str()) {
            if let Some(answer) = self.answer(&slot.record, key, fingerprint, self.now()) {
                return answer;
            }
        }
        let mut records = shard.write();
        let Records { index, slab, free } = &mut *records;
        let low = hash as u32;
        let is_key = |locator: &Locator| {
            locator.hash == low && Records::at(slab, locator.cell).key.is(key.as_str())
        };
        match index.entry(index_hash(low), is_key, |locator| index_hash(locator.hash)) {
            Entry::Occupied(entry) => {
                let cell = entry.get().cell;
                let Some(slot) = slab[cell as usize].as_mut() else {
                    unreachable!("an index entry points at a record")
                };
                // The clock is read only here: a fresh key needs no time.
                let now = self.now();
                if let Some(answer) = self.answer(&slot.record, key, fingerprint, now) {
                    return answer;
                }
                let (lease, record) = Self::execute(shard, hash, cell, fingerprint);
                // The expired outcome is dropped under the lock, as it would be if it were
                // removed first.
                slot.record = record(owner());
                Ok(lease)
            }
            Entry::Vacant(entry) => {
                let cell = Records::vacant_cell(slab, free);
                let (lease, record) = Self::execute(shard, hash, cell, fingerprint);
                slab[cell as usize] = Some(Slot {
                    key: StoredKey::new(key.as_str()),
                    record: record(owner()),
                });
                entry.insert(Locator { cell, hash: low });
                Ok(lease)
            }
        }
    }

    /// What a live record answers a claim with `fingerprint`: replay, conflict, or wait;
    /// `None` if the key may be taken over (the record expired).
    #[inline(always)]
    fn answer(
        &self,
        record: &Record<T>,
        key: &RecordKey,
        fingerprint: Fingerprint,
        now: u64,
    ) -> Option<Result<StoreClaim<T>, IdempotencyError>> {
        match record {
            Record::Done { expires, .. } if self.is_past(*expires, now) => None,
            Record::Done {
                fingerprint: stored,
                outcome,
                ..
            } => Some(self.replay_or_conflict(key, *stored, fingerprint.into(), outcome)),
            Record::InFlight {
                fingerprint: claimed,
                ..
            } if *claimed != fingerprint.into() => Some(Err(self.conflict(key))),
            Record::InFlight { owner, waiters, .. } => {
                self.counters.waits.fetch_add(1, Relaxed);
                let flight = waiters.get_or_init(|| Arc::new(Flight::owned_by(*owner)));
                Some(Ok(Claim::InFlight(Arc::clone(flight))))
            }
        }
    }

    // The lease of a new claim, and the in-flight record for it (given its owner). Called
    // under the write lock of `shard`, whose claim count it takes the number from.
    fn execute(
        shard: &Shard<T>,
        hash: u64,
        cell: u32,
        fingerprint: Fingerprint,
    ) -> (StoreClaim<T>, impl FnOnce(Owner) -> Record<T>) {
        let claim = shard.claims.load(Relaxed);
        shard.claims.store(claim + 1, Relaxed);
        let lease = Claim::Execute(StoreLease {
            hash,
            cell,
            fingerprint,
            claim,
            _outcome: PhantomData,
        });
        let record = move |owner| Record::InFlight {
            fingerprint: fingerprint.into(),
            claim,
            owner,
            waiters: OnceLock::new(),
        };
        (lease, record)
    }

    // Inlined into the claim: out of line, its result (a `Result` of a `Claim`) went through
    // memory, which cost a replay more than the counter saved.
    #[inline(always)]
    fn replay_or_conflict(
        &self,
        key: &RecordKey,
        stored: Stamp,
        fingerprint: Stamp,
        outcome: &T,
    ) -> Result<StoreClaim<T>, IdempotencyError> {
        if stored != fingerprint {
            return Err(self.conflict(key));
        }
        self.counters.replays.bump();
        Ok(Claim::Replay(outcome.clone()))
    }

    /// What a waiter's flight landed with: the owner's outcome (a replay, counted), or nothing
    /// (the owner failed or went away: the waiter claims again).
    fn landed(&self, landing: &Option<T>) -> Option<T> {
        if landing.is_some() {
            self.counters.replays.bump();
        }
        landing.clone()
    }

    fn conflict(&self, key: &RecordKey) -> IdempotencyError {
        self.counters.conflicts.fetch_add(1, Relaxed);
        IdempotencyError::Conflict {
            key: key.client_key().to_owned(),
        }
    }

    /// Stores the outcome, then wakes the waiters; see [`IdempotencyBackend::complete`].
    pub fn complete_lease(&self, lease: StoreLease<T>, outcome: &T, ttl: Duration) {
        // A panicking `Clone` must not leave the key in flight (and its waiters waiting)
        // forever: until the record holds its copy, unwinding releases the lease.
        struct ReleaseOnUnwind<'a, T: Clone>(&'a IdempotencyStore<T>, Option<StoreLease<T>>);
        impl<T: Clone> Drop for ReleaseOnUnwind<'_, T> {
            fn drop(&mut self) {
                if let Some(lease) = self.1.take() {
                    self.0.release_lease(lease);
                }
            }
        }
        let mut guard = ReleaseOnUnwind(self, Some(lease));
        let for_record = outcome.clone();
        let Some(StoreLease {
            hash,
            cell,
            fingerprint,
            claim,
            ..
        }) = guard.1.take()
        else {
            unreachable!("the guard holds the lease until here")
        };
        // The deadline from the precise clock, so that the coarse reads of `is_past` keep `ttl`
        // exact; the same reading serves the purge below (a precise reading is as good as a
        // coarse one there).
        let now = match &self.clock {
            Clock::System => crate::sync::clock::precise_nanos(),
            Clock::Manual(hand) => hand.load(Relaxed),
        };
        let expires = now.saturating_add(saturating_nanos(ttl)).max(1);
        let done = Record::Done {
            fingerprint: fingerprint.into(),
            outcome: for_record,
            expires,
            claim,
        };
        // Only this lease ends its in-flight record, so it is there.
        let waiters = {
            let mut records = self.shard(hash).write();
            match records.get_mut(cell, |record| is_claim(record, claim)) {
                Some(slot) => std::mem::replace(&mut slot.record, done).into_waiters(),
                None => None,
            }
        };
        if let Some(waiters) = waiters {
            wake(&waiters, outcome);
        }
        let mut stored = self.outcomes();
        stored.push_back(Listed {
            hash,
            cell,
            claim,
            expires,
        });
        self.purge_front(&mut stored, now);
        self.evict_over_capacity(&mut stored, now);
    }

    // The expired outcomes at the front of the list, a few at a time: no scan of the map.
    // `now` is a precise reading (see `complete_lease`), so it is compared as it is: going
    // through `is_past` would read the precise clock again for the first outcome not yet
    // expired, which is within `margin` of `now` on every call under a stream of stores.
    fn purge_front(&self, stored: &mut Outcomes, now: u64) {
        for _ in 0..PURGE_PER_STORE {
            match stored.front() {
                Some(listed) if now >= listed.expires => {}
                _ => break,
            }
            let Some(listed) = stored.pop_front() else {
                break;
            };
            self.remove(listed.hash, listed.cell, |record| {
                is_outcome(record, listed.claim)
            });
        }
    }

    // FIFO: drop the oldest outcomes until at most `capacity` are listed. Every stored outcome
    // is listed, so the count of outcomes never exceeds the capacity; entries whose outcome
    // expired or was replaced are skipped when they come up. In-flight records are not listed,
    // so they are never evicted.
    fn evict_over_capacity(&self, stored: &mut Outcomes, now: u64) {
        let Some(capacity) = self.config.capacity else {
            return;
        };
        let mut evicted = 0;
        while stored.len() > capacity {
            let Some(listed) = stored.pop_front() else {
                break;
            };
            let removed = self
                .remove(listed.hash, listed.cell, |record| {
                    is_outcome(record, listed.claim)
                })
                .is_some();
            // `now` is precise (see `purge_front`).
            if removed && now < listed.expires {
                evicted += 1;
            }
        }
        if evicted > 0 {
            self.note_evictions(evicted, capacity, now);
        }
    }

    fn note_evictions(&self, evicted: u64, capacity: usize, now: u64) {
        let total = self.counters.evictions.fetch_add(evicted, Relaxed) + evicted;
        self.meter.evicted(evicted);
        let warned_at = self.counters.warned_at.load(Relaxed);
        let due = warned_at == 0 || now.saturating_sub(warned_at) >= saturating_nanos(WARN_EVERY);
        if due
            && self
                .counters
                .warned_at
                .compare_exchange(warned_at, now.max(1), Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                target: "racefree",
                store = self.name,
                capacity,
                evictions = total,
                "idempotency store full: evicting the oldest outcomes; a retry with an evicted key executes again (raise `capacity`, or use a shared store)"
            );
        }
    }
}

// The outcome stored by this claim (not a later one of the same key).
fn is_outcome<T>(record: &Record<T>, claim: u64) -> bool {
    matches!(record, Record::Done { claim: stored_by, .. } if *stored_by == claim)
}

fn is_claim<T>(record: &Record<T>, claim: u64) -> bool {
    matches!(record, Record::InFlight { claim: current, .. } if *current == claim)
}

impl<T> Record<T> {
    // What the duplicates of an in-flight record wait on, if any waits.
    fn into_waiters(self) -> Option<Arc<Flight<T>>> {
        match self {
            Record::InFlight { waiters, .. } => waiters.into_inner(),
            Record::Done { .. } => None,
        }
    }
}

// Hands the stored outcome to the waiters. Should its `Clone` panic, they are woken with
// nothing and claim again, which replays the outcome already stored.
fn wake<T: Clone>(waiters: &Flight<T>, outcome: &T) {
    struct WakeOnUnwind<'a, T>(&'a Flight<T>);
    impl<T> Drop for WakeOnUnwind<'_, T> {
        fn drop(&mut self) {
            self.0.complete(None);
        }
    }
    let unwinding = WakeOnUnwind(waiters);
    let landing = outcome.clone();
    std::mem::forget(unwinding);
    waiters.complete(Some(landing));
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<T> IdempotencyBackend<T> for IdempotencyStore<T>
where
    T: Clone + Send + Sync,
{
    type Lease = StoreLease<T>;
    type InFlight = Arc<Flight<T>>;
    const STORE: &'static str = "memory";

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, Self::Lease, Self::InFlight>, IdempotencyError> {
        self.claim_as(key, fingerprint, || Owner::here(true))
    }

    async fn wait(
        &self,
        key: &RecordKey,
        flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> Result<Option<T>, IdempotencyError> {
        let Some(deadline) = deadline else {
            return Ok(self.landed(flight.wait_async().await));
        };
        match tokio::time::timeout_at(deadline.into(), flight.wait_async()).await {
            Ok(landing) => Ok(self.landed(landing)),
            Err(_) => Err(IdempotencyError::InProgress {
                key: key.client_key().to_owned(),
            }),
        }
    }

    async fn complete(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        self.complete_lease(lease, outcome, ttl);
        Ok(())
    }

    fn release(&self, lease: Self::Lease) {
        self.release_lease(lease);
    }
}

impl<T> BlockingIdempotencyBackend<T> for IdempotencyStore<T>
where
    T: Clone + Send + Sync,
{
    fn claim_blocking(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<T, Self::Lease, Self::InFlight>, IdempotencyError> {
        self.claim_as(key, fingerprint, || Owner::here(false))
    }

    fn wait_blocking(
        &self,
        key: &RecordKey,
        flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> Result<Option<T>, IdempotencyError> {
        let would_deadlock = |_| IdempotencyError::WouldDeadlock {
            key: key.client_key().to_owned(),
        };
        match deadline {
            None => Ok(self.landed(flight.wait_checked().map_err(would_deadlock)?)),
            Some(deadline) => match flight
                .wait_deadline_checked(deadline)
                .map_err(would_deadlock)?
            {
                Some(landing) => Ok(self.landed(landing)),
                None => Err(IdempotencyError::InProgress {
                    key: key.client_key().to_owned(),
                }),
            },
        }
    }

    fn complete_blocking(
        &self,
        lease: Self::Lease,
        outcome: &T,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        self.complete_lease(lease, outcome, ttl);
        Ok(())
    }
}

impl<T> fmt::Debug for IdempotencyStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyStore")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(store: &IdempotencyStore<u64>, key: &str, fingerprint: u128) -> StoreClaim<u64> {
        store
            .claim_now(&RecordKey::new("f", None, key), Fingerprint(fingerprint))
            .unwrap()
    }

    // A slot for a small outcome fits in two cache lines (a `u128` field made it 144 bytes),
    // and an index entry is 8 bytes.
    #[test]
    fn records_stay_small() {
        assert!(std::mem::size_of::<Option<Slot<[u64; 2]>>>() <= 128);
        assert_eq!(std::mem::size_of::<Locator>(), 8);
    }

    // Regression: sweeping only when the stores since the last sweep outnumbered *all* records
    // never swept again once live records survived a sweep.
    #[test]
    fn sweeps_keep_up_with_a_stream_of_unique_keys() {
        let (builder, clock) = IdempotencyStore::builder().manual_clock();
        let store: IdempotencyStore<u64> = builder.build();
        let mut largest = 0;
        for n in 0..50_000u64 {
            let Claim::Execute(lease) = claim(&store, &n.to_string(), 1) else {
                panic!("fresh key")
            };
            store.complete_lease(lease, &n, Duration::from_millis(1));
            clock.advance(Duration::from_micros(1));
            largest = largest.max(store.len());
        }
        // 1000 live; a sweep every max(1024, 1000) stores.
        assert!(largest <= 1000 + 2 * 1024, "grew to {largest}");
    }

    // Keys at, just past and far past the inline length, and two long keys that differ only
    // after it: each is its own record, replayed as itself.
    #[test]
    fn keys_of_every_length_are_told_apart() {
        let store: IdempotencyStore<u64> = IdempotencyStore::new();
        let inline = "k".repeat(INLINE_KEY - 3); // with `f##`: exactly INLINE_KEY bytes
        let keys = [
            inline.clone(),
            format!("{inline}x"),
            format!("{}a", "k".repeat(200)),
            format!("{}b", "k".repeat(200)),
        ];
        for (n, key) in (0..).zip(&keys) {
            let Claim::Execute(lease) = claim(&store, key, 1) else {
                panic!("fresh key {n}")
            };
            store.complete_lease(lease, &n, Duration::from_secs(60));
        }
        for (n, key) in (0..).zip(&keys) {
            assert!(matches!(claim(&store, key, 1), Claim::Replay(stored) if stored == n));
        }
        assert_eq!(store.len(), keys.len());
    }

    #[test]
    fn capacity_keeps_the_newest_outcomes() {
        let store: IdempotencyStore<u64> = IdempotencyStore::builder().capacity(3).build();
        for n in 0..10u64 {
            let Claim::Execute(lease) = claim(&store, &n.to_string(), 1) else {
                panic!("fresh key")
            };
            store.complete_lease(lease, &n, Duration::from_secs(60));
            assert!(store.len() <= 3);
        }
        assert!(matches!(claim(&store, "9", 1), Claim::Replay(9)));
        assert!(
            matches!(claim(&store, "0", 1), Claim::Execute(_)),
            "the oldest went first"
        );
    }

    #[test]
    fn a_released_claim_leaves_no_record() {
        let store: IdempotencyStore<u64> = IdempotencyStore::new();
        let Claim::Execute(lease) = claim(&store, "k", 1) else {
            panic!("fresh key")
        };
        let Claim::InFlight(flight) = claim(&store, "k", 1) else {
            panic!("in flight")
        };
        store.release_lease(lease);
        assert_eq!(flight.wait(), &None);
        assert!(store.is_empty());
    }

    // Found in review: a `Clone` that panicked while the outcome was being stored left the key
    // in flight forever, and every later call with it waited.
    #[test]
    fn a_panicking_clone_while_storing_releases_the_key() {
        #[derive(Debug)]
        struct Fragile;
        impl Clone for Fragile {
            fn clone(&self) -> Self {
                panic!("clone fails")
            }
        }
        let store: IdempotencyStore<Fragile> = IdempotencyStore::new();
        let key = RecordKey::new("f", None, "k");
        let Ok(Claim::Execute(lease)) = store.claim_now(&key, Fingerprint(1)) else {
            panic!("fresh key")
        };
        let Ok(Claim::InFlight(waiter)) = store.claim_now(&key, Fingerprint(1)) else {
            panic!("in flight")
        };
        let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.complete_lease(lease, &Fragile, Duration::from_secs(60))
        }));
        assert!(stored.is_err());
        assert!(
            waiter.wait().is_none(),
            "the waiter was released without an outcome"
        );
        assert_eq!(store.in_flight(), 0);
        assert!(matches!(
            store.claim_now(&key, Fingerprint(1)),
            Ok(Claim::Execute(_))
        ));
    }
}
