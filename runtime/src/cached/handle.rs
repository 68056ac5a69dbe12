//! The function-owned caches of `#[cached]`, reachable without naming their types.
//!
//! A `#[cached]` function without `store = …` keeps its cache in a [`CacheHandle`], held by a
//! `static` [`CacheCell`] (see `function.rs` for why a handle and not the typed
//! cache). The generated `fn <name>_cache()` returns the same handle, so users can
//! `invalidate`, `clear` and read `stats` without naming a type either.

use std::hash::Hash;

use super::cache::{Cache, CacheConfig};
use super::stats::CacheStats;
use crate::function::{
    ask_stores, FunctionCell, HandleKey, Home, KeyOf, Keyed, PerType, Probe, Registry,
};

/// What a handle needs from a typed cache.
trait ErasedCache: Send + Sync {
    /// `None` if the key is not of this cache's key type (nor a borrowed form of it).
    fn invalidate_probe(&self, key: Probe<'_>) -> Option<bool>;
    fn key_type(&self) -> &'static str;
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
    fn invalidate_probe(&self, key: Probe<'_>) -> Option<bool> {
        match key.value::<K>() {
            Some(key) => Some(self.invalidate(key)),
            None => Some(self.invalidate(&key.to_key::<K>()?)),
        }
    }
    fn key_type(&self) -> &'static str {
        std::any::type_name::<K>()
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
///
/// Lookups take the key as the function builds it or, for a text key, borrowed (`"a"` or
/// `&"a"` for a `String` key); a key of any other type panics with the key type to use rather
/// than answering for a cache that does not exist:
///
/// ```should_panic
/// # use racefree_runtime::{CacheConfig, cached::CacheCell};
/// static NAMES: CacheCell = CacheCell::new("doc::names", CacheConfig::new());
/// NAMES.handle().cache::<String, u64>().insert("a".to_owned(), 1);
/// assert!(NAMES.handle().invalidate("a"));          // &str for a String key: fine
/// NAMES.handle().invalidate(&1_u32);                // panics: its keys are `alloc::string::String`
/// ```
pub struct CacheHandle {
    name: &'static str,
    config: CacheConfig,
    caches: PerType<dyn ErasedCache>,
}

impl CacheHandle {
    /// The function's cache for keys `K` and values `V`, **created on first use**: this is how
    /// the function itself reaches its cache. To look at the cache without creating one, use
    /// [`typed`](Self::typed).
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

    /// The function's cache for keys `K` and values `V`, if the function has used one.
    pub fn typed<K, V>(&self) -> Option<&'static Cache<K, V>>
    where
        K: Eq + Hash + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        self.caches.find()
    }

    fn each(&self) -> Vec<&'static dyn ErasedCache> {
        self.caches.each()
    }

    /// Removes the entry for `key`, given as the function builds its key (an owned value, e.g.
    /// `String` for a `&str` argument, a tuple for several arguments) or, for a text key,
    /// borrowed (`"a"`, `&"a"`); `true` if it was there.
    ///
    /// # Panics
    /// If the function has a cache and `key` is of none of its key types (see [`HandleKey`]).
    pub fn invalidate<Q: HandleKey + ?Sized>(&self, key: &Q) -> bool {
        let key = key.probe();
        ask_stores(
            self.name,
            &self.each(),
            key,
            |c| c.key_type(),
            |c| c.invalidate_probe(key),
        )
        .into_iter()
        .any(|removed| removed)
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

impl<K: ?Sized + 'static> Keyed<CacheHandle, K> {
    /// [`CacheHandle::invalidate`], for a key of the function's key type `K` (or, for a text
    /// key, `&str`): another type does not compile.
    pub fn invalidate<Q: KeyOf<K> + ?Sized>(&self, key: &Q) -> bool {
        self.handle().invalidate(key)
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
