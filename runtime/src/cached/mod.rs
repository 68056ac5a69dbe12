//! `#[cached]`: the memo [`Cache`] (TTL, capacity, single flight in front of the body), what
//! `store = <expr>` takes ([`store`]; with feature `moka` also a moka cache, see `moka.rs`), the
//! function-owned [`CacheHandle`] and its [`stats`].
//!
//! Promises and limits are in [`cache`]'s docs: one execution per cold key, failures not
//! shared, bounded by TTL and capacity. This room knows nothing of the other attributes; it
//! uses `sync/` for flights and the clock.

pub mod cache;
pub mod handle;
#[cfg(feature = "moka")]
pub mod moka;
pub mod served;
pub mod stats;
pub mod store;

pub use cache::{
    Answer, Cache, CacheBuilder, CacheConfig, CacheLead, CacheRefresh, Lookup, ShareableError,
    SharedError,
};
pub use handle::{CacheCell, CacheHandle};
pub use served::Served;
pub use stats::CacheStats;
pub use store::{Always, AsyncCacheStore, CacheStore};
#[doc(hidden)]
pub use store::{AsyncCacheStoreRef, CacheStoreRef};
