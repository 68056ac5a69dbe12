//! The promise at the edges (issue 9): every function has its own store however it was written,
//! and the attributes work in every signature form. Each test is named after what broke.

use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use racefree::idempotency::{Claim, RecordKey};
use racefree::{
    cached, idempotent, sequenced, BlockingIdempotencyBackend, Fingerprint, IdempotencyBackend,
    IdempotencyError, IdempotencyStore, Seq, SequenceError,
};

// ---------------------------------------------------------------------------------------------
// 1. Function identity: one `macro_rules!` invocation generating the same function names in two
//    impls used to give them one store (the id used `line!()`/`column!()`, which resolve to the
//    invocation), so `Quad::scaled(10)` returned Tri's 30.

/// Every key the idempotency layer asked its store about, as text.
static SEEN_KEYS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// An in-process store that writes down the record keys it is asked about.
struct RecordingStore(IdempotencyStore<u64>);

type Inner = IdempotencyStore<u64>;

impl IdempotencyBackend<u64> for RecordingStore {
    type Lease = <Inner as IdempotencyBackend<u64>>::Lease;
    type InFlight = <Inner as IdempotencyBackend<u64>>::InFlight;

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<u64, Self::Lease, Self::InFlight>, IdempotencyError> {
        SEEN_KEYS.lock().unwrap().push(key.as_str().to_owned());
        IdempotencyBackend::claim(&self.0, key, fingerprint).await
    }
    async fn wait(
        &self,
        key: &RecordKey,
        in_flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>, IdempotencyError> {
        IdempotencyBackend::wait(&self.0, key, in_flight, deadline).await
    }
    async fn complete(
        &self,
        lease: Self::Lease,
        outcome: &u64,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        IdempotencyBackend::complete(&self.0, lease, outcome, ttl).await
    }
    fn release(&self, lease: Self::Lease) {
        IdempotencyBackend::release(&self.0, lease)
    }
}

impl BlockingIdempotencyBackend<u64> for RecordingStore {
    fn claim_blocking(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Claim<u64, Self::Lease, Self::InFlight>, IdempotencyError> {
        SEEN_KEYS.lock().unwrap().push(key.as_str().to_owned());
        self.0.claim_blocking(key, fingerprint)
    }
    fn wait_blocking(
        &self,
        key: &RecordKey,
        in_flight: Self::InFlight,
        deadline: Option<Instant>,
    ) -> Result<Option<u64>, IdempotencyError> {
        self.0.wait_blocking(key, in_flight, deadline)
    }
    fn complete_blocking(
        &self,
        lease: Self::Lease,
        outcome: &u64,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        self.0.complete_blocking(lease, outcome, ttl)
    }
}

static SHARED: std::sync::LazyLock<RecordingStore> =
    std::sync::LazyLock::new(|| RecordingStore(IdempotencyStore::new()));

macro_rules! shapes {
    ($($shape:ident = $factor:literal, $charges:ident, $areas:ident;)*) => {$(
        static $charges: AtomicUsize = AtomicUsize::new(0);
        static $areas: AtomicUsize = AtomicUsize::new(0);

        struct $shape;

        impl $shape {
            #[cached]
            fn scaled(x: u64) -> u64 {
                x * $factor
            }

            #[cached]
            fn area(x: u64) -> u64 {
                $areas.fetch_add(1, SeqCst);
                x * x * $factor
            }

            #[idempotent(key = key)]
            fn charge(key: &str) -> Result<u64, IdempotencyError> {
                $charges.fetch_add(1, SeqCst);
                Ok($factor)
            }

            /// One store shared on purpose: records must still not meet.
            #[idempotent(key = key, store = SHARED)]
            fn charge_shared(key: &str) -> Result<u64, IdempotencyError> {
                Ok($factor)
            }

            /// A method of an inherent impl: its path names `Self` already.
            #[idempotent(key = key, store = SHARED)]
            fn charge_method(&self, key: &str) -> Result<u64, IdempotencyError> {
                Ok($factor)
            }

            #[sequenced]
            fn ticket(seq: Seq) -> u64 {
                seq.get()
            }
        }
    )*};
}

shapes! {
    Tri = 3, TRI_CHARGES, TRI_AREAS;
    Quad = 4, QUAD_CHARGES, QUAD_AREAS;
}

#[test]
fn functions_from_one_macro_rules_invocation_no_longer_share_a_cache() {
    assert_eq!((Tri::scaled(10), Quad::scaled(10)), (30, 40));
    assert_eq!((Tri::scaled(10), Quad::scaled(10)), (30, 40));
    let (tri, quad) = (Tri::scaled_cache(), Quad::scaled_cache());
    assert!(
        !std::ptr::eq(tri.handle(), quad.handle()),
        "one cache for two functions"
    );
    assert_eq!((tri.stats().hits, tri.stats().executions), (1, 1));
    assert_eq!((quad.stats().hits, quad.stats().executions), (1, 1));
    assert!(tri.name().contains("Tri::scaled"), "{}", tri.name());
}

/// 8 callers released by one barrier per round, 20 rounds, half calling `Tri::area`, half
/// `Quad::area` with the round's key. Every round each caller gets its own type's value, and
/// each of the two bodies ran exactly once for the key.
#[test]
fn concurrent_callers_of_macro_generated_twins_each_get_their_own_value() {
    const CALLERS: usize = 8;
    const ROUNDS: u64 = 20;
    for round in 0..ROUNDS {
        let barrier = Barrier::new(CALLERS);
        let values: Vec<(usize, u64)> = std::thread::scope(|s| {
            let callers: Vec<_> = (0..CALLERS)
                .map(|caller| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        match caller % 2 {
                            0 => (caller, Tri::area(round)),
                            _ => (caller, Quad::area(round)),
                        }
                    })
                })
                .collect();
            callers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for (caller, value) in values {
            let factor = if caller % 2 == 0 { 3 } else { 4 };
            assert_eq!(
                value,
                round * round * factor,
                "round {round}, caller {caller}"
            );
        }
        let runs = (TRI_AREAS.load(SeqCst), QUAD_AREAS.load(SeqCst));
        let expected = (round as usize + 1, round as usize + 1);
        assert_eq!(runs, expected, "round {round}: executions per type");
    }
}

#[test]
fn functions_from_one_macro_rules_invocation_no_longer_replay_each_other() {
    assert_eq!(Tri::charge("order-1"), Ok(3));
    assert_eq!(Quad::charge("order-1"), Ok(4));
    assert_eq!(Quad::charge("order-1"), Ok(4));
    assert_eq!(
        (TRI_CHARGES.load(SeqCst), QUAD_CHARGES.load(SeqCst)),
        (1, 1)
    );
}

#[test]
fn functions_from_one_macro_rules_invocation_no_longer_share_a_sequence() {
    let tri: Vec<u64> = (0..3).map(|_| Tri::ticket()).collect();
    let quad: Vec<u64> = (0..3).map(|_| Quad::ticket()).collect();
    assert_eq!((tri, quad), (vec![1, 2, 3], vec![1, 2, 3]));
}

#[test]
fn record_keys_name_the_self_type_and_no_line() {
    assert_eq!(Tri::charge_shared("k"), Ok(3));
    assert_eq!(
        Quad::charge_shared("k"),
        Ok(4),
        "Quad replayed Tri's record"
    );
    assert_eq!(
        (Tri.charge_method("k"), Quad.charge_method("k")),
        (Ok(3), Ok(4))
    );
    assert_eq!((Books(1).book("k"), Games(1).book("k")), (Ok(1), Ok(1)));
    let keys = SEEN_KEYS.lock().unwrap().clone();
    let expected = [
        "edges::Tri::charge_shared##k",
        "edges::Quad::charge_shared##k",
        "edges::Tri::charge_method##k",
        "edges::Quad::charge_method##k",
        // A default method: its path is the trait's, its scope the implementor.
        "edges::Catalog::book#12:edges::Books#k",
        "edges::Catalog::book#12:edges::Games#k",
    ];
    assert_eq!(keys, expected);
}

/// Issue 9.1: two functions whose record paths cannot differ (same module, same name: here
/// in sibling blocks of one function) used to share one store's records silently, so the
/// second replayed the first's outcome. The second to run is now refused with
/// `SharedRecords` (its body does not run) naming both sites; distinct `scope`s separate them.
#[test]
fn same_named_functions_sharing_a_store_are_refused_instead_of_mixing_records() {
    static SHARED: std::sync::LazyLock<IdempotencyStore<u64>> =
        std::sync::LazyLock::new(IdempotencyStore::new);
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let first = {
        #[idempotent(key = key, store = SHARED)]
        fn refund(key: &str) -> Result<u64, IdempotencyError> {
            RUNS.fetch_add(1, SeqCst);
            Ok(1)
        }
        refund
    };
    let second = {
        #[idempotent(key = key, store = SHARED)]
        fn refund(key: &str) -> Result<u64, IdempotencyError> {
            RUNS.fetch_add(1, SeqCst);
            Ok(2)
        }
        refund
    };
    assert_eq!(first("r-1"), Ok(1));
    assert_eq!(first("r-1"), Ok(1), "the first keeps working");
    match second("r-1") {
        Err(IdempotencyError::SharedRecords { first, second, .. }) => {
            assert!(first.contains("edges.rs") && second.contains("edges.rs"));
            assert_ne!(first, second);
        }
        other => panic!("the second function replayed or ran: {other:?}"),
    }
    assert_eq!(RUNS.load(SeqCst), 1, "the refused body did not run");

    let tenant_a = {
        #[idempotent(key = key, store = SHARED, scope = "a")]
        fn void(key: &str) -> Result<u64, IdempotencyError> {
            Ok(10)
        }
        void
    };
    let tenant_b = {
        #[idempotent(key = key, store = SHARED, scope = "b")]
        fn void(key: &str) -> Result<u64, IdempotencyError> {
            Ok(20)
        }
        void
    };
    assert_eq!((tenant_a("v-1"), tenant_b("v-1")), (Ok(10), Ok(20)));
}

// ---------------------------------------------------------------------------------------------
// 2. A `&self` method without `key` or `store` used to key on its other arguments only, so
//    instance B got instance A's value. That is now a compile error
//    (tests/ui/cached-method-without-key.rs) unless the method opts in with `shared`.

struct Rates {
    bank: &'static str,
}

static RATE_LOOKUPS: AtomicUsize = AtomicUsize::new(0);

impl Rates {
    /// Every bank quotes the same rate: one cache for all instances, on purpose.
    #[cached(shared)]
    fn rate(&self, currency: &str) -> u64 {
        RATE_LOOKUPS.fetch_add(1, SeqCst);
        currency.len() as u64
    }

    #[cached(key = (self.bank, currency.to_owned()))]
    fn quote(&self, currency: &str) -> String {
        format!("{} {currency}", self.bank)
    }
}

#[test]
fn shared_method_cache_is_one_for_all_instances_and_a_keyed_one_is_per_instance() {
    let (a, b) = (Rates { bank: "a" }, Rates { bank: "b" });
    assert_eq!((a.rate("EUR"), b.rate("EUR")), (3, 3));
    assert_eq!(RATE_LOOKUPS.load(SeqCst), 1, "shared: b reuses a's value");
    assert_eq!(
        (a.quote("EUR"), b.quote("EUR")),
        ("a EUR".into(), "b EUR".into())
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Signatures: trait impls used to fail with E0407 (the accessor is not a trait member), a
//    trait default method became not dyn-compatible (E0038), `-> impl Trait` under #[sequenced]
//    failed with E0562. Methods with a receiver get no accessor now; `impl Trait` is erased to
//    `_` where the expansion writes the type.

trait Meter {
    fn id(&self) -> u64;

    /// A default method: the trait must stay dyn-compatible.
    #[cached(key = self.id())]
    fn reading(&self) -> u64 {
        METER_READS.fetch_add(1, SeqCst);
        self.id() * 100
    }

    fn charge(&self, key: &str) -> Result<u64, IdempotencyError>;

    fn ticket(&self) -> u64;
}

/// `async fn` in a trait makes it not dyn-compatible on its own: a trait of its own.
trait Load {
    async fn load(&self, n: u64) -> u64;
}

static METER_READS: AtomicUsize = AtomicUsize::new(0);
static METER_CHARGES: AtomicUsize = AtomicUsize::new(0);
static METER_LOADS: AtomicUsize = AtomicUsize::new(0);

struct Gauge(u64);

impl Meter for Gauge {
    fn id(&self) -> u64 {
        self.0
    }

    #[idempotent(key = key)]
    fn charge(&self, key: &str) -> Result<u64, IdempotencyError> {
        METER_CHARGES.fetch_add(1, SeqCst);
        Ok(self.0)
    }

    #[sequenced(key = self.0)]
    fn ticket(&self, seq: Seq) -> u64 {
        seq.get()
    }
}

impl Load for Gauge {
    #[cached(key = (self.0, n))]
    async fn load(&self, n: u64) -> u64 {
        METER_LOADS.fetch_add(1, SeqCst);
        self.0 + n
    }
}

#[test]
fn attributes_compile_in_trait_impls_and_default_methods_and_the_trait_stays_dyn_compatible() {
    let meters: [&dyn Meter; 2] = [&Gauge(1), &Gauge(2)];
    let readings: Vec<u64> = meters.iter().chain(&meters).map(|m| m.reading()).collect();
    assert_eq!(readings, [100, 200, 100, 200]);
    assert_eq!(METER_READS.load(SeqCst), 2);

    let gauge = Gauge(7);
    assert_eq!((gauge.charge("c-1"), gauge.charge("c-1")), (Ok(7), Ok(7)));
    assert_eq!(METER_CHARGES.load(SeqCst), 1);
    assert_eq!(
        (gauge.ticket(), gauge.ticket(), Gauge(8).ticket()),
        (1, 2, 1)
    );
}

#[test]
fn async_fn_in_a_trait_impl_is_cached() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let gauge = Gauge(5);
    let loads = rt.block_on(async {
        (
            gauge.load(1).await,
            gauge.load(1).await,
            gauge.load(2).await,
        )
    });
    assert_eq!(loads, (6, 6, 7));
    assert_eq!(METER_LOADS.load(SeqCst), 2);
}

/// Associated functions without `self`, in a trait and its impl.
trait Registry {
    fn lookup(id: u64) -> u64;
    fn enroll(key: &str) -> Result<u64, IdempotencyError>;
    fn serial(desk: u8) -> u64;
}

struct Office;

static OFFICE_LOOKUPS: AtomicUsize = AtomicUsize::new(0);
static OFFICE_ENROLLS: AtomicUsize = AtomicUsize::new(0);

impl Registry for Office {
    #[cached(no_accessor)]
    fn lookup(id: u64) -> u64 {
        OFFICE_LOOKUPS.fetch_add(1, SeqCst);
        id * 2
    }

    #[idempotent(key = key, no_accessor)]
    fn enroll(key: &str) -> Result<u64, IdempotencyError> {
        Ok(OFFICE_ENROLLS.fetch_add(1, SeqCst) as u64 + 1)
    }

    #[sequenced(key = desk, no_accessor)]
    fn serial(desk: u8, seq: Seq) -> u64 {
        let _ = desk;
        seq.get()
    }
}

/// Issue 9.3: an associated function without `self` in a trait impl got an accessor, which is
/// not a trait member (E0407). With `no_accessor` it compiles and keeps its own store.
#[test]
fn associated_functions_in_a_trait_impl_compile_with_no_accessor() {
    assert_eq!((Office::lookup(4), Office::lookup(4)), (8, 8));
    assert_eq!(OFFICE_LOOKUPS.load(SeqCst), 1, "the second call was a hit");
    assert_eq!(
        (Office::enroll("e-1"), Office::enroll("e-1")),
        (Ok(1), Ok(1))
    );
    assert_eq!(OFFICE_ENROLLS.load(SeqCst), 1, "the second call replayed");
    assert_eq!(
        (Office::serial(1), Office::serial(1), Office::serial(2)),
        (1, 2, 1)
    );
}

#[sequenced]
fn label(seq: Seq) -> impl Display {
    format!("#{seq}")
}

#[sequenced(key = desk, timeout = "10s")]
async fn async_label(desk: u8, seq: Seq) -> Result<impl Display, SequenceError> {
    Ok(format!("{desk}-{seq}"))
}

#[test]
fn sequenced_returns_impl_trait() {
    assert_eq!(
        (label().to_string(), label().to_string()),
        ("#1".into(), "#2".into())
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let numbered = rt.block_on(async { async_label(3).await.unwrap().to_string() });
    assert_eq!(numbered, "3-1");
}

/// Trait default methods are one function for every implementor: their own stores used to be
/// shared, so `Games(1).title()` returned `Books(1)`'s title. Entries are now per implementor.
trait Catalog {
    fn shop(&self) -> u64;
    fn label(&self) -> &'static str;

    #[cached(key = self.shop())]
    fn title(&self) -> String {
        format!("{} {}", self.label(), self.shop())
    }

    #[idempotent(key = key)]
    fn order(&self, key: &str) -> Result<&'static str, IdempotencyError> {
        Ok(self.label())
    }

    #[sequenced(key = self.shop())]
    fn invoice(&self, seq: Seq) -> u64 {
        seq.get()
    }

    #[idempotent(key = key, store = SHARED)]
    fn book(&self, key: &str) -> Result<u64, IdempotencyError> {
        Ok(self.label().len() as u64 - 4)
    }
}

struct Books(u64);
struct Games(u64);

impl Catalog for Books {
    fn shop(&self) -> u64 {
        self.0
    }
    fn label(&self) -> &'static str {
        "books"
    }
}

impl Catalog for Games {
    fn shop(&self) -> u64 {
        self.0
    }
    fn label(&self) -> &'static str {
        "games"
    }
}

#[test]
fn default_methods_keep_each_implementors_entries_apart() {
    let shops: [&dyn Catalog; 2] = [&Books(1), &Games(1)];
    let titles: Vec<String> = shops.iter().map(|s| s.title()).collect();
    assert_eq!(titles, ["books 1", "games 1"]);
    let orders: Vec<_> = shops.iter().map(|s| s.order("o-1")).collect();
    assert_eq!(orders, [Ok("books"), Ok("games")]);
    let invoices: Vec<u64> = shops.iter().chain(&shops).map(|s| s.invoice()).collect();
    assert_eq!(invoices, [1, 1, 2, 2]);
}
