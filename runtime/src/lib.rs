//! The runtime of [racefree](https://docs.rs/racefree): small pieces with one job each and no
//! knowledge of the macros that use them.
//!
//! - [`flight`]: a one-shot cell a leader completes and followers wait on (sync or async).
//! - [`single_flight`]: the per-key registry of flights: at most one computation per key.
//! - [`cache`]: the memo cache of `#[cached]` (TTL, capacity, stats) over the two above.
//! - [`handle`]: the type-erased home of a function's own cache.
//! - [`stats`]: hit/coalesced/execution counters.

#![warn(missing_docs)]

pub mod cache;
pub mod flight;
pub mod handle;
pub mod single_flight;
pub mod stats;

pub use cache::{Cache, CacheBuilder, CacheConfig, CacheLead, Lookup};
pub use handle::{CacheHandle, HandleCell};
pub use stats::CacheStats;
