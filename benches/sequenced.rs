//! `#[sequenced]` against the hand-written alternatives, in one short run:
//! - uncontended call overhead (one key, one caller) vs a bare `tokio::sync::Mutex`
//!   lock/unlock (target: at most 3x) and vs `AtomicU64::fetch_add` (the lower bound: a number
//!   with neither gap-freedom nor mutual exclusion);
//! - contended throughput, 2 threads on one key, vs a `Mutex<HashMap<K, u64>>` counter, a
//!   `tokio::sync::Mutex` (FIFO, as `#[sequenced]` is) and a `std::sync::Mutex` (barging);
//! - the cost of 100,000 distinct keys (lock entry created and removed per call; with `Seq`,
//!   one counter kept per key) vs the same `Mutex<HashMap>`.
//!
//! `cargo bench --bench sequenced` (about 30 s).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use racefree::{sequenced, Seq, SequenceBackend, SequenceLease, Sequencer};

#[sequenced(key = key)]
fn next_number(key: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = key)]
fn serialized(key: u64) -> u64 {
    key
}

#[sequenced(key = key)]
async fn next_number_async(key: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = key)]
fn contended(key: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = key)]
fn distinct(key: u64) -> u64 {
    key
}

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mutex = tokio::sync::Mutex::new(0_u64);
    let atomic = AtomicU64::new(0);
    let mut g = c.benchmark_group("sequenced/uncontended");
    g.bench_function("#[sequenced] sync, Seq", |b| {
        b.iter(|| next_number(black_box(1)))
    });
    g.bench_function("#[sequenced] sync, no Seq", |b| {
        b.iter(|| serialized(black_box(1)))
    });
    g.bench_function("#[sequenced] async, Seq", |b| {
        b.to_async(&rt).iter(|| next_number_async(black_box(1)))
    });
    g.bench_function("tokio::sync::Mutex lock+unlock", |b| {
        b.to_async(&rt).iter(|| async {
            let mut guard = mutex.lock().await;
            *guard += 1;
            black_box(*guard)
        })
    });
    g.bench_function("AtomicU64::fetch_add", |b| {
        b.iter(|| black_box(atomic.fetch_add(1, Ordering::Relaxed)))
    });
    g.finish();
}

/// Runs `per_thread` calls on each of 2 threads released by one barrier; the elapsed time of
/// the slower thread.
fn two_threads(per_thread: u64, call: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..per_thread {
                        call();
                    }
                    start.elapsed()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .max()
            .unwrap()
    })
}

fn contention(c: &mut Criterion) {
    let map: Mutex<HashMap<u64, u64>> = Mutex::new(HashMap::new());
    let mut g = c.benchmark_group("sequenced/contended, 2 threads, one key");
    // Time per call over both threads: elapsed / (2 * per_thread).
    g.bench_function("#[sequenced] sync, Seq", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), || {
                black_box(contended(7));
            })
        })
    });
    g.bench_function("Mutex<HashMap<u64, u64>>", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), || {
                let mut map = map.lock().unwrap();
                let next = map.entry(7).or_insert(0);
                *next += 1;
                black_box(*next);
            })
        })
    });
    // The two locks a hand-written per-key section would use: tokio's is FIFO like
    // #[sequenced] (a waiter is handed the lock in arrival order); std's lets the releasing
    // thread barge back in, which is faster under contention and unfair.
    let fifo = tokio::sync::Mutex::new(0_u64);
    g.bench_function("tokio::sync::Mutex (FIFO) blocking_lock", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), || {
                let mut next = fifo.blocking_lock();
                *next += 1;
                black_box(*next);
            })
        })
    });
    let barging = Mutex::new(0_u64);
    g.bench_function("std::sync::Mutex (barging)", |b| {
        b.iter_custom(|iters| {
            two_threads(iters.div_ceil(2), || {
                let mut next = barging.lock().unwrap();
                *next += 1;
                black_box(*next);
            })
        })
    });
    g.finish();
}

fn many_keys(c: &mut Criterion) {
    const KEYS: u64 = 100_000;
    let mut g = c.benchmark_group("sequenced/100k distinct keys");
    g.sample_size(10);
    let offset = Arc::new(AtomicU64::new(0));
    // The attribute without `Seq`: a lock entry made and removed per key, nothing kept.
    g.bench_function(BenchmarkId::new("#[sequenced] no Seq", KEYS), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let base = offset.fetch_add(KEYS, Ordering::Relaxed);
                for key in base..base + KEYS {
                    black_box(distinct(key));
                }
            }
            start.elapsed()
        })
    });
    // With numbers: one counter per key stays, so each batch gets a fresh sequencer (dropped
    // outside the timing).
    g.bench_function(
        BenchmarkId::new("Sequencer acquire+next+commit", KEYS),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let sequencer = Sequencer::new();
                    let start = Instant::now();
                    for key in 0..KEYS {
                        let mut lease = sequencer.acquire(key, None).unwrap();
                        let n = lease.next().unwrap().unwrap_or(1);
                        lease.commit(n).unwrap();
                    }
                    total += start.elapsed();
                    assert_eq!(sequencer.counters(), KEYS as usize);
                }
                total
            })
        },
    );
    g.bench_function(BenchmarkId::new("Mutex<HashMap<u64, u64>>", KEYS), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let map: Mutex<HashMap<u64, u64>> = Mutex::new(HashMap::new());
                let start = Instant::now();
                for key in 0..KEYS {
                    let mut map = map.lock().unwrap();
                    *map.entry(key).or_insert(0) += 1;
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
    assert_eq!(
        distinct_sequence().locked(),
        0,
        "idle keys leave no lock entry"
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .configure_from_args()
}

criterion_group! { name = benches; config = config(); targets = uncontended, contention, many_keys }
criterion_main!(benches);
