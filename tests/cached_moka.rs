//! `#[cached(store = ...)]` with a moka cache (feature `moka`): the same single flight as
//! racefree's own cache. Concurrency tests say how many callers, how many rounds and what must
//! hold in every round.
#![cfg(feature = "moka")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, LazyLock};
use std::task::Poll;

use racefree::cached;

#[path = "support/common.rs"]
mod common;

/// `callers` threads released together by a barrier, each running `call`; their outcomes
/// (`Err` for a panic), in order.
fn threads_released_together<T: Send + 'static>(
    callers: usize,
    call: impl Fn() -> T + Send + Sync + 'static,
) -> Vec<std::thread::Result<T>> {
    let barrier = Arc::new(Barrier::new(callers));
    let call = Arc::new(call);
    (0..callers)
        .map(|_| {
            let (barrier, call) = (barrier.clone(), call.clone());
            std::thread::spawn(move || {
                barrier.wait();
                call()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join())
        .collect()
}

/// Threads that have entered a call and now sleep (blocked on moka's per-key waiter lock: once
/// inside, it is the only place a caller blocks). Linux: from `/proc`; elsewhere it counts the
/// threads that entered.
#[derive(Default)]
struct Entered(std::sync::Mutex<Vec<String>>);

impl Entered {
    fn enter(&self) {
        let me = std::fs::read_link("/proc/thread-self")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.0.lock().unwrap().push(me);
    }

    fn sleeping(&self) -> usize {
        let threads = self.0.lock().unwrap();
        threads
            .iter()
            .filter(|t| {
                t.is_empty()
                    || std::fs::read_to_string(format!("/proc/{t}/stat"))
                        // Field 3, after the parenthesised name.
                        .map(|s| {
                            s.rsplit(')')
                                .next()
                                .unwrap_or("")
                                .trim_start()
                                .starts_with('S')
                        })
                        .unwrap_or(false)
            })
            .count()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

// 1. Sync, `store = <LazyLock static>`: 16 threads × 100 rounds, one cold key per round: the body
//    runs exactly once per round and every caller gets its value.
#[test]
fn sync_callers_of_a_cold_key_run_the_body_once_per_round() {
    static MOKA: LazyLock<moka::sync::Cache<u64, Vec<u64>>> =
        LazyLock::new(|| moka::sync::Cache::new(10_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(key = round, store = MOKA)]
    fn compute(round: u64) -> Vec<u64> {
        RUNS.fetch_add(1, SeqCst);
        vec![round, round * 2]
    }
    const CALLERS: usize = 16;
    for round in 0..100u64 {
        let values = threads_released_together(CALLERS, move || compute(round));
        for value in values {
            assert_eq!(value.unwrap(), vec![round, round * 2], "round {round}");
        }
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            round + 1,
            "round {round}: executions"
        );
    }
    assert_eq!(MOKA.get(&3), Some(vec![3, 6]));
}

// 2. Async, `store = <LazyLock static>` holding a `moka::future::Cache`: 16 tasks × 100 rounds on
//    a 2-worker runtime, one cold key per round: one execution per round, every caller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_callers_of_a_cold_key_run_the_body_once_per_round() {
    static MOKA: LazyLock<moka::future::Cache<u64, u64>> =
        LazyLock::new(|| moka::future::Cache::new(10_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(key = round, store = MOKA)]
    async fn compute(round: u64) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        tokio::task::yield_now().await;
        round * 10
    }
    const CALLERS: usize = 16;
    for round in 0..100u64 {
        let callers = common::released_together(CALLERS, |_| compute(round));
        for caller in callers {
            let value = common::guarded("a caller", caller).await.unwrap();
            assert_eq!(value, round * 10, "round {round}");
        }
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            round + 1,
            "round {round}: executions"
        );
    }
}

// 3. Sync `Err`: the first execution of each round fails once its 7 waiters block on it; the
//    error reaches only that caller, nothing is cached, the waiters are released and exactly one
//    of them computes. 8 threads × 30 rounds: 2 executions, 1 `Err`, 7 `Ok` per round.
#[test]
fn an_error_is_not_cached_and_releases_the_waiters() {
    static MOKA: LazyLock<moka::sync::Cache<u64, u64>> =
        LazyLock::new(|| moka::sync::Cache::new(1_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static ENTERED: LazyLock<Entered> = LazyLock::new(Entered::default);
    const CALLERS: usize = 8;
    #[cached(key = round, store = MOKA)]
    fn flaky(round: u64) -> Result<u64, String> {
        if RUNS.fetch_add(1, SeqCst).is_multiple_of(2) {
            // Everybody else entered and sleeps: they wait for this execution.
            common::until_sync("the other callers wait", || {
                ENTERED.sleeping() >= CALLERS - 1
            });
            return Err(format!("round {round} fails once"));
        }
        Ok(round)
    }
    for round in 0..30u64 {
        ENTERED.clear();
        let outcomes = threads_released_together(CALLERS, move || {
            ENTERED.enter();
            flaky(round)
        });
        let outcomes: Vec<Result<u64, String>> = outcomes.into_iter().map(Result::unwrap).collect();
        let errors = outcomes.iter().filter(|o| o.is_err()).count();
        assert_eq!(
            errors, 1,
            "round {round}: the error reached {errors} callers"
        );
        assert!(
            outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok())
                .all(|v| *v == round),
            "round {round}"
        );
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            2 * (round + 1),
            "round {round}: executions"
        );
        assert_eq!(
            MOKA.get(&round),
            Some(round),
            "round {round}: the success is cached"
        );
    }
}

// 4. Sync panic: the first execution of each round panics once its 7 waiters block on it; the
//    panic reaches only that caller, the waiters are released, one computes. 8 threads × 30
//    rounds: 2 executions, 1 panic, 7 values per round.
#[test]
fn a_panicking_body_releases_its_waiters() {
    static MOKA: LazyLock<moka::sync::Cache<u64, u64>> =
        LazyLock::new(|| moka::sync::Cache::new(1_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static ENTERED: LazyLock<Entered> = LazyLock::new(Entered::default);
    const CALLERS: usize = 8;
    #[cached(key = round, store = MOKA)]
    fn fragile(round: u64) -> u64 {
        if RUNS.fetch_add(1, SeqCst).is_multiple_of(2) {
            common::until_sync("the other callers wait", || {
                ENTERED.sleeping() >= CALLERS - 1
            });
            panic!("first execution of round {round} panics");
        }
        round
    }
    for round in 0..30u64 {
        ENTERED.clear();
        let outcomes = threads_released_together(CALLERS, move || {
            ENTERED.enter();
            fragile(round)
        });
        let panicked = outcomes.iter().filter(|o| o.is_err()).count();
        assert_eq!(
            panicked, 1,
            "round {round}: the panic reached {panicked} callers"
        );
        let values: Vec<u64> = outcomes.into_iter().filter_map(Result::ok).collect();
        assert_eq!(values, vec![round; CALLERS - 1], "round {round}");
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            2 * (round + 1),
            "round {round}: executions"
        );
    }
}

fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    future.poll(&mut std::task::Context::from_waker(waker))
}

// 5. Async `None` and `Err`, deterministic: a leader is polled until its body awaits, 5 waiters
//    are polled until they wait on it (their bodies have not run), then the leader fails. The
//    waiters are released and exactly one of them runs its body; the failure is not cached.
//    50 rounds, each for `Option` and for `Result`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_failures_are_not_cached_and_release_the_waiters() {
    static MOKA: LazyLock<moka::future::Cache<u64, String>> =
        LazyLock::new(|| moka::future::Cache::new(1_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(key = key, store = MOKA)]
    async fn maybe(key: u64, gate: Option<tokio::sync::oneshot::Receiver<()>>) -> Option<String> {
        RUNS.fetch_add(1, SeqCst);
        match gate {
            Some(gate) => {
                let _ = gate.await;
                None
            }
            None => Some(format!("value {key}")),
        }
    }
    #[cached(key = key, store = MOKA)]
    async fn fallible(
        key: u64,
        gate: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Result<String, u64> {
        RUNS.fetch_add(1, SeqCst);
        match gate {
            Some(gate) => {
                let _ = gate.await;
                Err(key)
            }
            None => Ok(format!("value {key}")),
        }
    }
    const WAITERS: usize = 5;
    for round in 0..100u64 {
        let runs = RUNS.load(SeqCst);
        let (open, gate) = tokio::sync::oneshot::channel();
        let option = round % 2 == 0;
        type Call = Pin<Box<dyn Future<Output = Result<String, ()>> + Send>>;
        let call = |gate| -> Call {
            if option {
                Box::pin(async move { maybe(round, gate).await.ok_or(()) })
            } else {
                Box::pin(async move {
                    fallible(round, gate)
                        .await
                        .map_err(|k| assert_eq!(k, round))
                })
            }
        };
        let mut leader = call(Some(gate));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut waiters: Vec<Call> = (0..WAITERS).map(|_| call(None)).collect();
        for waiter in &mut waiters {
            assert!(poll_once(waiter.as_mut()).is_pending(), "round {round}");
        }
        assert_eq!(
            RUNS.load(SeqCst),
            runs + 1,
            "round {round}: only the leader runs"
        );
        open.send(()).unwrap();
        assert_eq!(leader.await, Err(()), "round {round}: the leader's failure");
        let values = common::guarded("the waiters", futures::future::join_all(waiters)).await;
        assert_eq!(
            values,
            vec![Ok(format!("value {round}")); WAITERS],
            "round {round}"
        );
        assert_eq!(
            RUNS.load(SeqCst),
            runs + 2,
            "round {round}: one take-over execution"
        );
    }
}

// 6. Async cancellation, deterministic: the leader's future is dropped while its body awaits
//    and 5 waiters wait on it; they are released, exactly one runs its body, all get the value.
//    A dropped waiter leaves nothing behind either. 50 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_leader_future_releases_its_waiters() {
    static MOKA: LazyLock<moka::future::Cache<u64, u64>> =
        LazyLock::new(|| moka::future::Cache::new(1_000));
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(key = round, store = MOKA)]
    async fn get(round: u64, hang: bool) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        if hang {
            std::future::pending::<()>().await;
        }
        round
    }
    const WAITERS: usize = 5;
    for round in 0..50u64 {
        let runs = RUNS.load(SeqCst);
        let mut leader = Box::pin(get(round, true));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut waiters: Vec<_> = (0..WAITERS).map(|_| Box::pin(get(round, false))).collect();
        for waiter in &mut waiters {
            assert!(poll_once(waiter.as_mut()).is_pending(), "round {round}");
        }
        let mut dropped_waiter = Box::pin(get(round, false));
        assert!(poll_once(dropped_waiter.as_mut()).is_pending());
        drop(dropped_waiter);
        assert_eq!(
            RUNS.load(SeqCst),
            runs + 1,
            "round {round}: only the leader runs"
        );
        drop(leader);
        let values = common::guarded("the waiters", futures::future::join_all(waiters)).await;
        assert_eq!(values, vec![round; WAITERS], "round {round}");
        assert_eq!(
            RUNS.load(SeqCst),
            runs + 2,
            "round {round}: one take-over execution"
        );
        assert_eq!(
            get(round, true).await,
            round,
            "round {round}: a hit after the take-over"
        );
    }
}

// 7. moka's eviction: 200 keys into a cache of capacity 10; after `run_pending_tasks` at most 10
//    remain and the eviction listener saw the rest go. An evicted key computes again (once); a
//    stored one is a hit.
#[test]
fn an_evicted_key_is_computed_again() {
    static EVICTED: AtomicUsize = AtomicUsize::new(0);
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static MOKA: LazyLock<moka::sync::Cache<u64, u64>> = LazyLock::new(|| {
        moka::sync::Cache::builder()
            .max_capacity(10)
            .eviction_listener(|_, _, _| {
                EVICTED.fetch_add(1, SeqCst);
            })
            .build()
    });
    #[cached(key = k, store = MOKA)]
    fn square(k: u64) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        k * k
    }
    for k in 0..200 {
        assert_eq!(square(k), k * k);
    }
    MOKA.run_pending_tasks();
    assert!(MOKA.entry_count() <= 10, "{} entries", MOKA.entry_count());
    assert!(
        EVICTED.load(SeqCst) >= 190,
        "{} evictions",
        EVICTED.load(SeqCst)
    );
    let stored: Vec<u64> = (0..200).filter(|k| MOKA.contains_key(k)).collect();
    let evicted = (0..200).find(|k| !MOKA.contains_key(k)).unwrap();
    let runs = RUNS.load(SeqCst);
    for &k in &stored {
        assert_eq!(square(k), k * k);
    }
    assert_eq!(RUNS.load(SeqCst), runs, "a stored key ran its body");
    assert_eq!(square(evicted), evicted * evicted);
    assert_eq!(
        RUNS.load(SeqCst),
        runs + 1,
        "the evicted key is computed once"
    );
}

// 8. `store = self.field`, sync and async: one moka cache per instance; a plain return value is
//    always cached, `None` never.
#[tokio::test]
async fn per_instance_moka_stores() {
    struct Repo {
        rows: moka::sync::Cache<u64, String>,
        names: moka::future::Cache<u64, String>,
        reads: AtomicUsize,
    }
    impl Repo {
        fn new() -> Self {
            Repo {
                rows: moka::sync::Cache::new(100),
                names: moka::future::Cache::new(100),
                reads: AtomicUsize::new(0),
            }
        }

        #[cached(key = id, store = self.rows)]
        fn row(&self, id: u64) -> Option<String> {
            self.reads.fetch_add(1, SeqCst);
            (id != 0).then(|| format!("row {id}"))
        }

        #[cached(key = id, store = self.names)]
        async fn name(&self, id: u64) -> String {
            self.reads.fetch_add(1, SeqCst);
            format!("name {id}")
        }
    }
    let (a, b) = (Repo::new(), Repo::new());
    assert_eq!(
        (a.row(1), a.row(1)),
        (Some("row 1".into()), Some("row 1".into()))
    );
    assert_eq!((a.row(0), a.row(0)), (None, None));
    assert_eq!(b.row(1), Some("row 1".into()));
    assert_eq!(a.name(1).await, "name 1");
    assert_eq!(a.name(1).await, "name 1");
    assert_eq!(
        (a.reads.load(SeqCst), b.reads.load(SeqCst)),
        (1 + 2 + 1, 1),
        "a hit ran the body, or instances share a cache"
    );
    assert_eq!(a.rows.get(&1), Some("row 1".into()));
    assert!(!a.rows.contains_key(&0), "None was cached");
    assert_eq!(a.names.get(&1).await, Some("name 1".into()));
}
