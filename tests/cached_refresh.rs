//! `#[cached(refresh = "...", ttl = "...")]`: refresh-ahead. Past `refresh` a hit returns the
//! current value at once and starts exactly one background recompute of its key (a thread for
//! a sync fn, a task of the caller's Tokio runtime for an async fn); the new value replaces
//! the old on success, a failure keeps the old one, and an invalidation during the refresh wins.
//!
//! Waiting for an entry to reach its `refresh` age is a sleep for that age (time is what is
//! tested); everything else synchronises on barriers, locks and channels the test holds, or
//! polls an observable counter (`in_flight`, `stats`) through `common::until_sync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex, RwLock};
use std::time::Duration;

use racefree::{cached, served, Served};

#[path = "support/common.rs"]
mod common;
use common::until_sync;

const REFRESH: Duration = Duration::from_millis(200);

fn past_refresh() {
    std::thread::sleep(REFRESH + Duration::from_millis(10));
}

// 64 threads × 5 rounds over 4 keys (16 callers per key), released by a barrier once every
// entry is past its refresh age. The refreshes block on a lock the test holds until all 64
// have returned, so in every round: every caller got its key's value from before the round
// and `Served::Refreshing`, and each key's body ran exactly once more (one refresh per key,
// whatever the number of hits); after the refreshes land, the next round sees their values.
#[test]
fn one_refresh_per_key_under_64_concurrent_hits() {
    static RUNS: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);
    static HOLD: RwLock<()> = RwLock::new(());
    #[cached(refresh = "200ms", ttl = "1h")]
    fn generation(key: u64) -> u64 {
        drop(HOLD.read().unwrap());
        let mut runs = RUNS.lock().unwrap();
        let runs = runs
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_default();
        *runs += 1;
        key * 1000 + *runs
    }
    const CALLERS: usize = 64;
    const KEYS: u64 = 4;
    const ROUNDS: u64 = 5;
    for key in 0..KEYS {
        assert_eq!(generation(key), key * 1000 + 1);
    }
    for round in 1..=ROUNDS {
        past_refresh();
        let hold = HOLD.write().unwrap();
        let barrier = Arc::new(Barrier::new(CALLERS));
        let answers: Vec<(u64, u64, Served)> = (0..CALLERS)
            .map(|i| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let key = i as u64 % KEYS;
                    barrier.wait();
                    let (value, served) = served::track_sync(|| generation(key));
                    (key, value, served)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        for (key, value, served) in answers {
            assert_eq!(
                value,
                key * 1000 + round,
                "round {round}: key {key} not the old value"
            );
            assert_eq!(served, Served::Refreshing, "round {round}: key {key}");
        }
        assert_eq!(
            generation_cache().in_flight(),
            KEYS as usize,
            "round {round}"
        );
        drop(hold);
        until_sync("the refreshes landed", || {
            generation_cache().in_flight() == 0
        });
        let runs = RUNS.lock().unwrap().clone().unwrap();
        for key in 0..KEYS {
            assert_eq!(
                runs[&key],
                round + 1,
                "round {round}: key {key} refreshed more than once"
            );
        }
    }
    let stats = generation_cache().stats();
    assert_eq!(stats.refreshes, KEYS * ROUNDS);
    assert_eq!(stats.executions, KEYS * (ROUNDS + 1));
    assert_eq!(stats.hits, CALLERS as u64 * ROUNDS);
}

// While the refresh is blocked on a channel the test holds, 8 threads × 200 calls (barrier
// released) all return the old value at once; once the test sends, the new value replaces it.
#[test]
fn no_caller_waits_during_a_refresh() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static GATE: Mutex<Option<mpsc::Receiver<u64>>> = Mutex::new(None);
    #[cached(refresh = "200ms", ttl = "1h")]
    fn price(item: u64) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        let gate = GATE.lock().unwrap().take();
        match gate {
            Some(gate) => gate.recv().unwrap(),
            None => item,
        }
    }
    assert_eq!(price(7), 7);
    let (open, gate) = mpsc::channel();
    *GATE.lock().unwrap() = Some(gate);
    past_refresh();
    assert_eq!(served::track_sync(|| price(7)), (7, Served::Refreshing));
    const CALLERS: usize = 8;
    let barrier = Arc::new(Barrier::new(CALLERS));
    let threads: Vec<_> = (0..CALLERS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                (0..200).map(|_| price(7)).collect::<Vec<_>>()
            })
        })
        .collect();
    for thread in threads {
        assert!(thread.join().unwrap().iter().all(|&v| v == 7));
    }
    // The refresh is still blocked: every call above was answered while it ran.
    assert_eq!(price_cache().in_flight(), 1);
    assert_eq!(RUNS.load(SeqCst), 2);
    open.send(70).unwrap();
    until_sync("the refresh landed", || price_cache().in_flight() == 0);
    assert_eq!(served::track_sync(|| price(7)), (70, Served::Hit));
    assert_eq!(RUNS.load(SeqCst), 2);
}

// A refresh that fails keeps the old value: 5 rounds of two failing refreshes each (a failure
// leaves the entry free to refresh again on its next hit) leave `Ok(101)` served and are
// counted in `refresh_failures`; once the backend recovers, the next refresh replaces it.
#[test]
fn a_failed_refresh_keeps_the_old_value() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static DOWN: AtomicBool = AtomicBool::new(false);
    #[cached(refresh = "200ms", ttl = "1h")]
    fn quote(symbol: u64) -> Result<u64, String> {
        let run = RUNS.fetch_add(1, SeqCst) + 1;
        match DOWN.load(SeqCst) {
            true => Err("backend down".to_owned()),
            false => Ok(symbol * 100 + run),
        }
    }
    assert_eq!(quote(1), Ok(101));
    DOWN.store(true, SeqCst);
    past_refresh();
    for round in 1..=5u64 {
        assert_eq!(
            served::track_sync(|| quote(1)),
            (Ok(101), Served::Refreshing),
            "round {round}"
        );
        until_sync("the refresh failed", || quote_cache().in_flight() == 0);
        assert_eq!(quote_cache().stats().refresh_failures, 2 * round - 1);
        assert_eq!(
            served::track_sync(|| quote(1)),
            (Ok(101), Served::Refreshing),
            "round {round}"
        );
        until_sync("the retry failed", || quote_cache().in_flight() == 0);
        assert_eq!(quote_cache().stats().refresh_failures, 2 * round);
    }
    DOWN.store(false, SeqCst);
    let failures = quote_cache().stats().refresh_failures;
    assert_eq!(quote(1), Ok(101));
    until_sync("the refresh landed", || quote_cache().in_flight() == 0);
    let run = RUNS.load(SeqCst);
    assert_eq!(quote(1), Ok(100 + run));
    assert_eq!(quote_cache().stats().refresh_failures, failures);
}

// An invalidation while the refresh runs wins: the refresh's value (computed from what was
// there before the invalidation) is dropped, a caller arriving after the invalidation (and
// possibly waiting for the refresh) runs the body itself, and the cache holds its value.
// 5 rounds.
#[test]
fn an_invalidation_during_a_refresh_wins() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static GATE: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);
    #[cached(refresh = "200ms", ttl = "1h")]
    fn profile(user: u64) -> u64 {
        let run = RUNS.fetch_add(1, SeqCst) + 1;
        let gate = GATE.lock().unwrap().take();
        if let Some(gate) = gate {
            gate.recv().unwrap();
        }
        user * 1000 + run
    }
    let mut current = profile(3);
    for round in 1..=5 {
        let (open, gate) = mpsc::channel();
        *GATE.lock().unwrap() = Some(gate);
        past_refresh();
        let before = RUNS.load(SeqCst);
        assert_eq!(
            served::track_sync(|| profile(3)),
            (current, Served::Refreshing)
        );
        assert!(profile_cache().invalidate(&3_u64), "round {round}");
        let after = std::thread::spawn(|| served::track_sync(|| profile(3)));
        open.send(()).unwrap();
        let (value, served) = after.join().unwrap();
        assert_eq!(
            served,
            Served::Executed,
            "round {round}: the refresh's value came back"
        );
        // The refresh ran first (it holds the key until it ends), then this caller.
        assert_eq!(value, 3000 + before + 2, "round {round}");
        until_sync("the refresh ended", || profile_cache().in_flight() == 0);
        assert_eq!(RUNS.load(SeqCst), before + 2, "round {round}");
        assert_eq!(
            served::track_sync(|| profile(3)),
            (value, Served::Hit),
            "round {round}"
        );
        current = value;
    }
}

// What a refresh replaces is the entry it started from, named by its insert (the deadline
// stamped into it): a value inserted while the refresh runs wins over the refresh's, with and
// without a capacity (whose CLOCK bit the hit sets in the same word). 5 rounds each.
#[test]
fn a_newer_value_during_a_refresh_wins() {
    use racefree::__private::Answer;
    for capacity in [None, Some(100)] {
        let config = racefree::CacheConfig::new()
            .ttl(Duration::from_secs(3600))
            .refresh(REFRESH);
        let config = match capacity {
            Some(capacity) => config.capacity(capacity),
            None => config,
        };
        let cache = racefree::Cache::<u64, u64>::with_config(config);
        for round in 0..5_u64 {
            cache.insert(1, round * 10);
            past_refresh();
            let refresh = match cache.answer(1) {
                Answer::Refresh(value, refresh) => {
                    assert_eq!(value, round * 10, "round {round}");
                    refresh
                }
                _ => panic!("round {round}: past its refresh age, the hit starts the refresh"),
            };
            cache.insert(1, round * 10 + 1);
            refresh.run(|| Some(round * 10 + 2));
            assert_eq!(
                cache.get(&1),
                Some(round * 10 + 1),
                "round {round}, capacity {capacity:?}: the newer value stays"
            );
        }
        // Without a newer value the refresh's lands.
        past_refresh();
        let Answer::Refresh(_, refresh) = cache.answer(1) else {
            panic!("past its refresh age, the hit starts the refresh")
        };
        refresh.run(|| Some(99));
        assert_eq!(cache.get(&1), Some(99), "capacity {capacity:?}");
    }
}

// Async: the refresh is a task of the caller's runtime (multi-thread, 4 workers): 32 tasks
// released together past the refresh age all get the old value while the refresh waits on a
// lock the test holds, one refresh runs per round, and its value lands. 3 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_async_refresh_runs_on_the_callers_runtime() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static HOLD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
    #[cached(refresh = "200ms", ttl = "1h")]
    async fn rate(pair: u64) -> u64 {
        drop(HOLD.read().await);
        pair + RUNS.fetch_add(1, SeqCst) + 1
    }
    let mut current = rate(10).await;
    assert_eq!(current, 11);
    for round in 1..=3u64 {
        tokio::time::sleep(REFRESH + Duration::from_millis(10)).await;
        let hold = HOLD.write().await;
        let callers = common::released_together(32, |_| async { served::track(rate(10)).await });
        for caller in callers {
            let (value, served) = caller.await.unwrap();
            assert_eq!(value, current, "round {round}");
            assert_eq!(served, Served::Refreshing, "round {round}");
        }
        assert_eq!(rate_cache().in_flight(), 1, "round {round}");
        drop(hold);
        common::until("the refresh landed", || rate_cache().in_flight() == 0).await;
        assert_eq!(RUNS.load(SeqCst), round + 1, "round {round}: one refresh");
        let next = rate(10).await;
        assert_eq!(next, 10 + round + 1, "round {round}");
        current = next;
    }
    assert_eq!(rate_cache().stats().refreshes, 3);
}

// Outside a Tokio runtime an async fn has nowhere to run a refresh in the background: it is
// skipped, the hit still returns the current value, and nothing is left in flight.
#[test]
fn an_async_refresh_outside_a_tokio_runtime_is_skipped() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached(refresh = "200ms", ttl = "1h")]
    async fn label(id: u64) -> u64 {
        id + RUNS.fetch_add(1, SeqCst)
    }
    assert_eq!(futures::executor::block_on(label(5)), 5);
    past_refresh();
    for _ in 0..3 {
        assert_eq!(futures::executor::block_on(label(5)), 5);
    }
    assert_eq!(label_cache().in_flight(), 0);
    assert_eq!(label_cache().stats().refreshes, 0);
    assert_eq!(RUNS.load(SeqCst), 1);
}
