//! What a cache reports: [`CacheStats`]. Its hits are counted on a [`StripedCounter`], which
//! writes no shared cache line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use crate::sync::striped::StripedCounter;

/// What a cache has done since it was created (or since its stats were reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Calls answered from the cache without waiting.
    pub hits: u64,
    /// Calls that found the key being computed by another caller and waited for its result.
    pub coalesced: u64,
    /// Times the function body ran (background refreshes included).
    pub executions: u64,
    /// Background recomputes started by hits past the `refresh` age (also in `executions`).
    pub refreshes: u64,
    /// Background recomputes that failed; the entry kept its value.
    pub refresh_failures: u64,
    /// Calls answered with an expired value because its recompute failed (`stale_on_error`).
    pub stale_served: u64,
}

impl CacheStats {
    pub(crate) fn add(self, other: CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits + other.hits,
            coalesced: self.coalesced + other.coalesced,
            executions: self.executions + other.executions,
            refreshes: self.refreshes + other.refreshes,
            refresh_failures: self.refresh_failures + other.refresh_failures,
            stale_served: self.stale_served + other.stale_served,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: StripedCounter,
    pub(crate) coalesced: AtomicU64,
    pub(crate) executions: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) refresh_failures: AtomicU64,
    pub(crate) stale_served: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            coalesced: self.coalesced.load(Relaxed),
            executions: self.executions.load(Relaxed),
            refreshes: self.refreshes.load(Relaxed),
            refresh_failures: self.refresh_failures.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
        }
    }

    pub(crate) fn reset(&self) {
        self.hits.reset();
        self.coalesced.store(0, Relaxed);
        self.executions.store(0, Relaxed);
        self.refreshes.store(0, Relaxed);
        self.refresh_failures.store(0, Relaxed);
        self.stale_served.store(0, Relaxed);
    }
}
