//! What racefree reports about its calls: counters and histograms through the
//! [`metrics`](https://docs.rs/metrics) facade (feature `metrics`), and the fields of its
//! `tracing` spans and events. This is the
//! one place that names them; the attributes and the stores bump them with one-line hooks.
//!
//! # Metrics (feature `metrics`)
//! Every metric carries the labels `function` (the annotated function's path,
//! `module::Type::name`, as `tracing` events name it) and `store` (`memory`, `redis`,
//! `postgres`, `sqlite`, or `custom` for a store of your own); `racefree_store_errors_total`
//! adds `kind`.
//!
//! | metric | type | unit | counts |
//! |---|---|---|---|
//! | `racefree_cache_hits_total` | counter | calls | `#[cached]` calls answered from the store without waiting |
//! | `racefree_cache_waits_total` | counter | calls | `#[cached]` calls that found their key being computed and waited for it (coalesced) |
//! | `racefree_executions_total` | counter | calls | bodies run: `#[cached]` misses and background refreshes, `#[idempotent]` calls that executed (with or without a key), `#[sequenced]` calls that got their key |
//! | `racefree_replays_total` | counter | calls | `#[idempotent]` calls answered with a stored outcome, directly or after waiting |
//! | `racefree_idempotent_waits_total` | counter | waits | `#[idempotent]` waits for a duplicate in flight |
//! | `racefree_conflicts_total` | counter | calls | `#[idempotent]` calls refused because their key was used with another request |
//! | `racefree_evictions_total` | counter | entries | entries an in-process store removed to stay within its capacity |
//! | `racefree_store_errors_total` | counter | errors | store failures, by `kind`: `unavailable`, `timeout`, `lease_lost`, `outcome_unknown`, `outcome_not_stored`, `undecodable`, `commit_unknown`, `command`, `serialize`, `misconfigured`, `data_lost` |
//! | `racefree_lock_wait_seconds` | histogram | seconds | how long each `#[sequenced]` call waited for its key (one sample per acquire, timed out ones included) |
//! | `racefree_flight_wait_seconds` | histogram | seconds | how long a caller waited for another caller's computation (one sample per wait: `#[cached]` waiters, `#[idempotent]` duplicates) |
//!
//! The names are also constants here ([`CACHE_HITS`], ...), for dashboards and tests.
//!
//! # What it costs
//! Without the feature nothing here compiles to any code: the hooks are empty inline
//! functions on zero-sized types. With it, each function registers its handles with the
//! recorder **once**, on its first call with a given store (a `#[cached]` function's own cache
//! when it is created), and a hit costs one more counter increment through that handle: no
//! registry lookup, no label built. What the increment costs is the recorder's business
//! (`metrics-exporter-prometheus` does one atomic add on a line every core's hits share).
//!
//! **Install the recorder before the first call** of the functions you want to see: handles
//! registered while no recorder was installed stay no-ops, as with any `metrics` handle.
//! A thread's local recorder (`metrics::with_local_recorder`) is seen only by calls made on
//! that thread while it is set.
//!
//! What is not counted: a `Cache` built by hand without a [`name`](crate::CacheBuilder::name)
//! (it has no function to label), and a moka store's hits (moka does not tell a hit from a
//! wait; its own `entry_count` and eviction listener say what it holds).
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use racefree_runtime::Cache;
//! use racefree_runtime::telemetry::{CACHE_HITS, EXECUTIONS};
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     let cache: Cache<u64, u64> = Cache::builder().name("docs::square").build();
//!     cache.get_with(3, || 9);
//!     cache.get_with(3, || unreachable!());
//! });
//! let counts: Vec<(String, u64)> = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .filter_map(|(key, _, _, value)| match value {
//!         DebugValue::Counter(n) => Some((key.key().name().to_owned(), n)),
//!         _ => None,
//!     })
//!     .collect();
//! assert!(counts.contains(&(CACHE_HITS.to_owned(), 1)));
//! assert!(counts.contains(&(EXECUTIONS.to_owned(), 1)));
//! # }
//! ```
//!
//! # Tracing
//! Target `racefree`, level `debug`, with or without the feature:
//! - every `#[idempotent]` call is an `idempotent` span with the fields `function`, `outcome`
//!   and `waited` (`true` if it waited for a duplicate in flight); the protocol's steps run
//!   inside it, and it closes when the call ends;
//! - every `#[sequenced]` call is a `sequenced` span with `function` and `outcome`, alive from
//!   before the wait for the key until the call returns, but never entered: the store's and the
//!   body's events are not inside it (its busy time is zero);
//! - spans are made only when a subscriber listens at `debug` (a disabled span would cost a
//!   tenth of an uncontended `#[sequenced]` call);
//! - the events that decide a call carry `function` and `outcome` too, `#[cached]`'s included.
//!
//! `outcome` is one of [`outcome::EXECUTED`], [`outcome::REPLAYED`], [`outcome::WAITED`],
//! [`outcome::CONFLICT`], [`outcome::ERROR`] ([`outcome::HIT`] names a hit, which emits
//! nothing). A `#[cached]` call has no span and a hit no event: either would cost more than
//! the hit; hits are counted instead.

#[cfg(feature = "metrics")]
use std::collections::HashMap;
#[cfg(feature = "metrics")]
use std::sync::{Mutex, OnceLock};
#[cfg(feature = "metrics")]
use std::time::Instant;

/// `#[cached]` calls answered from the store without waiting.
pub const CACHE_HITS: &str = "racefree_cache_hits_total";
/// `#[cached]` calls that waited for the caller computing their key.
pub const CACHE_WAITS: &str = "racefree_cache_waits_total";
/// Bodies run, by any attribute.
pub const EXECUTIONS: &str = "racefree_executions_total";
/// `#[idempotent]` calls answered with a stored outcome.
pub const REPLAYS: &str = "racefree_replays_total";
/// `#[idempotent]` waits for a duplicate in flight.
pub const IDEMPOTENT_WAITS: &str = "racefree_idempotent_waits_total";
/// `#[idempotent]` calls refused because their key was used with another request.
pub const CONFLICTS: &str = "racefree_conflicts_total";
/// Entries an in-process store removed to stay within its capacity.
pub const EVICTIONS: &str = "racefree_evictions_total";
/// Store failures, labelled with their `kind`.
pub const STORE_ERRORS: &str = "racefree_store_errors_total";
/// Seconds a `#[sequenced]` call waited for its key.
pub const LOCK_WAIT: &str = "racefree_lock_wait_seconds";
/// Seconds a caller waited for another caller's computation.
pub const FLIGHT_WAIT: &str = "racefree_flight_wait_seconds";

/// The label naming the function.
pub const FUNCTION: &str = "function";
/// The label naming the kind of store (`memory`, `redis`, `postgres`, `sqlite`, `custom`).
pub const STORE: &str = "store";
/// The label of [`STORE_ERRORS`] naming what failed.
pub const KIND: &str = "kind";

/// The words the `outcome` field of racefree's `tracing` events takes.
pub mod outcome {
    /// The body ran.
    pub const EXECUTED: &str = "executed";
    /// A stored outcome was returned; the body did not run.
    pub const REPLAYED: &str = "replayed";
    /// The value came from the cache.
    pub const HIT: &str = "hit";
    /// The call waited for another caller's computation.
    pub const WAITED: &str = "waited";
    /// The key was used with another request.
    pub const CONFLICT: &str = "conflict";
    /// The call was refused, or its store failed.
    pub const ERROR: &str = "error";
}

/// One function's handles on one store. Without the feature `metrics` it is empty and every
/// hook is an empty inline function.
#[doc(hidden)]
pub struct Meter {
    #[cfg(feature = "metrics")]
    handles: Option<Handles>,
}

#[cfg(feature = "metrics")]
struct Handles {
    function: &'static str,
    store: &'static str,
    hits: metrics::Counter,
    cache_waits: metrics::Counter,
    executions: metrics::Counter,
    replays: metrics::Counter,
    idempotent_waits: metrics::Counter,
    conflicts: metrics::Counter,
    evictions: metrics::Counter,
    lock_wait: metrics::Histogram,
    flight_wait: metrics::Histogram,
}

/// When a wait began (nothing without the feature `metrics`).
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Started {
    #[cfg(feature = "metrics")]
    at: Instant,
}

impl Started {
    #[doc(hidden)]
    #[inline]
    pub fn now() -> Started {
        Started {
            #[cfg(feature = "metrics")]
            at: Instant::now(),
        }
    }
}

impl Meter {
    /// Reports nothing.
    pub(crate) const DISABLED: Meter = Meter {
        #[cfg(feature = "metrics")]
        handles: None,
    };

    /// Registers the handles of `function` (an id's `@line:column` suffix is dropped) on
    /// `store` with the recorder installed now; an empty `function` reports nothing.
    pub(crate) fn new(function: &'static str, store: &'static str) -> Meter {
        #[cfg(feature = "metrics")]
        {
            let function = function.split_once('@').map_or(function, |(path, _)| path);
            if function.is_empty() {
                return Meter::DISABLED;
            }
            let labels = [(FUNCTION, function), (STORE, store)];
            let handles = Handles {
                function,
                store,
                hits: metrics::counter!(CACHE_HITS, &labels),
                cache_waits: metrics::counter!(CACHE_WAITS, &labels),
                executions: metrics::counter!(EXECUTIONS, &labels),
                replays: metrics::counter!(REPLAYS, &labels),
                idempotent_waits: metrics::counter!(IDEMPOTENT_WAITS, &labels),
                conflicts: metrics::counter!(CONFLICTS, &labels),
                evictions: metrics::counter!(EVICTIONS, &labels),
                lock_wait: metrics::histogram!(LOCK_WAIT, &labels),
                flight_wait: metrics::histogram!(FLIGHT_WAIT, &labels),
            };
            Meter {
                handles: Some(handles),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (function, store);
            Meter::DISABLED
        }
    }

    /// The process-wide meter of `function` on `store`, registered on first use: for stores
    /// that serve many functions and hold no handles themselves (a Redis cache store), and
    /// for a function that meets a second kind of store. Takes a lock; not for hit paths.
    pub(crate) fn shared(function: &'static str, store: &'static str) -> MeterRef {
        #[cfg(feature = "metrics")]
        {
            type Meters = Mutex<HashMap<(&'static str, &'static str), &'static Meter>>;
            static METERS: OnceLock<Meters> = OnceLock::new();
            let mut meters = METERS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Leaked once per (function, store): both are `'static` names, so bounded.
            let meter = *meters
                .entry((function, store))
                .or_insert_with(|| Box::leak(Box::new(Meter::new(function, store))));
            MeterRef(meter)
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (function, store);
            MeterRef()
        }
    }

    /// A `#[cached]` call answered from the store.
    #[inline]
    pub(crate) fn hit(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.hits.increment(1);
        }
    }

    /// A `#[cached]` call began waiting for the caller computing its key.
    #[inline]
    pub(crate) fn cache_waited(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.cache_waits.increment(1);
        }
    }

    /// A body ran.
    #[inline]
    pub(crate) fn executed(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.executions.increment(1);
        }
    }

    /// An `#[idempotent]` call returned a stored outcome.
    #[inline]
    pub(crate) fn replayed(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.replays.increment(1);
        }
    }

    /// An `#[idempotent]` call began waiting for a duplicate in flight.
    #[inline]
    pub(crate) fn idempotent_waited(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.idempotent_waits.increment(1);
        }
    }

    /// An `#[idempotent]` key was reused with another request.
    #[inline]
    pub(crate) fn conflict(&self) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.conflicts.increment(1);
        }
    }

    /// `entries` were evicted to make room.
    #[inline]
    pub(crate) fn evicted(&self, entries: u64) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.evictions.increment(entries);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = entries;
    }

    /// The store failed with an error of `kind` (`None`: not a store error, nothing counted).
    /// Registers the counter now: errors are rare, and their kinds are many.
    #[inline]
    pub(crate) fn store_error(&self, kind: Option<&'static str>) {
        #[cfg(feature = "metrics")]
        if let (Some(handles), Some(kind)) = (&self.handles, kind) {
            metrics::counter!(
                STORE_ERRORS,
                FUNCTION => handles.function,
                STORE => handles.store,
                KIND => kind
            )
            .increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = kind;
    }

    /// A `#[sequenced]` call's wait for its key, which began at `started`, ended.
    #[inline]
    pub(crate) fn lock_waited(&self, started: Started) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.lock_wait.record(started.at.elapsed());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = started;
    }

    /// A wait for another caller's computation, which began at `started`, ended.
    #[inline]
    pub(crate) fn flight_waited(&self, started: Started) {
        #[cfg(feature = "metrics")]
        if let Some(handles) = &self.handles {
            handles.flight_wait.record(started.at.elapsed());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = started;
    }
}

/// A meter that lives as long as the process: what a call carries through its steps.
/// Zero-sized without the feature `metrics`.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct MeterRef(#[cfg(feature = "metrics")] &'static Meter);

impl std::ops::Deref for MeterRef {
    type Target = Meter;
    #[inline]
    fn deref(&self) -> &Meter {
        #[cfg(feature = "metrics")]
        {
            self.0
        }
        #[cfg(not(feature = "metrics"))]
        {
            &Meter::DISABLED
        }
    }
}

/// The `static` an `#[idempotent]` or `#[sequenced]` expansion declares: the function's
/// handles, registered on its first call (with the store that call uses). Empty without the
/// feature `metrics`.
#[doc(hidden)]
pub struct MeterCell {
    #[cfg(feature = "metrics")]
    first: OnceLock<(&'static str, &'static Meter)>,
}

impl std::fmt::Debug for MeterCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeterCell")
    }
}

impl MeterCell {
    #[doc(hidden)]
    #[allow(clippy::new_without_default)]
    pub const fn new() -> MeterCell {
        MeterCell {
            #[cfg(feature = "metrics")]
            first: OnceLock::new(),
        }
    }

    /// The meter of the function `function` names, on `store`: one atomic load after the
    /// first call; a second kind of store (a generic function's) takes the shared path.
    #[inline]
    pub(crate) fn meter(
        &self,
        function: impl Fn() -> &'static str,
        store: &'static str,
    ) -> MeterRef {
        #[cfg(feature = "metrics")]
        {
            let (first, meter) = *self.first.get_or_init(|| {
                let function = function();
                let meter: &'static Meter = Box::leak(Box::new(Meter::new(function, store)));
                (store, meter)
            });
            match first == store {
                true => MeterRef(meter),
                false => Meter::shared(function(), store),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (function, store);
            MeterRef()
        }
    }
}

/// The `kind` of an idempotency store's error; `None` for a refusal that is not the store's
/// (a conflict, a duplicate in flight, a missing or over-long key, re-entry).
pub(crate) fn idempotency_error_kind(error: &crate::IdempotencyError) -> Option<&'static str> {
    use crate::IdempotencyError as E;
    match error {
        E::StoreUnavailable { .. } => Some("unavailable"),
        E::OutcomeUnknown { .. } => Some("outcome_unknown"),
        E::LeaseLost { .. } => Some("lease_lost"),
        E::OutcomeNotStored { .. } => Some("outcome_not_stored"),
        E::Undecodable { .. } => Some("undecodable"),
        _ => None,
    }
}

/// The `kind` of a sequence store's error; `None` for what is not the store's (a timeout
/// waiting for the key, re-entry, an exhausted sequence).
pub(crate) fn sequence_error_kind(error: &crate::SequenceError) -> Option<&'static str> {
    use crate::SequenceError as E;
    match error {
        // The Redis store's own error says which kind (as `#[cached]` and `#[idempotent]`
        // count it); any other store's is `unavailable`.
        E::Store(source) => {
            #[cfg(feature = "redis")]
            if let Some(redis) = source.downcast_ref::<crate::redis::RedisStoreError>() {
                return redis_error_kind(redis);
            }
            let _ = source;
            Some("unavailable")
        }
        E::LeaseLost => Some("lease_lost"),
        E::CommitUnknown(_) => Some("commit_unknown"),
        _ => None,
    }
}

/// The `kind` of a Redis store's error.
#[cfg(feature = "redis")]
pub(crate) fn redis_error_kind(error: &crate::redis::RedisStoreError) -> Option<&'static str> {
    use crate::redis::RedisStoreError as E;
    Some(match error {
        E::Unavailable { .. } => "unavailable",
        E::Timeout { .. } => "timeout",
        E::Undecodable { .. } => "undecodable",
        E::LeaseLost { .. } => "lease_lost",
        E::Command { .. } => "command",
        E::Serialize { .. } => "serialize",
        E::OutcomeUnknown { .. } => "outcome_unknown",
        E::OutcomeNotStored { .. } => "outcome_not_stored",
        E::EvictionPolicy { .. } | E::NotDurable { .. } | E::Unsupported { .. } => "misconfigured",
        E::DataLost { .. } => "data_lost",
        #[allow(unreachable_patterns)]
        _ => "other",
    })
}
