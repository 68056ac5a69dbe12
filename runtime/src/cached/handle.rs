//! The function-owned caches of `#[cached]`, reachable without naming their types.
//!
//! A `#[cached]` function without `store = …` keeps its cache in a [`CacheHandle`], held by a
//! `static` [`CacheCell`] (see `function.rs` for why a handle and not the typed
//! cache). The generated `fn <name>_cache()` returns the same handle, so users can
//! `invalidate`, `clear` and read `stats` without naming a type either.

use std::any::Any;
use std::hash::Hash;

use super::cache::{Cache, CacheConfig};
use super::stats::CacheStats;
use crate::function::{FunctionCell, Home, PerType, Registry};

/// What a handle needs from a typed cache.
trait ErasedCache: Send + Sync {
    fn invalidate_any(&self, key: &dyn Any) -> bool;
    fn clear(&self);
    fn len(&self) -> usize;
    fn in_flight(&self) -> usize;
    fn stats(&self) -> CacheStats;
    fn reset_stats(&self);
}

impl<K, V> ErasedCache for Cache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn invalidate_any(&self, key: &dyn Any) -> bool {
        key.downcast_ref::<K>()
            .is_some_and(|key| self.invalidate(key))
    }
    fn clear(&self) {
        Cache::clear(self)
    }
    fn len(&self) -> usize {
        Cache::len(self)
    }
    fn in_flight(&self) -> usize {
        Cache::in_flight(self)
    }
    fn stats(&self) -> CacheStats {
        Cache::stats(self)
    }
    fn reset_stats(&self) {
        Cache::reset_stats(self)
    }
}

/// The cache of one `#[cached]` function, as returned by the generated `fn <name>_cache()`.
///
/// ```
/// use racefree_runtime::CacheConfig;
/// use racefree_runtime::cached::CacheCell;
///
/// // What `#[cached] fn square(x: u64) -> u64` declares, and `square_cache()` returns.
/// static SQUARE: CacheCell = CacheCell::new("doc::square", CacheConfig::new());
/// let square = |x: u64| SQUARE.handle().cache::<u64, u64>().get_with(x, || x * x);
///
/// square(3);
/// square(3);
/// let cache = SQUARE.handle();
/// assert_eq!((cache.stats().executions, cache.stats().hits, cache.len()), (1, 1, 1));
/// assert!(cache.invalidate(&3_u64));     // the key as the function builds it
/// assert_eq!(cache.len(), 0);
/// ```
pub struct CacheHandle {
    name: &'static str,
    config: CacheConfig,
    caches: PerType<dyn ErasedCache>,
}

impl CacheHandle {
    /// The function's cache for keys `K` and values `V`, created on first use.
    #[inline]
    pub fn cache<K, V>(&self) -> &'static Cache<K, V>
    where
        K: Eq + Hash + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        self.caches.get_or_create(
            || Cache::with_config_and_hasher(self.config, self.name, Default::default()),
            |cache| cache,
        )
    }

    fn each(&self) -> Vec<&'static dyn ErasedCache> {
        self.caches.each()
    }

    /// Removes the entry for `key`, given as the function builds its key (an owned value, e.g.
    /// `String` for a `&str` argument, a tuple for several arguments); `true` if it was there.
    pub fn invalidate<K: Any>(&self, key: &K) -> bool {
        self.each().iter().any(|c| c.invalidate_any(key))
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.each().iter().for_each(|c| c.clear());
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.each().iter().map(|c| c.len()).sum()
    }

    /// `true` when no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys being computed right now: the size of the per-key lock registry.
    pub fn in_flight(&self) -> usize {
        self.each().iter().map(|c| c.in_flight()).sum()
    }

    /// Hits, coalesced waits and executions so far.
    pub fn stats(&self) -> CacheStats {
        self.each()
            .iter()
            .fold(CacheStats::default(), |sum, c| sum.add(c.stats()))
    }

    /// Sets the stats back to zero.
    pub fn reset_stats(&self) {
        self.each().iter().for_each(|c| c.reset_stats());
    }

    /// The function this cache belongs to (`module::path::name@line:column`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How the cache is bounded.
    pub fn config(&self) -> CacheConfig {
        self.config
    }
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheHandle")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Home for CacheHandle {
    type Config = CacheConfig;
    fn open(id: &'static str, config: CacheConfig) -> Self {
        CacheHandle {
            name: id,
            config,
            caches: PerType::new(),
        }
    }
    fn registry() -> &'static Registry<Self> {
        static REGISTRY: Registry<CacheHandle> = Registry::new();
        &REGISTRY
    }
}

/// The `static` a `#[cached]` expansion declares.
#[doc(hidden)]
pub type CacheCell = FunctionCell<CacheHandle>;

impl CacheCell {
    #[doc(hidden)]
    pub const fn new(id: &'static str, config: CacheConfig) -> Self {
        FunctionCell::with_config(id, config)
    }
}
