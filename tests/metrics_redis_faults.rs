//! The `metrics` counts of `#[cached(store = <RedisCacheStore>)]` when a call's in-process
//! lead goes away while it waits: the call that waited must still count as one wait. On a
//! private `redis-server`, with two `RedisStore`s on it standing for two processes.
#![cfg(all(feature = "redis", feature = "metrics"))]

#[path = "support/redis.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use racefree::redis::{driver, RedisCacheStore, RedisStore, RedisStoreError};
use racefree::telemetry::{CACHE_HITS, CACHE_WAITS, EXECUTIONS, STORE_ERRORS};
use racefree::{cached, sequenced, Seq, SequenceError};
use tokio::sync::oneshot;

const PATIENCE: Duration = Duration::from_secs(10);
const NAME: &str = "tests::metrics_redis_faults::rate";

static SERVER: LazyLock<support::Private> = LazyLock::new(|| support::Private::start(&[]));
static HERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(SERVER.url.clone()));
static THERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(SERVER.url.clone()));
static RATES_HERE: LazyLock<RedisCacheStore<'static>> =
    LazyLock::new(|| RedisCacheStore::new(&HERE, NAME, Duration::from_secs(60)));
static RATES_THERE: LazyLock<RedisCacheStore<'static>> =
    LazyLock::new(|| RedisCacheStore::new(&THERE, NAME, Duration::from_secs(60)));

fn rates_here() -> &'static RedisCacheStore<'static> {
    &RATES_HERE
}

fn rates_there() -> &'static RedisCacheStore<'static> {
    &RATES_THERE
}

/// Where the other process's body waits until the test lets it go.
static GATE: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>> = Mutex::new(None);

#[cached(key = currency.to_owned(), store = rates_here())]
async fn rate_here(currency: &str) -> Result<u64, RedisStoreError> {
    Ok(currency.len() as u64)
}

#[cached(key = currency.to_owned(), store = rates_there())]
async fn rate_there(currency: &str) -> Result<u64, RedisStoreError> {
    let gate = GATE.lock().unwrap().take();
    if let Some((entered, until)) = gate {
        let _ = entered.send(());
        let _ = until.await;
    }
    Ok(currency.len() as u64)
}

/// Counter totals by name, over every series; a snapshot drains the recorder, so they add up.
struct Totals {
    snapshotter: Snapshotter,
    totals: HashMap<String, u64>,
}

impl Totals {
    fn get(&mut self, name: &str) -> u64 {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let DebugValue::Counter(n) = value {
                *self.totals.entry(key.key().name().to_owned()).or_default() += n;
            }
        }
        self.totals.get(name).copied().unwrap_or(0)
    }
}

/// The scripts the server has run (`EVALSHA`/`EVAL` calls): each look at the cached key is one.
async fn scripts_run(conn: &mut racefree::redis::Connection) -> u64 {
    let info: String = driver::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// One round, one key: another process (`rate_there`) fills the key and parks in its body,
/// holding the key's fill lock; here, caller 1 leads this process's flight and polls that lock
/// (1 wait), caller 2 follows caller 1 (1 wait); then caller 1's future is dropped, so caller 2
/// leads this process's flight and polls the lock itself until the other process's value
/// lands. Caller 2 is one call that waited: `racefree_cache_waits_total` must be 2 (one per
/// waiting call, as the Redis cache store's code says: "a call that waits is counted once,
/// however many leads it waits for"), with 1 execution (the other process's) and no hit.
#[test]
fn a_call_whose_lead_is_dropped_counts_one_wait() {
    LazyLock::force(&SERVER);
    let recorder = DebuggingRecorder::new();
    let mut totals = Totals {
        snapshotter: recorder.snapshotter(),
        totals: HashMap::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = support::unique("eur");
    let counts = metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let mut conn = HERE.connection().await.unwrap();
            let (entered_tx, entered) = oneshot::channel();
            let (release, until) = oneshot::channel();
            *GATE.lock().unwrap() = Some((entered_tx, until));
            let there = tokio::spawn({
                let key = key.clone();
                async move { rate_there(&key).await }
            });
            entered.await.unwrap();

            let first = tokio::spawn({
                let key = key.clone();
                async move { rate_here(&key).await }
            });
            let deadline = Instant::now() + PATIENCE;
            while totals.get(CACHE_WAITS) < 1 {
                assert!(Instant::now() < deadline, "caller 1 never waited");
                tokio::task::yield_now().await;
            }
            let second = tokio::spawn({
                let key = key.clone();
                async move { rate_here(&key).await }
            });
            while totals.get(CACHE_WAITS) < 2 {
                assert!(
                    Instant::now() < deadline,
                    "caller 2 never followed caller 1"
                );
                tokio::task::yield_now().await;
            }

            first.abort();
            assert!(first.await.unwrap_err().is_cancelled());
            // Caller 2 now looks at the lock itself: two looks, so it has seen it held.
            let looked = scripts_run(&mut conn).await;
            while scripts_run(&mut conn).await < looked + 2 {
                assert!(
                    Instant::now() < deadline,
                    "caller 2 never looked at the lock"
                );
                tokio::task::yield_now().await;
            }
            assert!(
                !second.is_finished(),
                "caller 2 ended while the lock was held"
            );

            release.send(()).unwrap();
            let filled = tokio::time::timeout(PATIENCE, there)
                .await
                .unwrap()
                .unwrap();
            let waited = tokio::time::timeout(PATIENCE, second)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (filled.unwrap(), waited.unwrap()),
                (key.len() as u64, key.len() as u64)
            );
            (
                totals.get(CACHE_WAITS),
                totals.get(EXECUTIONS),
                totals.get(CACHE_HITS),
            )
        })
    });
    assert_eq!(
        counts,
        (2, 1, 0),
        "(waits, executions, hits): two calls waited, one body ran elsewhere"
    );
}

// --- the kind of a store error: the same Redis failure, the same `kind` -------------------

static PAUSED_SERVER: LazyLock<support::Private> = LazyLock::new(|| support::Private::start(&[]));
static PAUSED: LazyLock<RedisStore> = LazyLock::new(|| {
    RedisStore::new(PAUSED_SERVER.url.clone()).command_timeout(Duration::from_millis(200))
});
static PAUSED_RATES: LazyLock<RedisCacheStore<'static>> =
    LazyLock::new(|| RedisCacheStore::new(&PAUSED, "tests::paused_rate", Duration::from_secs(60)));

fn paused_rates() -> &'static RedisCacheStore<'static> {
    &PAUSED_RATES
}

#[cached(key = currency.to_owned(), store = paused_rates())]
async fn paused_rate(currency: &str) -> Result<u64, RedisStoreError> {
    Ok(currency.len() as u64)
}

#[sequenced(key = desk.to_owned(), store = PAUSED.sequence("tests::paused_ticket"))]
async fn paused_ticket(desk: &str, seq: Seq) -> Result<u64, SequenceError> {
    Ok(seq.get())
}

/// The kinds of `racefree_store_errors_total` `function` has counted, with their counts.
fn kinds(
    recorder: &Snapshotter,
    seen: &mut HashMap<(String, String), u64>,
    function: &str,
) -> Vec<(String, u64)> {
    for (key, _, _, value) in recorder.snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
        };
        if let (DebugValue::Counter(n), true) = (value, key.name() == STORE_ERRORS) {
            let series = (
                label("function").unwrap_or_default(),
                label("kind").unwrap_or_default(),
            );
            *seen.entry(series).or_default() += n;
        }
    }
    let mut kinds: Vec<(String, u64)> = seen
        .iter()
        .filter(|((f, _), _)| f == function)
        .map(|((_, kind), n)| (kind.clone(), *n))
        .collect();
    kinds.sort();
    kinds
}

/// One round: a `#[cached]` and a `#[sequenced]` function on one Redis store (200 ms command
/// timeout) each succeed once; then the server pauses every client for 3 s (`CLIENT PAUSE
/// 3000 ALL`) and one call of each fails. The same fault must be counted under the same
/// `kind` for both attributes, the one the telemetry docs list for it (`timeout`), not under a
/// blanket `unavailable` for the one whose error boxes the store's.
#[test]
fn one_redis_timeout_is_one_kind_for_every_attribute() {
    LazyLock::force(&PAUSED_SERVER);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let desk = support::unique("desk");
            assert_eq!(paused_rate(&desk).await.unwrap(), desk.len() as u64);
            assert_eq!(paused_ticket(&desk).await.unwrap(), 1);
            assert_eq!(PAUSED_SERVER.cli(&["CLIENT", "PAUSE", "3000", "ALL"]), "OK");
            let cached = paused_rate(&support::unique("usd")).await;
            let sequenced = paused_ticket(&desk).await;
            assert!(
                cached.is_err() && sequenced.is_err(),
                "{cached:?} {sequenced:?}"
            );
            println!("cached: {cached:?}\nsequenced: {sequenced:?}");
        })
    });
    let mut seen = HashMap::new();
    let cached = kinds(&snapshotter, &mut seen, "tests::paused_rate");
    let sequenced = kinds(
        &snapshotter,
        &mut seen,
        "metrics_redis_faults::paused_ticket",
    );
    assert_eq!(
        cached,
        [("timeout".to_owned(), 1)],
        "the cached call's kind"
    );
    assert_eq!(
        sequenced, cached,
        "the sequenced call's kind, for the same fault"
    );
}
