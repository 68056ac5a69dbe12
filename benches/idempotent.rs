//! `#[idempotent]` in numbers, all in one run:
//! - **replay latency** against a `#[cached]` hit on the same arguments (the target:
//!   at most 1.5×): a replay also builds the record key (function, scope, client key), hashes
//!   the request fingerprint, checks the outcome's `ttl` and reports to the replay scope;
//! - **first-execution overhead** against calling the body directly and against the one map
//!   write it cannot avoid (a `DashMap<String, _>` insert of the record; the target:
//!   at most 1.5×), a fresh key per call. A second peer keeps its map bounded inside the
//!   measurement, as the store must (it frees every record it inserted, in bulk): the first
//!   peer's map is cleared in untimed setup, so it never pays for freeing a record, while the
//!   store removes an expired record for each one it stores;
//! - **executions under 64 concurrent duplicates** for a hand-written check-then-act cache
//!   (which awaits between its check and its store, as a handler awaiting its database does)
//!   and for `#[idempotent]`, printed as figures.
//!
//! `cargo bench --bench idempotent`; `cargo run --example bench_report` puts the results in the
//! report.

use std::collections::HashMap;
use std::hash::Hash;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use racefree::idempotency::fingerprint::ProcessHasher;
use racefree::{cached, idempotent, IdempotencyError};

mod support;

#[derive(Debug, Clone, PartialEq)]
struct Charge {
    id: u64,
    cents: u64,
}

fn charge_body(customer: &str, cents: u64) -> Charge {
    Charge {
        id: customer.len() as u64 * 1_000 + cents,
        cents,
    }
}

#[idempotent(key = key, ttl = "1h")]
fn idempotent_charge(key: &str, customer: &str, cents: u64) -> Result<Charge, IdempotencyError> {
    Ok(charge_body(customer, cents))
}

#[cached]
fn cached_charge(key: &str, customer: &str, cents: u64) -> Result<Charge, IdempotencyError> {
    let _ = key;
    Ok(charge_body(customer, cents))
}

// Fresh keys: outcomes live 50 ms, so the store's sweeps keep it from growing with the run.
#[idempotent(key = key, ttl = "50ms")]
fn idempotent_first(key: &str, customer: &str, cents: u64) -> Result<Charge, IdempotencyError> {
    Ok(charge_body(customer, cents))
}

fn direct_first(_key: &str, customer: &str, cents: u64) -> Result<Charge, IdempotencyError> {
    Ok(charge_body(customer, cents))
}

fn replay(c: &mut Criterion) {
    let mut group = c.benchmark_group("idempotent/replay vs cached hit");
    idempotent_charge("order-17", "alice", 500).unwrap();
    cached_charge("order-17", "alice", 500).unwrap();
    group.bench_function("racefree #[cached] hit", |b| {
        b.iter(|| cached_charge(black_box("order-17"), black_box("alice"), black_box(500)))
    });
    group.bench_function("racefree #[idempotent] replay", |b| {
        b.iter(|| idempotent_charge(black_box("order-17"), black_box("alice"), black_box(500)))
    });
    group.finish();
}

fn first_execution(c: &mut Criterion) {
    let mut group = c.benchmark_group("idempotent/first execution vs the body");
    let next = AtomicU64::new(0);
    let fresh_key = || format!("key-{}", next.fetch_add(1, Relaxed));
    group.bench_function("body called directly", |b| {
        b.iter_batched(
            fresh_key,
            |key| direct_first(&key, black_box("alice"), 500),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("racefree #[idempotent] first call", |b| {
        b.iter_batched(
            fresh_key,
            |key| idempotent_first(&key, black_box("alice"), 500),
            BatchSize::SmallInput,
        )
    });
    // The peer: the one map write a first execution cannot avoid, the record under its key
    // (the key copied in, as the call must). Kept below 100 000 entries, like the store.
    let records: dashmap::DashMap<String, Charge> = dashmap::DashMap::new();
    group.bench_function("DashMap<String, _> insert of the record", |b| {
        b.iter_batched(
            || {
                if records.len() > 100_000 {
                    records.clear();
                }
                fresh_key()
            },
            |key| {
                let charge = charge_body(black_box("alice"), 500);
                records.insert(key.as_str().to_owned(), charge.clone());
                Ok::<_, IdempotencyError>(charge)
            },
            BatchSize::SmallInput,
        )
    });
    // The same peer paying for its bound: the clear (every record freed) is measured.
    let bounded: dashmap::DashMap<String, Charge> = dashmap::DashMap::new();
    group.bench_function(
        "DashMap<String, _> insert of the record, bound measured",
        |b| {
            b.iter_batched(
                fresh_key,
                |key| {
                    if bounded.len() > 100_000 {
                        bounded.clear();
                    }
                    let charge = charge_body(black_box("alice"), 500);
                    bounded.insert(key.as_str().to_owned(), charge.clone());
                    Ok::<_, IdempotencyError>(charge)
                },
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

/// The request fingerprint on its own (part of every first execution and every replay): a
/// small request, and one the size of a typical JSON body's fields (~200 bytes hashed); the
/// stable one (BLAKE3, any `store = ...`) and the one a function's own in-process store uses
/// (SipHash-2-4 under a per-process key).
fn fingerprint(c: &mut Criterion) {
    let mut group = c.benchmark_group("idempotent/request fingerprint");
    let small = ("alice", 500_u64);
    let typical = (
        "ward-3".to_owned(),
        48_u32,
        (1..=7)
            .map(|day| format!("day {day} early/late/night"))
            .collect::<Vec<_>>(),
    );
    group.bench_function("small request (2 fields)", |b| {
        b.iter(|| racefree::Fingerprint::of(black_box(&small)))
    });
    group.bench_function("typical request (~200 bytes)", |b| {
        b.iter(|| racefree::Fingerprint::of(black_box(&typical)))
    });
    let in_process = |request: &dyn Fn(&mut ProcessHasher)| {
        let mut hasher = ProcessHasher::new();
        request(&mut hasher);
        hasher.fingerprint()
    };
    group.bench_function("small request (2 fields), own store", |b| {
        b.iter(|| in_process(&|hasher| black_box(&small).hash(hasher)))
    });
    group.bench_function("typical request (~200 bytes), own store", |b| {
        b.iter(|| in_process(&|hasher| black_box(&typical).hash(hasher)))
    });
    group.finish();
}

/// What many services write: look the key up; on a miss, execute and store the response.
#[derive(Default)]
struct CheckThenAct {
    responses: Mutex<HashMap<String, Charge>>,
    executions: AtomicUsize,
}

impl CheckThenAct {
    async fn charge(&self, key: &str, customer: &str, cents: u64) -> Charge {
        if let Some(stored) = self.responses.lock().unwrap().get(key) {
            return stored.clone();
        }
        tokio::task::yield_now().await; // the payment provider's round trip
        self.executions.fetch_add(1, Relaxed);
        let charge = charge_body(customer, cents);
        self.responses
            .lock()
            .unwrap()
            .insert(key.to_owned(), charge.clone());
        charge
    }
}

static STAMPEDE_EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = key)]
async fn stampede_charge(
    key: &str,
    customer: &str,
    cents: u64,
) -> Result<Charge, IdempotencyError> {
    tokio::task::yield_now().await; // the payment provider's round trip
    STAMPEDE_EXECUTIONS.fetch_add(1, Relaxed);
    Ok(charge_body(customer, cents))
}

// 64 concurrent duplicates of one request on a 2-worker runtime, released by a barrier, 20
// rounds with a fresh key each: total executions of each implementation (1 per round is right).
fn duplicates(_: &mut Criterion) {
    const CALLERS: usize = 64;
    const ROUNDS: usize = 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let naive = Arc::new(CheckThenAct::default());
    runtime.block_on(async {
        for round in 0..ROUNDS {
            let barrier = Arc::new(tokio::sync::Barrier::new(2 * CALLERS));
            let key: Arc<str> = format!("dup-{round}").into();
            let calls: Vec<_> = (0..CALLERS)
                .flat_map(|_| {
                    let (naive, barrier_a, key_a) = (naive.clone(), barrier.clone(), key.clone());
                    let (barrier_b, key_b) = (barrier.clone(), key.clone());
                    [
                        tokio::spawn(async move {
                            barrier_a.wait().await;
                            let _ = naive.charge(&key_a, "alice", 500).await;
                        }),
                        tokio::spawn(async move {
                            barrier_b.wait().await;
                            let _ = stampede_charge(&key_b, "alice", 500).await.unwrap();
                        }),
                    ]
                })
                .collect();
            for call in calls {
                call.await.unwrap();
            }
        }
    });
    let group = "idempotent/64 concurrent duplicates x 20 rounds";
    support::figure(
        group,
        "check-then-act executions",
        naive.executions.load(Relaxed) as f64,
        "runs",
    );
    support::figure(
        group,
        "racefree #[idempotent] executions",
        STAMPEDE_EXECUTIONS.load(Relaxed) as f64,
        "runs",
    );
}

fn config() -> Criterion {
    support::criterion().measurement_time(Duration::from_millis(1500))
}

criterion_group! { name = benches; config = config(); targets = replay, first_execution, fingerprint, duplicates }
criterion_main!(benches);
