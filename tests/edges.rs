//! The promise at the edges (issue 9): every function has its own store however it was written,
//! and the attributes work in every signature form. Each test is named after what broke.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use racefree::idempotency::{Claim, RecordKey};
use racefree::{
    cached, idempotent, sequenced, BlockingIdempotencyBackend, Fingerprint, IdempotencyBackend,
    IdempotencyError, IdempotencyStore, Seq,
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
    ($($shape:ident = $factor:literal, $charges:ident;)*) => {$(
        static $charges: AtomicUsize = AtomicUsize::new(0);

        struct $shape;

        impl $shape {
            #[cached]
            fn scaled(x: u64) -> u64 {
                x * $factor
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

            #[sequenced]
            fn ticket(seq: Seq) -> u64 {
                seq.get()
            }
        }
    )*};
}

shapes! {
    Tri = 3, TRI_CHARGES;
    Quad = 4, QUAD_CHARGES;
}

#[test]
fn functions_from_one_macro_rules_invocation_no_longer_share_a_cache() {
    assert_eq!((Tri::scaled(10), Quad::scaled(10)), (30, 40));
    assert_eq!((Tri::scaled(10), Quad::scaled(10)), (30, 40));
    let (tri, quad) = (Tri::scaled_cache(), Quad::scaled_cache());
    assert!(!std::ptr::eq(tri, quad), "one cache for two functions");
    assert_eq!((tri.stats().hits, tri.stats().executions), (1, 1));
    assert_eq!((quad.stats().hits, quad.stats().executions), (1, 1));
    assert!(tri.name().contains("Tri::scaled"), "{}", tri.name());
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
    let keys = SEEN_KEYS.lock().unwrap().clone();
    assert_eq!(
        keys,
        [
            "edges::Tri::charge_shared##k",
            "edges::Quad::charge_shared##k"
        ]
    );
}
