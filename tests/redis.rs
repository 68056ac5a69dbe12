//! The Redis store against a real Redis: exactly-once claims, gap-free sequences and
//! single-flight caching across OS processes, crash takeover, killed connections, and the same
//! on a 3-node Redis Cluster.
//!
//! Multi-process tests re-run this test binary as workers (`worker_entry` with `RF_WORKER_MODE`
//! set); the workers meet at a barrier in Redis (a counter every worker increments, then waits
//! to see reach the worker count) so their callers start together without sleeps. Executions
//! are counted outside the processes, with `INCR` on a separate Redis key.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod support;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use racefree::redis::driver::{self, AsyncCommands};
use racefree::redis::{
    CacheOptions, Claim, IdempotencyOptions, IdempotentError, InFlight, OwnerClaim,
    RedisCacheStore, RedisIdempotencyStore, RedisKey, RedisStore, RedisStoreError, SequenceOptions,
    SequencedError,
};
use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq, SequenceError};

const WORKERS: usize = 4;

// The attributes with the Redis store, driven by the same workers (modes "attr-*").
static ATTR_STORE: LazyLock<Arc<RedisStore>> =
    LazyLock::new(|| Arc::new(worker_store(Duration::from_secs(10))));
static ATTR_OUTCOMES: LazyLock<RedisIdempotencyStore<String>> =
    LazyLock::new(|| RedisIdempotencyStore::shared(Arc::clone(&ATTR_STORE)));

#[derive(Debug)]
struct AttrError(#[allow(dead_code)] String);

impl From<IdempotencyError> for AttrError {
    fn from(e: IdempotencyError) -> Self {
        AttrError(e.to_string())
    }
}

impl From<RedisStoreError> for AttrError {
    fn from(e: RedisStoreError) -> Self {
        AttrError(e.to_string())
    }
}

impl From<SequenceError> for AttrError {
    fn from(e: SequenceError) -> Self {
        AttrError(e.to_string())
    }
}

#[idempotent(key = key, store = ATTR_OUTCOMES, skip(execs))]
async fn attr_charge(key: &str, execs: &str) -> Result<String, AttrError> {
    let n: i64 = ATTR_STORE
        .connection()
        .await
        .unwrap()
        .incr(execs, 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("charge-{n}"))
}

static ATTR_VALUES: LazyLock<RedisCacheStore<'static>> = LazyLock::new(|| {
    RedisCacheStore::new(
        &ATTR_STORE,
        "tests::redis::attr_value",
        Duration::from_secs(60),
    )
});

#[cached(key = key.to_owned(), store = ATTR_VALUES, skip(execs))]
async fn attr_value(key: &str, execs: &str) -> Result<String, AttrError> {
    let n: i64 = ATTR_STORE
        .connection()
        .await
        .unwrap()
        .incr(execs, 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("value-{n}"))
}

#[sequenced(key = key, store = ATTR_STORE.sequence("tests::redis::attr_next"))]
async fn attr_next(key: &str, seq: Seq) -> Result<u64, AttrError> {
    tokio::task::yield_now().await;
    Ok(seq.get())
}
const CALLERS: usize = 25;
const ROUNDS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Workers

/// Where a worker connects: `RF_REDIS` (one node) or `RF_CLUSTER` (comma-separated nodes).
fn worker_store(lease: Duration) -> RedisStore {
    let store = match std::env::var("RF_CLUSTER") {
        Ok(nodes) => RedisStore::cluster(nodes.split(',').map(str::to_owned).collect()),
        Err(_) => RedisStore::new(std::env::var("RF_REDIS").expect("RF_REDIS")),
    };
    store.lease(lease)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Not a test of its own: the body of the worker processes. Without `RF_WORKER_MODE` it returns.
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var("RF_WORKER_MODE") else {
        return;
    };
    let prefix = std::env::var("RF_PREFIX").unwrap();
    let rounds: usize = std::env::var("RF_ROUNDS").map_or(1, |r| r.parse().unwrap());
    rt().block_on(async move {
        let store = Arc::new(worker_store(Duration::from_millis(
            std::env::var("RF_LEASE_MS").map_or(10_000, |ms| ms.parse().unwrap()),
        )));
        for round in 0..rounds {
            barrier(&store, &format!("{prefix}:ready:{round}"), WORKERS as i64).await;
            let callers: Vec<_> = (0..CALLERS)
                .map(|caller| {
                    let (store, prefix, mode) = (Arc::clone(&store), prefix.clone(), mode.clone());
                    tokio::spawn(
                        async move { worker_call(&store, &mode, &prefix, round, caller).await },
                    )
                })
                .collect();
            for caller in callers {
                caller.await.unwrap();
            }
        }
        if mode == "hold-claim" {
            unreachable!("hold-claim never returns");
        }
    });
}

/// Waits until `n` participants incremented `key`.
async fn barrier(store: &RedisStore, key: &str, n: i64) {
    let mut conn = store.connection().await.unwrap();
    let _: i64 = conn.incr(key, 1).await.unwrap();
    let _: bool = conn.expire(key, 300).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while conn.get::<_, i64>(key).await.unwrap() < n {
        assert!(Instant::now() < deadline, "barrier {key} never reached {n}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn worker_call(store: &RedisStore, mode: &str, prefix: &str, round: usize, caller: usize) {
    let worker: usize = std::env::var("RF_WORKER").unwrap().parse().unwrap();
    let mut conn = store.connection().await.unwrap();
    let execs = format!("{prefix}:execs:{round}");
    let results = format!("{prefix}:results:{round}");
    let key = RedisKey::new("tests::redis", Some(prefix), format!("k{round}"));
    match mode {
        "idempotent" => {
            let outcome = store
                .idempotency()
                .run(&key, "fp", IdempotencyOptions::new(), || async {
                    let n: i64 = store
                        .connection()
                        .await
                        .unwrap()
                        .incr(&execs, 1)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await; // let the others pile up
                    Ok::<_, String>(format!("outcome-{n}-of-worker-{worker}"))
                })
                .await
                .expect("every caller gets the outcome");
            let _: i64 = conn.rpush(&results, outcome.value).await.unwrap();
        }
        "sequenced" | "sequenced-failing" => {
            // Callers whose global index is a multiple of 5 fail: 20 of 100.
            let fail = mode == "sequenced-failing" && (worker * CALLERS + caller).is_multiple_of(5);
            let result = store
                .sequences()
                .run(&key, 1, SequenceOptions::default(), |ticket| async move {
                    tokio::task::yield_now().await;
                    if fail {
                        Err("injected")
                    } else {
                        Ok(ticket.number())
                    }
                })
                .await;
            match result {
                Ok(number) => {
                    let _: i64 = conn.rpush(&results, number).await.unwrap();
                }
                Err(SequencedError::Body("injected")) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        "cached" => {
            let value: String = store
                .cache()
                .get_or_compute(&key, CacheOptions::new(Duration::from_secs(60)), || async {
                    let n: i64 = store
                        .connection()
                        .await
                        .unwrap()
                        .incr(&execs, 1)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, String>(format!("value-{n}-of-worker-{worker}"))
                })
                .await
                .expect("every caller gets the value");
            let _: i64 = conn.rpush(&results, value).await.unwrap();
        }
        "attr-idempotent" => {
            let key = format!("{prefix}-attr-{round}");
            let outcome = attr_charge(&key, &execs)
                .await
                .expect("every caller gets the outcome");
            let _: i64 = conn.rpush(&results, outcome).await.unwrap();
        }
        "attr-cached" => {
            let value = attr_value(&format!("{prefix}-attr-{round}"), &execs)
                .await
                .expect("every caller gets the value");
            let _: i64 = conn.rpush(&results, value).await.unwrap();
        }
        "attr-sequenced" => {
            let number = attr_next(&format!("{prefix}-attr-{round}"))
                .await
                .expect("a number");
            let _: i64 = conn.rpush(&results, number).await.unwrap();
        }
        "hold-claim" => {
            if caller != 0 {
                return;
            }
            // Claims, signals, then runs "forever" (the heartbeat keeps the claim) until killed.
            let _ = store
                .idempotency()
                .run(&key, "fp", IdempotencyOptions::new(), || async {
                    let _: i64 = conn.incr(format!("{prefix}:holding"), 1).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<_, String>("never".to_owned())
                })
                .await;
        }
        other => panic!("unknown worker mode {other}"),
    }
}

struct Target {
    redis: Option<String>,
    cluster: Option<String>,
}

impl Target {
    fn single() -> Target {
        Target {
            redis: Some(support::server().url.clone()),
            cluster: None,
        }
    }

    fn cluster(cluster: &support::Cluster) -> Target {
        Target {
            redis: None,
            cluster: Some(cluster.nodes.join(",")),
        }
    }

    fn store(&self) -> RedisStore {
        match (&self.redis, &self.cluster) {
            (Some(url), _) => RedisStore::new(url.clone()),
            (_, Some(nodes)) => RedisStore::cluster(nodes.split(',').map(str::to_owned).collect()),
            _ => unreachable!(),
        }
    }

    fn spawn(
        &self,
        mode: &str,
        prefix: &str,
        worker: usize,
        rounds: usize,
        extra: &[(&str, &str)],
    ) -> Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "worker_entry",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("RF_WORKER_MODE", mode)
        .env("RF_PREFIX", prefix)
        .env("RF_WORKER", worker.to_string())
        .env("RF_ROUNDS", rounds.to_string());
        if let Some(url) = &self.redis {
            cmd.env("RF_REDIS", url);
        }
        if let Some(nodes) = &self.cluster {
            cmd.env("RF_CLUSTER", nodes);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        // The worker's own libtest summary would read like ours: keep its stdout out of the log.
        cmd.stdout(std::process::Stdio::null())
            .spawn()
            .expect("re-run the test binary as a worker")
    }

    /// Runs `WORKERS` worker processes of `mode` for `rounds` rounds and waits for them (bounded).
    fn run_workers(&self, mode: &str, prefix: &str, rounds: usize) {
        let mut children: Vec<Child> = (0..WORKERS)
            .map(|w| self.spawn(mode, prefix, w, rounds, &[]))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        for child in &mut children {
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "a {mode} worker failed: {status}");
                    break;
                }
                if Instant::now() > deadline {
                    for child in &mut children {
                        let _ = child.kill();
                    }
                    panic!("{mode} workers hung");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A body for calls that must replay, conflict or fail before executing.
fn must_not_run<T>() -> std::future::Ready<Result<T, String>> {
    panic!("the body must not run")
}

async fn list(store: &RedisStore, key: &str) -> Vec<String> {
    store
        .connection()
        .await
        .unwrap()
        .lrange(key, 0, -1)
        .await
        .unwrap()
}

async fn count(store: &RedisStore, key: &str) -> i64 {
    store
        .connection()
        .await
        .unwrap()
        .get::<_, Option<i64>>(key)
        .await
        .unwrap()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Scenarios, shared by the single-node and the cluster tests

/// 4 processes × 25 callers, one idempotency key, 3 rounds. Every round: exactly 1 execution
/// (INCR outside the processes) and 100 equal outcomes.
async fn idempotent_across_processes(target: &Target, prefix: &str, mode: &str) {
    target.run_workers(mode, prefix, ROUNDS);
    let store = target.store();
    for round in 0..ROUNDS {
        assert_eq!(
            count(&store, &format!("{prefix}:execs:{round}")).await,
            1,
            "round {round}"
        );
        let outcomes = list(&store, &format!("{prefix}:results:{round}")).await;
        assert_eq!(outcomes.len(), WORKERS * CALLERS, "round {round}");
        assert!(
            outcomes.iter().all(|o| *o == outcomes[0]),
            "round {round}: {outcomes:?}"
        );
    }
}

/// 4 processes × 25 sequenced calls on one key, 3 rounds (one key each). Every round: the
/// numbers handed out are exactly 1..=100, and the committed counter is 100.
async fn sequenced_across_processes(target: &Target, prefix: &str, mode: &str) {
    target.run_workers(mode, prefix, ROUNDS);
    let store = target.store();
    for round in 0..ROUNDS {
        let mut numbers: Vec<u64> = list(&store, &format!("{prefix}:results:{round}"))
            .await
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        numbers.sort_unstable();
        assert_eq!(numbers, (1..=100).collect::<Vec<_>>(), "round {round}");
        let key = match mode {
            "sequenced" => RedisKey::new("tests::redis", Some(prefix), format!("k{round}")),
            _ => store
                .sequence("tests::redis::attr_next")
                .key(&format!("{prefix}-attr-{round}"))
                .unwrap(),
        };
        assert_eq!(store.sequences().current(&key).await.unwrap(), Some(100));
    }
}

/// The same with 20 of the 100 callers failing: the 80 successes got exactly 1..=80.
async fn sequenced_failures_leave_no_gap(target: &Target, prefix: &str) {
    target.run_workers("sequenced-failing", prefix, ROUNDS);
    let store = target.store();
    for round in 0..ROUNDS {
        let mut numbers: Vec<u64> = list(&store, &format!("{prefix}:results:{round}"))
            .await
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        numbers.sort_unstable();
        assert_eq!(numbers, (1..=80).collect::<Vec<_>>(), "round {round}");
    }
}

/// 4 processes × 25 callers of one cold cached key, 3 rounds. Every round: 1 execution and 100
/// equal values.
async fn cached_across_processes(target: &Target, prefix: &str, mode: &str) {
    target.run_workers(mode, prefix, ROUNDS);
    let store = target.store();
    for round in 0..ROUNDS {
        assert_eq!(
            count(&store, &format!("{prefix}:execs:{round}")).await,
            1,
            "round {round}"
        );
        let values = list(&store, &format!("{prefix}:results:{round}")).await;
        assert_eq!(values.len(), WORKERS * CALLERS);
        assert!(
            values.iter().all(|v| *v == values[0]),
            "round {round}: {values:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 5, points 1–5 on one node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_4_processes_x_25_callers_execute_once() {
    idempotent_across_processes(&Target::single(), &support::unique("idem"), "idempotent").await;
}

/// The same through `#[idempotent(store = RedisIdempotencyStore)]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_attribute_4_processes_x_25_callers_execute_once() {
    idempotent_across_processes(
        &Target::single(),
        &support::unique("aidem"),
        "attr-idempotent",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_4_processes_x_25_calls_number_1_to_100() {
    sequenced_across_processes(&Target::single(), &support::unique("seq"), "sequenced").await;
}

/// The same through `#[sequenced(store = REDIS.sequence(..))]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_attribute_4_processes_x_25_calls_number_1_to_100() {
    sequenced_across_processes(
        &Target::single(),
        &support::unique("aseq"),
        "attr-sequenced",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_failed_calls_across_processes_leave_no_gap() {
    sequenced_failures_leave_no_gap(&Target::single(), &support::unique("seqfail")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_4_processes_x_25_callers_compute_once() {
    cached_across_processes(&Target::single(), &support::unique("cache"), "cached").await;
}

/// The same through `#[cached(store = RedisCacheStore)]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_attribute_4_processes_x_25_callers_compute_once() {
    cached_across_processes(&Target::single(), &support::unique("acache"), "attr-cached").await;
}

/// A worker claims a key and is SIGKILLed while its body runs. While it lived, its heartbeat
/// kept the claim past three leases; after its death and one lease, exactly one of 20
/// concurrent callers executes and all 20 get that outcome; the dead owner's completion
/// (its token replayed) is rejected and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_is_taken_over_once_and_its_late_completion_rejected() {
    let target = Target::single();
    let prefix = support::unique("kill");
    let lease = Duration::from_millis(1000);
    let store = target.store().lease(lease);
    let key = RedisKey::new("tests::redis", Some(&prefix), "k0");

    // One worker process; the barrier wants 4 arrivals, so add the other 3 ourselves.
    let mut holder = target.spawn("hold-claim", &prefix, 0, 1, &[("RF_LEASE_MS", "1000")]);
    let ready = format!("{prefix}:ready:0");
    let mut conn = store.connection().await.unwrap();
    let _: i64 = conn.incr(&ready, 3).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&store, &format!("{prefix}:holding")).await < 1 {
        assert!(Instant::now() < deadline, "the worker never claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let record = store
        .idempotency()
        .replay(&key)
        .await
        .unwrap()
        .expect("the worker's claim");
    let stale = OwnerClaim::from_parts(&key, record.owner.clone(), "fp");

    // Alive for 3 leases: the heartbeat keeps the claim.
    tokio::time::sleep(lease * 3).await;
    assert!(matches!(
        store.idempotency().claim(&key, "fp", lease).await.unwrap(),
        Claim::InProgress
    ));

    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();

    let execs = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(store);
    let callers: Vec<_> = (0..20)
        .map(|i| {
            let (store, key, execs) = (Arc::clone(&store), key.clone(), Arc::clone(&execs));
            tokio::spawn(async move {
                store
                    .idempotency()
                    .run(&key, "fp", IdempotencyOptions::new(), || async move {
                        execs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(format!("taken-over-by-{i}"))
                    })
                    .await
                    .unwrap()
                    .value
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for caller in callers {
        outcomes.push(caller.await.unwrap());
    }
    assert_eq!(execs.load(Ordering::SeqCst), 1);
    assert!(outcomes.iter().all(|o| *o == outcomes[0]), "{outcomes:?}");

    let late = store
        .idempotency()
        .complete(&stale, "stale", Duration::from_secs(60))
        .await;
    assert!(
        matches!(late, Err(RedisStoreError::LeaseLost { .. })),
        "{late:?}"
    );
    assert!(!store.idempotency().release(&stale).await.unwrap());
    let replay = store
        .idempotency()
        .run(
            &key,
            "fp",
            IdempotencyOptions::new(),
            must_not_run::<String>,
        )
        .await;
    assert_eq!(replay.unwrap().value, outcomes[0]);
}

/// 100 concurrent idempotent callers and 100 sequenced callers while their connection is killed
/// (`CLIENT KILL ID`) five times. Every caller ends (bounded) with its value or a
/// typed store error; the body ran once; sequence numbers handed out are distinct and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_give_typed_errors_and_no_duplicates() {
    let target = Target::single();
    let prefix = support::unique("clientkill");
    let store = Arc::new(target.store().lease(Duration::from_secs(2)));
    let idem_key = RedisKey::new("tests::redis", Some(&prefix), "idem");
    let seq_key = RedisKey::new("tests::redis", Some(&prefix), "seq");
    let execs = Arc::new(AtomicUsize::new(0));

    // Kills the store's own connection (by id, so tests running beside this one keep theirs),
    // five times, 40 ms apart, while the callers run.
    let killer = {
        let url = support::server().url.clone();
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let client = driver::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut killed = 0;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let mut victim = store.connection().await.unwrap();
                let Ok(id) = driver::cmd("CLIENT")
                    .arg("ID")
                    .query_async::<i64>(&mut victim)
                    .await
                else {
                    continue;
                };
                let kill = driver::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(id)
                    .to_owned();
                killed += kill.query_async::<i64>(&mut conn).await.unwrap_or(0);
                if killed == 5 {
                    break;
                }
            }
            killed
        })
    };
    let idem: Vec<_> = (0..100)
        .map(|_| {
            let (store, key, execs) = (Arc::clone(&store), idem_key.clone(), Arc::clone(&execs));
            tokio::spawn(async move {
                store
                    .idempotency()
                    .run(&key, "fp", IdempotencyOptions::new(), || async move {
                        execs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, String>("the outcome".to_owned())
                    })
                    .await
            })
        })
        .collect();
    let seq: Vec<_> = (0..100)
        .map(|_| {
            let (store, key) = (Arc::clone(&store), seq_key.clone());
            tokio::spawn(async move {
                store
                    .sequences()
                    .run(
                        &key,
                        1,
                        SequenceOptions {
                            timeout: Some(Duration::from_secs(20)),
                        },
                        |t| async move { Ok::<_, String>(t.number()) },
                    )
                    .await
            })
        })
        .collect();

    let all = async {
        let mut idem_results = Vec::new();
        for call in idem {
            idem_results.push(call.await.unwrap());
        }
        let mut seq_results = Vec::new();
        for call in seq {
            seq_results.push(call.await.unwrap());
        }
        (idem_results, seq_results)
    };
    let (idem_results, seq_results) = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no hang");
    let killed = killer.await.unwrap();
    assert_eq!(
        killed, 5,
        "CLIENT KILL must hit the store's connection mid-run"
    );

    for result in &idem_results {
        match result {
            Ok(outcome) => assert_eq!(outcome.value, "the outcome"),
            Err(IdempotentError::Store(_)) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    let mut numbers = Vec::new();
    for result in &seq_results {
        match result {
            Ok(n) => numbers.push(*n),
            Err(SequencedError::Store(_) | SequencedError::Timeout { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    numbers.sort_unstable();
    numbers.dedup();
    let successes = seq_results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(numbers.len(), successes, "a number was handed out twice");
    let committed = store
        .sequences()
        .current(&seq_key)
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(numbers.iter().all(|n| *n <= committed));

    // After the storm: the outcome is there (or, had its completion been lost, the claim ends
    // with its lease); either way a fresh caller gets one outcome and the body ran once overall.
    let after = store
        .idempotency()
        .run(&idem_key, "fp", IdempotencyOptions::new(), || async {
            execs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>("the outcome".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(after.value, "the outcome");
    assert_eq!(
        execs.load(Ordering::SeqCst),
        1,
        "the body ran more than once"
    );
    eprintln!(
        "client kill: {killed} connections killed; {} idempotent callers got typed errors, {} sequenced callers got typed errors",
        idem_results.iter().filter(|r| r.is_err()).count(),
        seq_results.len() - successes
    );
}

// ---------------------------------------------------------------------------------------------
// Single-process behaviour

#[tokio::test]
async fn conflict_replay_and_reject() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("conflict")), "k");
    let first = store
        .idempotency()
        .run(&key, "fp-a", IdempotencyOptions::new(), || async {
            Ok::<_, String>(7)
        })
        .await;
    let first = first.unwrap();
    assert_eq!((first.value, first.replayed), (7, false));
    let replay = store
        .idempotency()
        .run(&key, "fp-a", IdempotencyOptions::new(), must_not_run::<i32>)
        .await;
    let replay = replay.unwrap();
    assert_eq!((replay.value, replay.replayed), (7, true));
    let conflict = store
        .idempotency()
        .run(&key, "fp-b", IdempotencyOptions::new(), must_not_run::<i32>)
        .await;
    assert!(matches!(conflict, Err(IdempotentError::Conflict { .. })));

    let running = RedisKey::new("tests::redis", Some(&support::unique("reject")), "k");
    let Claim::Owner(claim) = store
        .idempotency()
        .claim(&running, "fp", Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("fresh key must be claimable")
    };
    let options = IdempotencyOptions {
        in_flight: InFlight::Reject,
        ..IdempotencyOptions::new()
    };
    let rejected = store
        .idempotency()
        .run(&running, "fp", options, must_not_run::<i32>)
        .await;
    assert!(matches!(rejected, Err(IdempotentError::InProgress { .. })));
    assert!(store.idempotency().release(&claim).await.unwrap());
}

#[tokio::test]
async fn failed_body_releases_the_claim_and_is_not_stored() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("err")), "k");
    let failed = store
        .idempotency()
        .run(&key, "fp", IdempotencyOptions::new(), || async {
            Err::<i32, _>("boom")
        })
        .await;
    assert!(matches!(failed, Err(IdempotentError::Body("boom"))));
    let retried = store
        .idempotency()
        .run(&key, "fp", IdempotencyOptions::new(), || async {
            Ok::<_, String>(1)
        })
        .await;
    assert!(!retried.unwrap().replayed);
}

#[tokio::test]
async fn undecodable_record_is_a_typed_error() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("garbage")), "k");
    let mut conn = store.connection().await.unwrap();
    let _: () = conn.set(key.redis_key("idem"), "not json").await.unwrap();
    let _: () = conn
        .set(key.redis_key("val"), r#"{"v":99,"value":1}"#)
        .await
        .unwrap();
    let idem = store
        .idempotency()
        .run(&key, "fp", IdempotencyOptions::new(), must_not_run::<i32>)
        .await;
    assert!(
        matches!(
            idem,
            Err(IdempotentError::Store(RedisStoreError::Undecodable { .. }))
        ),
        "{idem:?}"
    );
    let cached = store
        .cache()
        .get_or_compute(
            &key,
            CacheOptions::new(Duration::from_secs(5)),
            must_not_run::<i32>,
        )
        .await;
    assert!(matches!(
        cached,
        Err(racefree::redis::CachedError::Store(
            RedisStoreError::Undecodable { .. }
        ))
    ));
    let _: () = conn
        .del(&[key.redis_key("idem"), key.redis_key("val")])
        .await
        .unwrap();
}

#[tokio::test]
async fn unreachable_redis_is_a_typed_error_not_a_hang() {
    // Port 1 on loopback: nothing listens there.
    let store = RedisStore::new("redis://127.0.0.1:1/").command_timeout(Duration::from_millis(300));
    let key = RedisKey::new("tests::redis", None, "k");
    let started = Instant::now();
    let idem = store
        .idempotency()
        .run(&key, "fp", IdempotencyOptions::new(), must_not_run::<i32>)
        .await;
    assert!(
        matches!(
            idem,
            Err(IdempotentError::Store(
                RedisStoreError::Unavailable { .. } | RedisStoreError::Timeout { .. }
            ))
        ),
        "{idem:?}"
    );
    let seq = store
        .sequences()
        .run(&key, 1, SequenceOptions::default(), |_| {
            must_not_run::<i32>()
        })
        .await;
    assert!(matches!(seq, Err(SequencedError::Store(_))), "{seq:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn sequence_lease_lost_commits_nothing() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("fence")), "k");
    let lease = Duration::from_millis(100);
    let first = store
        .sequences()
        .acquire(&key, 1, lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.number(), 1);
    tokio::time::sleep(lease * 3).await; // the holder "pauses" past its lease
    let second = store
        .sequences()
        .acquire(&key, 1, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.number(), 1, "the stale holder committed nothing");
    assert!(second.fence() > first.fence());
    assert!(matches!(
        store.sequences().commit(&first).await,
        Err(RedisStoreError::LeaseLost { .. })
    ));
    store.sequences().commit(&second).await.unwrap();
    assert_eq!(store.sequences().current(&key).await.unwrap(), Some(1));
    store
        .sequences()
        .reset(&key, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(store.sequences().current(&key).await.unwrap(), None);
}

/// A commit whose reply was lost is re-sent after the next holder already committed: the
/// re-send must learn that it landed (not report `LeaseLost`, which would tell the caller that
/// its number and its body's effects were not consumed).
#[tokio::test]
async fn commit_resent_after_the_next_holder_committed_reports_success() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("resend")), "k");
    let sequences = store.sequences();
    let first = sequences
        .acquire(&key, 1, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    sequences.commit(&first).await.unwrap();
    let second = sequences
        .acquire(&key, 1, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.number(), 2);
    sequences.commit(&second).await.unwrap();
    sequences
        .commit(&first)
        .await
        .expect("the re-sent commit landed the first time");
    assert_eq!(
        sequences.current(&key).await.unwrap(),
        Some(2),
        "the re-send changed nothing"
    );
}

/// A reset waits for the key's holder: it never lands between the holder's read of the counter
/// and its commit (which would undo the reset).
#[tokio::test]
async fn reset_waits_for_the_holder() {
    let store = RedisStore::new(support::server().url.clone());
    let key = RedisKey::new("tests::redis", Some(&support::unique("reset")), "k");
    let sequences = store.sequences();
    let first = sequences
        .acquire(&key, 1, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    sequences.commit(&first).await.unwrap();
    let held = sequences
        .acquire(&key, 1, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        sequences.reset(&key, Duration::from_millis(50)).await,
        Err(RedisStoreError::Timeout { .. })
    ));
    sequences.commit(&held).await.unwrap();
    sequences.reset(&key, Duration::from_secs(5)).await.unwrap();
    assert_eq!(sequences.current(&key).await.unwrap(), None);
}

#[tokio::test]
async fn static_store_works() {
    static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1:6379/");
    let store: &RedisStore = if support::server().url == "redis://127.0.0.1:6379/" {
        &REDIS
    } else {
        Box::leak(Box::new(RedisStore::new(support::server().url.clone())))
    };
    let key = RedisKey::new("tests::redis", Some(&support::unique("static")), "k");
    let v = store
        .cache()
        .get_or_compute(&key, CacheOptions::new(Duration::from_secs(5)), || async {
            Ok::<_, String>(5)
        })
        .await;
    assert_eq!(v.unwrap(), 5);
    assert!(store.round_trips() >= 2);
}

// ---------------------------------------------------------------------------------------------
// Issue 5, point 6: the same on a 3-node Redis Cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_idempotent_sequenced_and_cached_across_processes() {
    let cluster = support::Cluster::start();
    let target = Target::cluster(&cluster);
    assert!(target.store().connection().await.unwrap().is_cluster());
    idempotent_across_processes(&target, &support::unique("cidem"), "idempotent").await;
    idempotent_across_processes(&target, &support::unique("caidem"), "attr-idempotent").await;
    sequenced_across_processes(&target, &support::unique("cseq"), "sequenced").await;
    sequenced_across_processes(&target, &support::unique("caseq"), "attr-sequenced").await;
    sequenced_failures_leave_no_gap(&target, &support::unique("cseqfail")).await;
    cached_across_processes(&target, &support::unique("ccache"), "cached").await;
}
