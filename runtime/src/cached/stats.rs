//! Counters that many threads bump and few read.
//!
//! The hit counter is bumped on every cache hit from every thread. A single shared atomic would
//! bounce its cache line between cores, and even an uncontended `fetch_add` (a locked
//! read-modify-write) costs a fifth of a hit. So the counter is striped over cache-line-padded
//! slots, and a thread that owns a slot bumps it with a plain load and store: nobody else
//! writes that slot. A thread claims a free slot on its first bump and gives it back when it
//! exits (the hand-over goes through a mutex, so the next owner sees the last count); threads
//! beyond the slots share one more slot and bump it with `fetch_add`. Sums are exact.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

const STRIPES: usize = 32;
/// The slot threads without one of their own share (atomically).
const SHARED: usize = STRIPES - 1;

#[repr(align(64))]
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
        match own_stripe() {
            SHARED => {
                self.stripes[SHARED].0.fetch_add(1, Relaxed);
            }
            own => {
                // Only this thread writes its own slot: no read-modify-write needed.
                let slot = &self.stripes[own].0;
                slot.store(slot.load(Relaxed) + 1, Relaxed);
            }
        }
    }

    /// The sum over all threads.
    pub fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.0.load(Relaxed)).sum()
    }

    /// Sets the counter back to zero. (A bump racing with the reset may survive it.)
    pub fn reset(&self) {
        self.stripes.iter().for_each(|s| s.0.store(0, Relaxed));
    }
}

/// The slot a thread owns while it lives.
struct OwnedStripe(usize);

static NEVER_CLAIMED: AtomicUsize = AtomicUsize::new(0);
static GIVEN_BACK: Mutex<Vec<usize>> = Mutex::new(Vec::new());

impl OwnedStripe {
    fn claim() -> OwnedStripe {
        let given_back = GIVEN_BACK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let stripe = given_back.unwrap_or_else(|| {
            NEVER_CLAIMED
                .fetch_update(Relaxed, Relaxed, |n| (n < SHARED).then_some(n + 1))
                .unwrap_or(SHARED)
        });
        OwnedStripe(stripe)
    }
}

impl Drop for OwnedStripe {
    fn drop(&mut self) {
        if self.0 != SHARED {
            GIVEN_BACK
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(self.0);
        }
    }
}

thread_local! {
    static STRIPE: OwnedStripe = OwnedStripe::claim();
}

#[inline]
fn own_stripe() -> usize {
    // After the thread's slot was given back (a cache hit from another thread-local's
    // destructor), the shared slot counts.
    STRIPE.try_with(|stripe| stripe.0).unwrap_or(SHARED)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    // 100 threads (more than the slots, so some share) × 10 rounds of thread churn, 1,000 bumps
    // each: every round the sum is exact, and slots given back by exited threads are reused.
    #[test]
    fn striped_counter_is_exact_across_thread_churn() {
        let counter = StripedCounter::default();
        for round in 1..=10u64 {
            let barrier = std::sync::Barrier::new(100);
            std::thread::scope(|s| {
                for _ in 0..100 {
                    s.spawn(|| {
                        barrier.wait();
                        (0..1_000).for_each(|_| counter.bump());
                    });
                }
            });
            assert_eq!(counter.get(), round * 100_000, "round {round}");
        }
        assert!(NEVER_CLAIMED.load(Relaxed) <= SHARED);
    }
}
