//! What `#[cached(store = <expr>)]` accepts: a store that runs a function's body at most once
//! per key and hands the value to everyone else.
//!
//! A function without `store` uses its own in-process [`Cache`] through the explicit
//! `lookup_or_lead` / `complete` steps (see `macros/src/cached.rs`). With `store`, the
//! expression's type decides: a [`Cache`] (e.g. a per-instance field), a moka cache (feature
//! `moka`, see `cached/moka.rs`) or a Redis cache store (feature `redis`), so the generated code
//! hands the body to the store through these traits. Generated code calls them with method
//! syntax, so a store behind `LazyLock`, `Arc` or `&` is found by auto-deref.

use std::future::Future;
use std::hash::{BuildHasher, Hash};

use super::cache::{Cache, Lookup};

/// How a function's return value splits into what is cached and what is not.
pub trait Outcome: Sized {
    /// What is cached.
    type Value;
    /// The value to cache, or `None` when this outcome is not cached (`Err`, `None`).
    fn cached_value(&self) -> Option<&Self::Value>;
    /// The outcome a cached value stands for.
    fn from_cached(value: Self::Value) -> Self;
}

impl<T, E> Outcome for Result<T, E> {
    type Value = T;
    fn cached_value(&self) -> Option<&T> {
        self.as_ref().ok()
    }
    fn from_cached(value: T) -> Self {
        Ok(value)
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn cached_value(&self) -> Option<&T> {
        self.as_ref()
    }
    fn from_cached(value: T) -> Self {
        Some(value)
    }
}

/// A return value that is always cached (neither a `Result` nor an `Option`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Always<T>(pub T);

impl<T> Outcome for Always<T> {
    type Value = T;
    fn cached_value(&self) -> Option<&T> {
        Some(&self.0)
    }
    fn from_cached(value: T) -> Self {
        Always(value)
    }
}

/// A store a sync `#[cached]` function can use.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cache store for keys `{K}`",
    label = "`store = ...` must be a `racefree::Cache`, a moka cache (feature `moka`) or a Redis cache store",
    note = "for a per-instance cache keep a `racefree::Cache<K, V>` in a field and write `store = self.<field>`",
    note = "the cached value must be `Clone`; a Redis cache store also needs it to be `Serialize + Deserialize`",
    note = "an argument that is a handle (a pool, a client) does not belong in the key `{K}`: leave it out with `skip(<argument>)`"
)]
pub trait CacheStore<K, R: Outcome> {
    /// `body`'s outcome for `key`: cached, or computed by this caller or by the caller this
    /// one waited for. `body` runs at most once per cold key at a time.
    fn run_cached(&self, key: K, body: impl FnOnce() -> R) -> R;
}

/// A store an async `#[cached]` function can use.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cache store for keys `{K}`",
    label = "`store = ...` must be a `racefree::Cache`, a moka cache (feature `moka`) or a Redis cache store",
    note = "for a per-instance cache keep a `racefree::Cache<K, V>` in a field and write `store = self.<field>`",
    note = "the cached value must be `Clone`; a Redis cache store also needs it to be `Serialize + Deserialize`",
    note = "an argument that is a handle (a pool, a client) does not belong in the key `{K}`: leave it out with `skip(<argument>)`"
)]
pub trait AsyncCacheStore<K, R: Outcome> {
    /// [`CacheStore::run_cached`] for a future body; waiting awaits.
    fn run_cached_async(&self, key: K, body: impl Future<Output = R>) -> impl Future<Output = R>;
}

/// Finds the store behind `store = <expr>` by auto-deref (the expression may be a store or
/// anything that dereferences to one: `LazyLock`, `Arc`, `Box`), and names what to write when
/// it is not one (a method call on [`CacheStore`] itself would only say "no method named
/// `run_cached`"). Generated code calls `(<expr>).run_in_store(key, body)` with this trait in
/// scope.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cache store for keys `{K}`",
    label = "`store = ...` must be a `racefree::Cache`, a moka cache (feature `moka`) or a Redis cache store (or dereference to one)",
    note = "for a per-instance cache keep a `racefree::Cache<K, V>` in a field and write `store = self.<field>`",
    note = "the cached value must be `Clone`; a Redis cache store also needs it to be `Serialize + Deserialize`"
)]
pub trait CacheStoreRef<K, R> {
    fn run_in_store(&self, key: K, body: impl FnOnce() -> R) -> R;
}

impl<S: CacheStore<K, R> + ?Sized, K, R: Outcome> CacheStoreRef<K, R> for S {
    #[inline]
    fn run_in_store(&self, key: K, body: impl FnOnce() -> R) -> R {
        self.run_cached(key, body)
    }
}

/// [`CacheStoreRef`] for an async function's store.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a cache store for keys `{K}`",
    label = "`store = ...` must be a `racefree::Cache`, a moka cache (feature `moka`) or a Redis cache store (or dereference to one)",
    note = "for a per-instance cache keep a `racefree::Cache<K, V>` in a field and write `store = self.<field>`",
    note = "the cached value must be `Clone`; a Redis cache store also needs it to be `Serialize + Deserialize`"
)]
pub trait AsyncCacheStoreRef<K, R> {
    fn run_in_store_async(&self, key: K, body: impl Future<Output = R>) -> impl Future<Output = R>;
}

impl<S: AsyncCacheStore<K, R> + ?Sized, K, R: Outcome> AsyncCacheStoreRef<K, R> for S {
    #[inline]
    fn run_in_store_async(&self, key: K, body: impl Future<Output = R>) -> impl Future<Output = R> {
        self.run_cached_async(key, body)
    }
}

impl<K, V, S, R> CacheStore<K, R> for Cache<K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
    R: Outcome<Value = V>,
{
    fn run_cached(&self, key: K, body: impl FnOnce() -> R) -> R {
        match self.lookup_or_lead(key) {
            Lookup::Hit(value) => R::from_cached(value),
            Lookup::Lead(lead) => {
                let outcome = body();
                match outcome.cached_value() {
                    Some(value) => lead.complete(value.clone()),
                    // With `stale_on_error`, the expired value instead of the failure.
                    None => {
                        if let Some(stale) = lead.fail() {
                            return R::from_cached(stale);
                        }
                    }
                }
                outcome
            }
        }
    }
}

impl<K, V, S, R> AsyncCacheStore<K, R> for Cache<K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone,
    R: Outcome<Value = V>,
{
    async fn run_cached_async(&self, key: K, body: impl Future<Output = R>) -> R {
        match self.lookup_or_lead_async(key).await {
            Lookup::Hit(value) => R::from_cached(value),
            Lookup::Lead(lead) => {
                let outcome = body.await;
                match outcome.cached_value() {
                    Some(value) => lead.complete(value.clone()),
                    None => {
                        if let Some(stale) = lead.fail() {
                            return R::from_cached(stale);
                        }
                    }
                }
                outcome
            }
        }
    }
}
