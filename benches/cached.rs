//! `#[cached]` against its peers, all in one run: hit latency (u64 keys and values, 10k warm
//! keys), 2-thread hit throughput, memory for 1M entries, and the stampede / false-blocking
//! figures (executions, wall time) that motivate the crate.
//!
//! `cargo bench --bench cached` (`--features moka` adds `#[cached(store = <moka cache>)]`'s hit;
//! `--features metrics` builds every row with the metrics hooks, no recorder installed, and
//! adds a hit counted by a recorder);
//! `cargo run --example bench_report` turns the results into the
//! README's table of ratios.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;

mod support;

#[global_allocator]
static ALLOC: support::Counting = support::Counting;

const KEYS: u64 = 10_000;

#[inline]
fn key(i: u64) -> u64 {
    // A stride through the key space, so consecutive lookups touch different entries.
    (i.wrapping_mul(7919)) % KEYS
}

#[racefree::cached]
fn racefree_plain(k: u64) -> u64 {
    k
}

#[racefree::cached(ttl = "1h", capacity = 20_000)]
fn racefree_bounded(k: u64) -> u64 {
    k
}

// Its handles are registered with a recorder (see `hits`): each hit bumps a real counter.
#[cfg(feature = "metrics")]
#[racefree::cached]
fn racefree_metered(k: u64) -> u64 {
    k
}

#[racefree::cached]
async fn racefree_async(k: u64) -> u64 {
    k
}

#[racefree::cached]
fn racefree_str(k: &str) -> usize {
    k.len()
}

#[cached::macros::cached(key = "String", convert = "{ k.to_owned() }", sync_writes = "by_key")]
fn cached_by_key_str(k: &str) -> usize {
    k.len()
}

// `store = ` a moka cache (feature `moka`): moka's `get` under racefree's single flight.
#[cfg(feature = "moka")]
static MOKA_STORE: std::sync::LazyLock<moka::sync::Cache<u64, u64>> =
    std::sync::LazyLock::new(|| moka::sync::Cache::new(20_000));

#[cfg(feature = "moka")]
#[racefree::cached(key = k, store = MOKA_STORE)]
fn racefree_moka(k: u64) -> u64 {
    k
}

// A generic function: one cache per concrete type, found by walking the types before it.
// Three types with the same work (a `u64` in a newtype), so the third walks past two.
#[derive(Clone)]
struct Metres(u64);
#[derive(Clone)]
struct Grams(u64);
#[derive(Clone)]
struct Seconds(u64);
impl From<u64> for Metres {
    fn from(k: u64) -> Self {
        Metres(k)
    }
}
impl From<u64> for Grams {
    fn from(k: u64) -> Self {
        Grams(k)
    }
}
impl From<u64> for Seconds {
    fn from(k: u64) -> Self {
        Seconds(k)
    }
}

#[racefree::cached]
fn racefree_generic<T: From<u64> + Clone + Send + Sync + 'static>(k: u64) -> T {
    T::from(k)
}

#[cached::macros::cached]
fn cached_default(k: u64) -> u64 {
    k
}

#[cached::macros::cached(sync_writes = "by_key")]
fn cached_by_key(k: u64) -> u64 {
    k
}

fn hits(c: &mut Criterion) {
    let dashmap: DashMap<u64, u64> = (0..KEYS).map(|k| (k, k)).collect();
    let moka = moka::sync::Cache::<u64, u64>::new(20_000);
    let quick = quick_cache::sync::Cache::<u64, u64>::new(20_000);
    // One loop per cache, as the collected `DashMap` is filled: side by side, the caches that
    // allocate per entry had their entries scattered among the others' (see benches/scaling.rs).
    let fill = |f: &dyn Fn(u64)| (0..KEYS).for_each(f);
    fill(&|k| {
        racefree_plain(k);
    });
    fill(&|k| {
        racefree_generic::<Metres>(k);
    });
    fill(&|k| {
        racefree_generic::<Grams>(k);
    });
    fill(&|k| {
        racefree_generic::<Seconds>(k);
    });
    fill(&|k| {
        racefree_bounded(k);
    });
    #[cfg(feature = "moka")]
    fill(&|k| {
        racefree_moka(k);
    });
    fill(&|k| {
        cached_default(k);
    });
    fill(&|k| {
        cached_by_key(k);
    });
    fill(&|k| moka.insert(k, k));
    fill(&|k| quick.insert(k, k));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for k in 0..KEYS {
            racefree_async(k).await;
        }
    });
    // The cache is created under the recorder, so its handles count into it (atomically).
    #[cfg(feature = "metrics")]
    {
        let recorder = Box::leak(Box::new(metrics_util::debugging::DebuggingRecorder::new()));
        metrics::with_local_recorder(recorder, || {
            for k in 0..KEYS {
                racefree_metered(k);
            }
        });
    }

    let mut g = c.benchmark_group("cached/hit");
    let mut i = 0u64;
    let mut next = move || {
        i = i.wrapping_add(1);
        key(i)
    };
    g.bench_function("racefree", |b| b.iter(|| racefree_plain(black_box(next()))));
    g.bench_function("racefree ttl+capacity", |b| {
        b.iter(|| racefree_bounded(black_box(next())))
    });
    #[cfg(feature = "metrics")]
    g.bench_function("racefree + metrics recorder", |b| {
        b.iter(|| racefree_metered(black_box(next())))
    });
    #[cfg(feature = "moka")]
    g.bench_function("racefree store = moka", |b| {
        b.iter(|| racefree_moka(black_box(next())))
    });
    g.bench_function("racefree async", |b| {
        b.to_async(&rt).iter(|| racefree_async(black_box(next())))
    });
    g.bench_function("dashmap get+clone", |b| {
        b.iter(|| dashmap.get(&black_box(next())).map(|v| *v.value()))
    });
    g.bench_function("moka get_with", |b| {
        b.iter(|| moka.get_with(black_box(next()), || unreachable!()))
    });
    g.bench_function("quick_cache get", |b| {
        b.iter(|| quick.get(&black_box(next())))
    });
    g.bench_function("cached default", |b| {
        b.iter(|| cached_default(black_box(next())))
    });
    g.bench_function("cached by_key", |b| {
        b.iter(|| cached_by_key(black_box(next())))
    });
    g.finish();

    // The issue: every concrete type of a generic function hits at the first type's speed.
    let mut g = c.benchmark_group("cached/hit generic fn");
    g.bench_function("first concrete type", |b| {
        b.iter(|| racefree_generic::<Metres>(black_box(next())).0)
    });
    g.bench_function("second concrete type", |b| {
        b.iter(|| racefree_generic::<Grams>(black_box(next())).0)
    });
    g.bench_function("third concrete type", |b| {
        b.iter(|| racefree_generic::<Seconds>(black_box(next())).0)
    });
    g.finish();

    // String keys given as `&str`: racefree looks a hit up borrowed; a String is built only on a miss.
    let names: Vec<String> = (0..KEYS).map(|k| format!("user-{k:05}")).collect();
    let dashmap_str: DashMap<String, usize> = names.iter().map(|n| (n.clone(), n.len())).collect();
    for name in &names {
        racefree_str(name);
        cached_by_key_str(name);
    }
    let mut g = c.benchmark_group("cached/hit &str key");
    let mut j = 0u64;
    let mut name = move || {
        j = j.wrapping_add(1);
        key(j) as usize
    };
    g.bench_function("racefree", |b| {
        b.iter(|| racefree_str(black_box(&names[name()])))
    });
    g.bench_function("dashmap get+clone", |b| {
        b.iter(|| {
            dashmap_str
                .get(black_box(names[name()].as_str()))
                .map(|v| *v.value())
        })
    });
    g.bench_function("cached by_key", |b| {
        b.iter(|| cached_by_key_str(black_box(&names[name()])))
    });
    g.finish();

    // Two threads hitting warm keys at once: counters and locks that bounce between cores show here.
    let mut g = c.benchmark_group("cached/hit 2 threads");
    fn two_threads(iters: u64, lookup: impl Fn(u64) -> u64 + Sync) -> Duration {
        let barrier = Barrier::new(2);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (lookup, barrier) = (&lookup, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..iters / 2 {
                        black_box(lookup(key(i * 2 + t)));
                    }
                });
            }
        });
        start.elapsed()
    }
    g.bench_function("racefree", |b| {
        b.iter_custom(|n| two_threads(n, racefree_plain))
    });
    g.bench_function("racefree ttl+capacity", |b| {
        b.iter_custom(|n| two_threads(n, racefree_bounded))
    });
    g.bench_function("dashmap get+clone", |b| {
        b.iter_custom(|n| two_threads(n, |k| *dashmap.get(&k).unwrap()))
    });
    g.bench_function("moka get_with", |b| {
        b.iter_custom(|n| two_threads(n, |k| moka.get_with(k, || unreachable!())))
    });
    g.bench_function("quick_cache get", |b| {
        b.iter_custom(|n| two_threads(n, |k| quick.get(&k).unwrap()))
    });
    g.bench_function("cached by_key", |b| {
        b.iter_custom(|n| two_threads(n, cached_by_key))
    });
    g.finish();
}

fn memory(_: &mut Criterion) {
    const N: u64 = 1_000_000;
    let (dashmap_bytes, dashmap) = support::heap_bytes(|| {
        let map = DashMap::<u64, u64>::new();
        (0..N).for_each(|k| {
            map.insert(k, k);
        });
        map
    });
    drop(dashmap);
    let (plain_bytes, plain) = support::heap_bytes(|| {
        let cache = racefree::Cache::<u64, u64>::new();
        (0..N).for_each(|k| cache.insert(k, k));
        cache
    });
    drop(plain);
    let (bounded_bytes, bounded) = support::heap_bytes(|| {
        let cache = racefree::Cache::<u64, u64>::builder()
            .ttl(Duration::from_secs(3600))
            .capacity(N as usize)
            .build();
        (0..N).for_each(|k| cache.insert(k, k));
        cache
    });
    drop(bounded);
    let (moka_bytes, moka) = support::heap_bytes(|| {
        let cache = moka::sync::Cache::<u64, u64>::new(N);
        (0..N).for_each(|k| cache.insert(k, k));
        cache.run_pending_tasks();
        cache
    });
    drop(moka);
    support::figure(
        "cached/memory 1M u64",
        "dashmap",
        dashmap_bytes as f64,
        "bytes",
    );
    support::figure(
        "cached/memory 1M u64",
        "racefree",
        plain_bytes as f64,
        "bytes",
    );
    support::figure(
        "cached/memory 1M u64",
        "racefree ttl+capacity",
        bounded_bytes as f64,
        "bytes",
    );
    support::figure("cached/memory 1M u64", "moka", moka_bytes as f64, "bytes");
}

// 64 callers ask for one cold key whose body takes 20 ms: how often does the body run, and how
// long until everyone has the value?
fn stampede(_: &mut Criterion) {
    static RACEFREE: AtomicUsize = AtomicUsize::new(0);
    static CACHED_DEFAULT: AtomicUsize = AtomicUsize::new(0);
    static CACHED_BY_KEY: AtomicUsize = AtomicUsize::new(0);
    static MOKA: AtomicUsize = AtomicUsize::new(0);
    const BODY: Duration = Duration::from_millis(20);

    #[racefree::cached]
    fn rf(k: u64) -> u64 {
        RACEFREE.fetch_add(1, Relaxed);
        std::thread::sleep(BODY);
        k
    }
    #[cached::macros::cached]
    fn c_default(k: u64) -> u64 {
        CACHED_DEFAULT.fetch_add(1, Relaxed);
        std::thread::sleep(BODY);
        k
    }
    #[cached::macros::cached(sync_writes = "by_key")]
    fn c_by_key(k: u64) -> u64 {
        CACHED_BY_KEY.fetch_add(1, Relaxed);
        std::thread::sleep(BODY);
        k
    }
    let moka = moka::sync::Cache::<u64, u64>::new(100);

    fn run(f: impl Fn() + Sync) -> Duration {
        let barrier = Barrier::new(64);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..64 {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    f();
                });
            }
        });
        start.elapsed()
    }
    let rows = [
        ("racefree", run(|| _ = rf(1)), &RACEFREE),
        ("cached default", run(|| _ = c_default(1)), &CACHED_DEFAULT),
        ("cached by_key", run(|| _ = c_by_key(1)), &CACHED_BY_KEY),
        (
            "moka get_with",
            run(|| {
                moka.get_with(1, || {
                    MOKA.fetch_add(1, Relaxed);
                    std::thread::sleep(BODY);
                    1
                });
            }),
            &MOKA,
        ),
    ];
    for (name, wall, runs) in rows {
        support::figure(
            "cached/stampede 64 callers",
            &format!("{name} executions"),
            runs.load(Relaxed) as f64,
            "runs",
        );
        support::figure(
            "cached/stampede 64 callers",
            &format!("{name} wall"),
            wall.as_secs_f64() * 1e3,
            "ms",
        );
    }
}

// Two different cold keys, each body 100 ms, asked for at the same time; then a hit on a third
// key while a 100 ms miss runs. With one lock for all keys (cached's `sync_writes = "default"`)
// the second key waits for the first.
fn false_blocking(_: &mut Criterion) {
    const BODY: Duration = Duration::from_millis(100);
    #[racefree::cached]
    fn rf(k: u64) -> u64 {
        if k != 0 {
            std::thread::sleep(BODY);
        }
        k
    }
    #[cached::macros::cached(sync_writes = "default")]
    fn c_global(k: u64) -> u64 {
        if k != 0 {
            std::thread::sleep(BODY);
        }
        k
    }
    fn two_misses(f: fn(u64) -> u64) -> Duration {
        let barrier = Barrier::new(2);
        let start = Instant::now();
        std::thread::scope(|s| {
            for k in [1, 2] {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    f(k)
                });
            }
        });
        start.elapsed()
    }
    fn hit_during_miss(f: fn(u64) -> u64) -> Duration {
        f(0);
        let started = Arc::new(Barrier::new(2));
        std::thread::scope(|s| {
            let started2 = started.clone();
            s.spawn(move || {
                started2.wait();
                f(3)
            });
            started.wait();
            std::thread::sleep(Duration::from_millis(10)); // let the miss take its lock
            let t = Instant::now();
            f(0);
            t.elapsed()
        })
    }
    support::figure(
        "cached/false blocking",
        "racefree two cold keys wall",
        two_misses(rf).as_secs_f64() * 1e3,
        "ms",
    );
    support::figure(
        "cached/false blocking",
        "cached sync_writes=default two cold keys wall",
        two_misses(c_global).as_secs_f64() * 1e3,
        "ms",
    );
    support::figure(
        "cached/false blocking",
        "racefree hit during another key's miss",
        hit_during_miss(rf).as_secs_f64() * 1e6,
        "us",
    );
    support::figure(
        "cached/false blocking",
        "cached sync_writes=default hit during another key's miss",
        hit_during_miss(c_global).as_secs_f64() * 1e6,
        "us",
    );
}

criterion_group! { name = benches; config = support::criterion(); targets = hits, memory, stampede, false_blocking }
criterion_main!(benches);
