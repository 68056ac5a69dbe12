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
