//! Barrier-released stress: 64 callers × 500 rounds per mode, one cold key per round.
//! In every round: the body runs exactly once and all 64 callers get the same value.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use racefree::cached;

const CALLERS: usize = 64;
const ROUNDS: usize = 500;

static SYNC_RUNS: [AtomicUsize; ROUNDS] = [const { AtomicUsize::new(0) }; ROUNDS];
static ASYNC_RUNS: [AtomicUsize; ROUNDS] = [const { AtomicUsize::new(0) }; ROUNDS];

#[cached]
fn sync_value(round: usize) -> String {
    SYNC_RUNS[round].fetch_add(1, SeqCst);
    std::thread::yield_now();
    format!("value of round {round}")
}

#[cached]
async fn async_value(round: usize) -> String {
    ASYNC_RUNS[round].fetch_add(1, SeqCst);
    tokio::task::yield_now().await;
    format!("value of round {round}")
}

#[test]
fn sync_threads_64_callers_500_rounds() {
    let barrier = Arc::new(Barrier::new(CALLERS));
    let threads: Vec<_> = (0..CALLERS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                (0..ROUNDS)
                    .map(|round| {
                        barrier.wait(); // every round starts with all 64 callers released at once
                        sync_value(round)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Vec<String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for round in 0..ROUNDS {
        assert_eq!(SYNC_RUNS[round].load(SeqCst), 1, "round {round}: body runs");
        let expected = format!("value of round {round}");
        assert!(
            results.iter().all(|r| r[round] == expected),
            "round {round}: unequal values"
        );
    }
    assert_eq!(sync_value_cache().stats().executions, ROUNDS as u64);
    assert_eq!(sync_value_cache().in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_multi_thread_64_callers_500_rounds() {
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut values = Vec::with_capacity(ROUNDS);
                for round in 0..ROUNDS {
                    barrier.wait().await;
                    values.push(async_value(round).await);
                }
                values
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    for round in 0..ROUNDS {
        assert_eq!(
            ASYNC_RUNS[round].load(SeqCst),
            1,
            "round {round}: body runs"
        );
        let expected = format!("value of round {round}");
        assert!(
            results.iter().all(|r| r[round] == expected),
            "round {round}: unequal values"
        );
    }
    let stats = async_value_cache().stats();
    assert_eq!(stats.executions, ROUNDS as u64);
    assert!(
        stats.coalesced > 0,
        "no caller ever waited: the test did not exercise concurrency"
    );
    assert_eq!(async_value_cache().in_flight(), 0);
}

/// The table grows (a blocking copy, see `Cache`'s module docs) while others insert and hit:
/// 4 writers each ask for all 40k keys through `get_with`, each from its own quarter on (so
/// they race for every key), and 2 readers hit keys already asked for, all released by one
/// barrier, 5 rounds on a fresh cache each. In every round: each key's value was computed
/// exactly once, every caller and every read saw its key's value, and all 40k keys are there
/// at the end.
#[test]
fn growing_table_under_concurrent_inserts_and_hits_loses_nothing() {
    const WRITERS: u64 = 4;
    const KEYS: u64 = 40_000;
    const READERS: usize = 2;
    let value = |k: u64| k ^ 0x5555;
    let mut all_reads = 0;
    for round in 0..5 {
        let cache = Arc::new(racefree::Cache::<u64, u64>::new());
        let computed = Arc::new(AtomicUsize::new(0));
        let writing = Arc::new(AtomicUsize::new(WRITERS as usize));
        let barrier = Arc::new(Barrier::new(WRITERS as usize + READERS));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (cache, computed, writing, barrier) = (
                    cache.clone(),
                    computed.clone(),
                    writing.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    for k in (0..KEYS).map(|i| (i + w * KEYS / WRITERS) % KEYS) {
                        let v = cache.get_with(k, || {
                            computed.fetch_add(1, SeqCst);
                            value(k)
                        });
                        assert_eq!(v, value(k), "round {round}: a writer got another value");
                    }
                    writing.fetch_sub(1, SeqCst);
                })
            })
            .collect();
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let (cache, writing, barrier) = (cache.clone(), writing.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut reads = 0_u64;
                    let mut i = r as u64;
                    while writing.load(SeqCst) > 0 {
                        let k = i % KEYS;
                        if let Some(v) = cache.get(&k) {
                            assert_eq!(v, value(k), "round {round}: a read saw another value");
                            reads += 1;
                        }
                        i = i
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                    }
                    reads
                })
            })
            .collect();
        writers.into_iter().for_each(|t| t.join().unwrap());
        let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
        all_reads += reads;
        assert_eq!(
            computed.load(SeqCst),
            KEYS as usize,
            "round {round}: computed once each"
        );
        assert_eq!(cache.len(), KEYS as usize, "round {round}: keys kept");
        assert!(
            (0..KEYS).all(|k| cache.get(&k) == Some(value(k))),
            "round {round}: a key lost its value"
        );
    }
    assert!(all_reads > 0, "the readers read while the tables grew");
}
