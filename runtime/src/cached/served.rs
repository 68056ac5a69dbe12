//! How a `#[cached]` call was answered, without changing how the function is called.
//!
//! A `#[cached]` function returns what it always returned; a caller that wants to know whether
//! it was a hit (Go's `shared`, the `cached` crate's `Return<T>`) wraps the call in a tracking
//! scope, as [`replay::track`](crate::replay::track) does for `#[idempotent]`:
//!
//! - [`track`] runs a future and returns `(output, Served)`;
//! - [`track_sync`] does the same for a closure.
//!
//! Every call through a cache's lookups ([`Cache::lookup_or_lead`](super::Cache::lookup_or_lead)
//! and its siblings, which `#[cached]` uses) reports into the innermost active scope of the
//! current thread (for [`track`], the scope is active exactly while its future is polled, so it
//! follows the task across threads; tasks and threads spawned from it, such as a background
//! refresh, are not in it).
//!
//! **The last call to finish wins**, as for `replay`: for nested calls that is the outermost one
//! (it finishes after everything its body called), for calls one after the other the last.
//!
//! **Costs nothing when unused.** Reporting is one read of a `const` thread-local (no
//! initialisation check, no shared memory) and a branch; only inside a scope does it write,
//! and then to that thread-local.
//!
//! ```
//! use racefree_runtime::cached::served::{self, Served};
//! use racefree_runtime::Cache;
//!
//! let cache: Cache<u64, u64> = Cache::new();
//! let (value, served) = served::track_sync(|| cache.get_with(7, || 49));
//! assert_eq!((value, served), (49, Served::Executed));
//! let (value, served) = served::track_sync(|| cache.get_with(7, || unreachable!()));
//! assert_eq!((value, served), (49, Served::Hit));
//! assert!(served.is_cached());
//! ```

use std::cell::Cell;
use std::future::Future;
use std::thread::LocalKey;

use crate::sync::scope::{self, Tracked};

/// How the (last) cache call inside a tracking scope was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Served {
    /// No cache call finished inside the scope.
    #[default]
    NotRecorded,
    /// From the cache, younger than its `refresh` age (or the cache has no `refresh`).
    Hit,
    /// From the cache, older than `refresh`: the value is returned at once while a background
    /// recompute of the key is under way (this call may be the one that started it).
    Refreshing,
    /// The key was being computed by another caller; this call waited and got its outcome
    /// (its value, or with `share_errors` its error).
    Waited,
    /// This call ran the body (whether it succeeded or not).
    Executed,
    /// The recompute failed (this call's or the one it waited for) and the previous value,
    /// past its `ttl` but within `stale_on_error`, was returned instead of the error.
    Stale,
}

impl Served {
    /// `true` if the value came out of the cache without this call running the body or
    /// waiting for a computation: [`Hit`](Served::Hit) or [`Refreshing`](Served::Refreshing).
    pub fn is_cached(self) -> bool {
        matches!(self, Served::Hit | Served::Refreshing)
    }
}

thread_local! {
    // `None`: no scope is active on this thread.
    static CURRENT: Cell<Option<Served>> = const { Cell::new(None) };
}

impl Tracked for Served {
    fn slot() -> &'static LocalKey<Cell<Option<Served>>> {
        &CURRENT
    }
}

/// Reports how a cache call was answered to the innermost active scope, if any.
#[inline]
pub(crate) fn record(value: Served) {
    scope::record(value)
}

/// Runs `f` in a new tracking scope; returns its value and how the cache calls in it were
/// answered.
///
/// ```
/// use racefree_runtime::cached::served::{track_sync, Served};
///
/// let (_, served) = track_sync(|| ());
/// assert_eq!(served, Served::NotRecorded);
/// ```
pub fn track_sync<R>(f: impl FnOnce() -> R) -> (R, Served) {
    scope::track_sync(f)
}

/// Runs `future` in a new tracking scope; resolves to its output and how the cache calls in
/// it were answered. The scope is entered on every poll, so it works on any executor and
/// across threads; futures spawned from inside are not tracked by it.
///
/// ```
/// use racefree_runtime::cached::served::{self, Served};
/// use racefree_runtime::Cache;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache: Cache<u64, u64> = Cache::new();
/// let (value, served) = served::track(cache.get_with_async(3, async { 9 })).await;
/// assert_eq!((value, served), (9, Served::Executed));
/// # });
/// ```
pub async fn track<F: Future>(future: F) -> (F::Output, Served) {
    scope::track(future).await
}
