//! Behaviour of `#[cached]`, one test per promise. Concurrency tests say how many callers, how
//! many rounds and what must hold in every round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::Duration;

use racefree::{cached, Cache};

#[path = "support/common.rs"]
mod common;

// 1. Sync: 16 threads × 200 rounds, one cold key per round: the body runs exactly once per
//    round and every caller gets the same value.
#[test]
fn concurrent_sync_callers_of_a_cold_key_run_the_body_once() {
    static RUNS: Mutex<Option<HashMap<u64, usize>>> = Mutex::new(None);
    #[cached]
    fn compute(round: u64) -> Vec<u64> {
        *RUNS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .entry(round)
            .or_default() += 1;
        vec![round, round * 2]
    }
    const CALLERS: usize = 16;
    const ROUNDS: u64 = 200;
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(CALLERS));
        let results: Vec<Vec<u64>> = (0..CALLERS)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    compute(round)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(
            results.iter().all(|r| *r == [round, round * 2]),
            "round {round}: unequal values"
        );
        assert_eq!(
            RUNS.lock().unwrap().as_ref().unwrap()[&round],
            1,
            "round {round}: body ran more than once"
        );
    }
    assert_eq!(compute_cache().stats().executions, ROUNDS);
    assert_eq!(compute_cache().in_flight(), 0);
}

// 1. Async: a follower awaits, it never blocks the executor thread. On a current-thread
//    runtime the leader's body can only finish if the 10 followers yield the one thread while
//    they wait: the task that opens the gate runs on that same thread.
#[tokio::test(flavor = "current_thread")]
async fn async_followers_do_not_block_the_executor_thread() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
    #[cached]
    async fn slow(key: u64) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        GATE.notified().await;
        key + 1
    }
    let callers: Vec<_> = (0..11).map(|_| tokio::spawn(slow(7))).collect();
    let opener = tokio::spawn(async {
        // Runs only when every caller has parked on this thread: 1 leader + 10 coalesced.
        while slow_cache().stats().coalesced < 10 {
            tokio::task::yield_now().await;
        }
        GATE.notify_waiters();
    });
    let all =
        tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(callers)).await;
    let values: Vec<u64> = all
        .expect("followers blocked the executor")
        .into_iter()
        .map(Result::unwrap)
        .collect();
    opener.await.unwrap();
    assert_eq!(values, vec![8; 11]);
    assert_eq!(RUNS.load(SeqCst), 1);
    assert_eq!(slow_cache().stats().coalesced, 10);
}

// 2. 256 key pairs: while key A's body is blocked (it waits for our signal), a miss on key B
//    and a hit on a warm key H complete. If they waited on A, the test would time out.
#[test]
fn a_slow_key_never_delays_another_key() {
    static STARTED: Mutex<Option<mpsc::Sender<u64>>> = Mutex::new(None);
    static RELEASE: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);
    #[cached]
    fn value(key: u64) -> u64 {
        if key.is_multiple_of(2) {
            STARTED.lock().unwrap().as_ref().unwrap().send(key).unwrap();
            RELEASE.lock().unwrap().as_ref().unwrap().recv().unwrap();
        }
        key * 10
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *STARTED.lock().unwrap() = Some(started_tx);
    *RELEASE.lock().unwrap() = Some(release_rx);
    assert_eq!(value(1_000_001), 10_000_010); // the warm key H
    for pair in 0..256u64 {
        let slow_key = pair * 2;
        let slow = std::thread::spawn(move || value(slow_key));
        assert_eq!(
            started_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            slow_key
        );
        // A is mid-computation now. B's miss and H's hit must not wait for it.
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            done_tx
                .send((value(slow_key + 1), value(1_000_001)))
                .unwrap()
        });
        let (miss, hit) = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("key B waited for key A");
        assert_eq!((miss, hit), ((slow_key + 1) * 10, 10_000_010));
        release_tx.send(()).unwrap();
        assert_eq!(slow.join().unwrap(), slow_key * 10);
    }
}

// 3. Only `Ok` is cached; `io::Result` (an alias) counts as a Result.
#[test]
fn only_ok_results_are_cached() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static FAIL: AtomicBool = AtomicBool::new(true);
    #[cached]
    fn read(path: &str) -> std::io::Result<String> {
        RUNS.fetch_add(1, SeqCst);
        if FAIL.load(SeqCst) {
            return Err(std::io::Error::other("disk on fire"));
        }
        Ok(format!("contents of {path}"))
    }
    assert!(read("a").is_err());
    assert!(read("a").is_err());
    assert_eq!(RUNS.load(SeqCst), 2, "an Err was cached");
    FAIL.store(false, SeqCst);
    assert_eq!(read("a").unwrap(), "contents of a");
    assert_eq!(read("a").unwrap(), "contents of a");
    assert_eq!(RUNS.load(SeqCst), 3, "an Ok was not cached");
    assert_eq!(read_cache().len(), 1);
}

// 3. Only `Some` is cached.
#[test]
fn only_some_options_are_cached() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached]
    fn find(id: u32) -> Option<u32> {
        RUNS.fetch_add(1, SeqCst);
        id.is_multiple_of(2).then_some(id)
    }
    assert_eq!(
        (find(1), find(1), find(2), find(2)),
        (None, None, Some(2), Some(2))
    );
    assert_eq!(RUNS.load(SeqCst), 3);
}

// 3. Waiters of a failing call are not handed the error: each gets its own attempt, one at a
//    time. 8 threads × 50 rounds on a body that always fails: every caller gets Err, the body
//    runs once per caller, and never twice at the same time for one key.
#[test]
fn waiters_of_a_failed_call_retry_one_at_a_time() {
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    static MAX_ACTIVE: AtomicUsize = AtomicUsize::new(0);
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached]
    fn flaky(round: u32) -> Result<u32, String> {
        let now = ACTIVE.fetch_add(1, SeqCst) + 1;
        MAX_ACTIVE.fetch_max(now, SeqCst);
        RUNS.fetch_add(1, SeqCst);
        std::thread::yield_now();
        ACTIVE.fetch_sub(1, SeqCst);
        Err(format!("round {round} failed"))
    }
    const CALLERS: usize = 8;
    for round in 0..50 {
        let barrier = Arc::new(Barrier::new(CALLERS));
        let errors = (0..CALLERS)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    flaky(round)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|_| true)
            .map(|t| t.join().unwrap())
            .filter(Result::is_err)
            .count();
        assert_eq!(
            errors, CALLERS,
            "round {round}: somebody got a value from a failing body"
        );
        assert_eq!(
            MAX_ACTIVE.load(SeqCst),
            1,
            "round {round}: two executions of one key at once"
        );
    }
    assert_eq!(RUNS.load(SeqCst), 50 * CALLERS);
    assert_eq!(flaky_cache().len(), 0);
}

// 4. An entry lives `ttl`, then the body runs again. (1 s, so that a pause of the machine
//    between the first two calls does not expire the entry early.)
#[test]
fn ttl_expires_entries() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(ttl = "1s")]
    fn stamp(key: u8) -> usize {
        RUNS.fetch_add(1, SeqCst) + key as usize
    }
    let first = stamp(1);
    assert_eq!(stamp(1), first);
    // Waiting for time to pass is what is under test here, not a synchronisation.
    std::thread::sleep(Duration::from_millis(1050));
    assert_ne!(stamp(1), first, "an expired entry was returned");
    assert_eq!(RUNS.load(SeqCst), 2);
}

// 4. The entry count never exceeds `capacity`, and a key hit since the hand last passed
//    survives eviction (CLOCK).
#[test]
fn capacity_bounds_the_entry_count() {
    #[cached(capacity = 100)]
    fn square(x: u64) -> u64 {
        x * x
    }
    for x in 0..10_000 {
        assert_eq!(square(x), x * x);
        assert!(
            square_cache().len() <= 100,
            "{} entries after {x} inserts",
            square_cache().len()
        );
        square(0); // keep key 0 hot
    }
    let before = square_cache().stats().executions;
    square(0);
    assert_eq!(
        square_cache().stats().executions,
        before,
        "the hot key was evicted"
    );
}

// 5. A panic in the body reaches that caller only: the 7 callers waiting for it are released,
//    one of them computes, and nothing stays locked. 8 threads × 50 rounds.
#[test]
fn a_panicking_leader_releases_its_waiters() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    const CALLERS: usize = 8;
    #[cached]
    fn fragile(round: u64) -> u64 {
        if RUNS.fetch_add(1, SeqCst).is_multiple_of(2) {
            // First execution of the round: wait until every other caller waits on us, then panic.
            common::until_sync("all followers wait", || {
                fragile_cache().stats().coalesced >= (round + 1) * (CALLERS as u64 - 1)
            });
            panic!("first execution of round {round} panics");
        }
        round
    }
    for round in 0..50u64 {
        let barrier = Arc::new(Barrier::new(CALLERS));
        let outcomes: Vec<_> = (0..CALLERS)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    fragile(round)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join())
            .collect();
        let panicked = outcomes.iter().filter(|o| o.is_err()).count();
        let values: Vec<u64> = outcomes.into_iter().filter_map(Result::ok).collect();
        assert_eq!(
            panicked, 1,
            "round {round}: the panic reached {panicked} callers"
        );
        assert_eq!(values, vec![round; CALLERS - 1], "round {round}");
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            2 * (round + 1),
            "round {round}: executions"
        );
    }
}

// 6. Dropping the computing future releases its 5 waiters; one of them takes over.
//    Dropping a waiting future leaves no trace. 50 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_hands_over_and_a_cancelled_waiter_leaves_no_trace() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static STORE: std::sync::LazyLock<Cache<u64, u64>> = std::sync::LazyLock::new(Cache::new);
    struct Svc;
    impl Svc {
        #[cached(key = round, store = STORE)]
        async fn get(&self, round: u64, hang: bool) -> u64 {
            RUNS.fetch_add(1, SeqCst);
            if hang {
                std::future::pending::<()>().await;
            }
            round
        }
    }
    for round in 0..50u64 {
        let leader = tokio::spawn(async move { Svc.get(round, true).await });
        common::until("the leader computes", || STORE.in_flight() == 1).await;
        let coalesced = STORE.stats().coalesced;
        let waiters: Vec<_> = (0..5)
            .map(|_| tokio::spawn(async move { Svc.get(round, false).await }))
            .collect();
        let dropped_waiter = tokio::spawn(async move { Svc.get(round, false).await });
        common::until("six callers wait", || {
            STORE.stats().coalesced == coalesced + 6
        })
        .await;
        dropped_waiter.abort();
        let _ = dropped_waiter.await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        for w in waiters {
            let v = tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("a waiter hangs")
                .unwrap();
            assert_eq!(v, round, "round {round}");
        }
        assert_eq!(
            RUNS.load(SeqCst) as u64,
            2 * (round + 1),
            "round {round}: one take-over execution"
        );
        assert_eq!(
            STORE.in_flight(),
            0,
            "round {round}: registry entry left behind"
        );
    }
}

// 7. After 100,000 distinct keys — plain, failing, panicking, cancelled leaders and cancelled
//    waiters — the per-key registry holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_empty_after_100k_keys() {
    let cache: &'static Cache<u64, u64> = Box::leak(Box::new(Cache::new()));
    for key in 0..100_000u64 {
        match key % 5 {
            0 | 1 => assert_eq!(cache.get_with(key, || key), key),
            2 => assert!(cache.try_get_with(key, || Err::<u64, _>("no")).is_err()),
            3 => {
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    cache.get_with(key, || panic!("boom"))
                }));
                assert!(panicked.is_err());
            }
            _ => {
                // A leader that never finishes, a waiter behind it; both futures dropped.
                let leader = cache.get_with_async(key, std::future::pending::<u64>());
                let mut leader = Box::pin(leader);
                assert!(futures::poll!(leader.as_mut()).is_pending());
                let mut waiter = Box::pin(cache.get_with_async(key, async { unreachable!() }));
                assert!(futures::poll!(waiter.as_mut()).is_pending());
                drop(waiter);
                drop(leader);
            }
        }
    }
    assert_eq!(cache.in_flight(), 0);
}

// 8. Recursion through other keys works: fib(90) with memoization returns at once.
#[test]
fn memoized_recursion() {
    #[cached]
    fn fib(n: u64) -> u64 {
        if n < 2 {
            n
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    assert_eq!(fib(90), 2_880_067_194_370_816_120);
    assert_eq!(fib_cache().stats().executions, 91);
}

// 9. Methods with `&self`: a per-instance cache via `store = self.field`, and an associated
//    function with the function's own cache.
#[test]
fn methods_and_per_instance_stores() {
    struct Repo {
        rows: Cache<u64, String>,
        reads: AtomicUsize,
    }
    impl Repo {
        #[cached(key = id, store = self.rows)]
        fn row(&self, id: u64) -> Option<String> {
            self.reads.fetch_add(1, SeqCst);
            Some(format!("row {id}"))
        }

        #[cached]
        fn table_name(schema: &str) -> String {
            format!("{schema}.rows")
        }
    }
    let (a, b) = (
        Repo {
            rows: Cache::new(),
            reads: AtomicUsize::new(0),
        },
        Repo {
            rows: Cache::new(),
            reads: AtomicUsize::new(0),
        },
    );
    assert_eq!(
        (a.row(1), a.row(1), b.row(1)),
        (
            Some("row 1".into()),
            Some("row 1".into()),
            Some("row 1".into())
        )
    );
    assert_eq!(
        (a.reads.load(SeqCst), b.reads.load(SeqCst)),
        (1, 1),
        "instances share a cache"
    );
    assert_eq!(a.rows.len(), 1);
    assert_eq!(Repo::table_name("public"), "public.rows");
    assert_eq!(Repo::table_name("public"), "public.rows");
    assert_eq!(Repo::table_name_cache().stats().hits, 1);
    assert!(Repo::table_name_cache().invalidate(&"public".to_owned()));
}

// 9. A generic function gets one cache per concrete type.
#[test]
fn generic_functions_get_one_cache_per_type() {
    #[cached]
    fn describe<T: std::fmt::Debug + Clone + Eq + std::hash::Hash + Send + Sync + 'static>(
        value: T,
    ) -> String {
        format!("{value:?}")
    }
    assert_eq!(describe(1u8), "1");
    assert_eq!(describe("1".to_owned()), "\"1\"");
    assert_eq!(describe(1u8), "1");
    let stats = describe_cache().stats();
    assert_eq!(
        (stats.executions, stats.hits, describe_cache().len()),
        (2, 1, 2)
    );
    describe_cache().clear();
    assert_eq!(describe_cache().len(), 0);
}

// The handle: invalidate, clear, len, stats.
#[test]
fn the_function_handle_invalidates_clears_and_counts() {
    #[cached]
    fn greet(name: &str, times: usize) -> String {
        name.repeat(times)
    }
    greet("a", 2);
    greet("b", 2);
    greet("a", 2);
    let cache = greet_cache();
    assert_eq!(
        (cache.len(), cache.stats().hits, cache.stats().executions),
        (2, 1, 2)
    );
    assert!(cache.invalidate(&("a".to_owned(), 2usize)));
    assert!(!cache.invalidate(&("a".to_owned(), 2usize)));
    assert_eq!(cache.len(), 1);
    cache.clear();
    assert!(cache.is_empty());
    cache.reset_stats();
    assert_eq!(cache.stats(), racefree::CacheStats::default());
}

// 4. Expired entries are purged as new ones arrive, so a stream of unique keys keeps memory
//    bounded: 100,000 keys with a 1 ms TTL, time passes, 100,000 more — the first batch has
//    expired and must be gone, so at most the second batch remains.
#[test]
fn expired_entries_are_purged_under_a_stream_of_unique_keys() {
    let cache: Cache<u64, u64> = Cache::builder().ttl(Duration::from_millis(1)).build();
    for key in 0..100_000 {
        cache.insert(key, key);
    }
    // Waiting for the first batch to expire is what is under test, not a synchronisation.
    std::thread::sleep(Duration::from_millis(20));
    for key in 100_000..200_000 {
        cache.insert(key, key);
    }
    assert!(
        cache.len() <= 100_000,
        "{} entries: expired ones were not purged",
        cache.len()
    );
}
