//! What `#[cached]` does when the body fails: `stale_on_error` serves the expired value for a
//! while instead of the error, `share_errors` hands the lead's error to its waiters, and the
//! default (waiters compute again, one at a time) is unchanged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use racefree::{cached, served, Served};

#[path = "support/common.rs"]
mod common;
use common::until_sync;

/// `callers` threads released together, each calling `call`; their answers in order.
fn burst<T: Send + 'static>(callers: usize, call: fn() -> T) -> Vec<(T, Served)> {
    let barrier = Arc::new(Barrier::new(callers));
    (0..callers)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                served::track_sync(call)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect()
}

// 16 threads × 5 rounds, each released past the entry's ttl while the backend is down: every
// caller gets the last good value (`Served::Stale`), counted once per caller in
// `stale_served`; the body ran at least once per round and the entry is still the old one.
#[test]
fn a_failed_recompute_serves_the_expired_value_within_stale_on_error() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static DOWN: AtomicBool = AtomicBool::new(false);
    #[cached(ttl = "50ms", stale_on_error = "1h")]
    fn balance(account: u64) -> Result<u64, String> {
        RUNS.fetch_add(1, SeqCst);
        match DOWN.load(SeqCst) {
            true => Err("ledger down".to_owned()),
            false => Ok(account * 10),
        }
    }
    const CALLERS: usize = 16;
    assert_eq!(balance(4), Ok(40));
    DOWN.store(true, SeqCst);
    for round in 1..=5u64 {
        std::thread::sleep(Duration::from_millis(60)); // past the ttl
        let runs = RUNS.load(SeqCst);
        for (value, served) in burst(CALLERS, || balance(4)) {
            assert_eq!(value, Ok(40), "round {round}");
            assert_eq!(served, Served::Stale, "round {round}");
        }
        assert!(
            RUNS.load(SeqCst) > runs,
            "round {round}: the body did not run"
        );
        assert_eq!(balance_cache().stats().stale_served, round * CALLERS as u64);
    }
    DOWN.store(false, SeqCst);
    assert_eq!(
        served::track_sync(|| balance(4)),
        (Ok(40), Served::Executed)
    );
    assert_eq!(served::track_sync(|| balance(4)), (Ok(40), Served::Hit));
}

// Past ttl + stale_on_error the entry is gone: the error is returned as without it. (The grace
// is 1 s so that a pause of the machine inside it does not move the first read past it.)
#[test]
fn past_stale_on_error_the_error_is_returned() {
    static DOWN: AtomicBool = AtomicBool::new(false);
    #[cached(ttl = "20ms", stale_on_error = "1s")]
    fn level(tank: u64) -> Result<u64, String> {
        match DOWN.load(SeqCst) {
            true => Err("sensor down".to_owned()),
            false => Ok(tank),
        }
    }
    assert_eq!(level(1), Ok(1));
    DOWN.store(true, SeqCst);
    std::thread::sleep(Duration::from_millis(25)); // past ttl, within the grace
    assert_eq!(served::track_sync(|| level(1)), (Ok(1), Served::Stale));
    std::thread::sleep(Duration::from_millis(1000)); // past ttl + grace
    assert_eq!(
        served::track_sync(|| level(1)),
        (Err("sensor down".to_owned()), Served::Executed)
    );
    assert_eq!(level_cache().stats().stale_served, 1);
}

// share_errors: 16 threads × 5 rounds on a cold key whose body fails once all 15 waiters have
// joined: every caller gets the lead's error and the body ran exactly once per round.
#[test]
fn share_errors_hands_the_leads_error_to_every_waiter() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached(share_errors)]
    fn lookup(host: u64) -> Result<u64, String> {
        let run = RUNS.fetch_add(1, SeqCst) + 1;
        // Fail only once every other caller of the round waits for this one.
        let target = run * (CALLERS as u64 - 1);
        until_sync("the waiters joined", || {
            lookup_cache().stats().coalesced >= target
        });
        Err(format!("dns down (run {run}, host {host})"))
    }
    const CALLERS: usize = 16;
    for round in 1..=5u64 {
        let answers = burst(CALLERS, || lookup(9));
        let error = format!("dns down (run {round}, host 9)");
        assert!(
            answers
                .iter()
                .all(|(value, _)| *value == Err(error.clone())),
            "round {round}"
        );
        let executed = answers
            .iter()
            .filter(|(_, s)| *s == Served::Executed)
            .count();
        let waited = answers.iter().filter(|(_, s)| *s == Served::Waited).count();
        assert_eq!((executed, waited), (1, CALLERS - 1), "round {round}");
        assert_eq!(
            RUNS.load(SeqCst),
            round,
            "round {round}: one execution per burst"
        );
    }
    assert_eq!(lookup_cache().len(), 0);
    assert_eq!(lookup_cache().in_flight(), 0);
}

// The default is unchanged: 8 waiters of a failing lead each run the body themselves, one at
// a time (9 executions for 9 callers), and each gets its own error.
#[test]
fn without_share_errors_waiters_compute_again() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached]
    fn resolve(host: u64) -> Result<u64, String> {
        let run = RUNS.fetch_add(1, SeqCst) + 1;
        if run == 1 {
            until_sync("the waiters joined", || {
                resolve_cache().stats().coalesced >= 8
            });
        }
        Err(format!("down {host}"))
    }
    let answers = burst(9, || resolve(1));
    assert!(answers
        .iter()
        .all(|(v, s)| *v == Err("down 1".to_owned()) && *s == Served::Executed));
    assert_eq!(RUNS.load(SeqCst), 9);
}

// Async share_errors: 16 tasks on a multi-thread runtime, 3 rounds, one execution per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_share_errors_hands_the_leads_error_to_every_waiter() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached(share_errors)]
    async fn fetch(id: u64) -> Result<u64, std::sync::Arc<std::io::Error>> {
        let run = RUNS.fetch_add(1, SeqCst) + 1;
        common::until("the waiters joined", || {
            fetch_cache().stats().coalesced >= run * 15
        })
        .await;
        Err(std::sync::Arc::new(std::io::Error::other(format!(
            "run {run}, id {id}"
        ))))
    }
    for round in 1..=3u64 {
        let tasks = common::released_together(16, |_| served::track(fetch(5)));
        for task in tasks {
            let (value, _) = task.await.unwrap();
            assert_eq!(value.unwrap_err().to_string(), format!("run {round}, id 5"));
        }
        assert_eq!(
            RUNS.load(SeqCst),
            round,
            "round {round}: one execution per burst"
        );
    }
}

// A `store = ...` Cache built with `CacheConfig::stale_on_error` applies it itself.
#[test]
fn a_store_built_with_stale_on_error_serves_the_expired_value() {
    static DOWN: AtomicBool = AtomicBool::new(false);
    static STORE: std::sync::LazyLock<racefree::Cache<u64, u64>> = std::sync::LazyLock::new(|| {
        racefree::Cache::with_config(
            racefree::CacheConfig::new()
                .ttl(Duration::from_millis(20))
                .stale_on_error(Duration::from_secs(3600)),
        )
    });
    #[cached(store = STORE)]
    fn score(player: u64) -> Result<u64, String> {
        match DOWN.load(SeqCst) {
            true => Err("down".to_owned()),
            false => Ok(player + 1),
        }
    }
    assert_eq!(score(1), Ok(2));
    DOWN.store(true, SeqCst);
    std::thread::sleep(Duration::from_millis(30)); // past the ttl
    assert_eq!(served::track_sync(|| score(1)), (Ok(2), Served::Stale));
    assert_eq!(STORE.stats().stale_served, 1);
}
