//! Counters that many threads bump and few read.
//!
//! The hit counter is bumped on every cache hit from every thread, so a single shared atomic
//! would bounce its cache line between cores and cost more than the hit itself; it is striped
//! over cache-line-padded slots, one chosen per thread, and summed when read.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

const STRIPES: usize = 8;

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// A counter striped across threads: cheap to bump concurrently, exact when summed.
#[derive(Default)]
pub struct StripedCounter {
    stripes: [Padded; STRIPES],
}

impl StripedCounter {
    /// Adds one.
    #[inline]
    pub fn bump(&self) {
        self.stripes[stripe()].0.fetch_add(1, Relaxed);
    }

    /// The sum over all threads.
    pub fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.0.load(Relaxed)).sum()
    }

    /// Sets the counter back to zero.
    pub fn reset(&self) {
        self.stripes.iter().for_each(|s| s.0.store(0, Relaxed));
    }
}

#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

/// What a cache has done since it was created (or since its stats were reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Calls answered from the cache without waiting.
    pub hits: u64,
    /// Calls that found the key being computed by another caller and waited for its result.
    pub coalesced: u64,
    /// Times the function body ran.
    pub executions: u64,
}

impl CacheStats {
    pub(crate) fn add(self, other: CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits + other.hits,
            coalesced: self.coalesced + other.coalesced,
            executions: self.executions + other.executions,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: StripedCounter,
    pub(crate) coalesced: AtomicU64,
    pub(crate) executions: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            coalesced: self.coalesced.load(Relaxed),
            executions: self.executions.load(Relaxed),
        }
    }

    pub(crate) fn reset(&self) {
        self.hits.reset();
        self.coalesced.store(0, Relaxed);
        self.executions.store(0, Relaxed);
    }
}
