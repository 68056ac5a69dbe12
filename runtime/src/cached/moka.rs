//! A moka cache as the store of `#[cached(store = ...)]` (feature `moka`):
//! [`moka::sync::Cache`] for sync functions,
//! [`moka::future::Cache`] for async ones, so a function gets moka's
//! W-TinyLFU admission, weigher, per-entry expiry and eviction listeners with the same single
//! flight as racefree's own [`Cache`](super::Cache).
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
//! use std::sync::LazyLock;
//! use racefree_runtime::cached::CacheStore;
//!
//! static PAGES: LazyLock<moka::sync::Cache<u64, String>> = LazyLock::new(|| {
//!     moka::sync::Cache::builder()
//!         .max_capacity(10_000)
//!         .time_to_live(std::time::Duration::from_secs(60))
//!         .build()
//! });
//! static RUNS: AtomicUsize = AtomicUsize::new(0);
//!
//! // What `#[cached(store = PAGES)] fn page(id: u64) -> Result<String, String>` expands to.
//! let page = |id: u64, fail: bool| {
//!     PAGES.run_cached(id, || {
//!         RUNS.fetch_add(1, SeqCst);
//!         if fail { Err("backend down".to_owned()) } else { Ok(format!("page {id}")) }
//!     })
//! };
//! assert!(page(7, true).is_err());                     // not cached
//! assert_eq!(page(7, false).unwrap(), "page 7");       // computed
//! assert_eq!(page(7, true).unwrap(), "page 7");        // a hit: the body does not run
//! assert_eq!(RUNS.load(SeqCst), 2);
//! ```
//!
//! # What it promises
//! The same as racefree's own cache:
//! - **One execution per cold key.** Concurrent callers of a key that is not stored are
//!   coalesced: one runs its body, the others wait and receive a clone of its value.
//! - **Failures are not shared.** When the computing caller ends without a value (an
//!   `Err`/`None` outcome, a panic, a dropped future), nothing is stored and its waiters are
//!   released; one of them runs its own body next, the others wait for that one. A waiter
//!   never receives somebody else's error.
//! - Bounds, expiry, admission and eviction are moka's, configured on the cache the user builds.
//!   A value just computed may be refused by W-TinyLFU admission or evicted at once: it is
//!   still returned to the caller and its waiters, and the next call computes again.
//!
//! # Why moka's own coalescing and not racefree's `SingleFlight`
//! racefree's single flight is a registry that must live beside the map it guards, and moka's
//! `Cache` has no room for it. A process-wide registry keyed by the cache's identity would be
//! wrong twice: moka caches are cheap handles (`clone` shares the storage), so an address does
//! not identify a cache, and an address is reused after a cache is dropped. moka already keeps
//! such a registry inside the shared storage (its "waiters" map), and its
//! `optionally_get_with` gives, together with one retry loop here, exactly the semantics above
//! (checked in moka 0.12's `value_initializer.rs`, tested in `tests/cached_moka.rs`):
//! - it looks the key up again once it owns the key, so a caller arriving just after the
//!   leader stored the value gets the value, not a second execution;
//! - the leader's `None` is handed to its waiters as `None`. This is where moka's semantics
//!   differ from racefree's (as do `try_get_with`'s, which hands the leader's error to its
//!   waiters), so a caller whose body did not run and that got `None` calls again: the first to
//!   get there leads, the others wait for it. The caller that did run its body returns its own
//!   outcome (its `Err`, say), which never reaches moka;
//! - a panicking body (sync and async) and a leader's dropped future are caught by moka,
//!   which removes the key's waiter entry and lets the waiters retry (moka #43, #59): one
//!   of them runs its body; the panic goes on in the caller whose body panicked.
//!
//! What it costs and what it does not do:
//! - moka keys its waiters by key *and* method: a call of `get_with` or `try_get_with` on the
//!   same cache outside `#[cached]` is not coalesced with the functions' calls (all functions
//!   storing into one moka cache are, since they all go through `optionally_get_with`).
//! - A hit is moka's `get` (it records the access for the admission policy): several times
//!   racefree's own hit, see `benches/cached.rs`.
//! - No racefree [`CacheStats`](super::CacheStats) and no `in_flight()`: use moka's own
//!   `entry_count`, eviction listener and policy.
//! - No detection of a sync waiter blocking the thread its leader needs (racefree's
//!   `blocking` rule): sync functions take a `moka::sync::Cache`, async ones a
//!   `moka::future::Cache`, so a sync caller never waits for an async leader here; a body
//!   that calls its own function with the same key waits for itself forever, as with moka.
//! - moka gives up with a panic after 200 successive panicking or cancelled leaders for one
//!   waiting call.
//! - The cache is the user's: depend on the same `moka` 0.12 as racefree.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::pin;

use super::store::{AsyncCacheStore, CacheStore, Outcome};

impl<K, V, S, R> CacheStore<K, R> for ::moka::sync::Cache<K, V, S>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
    R: Outcome<Value = V>,
{
    fn run_cached(&self, key: K, body: impl FnOnce() -> R) -> R {
        let mut body = Some(body);
        let mut ran = None;
        loop {
            // By reference: a hit neither clones nor allocates the key; only an insert does.
            let value = self.optionally_get_with_by_ref(&key, || {
                let body = body
                    .take()
                    .expect("moka runs the init closure at most once");
                let outcome: &R = ran.insert(body());
                outcome.cached_value().cloned()
            });
            if let Some(outcome) = ran {
                return outcome;
            }
            match value {
                Some(value) => return R::from_cached(value),
                // The leader had no value to share: our body has not run; try again.
                None => {
                    tracing::debug!(target: "racefree", "moka store: the computing caller failed; retrying")
                }
            }
        }
    }
}

impl<K, V, S, R> AsyncCacheStore<K, R> for ::moka::future::Cache<K, V, S>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: BuildHasher + Clone + Send + Sync + 'static,
    R: Outcome<Value = V>,
{
    async fn run_cached_async(&self, key: K, body: impl Future<Output = R>) -> R {
        // Pinned here, so each attempt can lend it to moka; only the leading attempt polls it,
        // and it polls it to the end (or the whole call is dropped).
        let mut body = pin!(body);
        let mut ran = None;
        loop {
            let value = self
                .optionally_get_with_by_ref(&key, async {
                    let outcome: &R = ran.insert(body.as_mut().await);
                    outcome.cached_value().cloned()
                })
                .await;
            if let Some(outcome) = ran {
                return outcome;
            }
            match value {
                Some(value) => return R::from_cached(value),
                None => {
                    tracing::debug!(target: "racefree", "moka store: the computing caller failed; retrying")
                }
            }
        }
    }
}
