//! The `metrics` feature: every attribute reports its calls to the installed recorder, with
//! exact counts, labelled with the function and the store.
//!
//! Each test installs its own `DebuggingRecorder` as the local recorder of every thread that
//! calls (`metrics::with_local_recorder`; an async test runs its tasks on one current-thread
//! runtime inside it), and uses functions of its own: a function's handles are registered
//! with the recorder of its first call. The Redis and SQL tests run with the features
//! `redis` and `sqlite` too (`--all-features`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Barrier, Mutex};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use racefree::telemetry::{
    CACHE_HITS, CACHE_WAITS, CONFLICTS, EVICTIONS, EXECUTIONS, FLIGHT_WAIT, IDEMPOTENT_WAITS,
    LOCK_WAIT, REPLAYS, STORE_ERRORS,
};
use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq};

#[path = "support/common.rs"]
mod common;
#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis;

/// A recorder of one test, and everything it has recorded so far: a snapshot drains the
/// recorder (counters go back to 0, histograms are emptied), so the totals are kept here.
struct Recorded {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<Series, Total>>,
}

/// A metric's name and its labels, in order.
type Series = (String, Vec<(String, String)>);

#[derive(Default)]
struct Total {
    counter: u64,
    samples: Vec<f64>,
}

impl Recorded {
    fn new() -> Recorded {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        Recorded {
            recorder,
            snapshotter,
            totals: Mutex::default(),
        }
    }

    /// Runs `f` with this recorder as the thread's.
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The counter total and the histogram samples of `name`, summed over every series whose
    /// labels include all of `labels`.
    fn read(&self, name: &str, labels: &[(&str, &str)]) -> (u64, Vec<f64>) {
        let mut totals = self.totals.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut series_labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            series_labels.sort();
            let total = totals
                .entry((key.name().to_owned(), series_labels))
                .or_default();
            match value {
                DebugValue::Counter(n) => total.counter += n,
                DebugValue::Histogram(values) => {
                    total.samples.extend(values.iter().map(|v| v.into_inner()))
                }
                DebugValue::Gauge(_) => unreachable!("racefree reports no gauges"),
            }
        }
        let mut sum = (0, Vec::new());
        for ((series, series_labels), total) in totals.iter() {
            let wanted = labels
                .iter()
                .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if series == name && wanted {
                sum.0 += total.counter;
                sum.1.extend(&total.samples);
            }
        }
        sum
    }

    fn counter(&self, name: &str, function: &str) -> u64 {
        self.read(name, &[("function", function)]).0
    }

    fn samples(&self, name: &str, function: &str) -> Vec<f64> {
        self.read(name, &[("function", function)]).1
    }
}

static COLD_GATE: Mutex<()> = Mutex::new(());
static COLD_RUNS: AtomicU64 = AtomicU64::new(0);

#[cached]
fn cold_key(key: u32) -> u32 {
    let _gate = COLD_GATE.lock().unwrap();
    COLD_RUNS.fetch_add(1, SeqCst);
    key * 2
}

// 8 callers × 20 rounds on one cold key. Each round the key is invalidated, the body is held
// shut until the 7 callers that did not win are all waiting, then every caller calls again.
// Every round: one more execution, 7 more waits (7 more flight-wait samples), 8 more hits,
// and the metrics equal the cache's own stats.
#[test]
fn cold_key_counts_one_execution_seven_waits_and_eight_hits_per_round() {
    const CALLERS: u64 = 8;
    const ROUNDS: u64 = 20;
    const FUNCTION: &str = "metrics::cold_key";
    let recorded = Recorded::new();
    for round in 1..=ROUNDS {
        cold_key_cache().invalidate(&7);
        let gate = COLD_GATE.lock().unwrap();
        let barrier = Barrier::new(CALLERS as usize);
        std::thread::scope(|s| {
            for _ in 0..CALLERS {
                s.spawn(|| {
                    recorded.run(|| {
                        barrier.wait();
                        assert_eq!(cold_key(7), 14);
                    })
                });
            }
            common::until_sync("the other callers wait", || {
                cold_key_cache().stats().coalesced == (CALLERS - 1) * round
            });
            drop(gate);
        });
        std::thread::scope(|s| {
            for _ in 0..CALLERS {
                s.spawn(|| recorded.run(|| assert_eq!(cold_key(7), 14)));
            }
        });
        let stats = cold_key_cache().stats();
        let executions = recorded.counter(EXECUTIONS, FUNCTION);
        let waits = recorded.counter(CACHE_WAITS, FUNCTION);
        let hits = recorded.counter(CACHE_HITS, FUNCTION);
        assert_eq!(executions, round, "round {round}");
        assert_eq!(COLD_RUNS.load(SeqCst), round, "round {round}");
        assert_eq!(waits, (CALLERS - 1) * round, "round {round}");
        assert_eq!(hits, CALLERS * round, "round {round}");
        assert_eq!(
            (stats.executions, stats.coalesced, stats.hits),
            (executions, waits, hits),
            "round {round}: the metrics are the cache's stats"
        );
        let samples = recorded.samples(FLIGHT_WAIT, FUNCTION);
        assert_eq!(samples.len() as u64, waits, "round {round}");
        assert!(samples.iter().all(|s| *s >= 0.0), "{samples:?}");
    }
    assert_eq!(
        recorded
            .read(EXECUTIONS, &[("function", FUNCTION), ("store", "memory")])
            .0,
        ROUNDS,
        "labelled store = \"memory\""
    );
}

#[cached(capacity = 2)]
fn small(key: u32) -> u32 {
    key
}

// 10 distinct keys one after the other into a capacity of 2: 8 evictions, 10 executions.
#[test]
fn capacity_evictions_are_counted() {
    const FUNCTION: &str = "metrics::small";
    let recorded = Recorded::new();
    recorded.run(|| (0..10).for_each(|k| assert_eq!(small(k), k)));
    assert_eq!(recorded.counter(EVICTIONS, FUNCTION), 8);
    assert_eq!(recorded.counter(EXECUTIONS, FUNCTION), 10);
    assert_eq!(small_cache().len(), 2);
}

static PAY_GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);

#[idempotent(key = key)]
async fn pay(key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    PAY_GATE.acquire().await.unwrap().forget();
    Ok(cents)
}

// 8 callers × 10 rounds, a fresh key each round: the owner's body is held until the 7
// duplicates wait for it; then one more call with the key and another amount. Every round:
// one more execution, 7 more waits (and flight-wait samples), 7 more replays, one more
// conflict.
#[test]
fn idempotent_counts_executions_waits_replays_and_conflicts_per_round() {
    const CALLERS: u64 = 8;
    const ROUNDS: u64 = 10;
    const FUNCTION: &str = "metrics::pay";
    let recorded = Recorded::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    recorded.run(|| {
        runtime.block_on(async {
            for round in 1..=ROUNDS {
                let key = format!("k-{round}");
                let callers = futures::future::join_all((0..CALLERS).map(|_| pay(&key, 5)));
                let open = async {
                    common::until("the duplicates wait", || {
                        pay_idempotency_store().stats().waits == (CALLERS - 1) * round
                    })
                    .await;
                    PAY_GATE.add_permits(1);
                };
                let (outcomes, ()) =
                    common::guarded("a round", futures::future::join(callers, open)).await;
                assert!(outcomes.iter().all(|o| *o == Ok(5)), "{outcomes:?}");
                assert_eq!(
                    pay(&key, 6).await,
                    Err(IdempotencyError::Conflict { key: key.clone() })
                );
                one_execution_per_round(&recorded, FUNCTION, round, CALLERS - 1);
                assert_eq!(recorded.counter(CONFLICTS, FUNCTION), round);
                assert_eq!(recorded.counter(STORE_ERRORS, FUNCTION), 0);
            }
        })
    });
}

static REFUND_GATE: Mutex<()> = Mutex::new(());

#[idempotent(key = key)]
fn refund(key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _gate = REFUND_GATE.lock().unwrap();
    Ok(cents)
}

// The sync protocol: 8 threads × 10 rounds, a fresh key each round, released by a barrier;
// the owner's body is held until the 7 duplicates wait for it. Every round: one more
// execution, 7 more waits, flight-wait samples and replays.
#[test]
fn sync_idempotent_counts_one_execution_and_seven_replays_per_round() {
    const CALLERS: u64 = 8;
    const ROUNDS: u64 = 10;
    const FUNCTION: &str = "metrics::refund";
    let recorded = Recorded::new();
    for round in 1..=ROUNDS {
        let key = format!("r-{round}");
        let gate = REFUND_GATE.lock().unwrap();
        let barrier = Barrier::new(CALLERS as usize);
        std::thread::scope(|s| {
            for _ in 0..CALLERS {
                s.spawn(|| {
                    recorded.run(|| {
                        barrier.wait();
                        assert_eq!(refund(&key, 4), Ok(4));
                    })
                });
            }
            common::until_sync("the duplicates wait", || {
                refund_idempotency_store().stats().waits == (CALLERS - 1) * round
            });
            drop(gate);
        });
        one_execution_per_round(&recorded, FUNCTION, round, CALLERS - 1);
    }
}

/// After `round` rounds of one execution and `duplicates` waiting duplicates each: the
/// counters of `function` say so exactly (every duplicate waited, was timed, and replayed).
fn one_execution_per_round(recorded: &Recorded, function: &str, round: u64, duplicates: u64) {
    assert_eq!(recorded.counter(EXECUTIONS, function), round);
    assert_eq!(
        recorded.counter(IDEMPOTENT_WAITS, function),
        duplicates * round
    );
    assert_eq!(recorded.counter(REPLAYS, function), duplicates * round);
    assert_eq!(
        recorded.samples(FLIGHT_WAIT, function).len() as u64,
        duplicates * round
    );
}

#[sequenced(key = desk)]
fn ticket(desk: u8, seq: Seq) -> u64 {
    seq.get()
}

// 8 callers × 20 rounds on one key, released together: every call got the key, so after
// each round there is one lock-wait sample and one execution per call so far, and the
// numbers handed out are 1..=calls.
#[test]
fn sequenced_records_one_lock_wait_per_call() {
    const CALLERS: u64 = 8;
    const ROUNDS: u64 = 20;
    const FUNCTION: &str = "metrics::ticket";
    let recorded = Recorded::new();
    let mut numbers = Vec::new();
    for round in 1..=ROUNDS {
        let barrier = Barrier::new(CALLERS as usize);
        let got: Vec<u64> = std::thread::scope(|s| {
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    s.spawn(|| {
                        recorded.run(|| {
                            barrier.wait();
                            ticket(1)
                        })
                    })
                })
                .collect();
            callers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        numbers.extend(got);
        let samples = recorded.samples(LOCK_WAIT, FUNCTION);
        assert_eq!(samples.len() as u64, CALLERS * round, "round {round}");
        assert!(samples.iter().all(|s| *s >= 0.0));
        assert_eq!(recorded.counter(EXECUTIONS, FUNCTION), CALLERS * round);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=CALLERS * ROUNDS).collect::<Vec<_>>());
    let memory = recorded.read(LOCK_WAIT, &[("function", FUNCTION), ("store", "memory")]);
    assert_eq!(
        memory.1.len() as u64,
        CALLERS * ROUNDS,
        "labelled store = \"memory\""
    );
}

// A `Cache` built by hand is labelled with its name; without one it reports nothing.
#[test]
fn a_named_cache_reports_and_an_unnamed_one_does_not() {
    let recorded = Recorded::new();
    recorded.run(|| {
        let named: racefree::Cache<u8, u8> = racefree::Cache::builder().name("app::prices").build();
        let unnamed: racefree::Cache<u8, u8> = racefree::Cache::new();
        for cache in [&named, &unnamed] {
            cache.get_with(1, || 1);
            cache.get_with(1, || unreachable!());
        }
    });
    assert_eq!(recorded.counter(CACHE_HITS, "app::prices"), 1);
    assert_eq!(recorded.counter(EXECUTIONS, "app::prices"), 1);
    assert_eq!(
        recorded.read(CACHE_HITS, &[]).0,
        1,
        "only the named cache counts"
    );
}

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::OnceLock;
    use std::time::Duration;

    use racefree::redis::{RedisCacheStore, RedisIdempotencyStore, RedisStore, RedisStoreError};

    use super::redis;
    use super::*;

    static REDIS: OnceLock<RedisStore> = OnceLock::new();
    static RATES: OnceLock<RedisCacheStore<'static>> = OnceLock::new();
    static TRANSFERS: OnceLock<RedisIdempotencyStore<u64>> = OnceLock::new();

    fn redis_store() -> &'static RedisStore {
        REDIS.get().expect("set by the test")
    }

    fn rates() -> &'static RedisCacheStore<'static> {
        RATES.get().expect("set by the test")
    }

    fn transfers() -> &'static RedisIdempotencyStore<u64> {
        TRANSFERS.get_or_init(|| RedisIdempotencyStore::new(redis_store()))
    }

    #[cached(key = currency.to_owned(), store = rates())]
    async fn rate(currency: &str) -> Result<u64, RedisStoreError> {
        Ok(currency.len() as u64)
    }

    #[idempotent(key = key, store = transfers())]
    async fn transfer(key: &str, cents: u64) -> Result<u64, IdempotencyError> {
        Ok(cents)
    }

    // On a private redis-server: a cached miss then a hit, an idempotent execution then a
    // replay; the server stopped, one call of each fails and counts one store error each.
    #[test]
    fn redis_calls_and_store_errors_are_counted() {
        let mut server = redis::Private::start(&[]);
        let store = RedisStore::new(server.url.clone()).command_timeout(Duration::from_millis(500));
        assert!(REDIS.set(store).is_ok(), "set once");
        let rates = RedisCacheStore::new(redis_store(), "metrics::rate", Duration::from_secs(60));
        assert!(RATES.set(rates).is_ok(), "set once");
        let recorded = Recorded::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        recorded.run(|| {
            runtime.block_on(async {
                let key = redis::unique("eur");
                assert_eq!(rate(&key).await.unwrap(), key.len() as u64);
                assert_eq!(rate(&key).await.unwrap(), key.len() as u64);
                let paid = redis::unique("t");
                assert_eq!(transfer(&paid, 3).await, Ok(3));
                assert_eq!(transfer(&paid, 3).await, Ok(3));
                server.stop();
                assert!(rate(&redis::unique("usd")).await.is_err());
                assert!(transfer(&redis::unique("t2"), 3).await.is_err());
            })
        });
        let cached = [("function", "metrics::rate"), ("store", "redis")];
        assert_eq!(recorded.read(EXECUTIONS, &cached).0, 1);
        assert_eq!(recorded.read(CACHE_HITS, &cached).0, 1);
        assert_eq!(recorded.read(STORE_ERRORS, &cached).0, 1);
        let down = [("function", "metrics::rate"), ("kind", "unavailable")];
        assert_eq!(
            recorded.read(STORE_ERRORS, &down).0,
            1,
            "a stopped server is unavailable"
        );
        let function = "metrics::redis_store::transfer";
        let idempotent = [("function", function), ("store", "redis")];
        assert_eq!(recorded.read(EXECUTIONS, &idempotent).0, 1);
        assert_eq!(recorded.read(REPLAYS, &idempotent).0, 1);
        assert_eq!(recorded.read(STORE_ERRORS, &idempotent).0, 1);
        assert_eq!(
            recorded
                .read(
                    STORE_ERRORS,
                    &[("function", function), ("kind", "unavailable")]
                )
                .0,
            1
        );
    }
}

#[cfg(feature = "sqlite")]
mod sql_store {
    use racefree::sql::SqliteStore;

    use super::*;

    struct App {
        db: SqliteStore,
    }

    #[idempotent(key = key, store = app.db, skip(app))]
    async fn book(app: &App, key: &str, seats: u64) -> Result<u64, IdempotencyError> {
        Ok(seats)
    }

    #[sequenced(store = app.db.sequence("invoice"))]
    async fn invoice(app: &App, seq: Seq) -> Result<u64, racefree::SequenceError> {
        Ok(seq.get())
    }

    // On a SQLite file: 3 invoices (3 lock-wait samples, store "sqlite"), an execution and a
    // replay; then the pool is closed: one call of each fails and counts one store error each.
    #[test]
    fn sqlite_calls_and_store_errors_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        let recorded = Recorded::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        recorded.run(|| {
            runtime.block_on(async {
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let app = App {
                    db: SqliteStore::new(pool.clone()),
                };
                app.db.migrate().await.unwrap();
                for n in 1..=3 {
                    assert_eq!(invoice(&app).await.unwrap(), n);
                }
                assert_eq!(book(&app, "b-1", 2).await, Ok(2));
                assert_eq!(book(&app, "b-1", 2).await, Ok(2));
                pool.close().await;
                assert!(book(&app, "b-2", 2).await.is_err());
                assert!(invoice(&app).await.is_err());
            })
        });
        let booked = [
            ("function", "metrics::sql_store::book"),
            ("store", "sqlite"),
        ];
        assert_eq!(recorded.read(EXECUTIONS, &booked).0, 1);
        assert_eq!(recorded.read(REPLAYS, &booked).0, 1);
        assert_eq!(recorded.read(STORE_ERRORS, &booked).0, 1);
        let invoiced = [
            ("function", "metrics::sql_store::invoice"),
            ("store", "sqlite"),
        ];
        assert_eq!(recorded.read(LOCK_WAIT, &invoiced).1.len(), 3);
        assert_eq!(recorded.read(EXECUTIONS, &invoiced).0, 3);
        assert_eq!(recorded.read(STORE_ERRORS, &invoiced).0, 1);
        for function in ["metrics::sql_store::book", "metrics::sql_store::invoice"] {
            let closed = [("function", function), ("kind", "unavailable")];
            assert_eq!(recorded.read(STORE_ERRORS, &closed).0, 1, "{function}");
        }
    }
}
