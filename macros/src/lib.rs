//! Procedural macros of [racefree](https://docs.rs/racefree). Depend on `racefree`, not on this
//! crate: the generated code names `::racefree::__private`.
//!
//! Each attribute is a thin shim over its module (`cached.rs`, `idempotent.rs`,
//! `sequenced.rs`), which runs the same three steps: parse the arguments (`args.rs`, one
//! grammar for all three), validate them against the function into a plan of plain data
//! (`validate.rs` for what the attributes share, `shape.rs` for reading the signature), then
//! generate the new body, one small function per step of the expansion sketched in the
//! module's doc (`expand.rs` for the shared pieces, `mode.rs` for sync vs async).

mod args;
mod cached;
mod expand;
mod idempotent;
mod key;
mod mode;
mod sequenced;
mod shape;
mod tx;
mod validate;

use proc_macro::TokenStream;

/// Memoizes a function; on a miss exactly one caller per key runs the body, the others wait
/// for its value.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use racefree::cached;
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct User { id: u64 }
/// #[derive(Debug)]
/// struct DbError;
/// struct Db { queries: AtomicUsize }
///
/// #[cached(key = user_id, ttl = "5m", capacity = 10_000, skip(db))]
/// async fn fetch_user(db: &Db, user_id: u64) -> Result<User, DbError> {
///     db.queries.fetch_add(1, Ordering::SeqCst);
///     if user_id == 0 { return Err(DbError); }         // an `Err` is not cached
///     Ok(User { id: user_id })
/// }
///
/// let db = Db { queries: AtomicUsize::new(0) };
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// rt.block_on(async {
///     assert_eq!(fetch_user(&db, 7).await.unwrap(), User { id: 7 });
///     assert_eq!(fetch_user(&db, 7).await.unwrap(), User { id: 7 });   // a hit
///     assert!(fetch_user(&db, 0).await.is_err());
///     assert!(fetch_user(&db, 0).await.is_err());                      // runs again
/// });
/// assert_eq!(db.queries.load(Ordering::SeqCst), 3);
/// assert!(fetch_user_cache().invalidate(&7_u64));   // the key as the function builds it
/// assert_eq!(fetch_user_cache().stats().hits, 1);
/// ```
///
/// Refresh-ahead, stale values on failure, shared errors, and the per-call answer:
///
/// ```
/// use racefree::{cached, served, Served};
///
/// #[cached(refresh = "30s", ttl = "5m", stale_on_error = "1h", share_errors)]
/// fn rate(pair: String) -> Result<f64, std::sync::Arc<std::io::Error>> {
///     Ok(if pair == "EURUSD" { 1.08 } else { 1.0 })
/// }
///
/// let (value, served) = served::track_sync(|| rate("EURUSD".into()));
/// assert_eq!((value.unwrap(), served), (1.08, Served::Executed));
/// let (value, served) = served::track_sync(|| rate("EURUSD".into()));
/// assert_eq!((value.unwrap(), served), (1.08, Served::Hit));
/// ```
///
/// - `key = <expr>`: the cache key; by default every argument except `self` and those in
///   `skip(...)`, owned (`&str` → `String`; several arguments make a tuple). `&mut` and
///   `impl Trait` arguments cannot be part of the default key.
/// - `ttl = "<humantime duration>"`, `capacity = <integer>`: bounds of the function's own cache
///   (CLOCK eviction past the capacity; expired entries are never returned and are purged as
///   the cache grows).
/// - A `Result` return caches only `Ok`, an `Option` only `Some` (by the return type's last
///   path segment, so `io::Result<T>` counts). When the computing call ends without a value (an
///   `Err`, `None`, a panic, a dropped future) its waiters are released and one of them computes
///   next: each gets its own attempt, one at a time, never a copy of another caller's error.
/// - `share_errors` (a `Result` return with `E: Clone + Send + Sync + 'static`; wrap another
///   `E` in an `Arc`): the waiters of a failed call return a clone of its `Err` instead, so a
///   failing backend is asked once per burst of callers.
/// - `refresh = "30s"` with `ttl = "5m"` (shorter than it): refresh-ahead. A hit on an entry
///   at least `refresh` old still returns it at once and starts exactly one background
///   recompute of the key: a sync function's on a new thread, an async function's with
///   `tokio::spawn` on the caller's runtime (outside a Tokio runtime it is skipped, and the
///   entry is recomputed when its `ttl` ends). Success replaces the value; failure keeps the
///   old one; an invalidation during the refresh wins. The body runs after the call returned,
///   so it must own what it uses: no `self`, no borrowed arguments (compile errors).
/// - `stale_on_error = "10m"` with a `ttl`, on a `Result` return: when the recompute of an
///   expired entry fails, the entry is returned instead of the `Err` (to the computing call
///   and its waiters) up to that long past its `ttl`; counted in `stats().stale_served`.
/// - `racefree::served::track(future)` / `track_sync(f)` tell how a call was answered
///   (`Served::Hit`, `Refreshing`, `Waited`, `Executed`, `Stale`) without changing it.
/// - The value must be `Clone`; every caller gets a clone.
/// - Without `store`, the attribute also emits `fn <name>_cache() -> racefree::Keyed<CacheHandle,
///   K>` (with the function's visibility; see [Where it goes](#where-it-goes)), which derefs to
///   the `racefree::CacheHandle`: `invalidate(&key)` (a key of another type than `K`, or `&str`
///   for a text key, does not compile; `K` is `dyn Any`, checked at run time, where the key type
///   cannot be read off the signature), `clear()`, `len()`, `in_flight()`,
///   `stats()` (`hits`, `coalesced`, `executions`, `refreshes`, `refresh_failures`,
///   `stale_served`). A generic function gets one cache per concrete type.
/// - `store = <expr>`: a store you own instead, e.g. a `racefree::Cache<K, V>` field
///   (`store = self.rows`), or, with the `redis` feature, a `racefree::redis::RedisCacheStore`
///   (async functions returning `Result<T, E>` with `E: From<RedisStoreError>`).
/// - On a method (`&self`, `self`) the default key would be the other arguments only, and
///   every instance would get the value first computed for any of them, so it is a compile
///   error: write `key = (self.<id>, ...)` naming what identifies the instance,
///   `store = self.<field>` for a cache per instance, or `shared` for one cache for all
///   instances.
/// - A default-key argument that cannot be a key (not `Eq + Hash + Clone + Send + Sync +
///   'static` once owned, e.g. a connection pool) is an error at that argument: `skip` it.
/// - Async callers await while they wait (they never block an executor thread); sync callers
///   block their thread.
///
/// # Where it goes
///
/// On any `fn` or `async fn` with a body: free functions, inherent methods, trait impls
/// (`async fn` too) and trait default methods; not on a `const fn`. Every function has its own
/// store, told apart by its path including the `Self` type of a method, also when a
/// `macro_rules!` generates several. The accessor (`fn <name>_cache()`) is emitted beside a
/// function without a `self` receiver only: the attribute cannot see whether a method sits in
/// an inherent impl, a trait impl or a trait, and an added `fn` would not be a member of the
/// trait (E0407) or would make the trait not dyn-compatible. A method that needs to reach its
/// store takes `store = ...`. An associated function without `self` in a trait impl writes
/// `no_accessor` (it keeps its own store, unreachable from outside) or `store = ...`; so does one in a
/// trait. A trait default method (or a method of a generic impl) is one function for every
/// `Self` type: its own store keeps each one's entries apart (and `#[idempotent]` adds the
/// `Self` type to the record's scope whatever the store).
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    cached::expand(args.into(), item.into()).into()
}

/// Executes the body once per idempotency key; duplicates get the stored outcome.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use racefree::{idempotent, IdempotencyError};
///
/// #[derive(Hash)]
/// struct ScheduleRequest { idempotency_key: Option<String>, week: u32 }
/// #[derive(Clone, Debug, PartialEq)]
/// struct ScheduleRun { week: u32 }
/// #[derive(Debug, PartialEq)]
/// enum ApiError { Refused(IdempotencyError) }
/// impl From<IdempotencyError> for ApiError {
///     fn from(e: IdempotencyError) -> Self { ApiError::Refused(e) }
/// }
/// struct Db { runs: AtomicUsize }
///
/// #[idempotent(key = req.idempotency_key.as_deref(), ttl = "24h", skip(db))]
/// async fn generate_schedule(db: &Db, req: &ScheduleRequest) -> Result<ScheduleRun, ApiError> {
///     db.runs.fetch_add(1, Ordering::SeqCst);
///     Ok(ScheduleRun { week: req.week })
/// }
///
/// let db = Db { runs: AtomicUsize::new(0) };
/// let request = |week| ScheduleRequest { idempotency_key: Some("req-1".into()), week };
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// rt.block_on(async {
///     assert_eq!(generate_schedule(&db, &request(12)).await, Ok(ScheduleRun { week: 12 }));
///     assert_eq!(generate_schedule(&db, &request(12)).await, Ok(ScheduleRun { week: 12 }));  // replayed
///     assert_eq!(                                       // same key, other request
///         generate_schedule(&db, &request(13)).await,
///         Err(ApiError::Refused(IdempotencyError::Conflict { key: "req-1".into() })),
///     );
/// });
/// assert_eq!(db.runs.load(Ordering::SeqCst), 1);
/// ```
///
/// - The first call with a key claims it atomically and runs the body; its `Ok` outcome is
///   kept for `ttl` (default `"24h"`). Later calls with the key and the same request
///   fingerprint get that outcome without running anything.
/// - Calls arriving while the body runs wait for its outcome (`in_flight = "wait"`, the
///   default) or get `IdempotencyError::InProgress` at once (`in_flight = "reject"`).
/// - The same key with a different fingerprint is `IdempotencyError::Conflict`; the stored
///   outcome stays.
/// - An `Err`, a panic or a dropped future releases the key: the retry (or one waiter)
///   executes again. `store_errors` keeps `Err` outcomes too (then `E: Clone`, and the whole
///   `Result` is what is stored and replayed; a source that is not `Clone`, such as
///   `std::io::Error`, goes in an `Arc`).
/// - `key = <expr>` evaluates to `&str`, `String` or an `Option` of them; `None` runs the body
///   without idempotency, or refuses with `IdempotencyError::MissingKey` under `require_key`.
/// - Keys are per function and per `scope = <expr>` (any `Display`, e.g. a tenant id). The
///   function part is its path with the `Self` type of a method and no line number
///   (`app::Billing::charge`, `<app::Card as app::Pay>::charge`), the same in every build of
///   the same code, so a shared or persistent store never mixes two functions' records, even
///   ones a `macro_rules!` generates. Moving or renaming the function changes it; so can a
///   compiler release (it is the compiler's `type_name` of the scope): give `scope` to records
///   that must outlive either.
/// - The fingerprint is a stable XXH3-128 hash (`racefree::Fingerprint`) of every argument
///   except `self` and those in `skip(...)`; an argument that *is* the key (`key = order_key`)
///   is left out as well, while an argument the key is read from (`key = req.key.as_deref()`)
///   stays in, since it carries the request. `fingerprint = <expr>` hashes that instead. An
///   argument that is not `Hash` (a connection pool, say) is an error at it: `skip` it.
/// - The default store is the function's own in-process `racefree::IdempotencyStore`
///   (`T: Clone`; `capacity = <int>` bounds it; `fn <name>_idempotency_store()` reaches it);
///   `store = <expr>` names any `racefree::IdempotencyBackend` (a sync `fn` needs a
///   `BlockingIdempotencyBackend`).
/// - Callers that need to know whether an outcome was replayed (`Idempotency-Replayed: true`)
///   wrap the call in `racefree::replay::track(future)` or `track_sync(closure)`; ordinary
///   callers call the function as before.
/// - The function must return `Result<T, E>` with `E: From<racefree::IdempotencyError>`.
/// - With a SQL store (features `postgres`, `sqlite`: `store = <a racefree::sql::PgStore or
///   SqliteStore>`), a parameter whose type is `PgTx<'_>`, `SqliteTx<'_>` or `Tx<'_, D>`
///   (`racefree::sql`) is the store's transaction: supplied by the attribute and removed from
///   the signature callers see, like `seq: Seq`. The body's writes on it (`.execute(&mut *tx)`)
///   commit in one `COMMIT` with the outcome, and roll back with the claim on `Err`, panic, a
///   dropped future or a crash. Such a function must be `async`; a failed `COMMIT` reaches the
///   caller as `IdempotencyError::StoreUnavailable` or `OutcomeUnknown`, never as `Ok`.
///
/// # Where it goes
///
/// On any `fn` or `async fn` with a body: free functions, inherent methods, trait impls
/// (`async fn` too) and trait default methods; not on a `const fn`. Every function has its own
/// store, told apart by its path including the `Self` type of a method, also when a
/// `macro_rules!` generates several. The accessor (`fn <name>_idempotency_store()`) is emitted beside a
/// function without a `self` receiver only: the attribute cannot see whether a method sits in
/// an inherent impl, a trait impl or a trait, and an added `fn` would not be a member of the
/// trait (E0407) or would make the trait not dyn-compatible. A method that needs to reach its
/// store takes `store = ...`. An associated function without `self` in a trait impl writes
/// `no_accessor` (it keeps its own store, unreachable from outside) or `store = ...`; so does one in a
/// trait. A trait default method (or a method of a generic impl) is one function for every
/// `Self` type: its own store keeps each one's entries apart (and `#[idempotent]` adds the
/// `Self` type to the record's scope whatever the store).
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    idempotent::expand(args.into(), item.into()).into()
}

/// Runs calls with the same key one at a time, in arrival order, and hands out gap-free
/// sequence numbers.
///
/// ```
/// use std::sync::Mutex;
/// use racefree::{sequenced, Seq};
///
/// struct EventLog { rows: Mutex<Vec<(String, u64, &'static str)>> }
/// #[derive(Debug)]
/// struct StoreError;
///
/// #[sequenced(key = aggregate_id)]
/// async fn append(log: &EventLog, aggregate_id: &str, event: &'static str, seq: Seq) -> Result<(), StoreError> {
///     if event.is_empty() { return Err(StoreError); }  // consumes no number
///     log.rows.lock().unwrap().push((aggregate_id.to_owned(), seq.get(), event));
///     Ok(())
/// }
///
/// let log = EventLog { rows: Mutex::new(Vec::new()) };
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// rt.block_on(async {
///     append(&log, "cart-9", "created").await.unwrap();      // callers never pass `seq`
///     assert!(append(&log, "cart-9", "").await.is_err());
///     append(&log, "cart-9", "paid").await.unwrap();
///     append(&log, "cart-3", "created").await.unwrap();
/// });
/// let numbers: Vec<(String, u64)> = log.rows.lock().unwrap().iter().map(|r| (r.0.clone(), r.1)).collect();
/// assert_eq!(numbers, [("cart-9".into(), 1), ("cart-9".into(), 2), ("cart-3".into(), 1)]);
/// assert_eq!(append_sequence().next(&"cart-9".to_owned()), Some(3));
/// ```
///
/// Arguments, all optional:
/// - `key = <expr>`: calls with equal keys are serialized (FIFO) and numbered together. The
///   expression is evaluated before the call waits; a reference is kept in its owned form
///   (`&str` as `String`, `&Id` as `Id`), an owned value as it is. The kept type must be
///   `Eq + Hash + Clone + Send + Sync + 'static`. Without `key` the function has one sequence
///   for all callers.
/// - `start = <expr>`: the first number of a key not seen before (default 1), a `u64`.
///   Evaluated once per key, under that key's lock, in the function's own scope: `?` and
///   `.await` work as in the body. Needs a `Seq` parameter.
/// - `timeout = "<duration>"`: wait at most this long for the key; then the call returns
///   `Err(E::from(SequenceError::Timeout))`, so the function must return `Result<T, E>` with
///   `E: From<racefree::SequenceError>`.
/// - `store = <expr>`: a `racefree::SequenceBackend` (e.g. a shared `racefree::Sequencer`, a
///   field `self.sequencer`, or a distributed store) instead of the function's own sequencer.
///   Its errors reach the caller the same way, so it also needs that `Result`.
///
/// A parameter whose type is `Seq` (`racefree::Seq`) is supplied by the attribute and removed
/// from the signature callers see. Its number is consumed only when the call returns `Ok` (or
/// any value, for a function not returning `Result`); an `Err`, a panic or a dropped future
/// leaves it for the next caller, so the numbers of a key are 1, 2, 3, ... in the order the
/// calls finished.
///
/// With a SQL store (`store = db.sequence("name")`, features `postgres`, `sqlite`), a parameter
/// of type `PgTx<'_>`, `SqliteTx<'_>` or `Tx<'_, D>` (`racefree::sql`) is the transaction that
/// holds the key's counter row: supplied by the attribute like `Seq`, so the body's writes and
/// the consumed number commit together (the function must be `async` and take a `Seq`).
///
/// Without `store`, the attribute also emits `fn <name>_sequence() -> racefree::Keyed<SequenceHandle,
/// K>` to read, set and reset a key's next number (see [Where it goes](#where-it-goes)); a key
/// of another type than `K` does not compile (`K` is `dyn Any`, checked at run time, when `key`
/// is not an argument or a tuple of arguments).
///
/// Re-entering a key from inside its own body (the body calls, directly or not, a sequenced
/// function with the same key on the same thread or within the body's future) would deadlock;
/// it is detected and fails with `SequenceError::Reentrant` (returned with `timeout`/`store`,
/// a panic otherwise). A body that hands the re-entering call to another thread or a spawned
/// task and waits for it is not detected: use `timeout` there.
///
/// # Where it goes
///
/// On any `fn` or `async fn` with a body: free functions, inherent methods, trait impls
/// (`async fn` too) and trait default methods; not on a `const fn`. Every function has its own
/// store, told apart by its path including the `Self` type of a method, also when a
/// `macro_rules!` generates several. The accessor (`fn <name>_sequence()`) is emitted beside a
/// function without a `self` receiver only: the attribute cannot see whether a method sits in
/// an inherent impl, a trait impl or a trait, and an added `fn` would not be a member of the
/// trait (E0407) or would make the trait not dyn-compatible. A method that needs to reach its
/// store takes `store = ...`. An associated function without `self` in a trait impl writes
/// `no_accessor` (it keeps its own store, unreachable from outside) or `store = ...`; so does one in a
/// trait. A trait default method (or a method of a generic impl) is one function for every
/// `Self` type: its own store keeps each one's entries apart (and `#[idempotent]` adds the
/// `Self` type to the record's scope whatever the store).
/// `-> impl Trait` works (the expansion writes `_` where it names the return type).
#[proc_macro_attribute]
pub fn sequenced(args: TokenStream, item: TokenStream) -> TokenStream {
    sequenced::expand(args.into(), item.into()).into()
}
