//! # racefree
//!
//! Attributes that make three classic concurrency bugs impossible to write by accident.
//!
//! - [`#[cached]`](cached): memoize; on a miss exactly one caller per key runs the body (per-key
//!   lock, double check); everyone else waits and shares the value. TTL and capacity bounded;
//!   only `Ok`/`Some` are kept. Opt in to refresh-ahead (`refresh = "30s"`), serving the last
//!   value when the recompute fails (`stale_on_error = "10m"`) and handing a failed caller's
//!   error to its waiters (`share_errors`); [`served::track`] tells how a call was answered.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use racefree::cached;
//!
//! static LOADS: AtomicUsize = AtomicUsize::new(0);
//!
//! #[cached(ttl = "5m", capacity = 1_000)]
//! fn load_rules(dir: &str) -> Vec<String> {
//!     LOADS.fetch_add(1, Ordering::SeqCst);
//!     vec![format!("{dir}/a.rule")]
//! }
//!
//! let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(|| load_rules("/etc/rules"))).collect();
//! for t in threads { assert_eq!(t.join().unwrap(), ["/etc/rules/a.rule"]); }
//! assert_eq!(LOADS.load(Ordering::SeqCst), 1);          // four callers, one load
//! assert_eq!(load_rules_cache().stats().executions, 1);
//! ```
//!
//! - [`#[idempotent]`](idempotent): the first call with an idempotency key executes; concurrent
//!   and later calls with that key get the stored outcome without executing; the same key with
//!   a different payload is a [`Conflict`](IdempotencyError::Conflict); outcomes expire.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use racefree::{idempotent, replay, IdempotencyError};
//!
//! static CHARGES: AtomicUsize = AtomicUsize::new(0);
//!
//! #[idempotent(key = key, ttl = "24h")]
//! fn charge(key: &str, cents: u64) -> Result<String, IdempotencyError> {
//!     CHARGES.fetch_add(1, Ordering::SeqCst);
//!     Ok(format!("receipt for {cents}"))
//! }
//!
//! let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(|| charge("order-17", 1999))).collect();
//! for t in threads { assert_eq!(t.join().unwrap().unwrap(), "receipt for 1999"); }
//! assert_eq!(CHARGES.load(Ordering::SeqCst), 1);                  // four retries, one charge
//! let (_, how) = replay::track_sync(|| charge("order-17", 1999)); // later retry: replayed
//! assert!(how.is_replayed());
//! assert_eq!(charge("order-17", 2500), Err(IdempotencyError::Conflict { key: "order-17".into() }));
//! ```
//!
//! - [`#[sequenced]`](sequenced): calls with the same key run one at a time, in arrival order;
//!   a [`Seq`] parameter receives the key's next number, consumed only if the call succeeds, so
//!   numbers are unique, gap-free and in completion order.
//!
//! ```
//! use std::sync::Mutex;
//! use racefree::{sequenced, Seq};
//!
//! #[derive(Debug)]
//! struct Full;
//!
//! static ROWS: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
//!
//! #[sequenced(key = shop.to_owned(), start = 1_000)]
//! fn create_work_order(shop: &str, fail: bool, seq: Seq) -> Result<String, Full> {
//!     if fail { return Err(Full); }                   // consumes no number
//!     ROWS.lock().unwrap().push((shop.to_owned(), seq.get()));
//!     Ok(format!("{shop}-{seq}"))
//! }
//!
//! let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(|| create_work_order("porto", false))).collect();
//! for t in threads { t.join().unwrap().unwrap(); }   // callers never pass `seq`
//! assert!(create_work_order("porto", true).is_err());
//! assert_eq!(create_work_order("porto", false).unwrap(), "porto-1004");
//! let mut numbers: Vec<u64> = ROWS.lock().unwrap().iter().map(|r| r.1).collect();
//! numbers.sort();
//! assert_eq!(numbers, [1_000, 1_001, 1_002, 1_003, 1_004]);
//! assert_eq!(create_work_order_sequence().next(&"porto".to_owned()), Some(1_005));
//! ```

//! Every attribute takes `store = <expr>` to use a store other than the function's own
//! in-process one: a [`Cache`] field of `self`, a shared [`Sequencer`], or, with the `redis`
//! feature, the Redis stores in `racefree::redis` that carry the same guarantees across
//! processes and machines. The `axum` feature adds the HTTP pieces around `#[idempotent]`.
#![cfg_attr(
    feature = "moka",
    doc = r#"
With the `moka` feature, `#[cached(store = ...)]` also takes a `moka::sync::Cache` (sync
functions) or a `moka::future::Cache` (async ones), for W-TinyLFU admission, a weigher, per-entry
expiry or eviction listeners; racefree's single flight is in front, with the same promises
(one execution per cold key, failures not shared; see `racefree_runtime::cached::moka`):

```
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::LazyLock;
use racefree::cached;

static RATES: LazyLock<moka::sync::Cache<String, f64>> = LazyLock::new(|| {
    moka::sync::Cache::builder()
        .max_capacity(1_000)
        .time_to_live(std::time::Duration::from_secs(300))
        .build()
});
static FETCHES: AtomicUsize = AtomicUsize::new(0);

#[cached(key = currency.to_owned(), store = RATES)]
fn rate(currency: &str) -> Result<f64, String> {
    FETCHES.fetch_add(1, SeqCst);
    if currency == "XXX" { Err("unknown currency".into()) } else { Ok(1.08) }
}

let callers: Vec<_> = (0..8).map(|_| std::thread::spawn(|| rate("EUR"))).collect();
for c in callers { assert_eq!(c.join().unwrap(), Ok(1.08)); }
assert_eq!(FETCHES.load(SeqCst), 1);             // one fetch for eight callers
assert!(rate("XXX").is_err() && rate("XXX").is_err());
assert_eq!(FETCHES.load(SeqCst), 3);             // an error is not cached
assert_eq!(RATES.get("EUR"), Some(1.08));
```
"#
)]
#![cfg_attr(
    feature = "metrics",
    doc = r#"
With the `metrics` feature, every attribute reports through the [`metrics`](https://docs.rs/metrics)
facade to whatever recorder the application installed (Prometheus, StatsD, ...): hits,
coalesced waits, executions, replays, conflicts, evictions and store errors as counters, lock
and flight waits as histograms, each labelled with the `function` and the `store`. The names
and units are listed in [`telemetry`]. Install the recorder before the first call:

```
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use racefree::cached;

#[cached]
fn square(x: u64) -> u64 {
    x * x
}

let recorder = DebuggingRecorder::new();
let snapshotter = recorder.snapshotter();
metrics::with_local_recorder(&recorder, || {
    for _ in 0..3 {
        square(4);
    }
});
let counters: Vec<(String, String, u64)> = snapshotter
    .snapshot()
    .into_vec()
    .into_iter()
    .filter_map(|(key, _, _, value)| match value {
        DebugValue::Counter(n) if n > 0 => {
            let function = key.key().labels().find(|l| l.key() == "function")?.value().to_owned();
            Some((key.key().name().to_owned(), function, n))
        }
        _ => None,
    })
    .collect();
// `function` is the function's path: `my_crate::square` for a function at a crate's root.
let count = |metric: &str| {
    counters.iter().find(|(name, function, _)| name == metric && function.ends_with("::square")).map(|c| c.2)
};
assert_eq!(count("racefree_executions_total"), Some(1));
assert_eq!(count("racefree_cache_hits_total"), Some(2));
```
"#
)]
#![warn(missing_docs)]

pub use racefree_macros::{cached, idempotent, sequenced};
pub use racefree_runtime::cached::store as cache_store;
pub use racefree_runtime::idempotent as idempotency;
pub use racefree_runtime::replay;
pub use racefree_runtime::served;
pub use racefree_runtime::telemetry;
pub use racefree_runtime::turn;
pub use racefree_runtime::{
    BlockingIdempotencyBackend, Fingerprint, IdempotencyBackend, IdempotencyError,
    IdempotencyHandle, IdempotencyStats, IdempotencyStore, Replay,
};
pub use racefree_runtime::{Cache, CacheBuilder, CacheConfig, CacheHandle, CacheStats, Served};
pub use racefree_runtime::{HandleKey, KeyOf, Keyed};
pub use racefree_runtime::{
    Seq, SequenceBackend, SequenceError, SequenceHandle, SequenceLease, Sequencer, Turn,
};

/// The Redis store (feature `redis`): the three attributes across processes and machines.
/// See [`racefree_runtime::backends::redis`].
#[cfg(feature = "redis")]
pub mod redis {
    pub use racefree_runtime::backends::redis::*;
}

/// The SQL stores (features `postgres`, `sqlite`): `#[idempotent]` and `#[sequenced]` whose
/// guarantee commits in the same database transaction as the body's effect. See
/// [`racefree_runtime::backends::sql`].
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod sql {
    pub use racefree_runtime::backends::sql::*;
}

/// HTTP around `#[idempotent]` for any tower stack (feature `tower`): the replay-marking
/// [`ReplayLayer`](racefree_runtime::http::ReplayLayer), configurable key and replay headers,
/// problem+json responses. See [`racefree_runtime::http`].
#[cfg(feature = "tower")]
pub mod http {
    pub use racefree_runtime::http::*;
}

/// axum integration (feature `axum`): everything in [`http`] plus the key
/// extractors (`IdempotencyKey`, `ScopedKey<P>`), problem+json responses for
/// [`IdempotencyError`], and the `mark_replays` middleware. See [`racefree_runtime::http`].
#[cfg(feature = "axum")]
pub mod axum {
    pub use racefree_runtime::http::*;
}

/// Everything generated code needs, and nothing else. Not a public API.
#[doc(hidden)]
pub use racefree_runtime::__private;
