//! The function-owned stores of `#[idempotent]`, reachable without naming their types.
//!
//! Like `#[cached]`'s [`CacheHandle`](crate::CacheHandle): a `static` cannot name the inferred
//! outcome type, so it holds an [`IdempotencyHandle`] that creates the typed
//! [`IdempotencyStore`] on first use (one per concrete outcome type, for generic functions).
//! The generated `fn <name>_idempotency_store()` finds the same handle by the function's id.

use super::memory::{IdempotencyConfig, IdempotencyStats, IdempotencyStore};
use crate::function::{FunctionCell, Home, PerType, Registry};

trait ErasedStore: Send + Sync {
    fn len(&self) -> usize;
    fn in_flight(&self) -> usize;
    fn purge_expired(&self);
    fn clear(&self);
    fn stats(&self) -> IdempotencyStats;
}

impl<T: Clone + Send + Sync + 'static> ErasedStore for IdempotencyStore<T> {
    fn len(&self) -> usize {
        IdempotencyStore::len(self)
    }
    fn in_flight(&self) -> usize {
        IdempotencyStore::in_flight(self)
    }
    fn purge_expired(&self) {
        IdempotencyStore::purge_expired(self)
    }
    fn clear(&self) {
        IdempotencyStore::clear(self)
    }
    fn stats(&self) -> IdempotencyStats {
        IdempotencyStore::stats(self)
    }
}

/// The idempotency store of one `#[idempotent]` function, as returned by the generated
/// `fn <name>_idempotency_store()`.
///
/// ```
/// use racefree_runtime::idempotent::IdempotencyConfig;
/// use racefree_runtime::idempotent::IdempotencyCell;
///
/// // What `#[idempotent]` declares for `fn charge` (the macro also generates
/// // `fn charge_idempotency_store() -> &'static IdempotencyHandle`).
/// static CHARGE: IdempotencyCell = IdempotencyCell::new("billing::charge@3:4", IdempotencyConfig::new());
///
/// let store = CHARGE.handle().store::<u64>();   // the outcome type, inferred in generated code
/// assert!(std::ptr::eq(store, CHARGE.handle().store::<u64>()));
/// assert_eq!((CHARGE.handle().len(), CHARGE.handle().stats().executions), (0, 0));
/// ```
pub struct IdempotencyHandle {
    name: &'static str,
    config: IdempotencyConfig,
    stores: PerType<dyn ErasedStore>,
}

impl IdempotencyHandle {
    /// The function's store for outcomes of type `T`, created on first use.
    #[inline]
    pub fn store<T: Clone + Send + Sync + 'static>(&self) -> &'static IdempotencyStore<T> {
        self.stores.get_or_create(
            || IdempotencyStore::with_config(self.config, self.name),
            |store| store,
        )
    }

    /// The function's store for `store_errors` outcomes, `Result<O, E>`: [`store`](Self::store)
    /// with the error's bound spelled out, so that an error type that is not `Clone` is reported
    /// as what `store_errors` needs of it.
    #[inline]
    pub fn store_with_errors<O, E>(&self) -> &'static IdempotencyStore<Result<O, E>>
    where
        O: Clone + Send + Sync + 'static,
        E: StorableError,
    {
        self.store()
    }

    fn each(&self) -> Vec<&'static dyn ErasedStore> {
        self.stores.each()
    }

    /// Records kept (in flight and done, expired ones not yet purged included).
    pub fn len(&self) -> usize {
        self.each().iter().map(|s| s.len()).sum()
    }

    /// `true` when no record is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys being executed right now.
    pub fn in_flight(&self) -> usize {
        self.each().iter().map(|s| s.in_flight()).sum()
    }

    /// Removes expired outcomes now (they are also purged as new outcomes are stored).
    pub fn purge_expired(&self) {
        self.each().iter().for_each(|s| s.purge_expired());
    }

    /// Forgets every stored outcome.
    pub fn clear(&self) {
        self.each().iter().for_each(|s| s.clear());
    }

    /// Executions, replays, waits and conflicts so far.
    pub fn stats(&self) -> IdempotencyStats {
        self.each()
            .iter()
            .fold(IdempotencyStats::default(), |sum, s| {
                let s = s.stats();
                let mut total = sum;
                total.executions += s.executions;
                total.replays += s.replays;
                total.waits += s.waits;
                total.conflicts += s.conflicts;
                total
            })
    }

    /// The function this store belongs to.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for IdempotencyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyHandle")
            .field("name", &self.name)
            .field("len", &self.len())
            .finish()
    }
}

impl Home for IdempotencyHandle {
    type Config = IdempotencyConfig;
    fn open(id: &'static str, config: IdempotencyConfig) -> Self {
        IdempotencyHandle {
            name: id,
            config,
            stores: PerType::new(),
        }
    }
    fn registry() -> &'static Registry<Self> {
        static REGISTRY: Registry<IdempotencyHandle> = Registry::new();
        &REGISTRY
    }
}

/// The `static` an `#[idempotent]` expansion declares.
#[doc(hidden)]
pub type IdempotencyCell = FunctionCell<IdempotencyHandle>;

impl IdempotencyCell {
    #[doc(hidden)]
    pub const fn new(id: &'static str, config: IdempotencyConfig) -> Self {
        FunctionCell::with_config(id, config)
    }
}

/// What `store_errors` needs of the error type with the in-process store: it keeps the `Err`
/// as a value and hands a clone to every later call with the key.
///
/// An error with a source that is not `Clone` (`std::io::Error`, `sqlx::Error`) holds it in an
/// `Arc` and wraps it in its `From`, so that `?` still works:
///
/// ```
/// use std::sync::Arc;
///
/// #[derive(Debug, Clone)]
/// enum PayError {
///     Io(Arc<std::io::Error>),
/// }
///
/// impl From<std::io::Error> for PayError {
///     fn from(e: std::io::Error) -> Self {
///         PayError::Io(Arc::new(e))
///     }
/// }
///
/// fn storable<E: racefree_runtime::idempotent::StorableError>() {}
/// storable::<PayError>();
/// ```
#[diagnostic::on_unimplemented(
    message = "`store_errors` keeps the `Err` and replays it to later calls with the key, so `{Self}` must be `Clone + Send + Sync + 'static`",
    label = "the error type `store_errors` stores",
    note = "derive `Clone` for it, holding a source that is not `Clone` in an `Arc` (`Io(std::sync::Arc<std::io::Error>)`, with a `From<std::io::Error>` that wraps it, so `?` still works); a Redis or SQL store (`store = ...`) needs `Serialize + Deserialize` instead; or remove `store_errors` (an `Err` then frees the key and a retry runs again)"
)]
pub trait StorableError: Clone + Send + Sync + 'static {}

impl<E: Clone + Send + Sync + 'static> StorableError for E {}
