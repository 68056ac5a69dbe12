//! Behaviour of `#[idempotent]`, one test per numbered point of the issue (the number leads the
//! comment above each test). Concurrency tests say how many callers, how many rounds and what
//! must hold in every round; bodies that must still be running while duplicates arrive wait on
//! a gate the test opens, never on a sleep.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, LazyLock};
use std::time::Duration;

use racefree::idempotency::ManualClock;
use racefree::{idempotent, replay, IdempotencyError, IdempotencyStore, Replay};
use tokio::sync::Semaphore;

#[path = "support/common.rs"]
mod common;

use common::{guarded, released_together, until, until_sync};

#[derive(Debug, Clone, PartialEq, Eq)]
enum ApiError {
    Idempotency(IdempotencyError),
    Failed(String),
}

impl From<IdempotencyError> for ApiError {
    fn from(error: IdempotencyError) -> Self {
        ApiError::Idempotency(error)
    }
}

fn conflict(key: &str) -> ApiError {
    ApiError::Idempotency(IdempotencyError::Conflict {
        key: key.to_owned(),
    })
}

fn in_progress(key: &str) -> ApiError {
    ApiError::Idempotency(IdempotencyError::InProgress {
        key: key.to_owned(),
    })
}

// 1. The first call with a key executes, and its `Ok` outcome is stored (one record, found by
//    the next call without executing).
#[test]
fn first_call_executes_and_stores_its_ok_outcome() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, ttl = "1h")]
    fn create_order(key: &str, item: &str) -> Result<String, ApiError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        Ok(format!("order-{n}-{item}"))
    }
    assert_eq!(create_order("k-1", "desk"), Ok("order-1-desk".to_owned()));
    assert_eq!(EXECUTIONS.load(SeqCst), 1);
    let store = create_order_idempotency_store();
    assert_eq!(
        (store.len(), store.in_flight(), store.stats().executions),
        (1, 0, 1)
    );
    assert_eq!(create_order("k-1", "desk"), Ok("order-1-desk".to_owned()));
    assert_eq!(
        EXECUTIONS.load(SeqCst),
        1,
        "the stored outcome answered the second call"
    );
}

/// Declares a function booking a shift whose body counts its executions and then waits for
/// `gate`: one per test, so that the stats one test waits on are not bumped by another.
macro_rules! gated_booking {
    ($name:ident) => {
        #[idempotent(key = key, skip(gate, executions))]
        async fn $name(
            key: &str,
            worker: u32,
            gate: &Semaphore,
            executions: &AtomicUsize,
        ) -> Result<(usize, u32), ApiError> {
            let id = executions.fetch_add(1, SeqCst) + 1;
            let _open = gate.acquire().await.expect("gate stays open");
            Ok((id, worker))
        }
    };
}

// 2. (wait) 100 concurrent identical calls × 30 rounds, a new key per round, released by a
//    barrier while the first one's body is held open until the other 99 are waiting; then a
//    retry storm of 100 more after it finished. Every round: exactly one execution, and all 200
//    callers get the same outcome (the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_identical_calls_execute_once_and_share_the_outcome() {
    gated_booking!(book_shift);
    const CALLERS: usize = 100;
    const ROUNDS: usize = 30;
    let store = book_shift_idempotency_store();
    for round in 0..ROUNDS {
        let key: Arc<str> = format!("shift-{round}").into();
        let gate = Arc::new(Semaphore::new(0));
        let executions = Arc::new(AtomicUsize::new(0));
        let (waits_before, replays_before) = (store.stats().waits, store.stats().replays);
        let during = released_together(CALLERS, |_| {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            async move { book_shift(&key, 7, &gate, &executions).await }
        });
        until("99 duplicates wait", || {
            store.stats().waits == waits_before + CALLERS as u64 - 1
        })
        .await;
        gate.add_permits(CALLERS);
        let mut outcomes = Vec::new();
        for call in during {
            outcomes.push(guarded("a waiting duplicate", call).await.unwrap());
        }
        let after = released_together(CALLERS, |_| {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            async move { book_shift(&key, 7, &gate, &executions).await }
        });
        for call in after {
            outcomes.push(call.await.unwrap());
        }
        assert_eq!(executions.load(SeqCst), 1, "round {round}: one execution");
        assert!(
            outcomes.iter().all(|o| *o == Ok((1, 7))),
            "round {round}: one shared outcome: {outcomes:?}"
        );
        assert_eq!(
            store.stats().replays - replays_before,
            2 * CALLERS as u64 - 1,
            "round {round}: every caller but the one that executed is a replay, waiters included"
        );
    }
}

#[idempotent(key = key, in_flight = "reject", skip(gate, executions))]
async fn approve_leave(
    key: &str,
    days: u32,
    gate: &Semaphore,
    executions: &AtomicUsize,
) -> Result<u32, ApiError> {
    executions.fetch_add(1, SeqCst);
    let _open = gate.acquire().await.expect("gate stays open");
    Ok(days)
}

// 2. (reject) 100 concurrent identical calls × 30 rounds released by a barrier while the
//    first one's body is held open. Every round: one execution, 99 `InProgress` answers that
//    come back while the body still runs, and the owner's `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_mode_refuses_duplicates_in_flight_at_once() {
    const CALLERS: usize = 100;
    const ROUNDS: usize = 30;
    for round in 0..ROUNDS {
        let key: Arc<str> = format!("leave-{round}").into();
        let gate = Arc::new(Semaphore::new(0));
        let executions = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..CALLERS {
            let (key, gate, executions, barrier, answers) = (
                key.clone(),
                gate.clone(),
                executions.clone(),
                barrier.clone(),
                answers.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let _ = answers.send(approve_leave(&key, 3, &gate, &executions).await);
            });
        }
        let mut rejected = 0;
        while rejected < CALLERS - 1 {
            let answer = guarded("a rejected duplicate", answered.recv())
                .await
                .unwrap();
            assert_eq!(
                answer,
                Err(in_progress(&key)),
                "round {round}: only refusals while the body runs"
            );
            rejected += 1;
        }
        gate.add_permits(1);
        assert_eq!(guarded("the owner", answered.recv()).await.unwrap(), Ok(3));
        assert_eq!(
            executions.load(SeqCst),
            1,
            "round {round}: nothing executed twice"
        );
    }
}

// 3. A later call with the same key and fingerprint returns the stored outcome without
//    executing; a tracking scope tells the replay from the fresh call, for async and sync
//    callers, and the callers that waited for an execution count as replays too.
#[tokio::test]
async fn later_call_replays_the_outcome_and_is_flagged_replayed() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    async fn pay(key: &str, cents: u64) -> Result<u64, ApiError> {
        Ok(EXECUTIONS.fetch_add(1, SeqCst) as u64 * 1_000 + cents)
    }
    #[idempotent(key = key)]
    fn refund(key: &str, cents: u64) -> Result<u64, ApiError> {
        Ok(cents)
    }
    let (first, fresh) = replay::track(pay("pay-1", 500)).await;
    let (second, replayed) = replay::track(pay("pay-1", 500)).await;
    assert_eq!((first.clone(), fresh), (Ok(500), Replay::Fresh));
    assert_eq!((second, replayed), (first, Replay::Replayed));
    assert_eq!(EXECUTIONS.load(SeqCst), 1);
    // Ordinary callers call as before; the flag only exists inside a scope.
    assert_eq!(pay("pay-1", 500).await, Ok(500));

    assert_eq!(
        replay::track_sync(|| refund("r-1", 5)),
        (Ok(5), Replay::Fresh)
    );
    assert_eq!(
        replay::track_sync(|| refund("r-1", 5)),
        (Ok(5), Replay::Replayed)
    );
    // A call refused with an error reports nothing.
    assert_eq!(
        replay::track_sync(|| refund("r-1", 6)),
        (Err(conflict("r-1")), Replay::NotRecorded)
    );
}

// 3. Waiters: 20 concurrent calls × 20 rounds while the body is held open: exactly one of them
//    is flagged fresh, the other 19 replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_that_waited_are_flagged_replayed_and_only_the_owner_fresh() {
    gated_booking!(book_flagged);
    const CALLERS: usize = 20;
    const ROUNDS: usize = 20;
    let store = book_flagged_idempotency_store();
    for round in 0..ROUNDS {
        let key: Arc<str> = format!("flagged-{round}").into();
        let gate = Arc::new(Semaphore::new(0));
        let executions = Arc::new(AtomicUsize::new(0));
        let waits_before = store.stats().waits;
        let calls = released_together(CALLERS, |_| {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            async move { replay::track(book_flagged(&key, 1, &gate, &executions)).await }
        });
        until("19 duplicates wait", || {
            store.stats().waits == waits_before + CALLERS as u64 - 1
        })
        .await;
        gate.add_permits(CALLERS);
        let mut flags = Vec::new();
        for call in calls {
            let (outcome, flag) = guarded("a call", call).await.unwrap();
            assert_eq!(outcome, Ok((1, 1)));
            flags.push(flag);
        }
        assert_eq!(
            flags.iter().filter(|f| **f == Replay::Fresh).count(),
            1,
            "round {round}"
        );
        assert_eq!(
            flags.iter().filter(|f| **f == Replay::Replayed).count(),
            CALLERS - 1,
            "round {round}"
        );
    }
}

// 4. The same key with a different fingerprint is a `Conflict`: the body does not run, the
//    stored outcome stays, and later calls with the original request still replay it. While the
//    first call is still running, a different request under its key is a conflict too.
#[tokio::test]
async fn different_fingerprint_conflicts_without_running_and_keeps_the_outcome() {
    gated_booking!(book_contested);
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    async fn transfer(key: &str, to: &str, cents: u64) -> Result<String, ApiError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        Ok(format!("transfer-{n}: {cents} to {to}"))
    }
    let original = transfer("t-1", "alice", 100).await;
    assert_eq!(original, Ok("transfer-1: 100 to alice".to_owned()));
    assert_eq!(transfer("t-1", "alice", 999).await, Err(conflict("t-1")));
    assert_eq!(transfer("t-1", "mallory", 100).await, Err(conflict("t-1")));
    assert_eq!(EXECUTIONS.load(SeqCst), 1, "a conflict runs nothing");
    assert_eq!(
        transfer("t-1", "alice", 100).await,
        original,
        "the stored outcome is untouched"
    );
    assert_eq!(transfer_idempotency_store().stats().conflicts, 2);

    let gate = Semaphore::new(0);
    let executions = AtomicUsize::new(0);
    let owner = book_contested("c-1", 1, &gate, &executions);
    let mut owner = std::pin::pin!(owner);
    assert!(
        futures::poll!(owner.as_mut()).is_pending(),
        "the owner holds the key"
    );
    assert_eq!(
        book_contested("c-1", 2, &gate, &executions).await,
        Err(conflict("c-1"))
    );
    gate.add_permits(1);
    assert_eq!(owner.await, Ok((1, 1)));
    assert_eq!(executions.load(SeqCst), 1);
}

// 5. An `Err` outcome is not stored: the key is released and the client's retry executes.
//    With `store_errors` the `Err` is stored and replayed like an `Ok`.
#[test]
fn err_outcome_is_not_stored_and_the_retry_executes() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    fn terminate(key: &str, employee: u32) -> Result<u32, ApiError> {
        match EXECUTIONS.fetch_add(1, SeqCst) {
            0 => Err(ApiError::Failed("directory offline".to_owned())),
            _ => Ok(employee),
        }
    }
    assert_eq!(
        terminate("term-1", 42),
        Err(ApiError::Failed("directory offline".to_owned()))
    );
    assert_eq!(
        terminate_idempotency_store().len(),
        0,
        "no record is kept for an Err"
    );
    assert_eq!(terminate("term-1", 42), Ok(42));
    assert_eq!(terminate("term-1", 42), Ok(42));
    assert_eq!(EXECUTIONS.load(SeqCst), 2);

    static STORED_EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, store_errors)]
    fn terminate_once(key: &str, employee: u32) -> Result<u32, ApiError> {
        match STORED_EXECUTIONS.fetch_add(1, SeqCst) {
            0 => Err(ApiError::Failed(format!("{employee} is on leave"))),
            _ => Ok(employee),
        }
    }
    let failed = terminate_once("term-2", 7);
    assert_eq!(failed, Err(ApiError::Failed("7 is on leave".to_owned())));
    assert_eq!(
        terminate_once("term-2", 7),
        failed,
        "the stored Err is replayed"
    );
    assert_eq!(STORED_EXECUTIONS.load(SeqCst), 1);
}

/// An error that holds a source that is not `Clone` (`std::io::Error`) in an `Arc`: what
/// `store_errors` asks of it with the in-process store (issue 13).
#[derive(Debug, Clone)]
enum PayError {
    Io(Arc<std::io::Error>),
    // Read through `Debug` only.
    #[allow(dead_code)]
    Idempotency(IdempotencyError),
}

impl From<std::io::Error> for PayError {
    fn from(e: std::io::Error) -> Self {
        PayError::Io(Arc::new(e))
    }
}

impl From<IdempotencyError> for PayError {
    fn from(e: IdempotencyError) -> Self {
        PayError::Idempotency(e)
    }
}

// 5. `store_errors` with an error whose source is not `Clone`: held in an `Arc`, the first
//    call's `std::io::Error` itself (the same allocation) is replayed to every later call with
//    the key, and the body ran once.
#[test]
fn store_errors_replays_an_io_error_held_in_an_arc() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, store_errors)]
    fn charge(key: &str, cents: u64) -> Result<u64, PayError> {
        EXECUTIONS.fetch_add(1, SeqCst);
        let gateway: Result<u64, std::io::Error> =
            Err(std::io::Error::other(format!("gateway refused {cents}")));
        Ok(gateway?)
    }
    let Err(PayError::Io(first)) = charge("pay-io", 500) else {
        panic!("the gateway's error")
    };
    for _ in 0..3 {
        let Err(PayError::Io(replayed)) = charge("pay-io", 500) else {
            panic!("the stored error")
        };
        assert!(Arc::ptr_eq(&first, &replayed), "the stored error itself");
    }
    assert_eq!(first.to_string(), "gateway refused 500");
    assert_eq!(EXECUTIONS.load(SeqCst), 1);
}

#[idempotent(key = key, skip(gate, executions))]
async fn fail_first(
    key: &str,
    gate: &Semaphore,
    executions: &AtomicUsize,
) -> Result<usize, ApiError> {
    let n = executions.fetch_add(1, SeqCst) + 1;
    let _open = gate.acquire().await.expect("gate stays open");
    if n == 1 {
        return Err(ApiError::Failed("first attempt fails".to_owned()));
    }
    Ok(n)
}

// 5. Waiters of a failed call: 20 concurrent calls × 20 rounds; the owner fails after the 19
//    others wait. Every round: exactly one waiter executes next (2 executions in all), the
//    owner gets its Err, and all 19 waiters get the second execution's Ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_of_a_failed_call_one_executes_next() {
    const CALLERS: usize = 20;
    const ROUNDS: usize = 20;
    let store = fail_first_idempotency_store();
    for round in 0..ROUNDS {
        let key: Arc<str> = format!("retry-{round}").into();
        let gate = Arc::new(Semaphore::new(0));
        let executions = Arc::new(AtomicUsize::new(0));
        let waits_before = store.stats().waits;
        let calls = released_together(CALLERS, |_| {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            async move { fail_first(&key, &gate, &executions).await }
        });
        until("19 duplicates wait", || {
            store.stats().waits == waits_before + CALLERS as u64 - 1
        })
        .await;
        gate.add_permits(CALLERS);
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(guarded("a call", call).await.unwrap());
        }
        assert_eq!(
            executions.load(SeqCst),
            2,
            "round {round}: the failure, then one waiter"
        );
        assert_eq!(
            outcomes.iter().filter(|o| o.is_err()).count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert_eq!(
            outcomes.iter().filter(|o| **o == Ok(2)).count(),
            CALLERS - 1,
            "round {round}: {outcomes:?}"
        );
    }
}

// 6. A panicking body releases the claim: a caller that was waiting for it executes next, and
//    so does a later call. 10 rounds of one owner thread and one waiting thread.
#[test]
fn panicking_body_releases_the_claim() {
    #[idempotent(key = key, skip(panic, started, release))]
    fn risky(
        key: &str,
        panic: bool,
        started: &Barrier,
        release: &Barrier,
    ) -> Result<&'static str, ApiError> {
        if panic {
            started.wait();
            release.wait();
            panic!("the body panics");
        }
        Ok("done")
    }
    let store = risky_idempotency_store();
    for round in 0..10 {
        let key = format!("risky-{round}");
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let owner = {
            let (key, started, release) = (key.clone(), started.clone(), release.clone());
            std::thread::spawn(move || risky(&key, true, &started, &release))
        };
        started.wait();
        let waits_before = store.stats().waits;
        let waiter = {
            let key = key.clone();
            let unused = Arc::new(Barrier::new(1));
            std::thread::spawn(move || risky(&key, false, &unused, &unused))
        };
        until_sync("the duplicate waits", || {
            store.stats().waits == waits_before + 1
        });
        release.wait();
        assert!(owner.join().is_err(), "round {round}: the owner panicked");
        assert_eq!(
            waiter.join().unwrap(),
            Ok("done"),
            "round {round}: the waiter executed next"
        );
        assert_eq!(store.in_flight(), 0);
    }
}

// 6. A dropped future releases the claim: 10 rounds of an owner task aborted while its body
//    waits and one duplicate waiting for it. Every round the duplicate executes next, nobody
//    hangs, and no claim is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_future_releases_the_claim() {
    gated_booking!(book_dropped);
    let store = book_dropped_idempotency_store();
    for round in 0..10 {
        let key: Arc<str> = format!("dropped-{round}").into();
        let executions = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let owner = {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            tokio::spawn(async move { book_dropped(&key, 1, &gate, &executions).await })
        };
        until("the owner runs", || executions.load(SeqCst) == 1).await;
        let waits_before = store.stats().waits;
        let waiter = {
            let (key, gate, executions) = (key.clone(), gate.clone(), executions.clone());
            tokio::spawn(async move { book_dropped(&key, 1, &gate, &executions).await })
        };
        until("the duplicate waits", || {
            store.stats().waits == waits_before + 1
        })
        .await;
        owner.abort();
        assert!(owner.await.unwrap_err().is_cancelled());
        until("the duplicate executes", || executions.load(SeqCst) == 2).await;
        gate.add_permits(1);
        assert_eq!(
            guarded("the duplicate", waiter).await.unwrap(),
            Ok((2, 1)),
            "round {round}"
        );
    }
    assert_eq!(store.in_flight(), 0, "no claim left behind");
}

// 7. After `ttl` the key executes again: calls before the deadline replay, the first call after
//    it executes (a loop that calls until it has; no concurrent actors).
#[test]
fn outcome_expires_after_ttl_and_the_key_executes_again() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, ttl = "40ms")]
    fn submit_timesheet(key: &str, hours: u32) -> Result<usize, ApiError> {
        let _ = hours;
        Ok(EXECUTIONS.fetch_add(1, SeqCst) + 1)
    }
    assert_eq!(submit_timesheet("ts-1", 8), Ok(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match submit_timesheet("ts-1", 8) {
            Ok(1) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the outcome never expired"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            other => {
                assert_eq!(other, Ok(2), "after the ttl the key executed again");
                break;
            }
        }
    }
    assert_eq!(EXECUTIONS.load(SeqCst), 2);
}

struct ManualStore {
    store: IdempotencyStore<u64>,
    clock: ManualClock,
}

static MANUAL: LazyLock<ManualStore> = LazyLock::new(|| {
    let (builder, clock) = IdempotencyStore::builder().manual_clock();
    ManualStore {
        store: builder.build(),
        clock,
    }
});

#[idempotent(key = key, ttl = "1ms", store = MANUAL.store)]
fn short_lived(key: &str, n: u64) -> Result<u64, ApiError> {
    Ok(n)
}

#[idempotent(key = key, ttl = "1h", store = MANUAL.store)]
fn long_lived(key: &str, n: u64) -> Result<u64, ApiError> {
    Ok(n)
}

#[idempotent(key = key, ttl = "1ms", store = MANUAL.store, skip(hold))]
fn held(key: &str, hold: &std::sync::RwLock<()>) -> Result<u64, ApiError> {
    drop(hold.read().unwrap());
    Ok(0)
}

// 7. Expired outcomes are purged: 1M unique keys with a 1 ms ttl on a clock that moves 1 µs per
//    call (so about 1000 outcomes are live at any time). The record count never exceeds a few
//    thousand, and an explicit purge keeps live and in-flight records and removes only the
//    expired ones.
#[test]
fn expired_outcomes_are_purged_under_a_stream_of_unique_keys() {
    const CALLS: u64 = 1_000_000;
    let ManualStore { store, clock } = &*MANUAL;
    let mut largest = 0;
    for n in 0..CALLS {
        assert_eq!(short_lived(&n.to_string(), n), Ok(n));
        clock.advance(Duration::from_micros(1));
        if n % 1_000 == 0 {
            largest = largest.max(store.len());
        }
    }
    largest = largest.max(store.len());
    // ~1000 live + at most one sweep interval (1024 stores, or as many as are live) of expired.
    assert!(
        largest <= 4_096,
        "the store grew to {largest} records for 1000 live outcomes"
    );

    assert_eq!(long_lived("keep", 1), Ok(1));
    let hold = Arc::new(std::sync::RwLock::new(()));
    let held_open = hold.write().unwrap();
    let in_flight = {
        let hold = hold.clone();
        std::thread::spawn(move || held("running", &hold))
    };
    until_sync("the call is in flight", || store.in_flight() == 1);
    clock.advance(Duration::from_secs(1));
    store.purge_expired();
    assert_eq!(
        (store.len(), store.in_flight()),
        (2, 1),
        "only the live outcome and the call in flight are left"
    );
    drop(held_open);
    assert_eq!(in_flight.join().unwrap(), Ok(0));
    assert_eq!(long_lived("keep", 1), Ok(1));
    assert_eq!(store.stats().replays, 1);
}

// 8. A call whose key is `None` executes without idempotency (every time); with `require_key`
//    it is refused with `MissingKey` and runs nothing.
#[tokio::test]
async fn call_without_key_executes_and_require_key_refuses_it() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[derive(Hash)]
    struct Request {
        idempotency_key: Option<String>,
        employee: u32,
    }
    #[idempotent(key = req.idempotency_key.as_deref())]
    async fn update_address(req: &Request) -> Result<usize, ApiError> {
        let _ = req.employee;
        Ok(EXECUTIONS.fetch_add(1, SeqCst) + 1)
    }
    #[idempotent(key = req.idempotency_key.clone(), require_key)]
    async fn update_salary(req: &Request) -> Result<usize, ApiError> {
        let _ = req.employee;
        Ok(EXECUTIONS.fetch_add(1, SeqCst) + 1)
    }
    let unkeyed = Request {
        idempotency_key: None,
        employee: 1,
    };
    assert_eq!(update_address(&unkeyed).await, Ok(1));
    assert_eq!(update_address(&unkeyed).await, Ok(2));
    assert_eq!(
        update_address_idempotency_store().len(),
        0,
        "nothing is recorded without a key"
    );
    assert_eq!(
        replay::track(update_address(&unkeyed)).await.1,
        Replay::Fresh
    );
    assert_eq!(
        update_salary(&unkeyed).await,
        Err(ApiError::Idempotency(IdempotencyError::MissingKey))
    );
    assert_eq!(EXECUTIONS.load(SeqCst), 3, "a refused call runs nothing");
    let keyed = Request {
        idempotency_key: Some("sal-1".to_owned()),
        employee: 1,
    };
    assert_eq!(update_salary(&keyed).await, Ok(4));
    assert_eq!(update_salary(&keyed).await, Ok(4));
}

// 9. Keys are scoped per function (two functions never see each other's outcome, even through
//    one shared store) and by `scope` (the same key in two tenants is two records).
#[test]
fn keys_are_scoped_per_function_and_per_scope() {
    static SHARED: LazyLock<IdempotencyStore<String>> = LazyLock::new(IdempotencyStore::new);
    #[idempotent(key = key, store = SHARED)]
    fn hire(key: &str, name: &str) -> Result<String, ApiError> {
        Ok(format!("hired {name}"))
    }
    #[idempotent(key = key, store = SHARED)]
    fn fire(key: &str, name: &str) -> Result<String, ApiError> {
        Ok(format!("fired {name}"))
    }
    assert_eq!(hire("k", "ann"), Ok("hired ann".to_owned()));
    assert_eq!(
        fire("k", "ann"),
        Ok("fired ann".to_owned()),
        "another function, another record"
    );
    assert_eq!(fire("k", "bob"), Err(conflict("k")));
    assert_eq!(SHARED.len(), 2);

    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, scope = tenant)]
    fn open_ticket(tenant: u32, key: &str, title: &str) -> Result<(u32, usize), ApiError> {
        let _ = title;
        Ok((tenant, EXECUTIONS.fetch_add(1, SeqCst) + 1))
    }
    assert_eq!(open_ticket(1, "t", "printer"), Ok((1, 1)));
    assert_eq!(
        open_ticket(2, "t", "printer"),
        Ok((2, 2)),
        "same key, other tenant: executes"
    );
    assert_eq!(open_ticket(1, "t", "printer"), Ok((1, 1)));
    assert_eq!(open_ticket(2, "t", "printer"), Ok((2, 2)));
    assert_eq!(EXECUTIONS.load(SeqCst), 2);
}

// 10. Sync `fn`: 16 threads × 50 rounds released by a barrier, the owner's body held open until
//     the other 15 wait. Every round: one execution, 16 equal outcomes.
#[test]
fn sync_fn_executes_once_under_concurrent_threads() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key, skip(hold))]
    fn approve_expense(
        key: &str,
        cents: u64,
        hold: &std::sync::RwLock<()>,
    ) -> Result<(usize, u64), ApiError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        drop(hold.read().unwrap());
        Ok((n, cents))
    }
    const CALLERS: usize = 16;
    let store = approve_expense_idempotency_store();
    for round in 0..50 {
        let key: Arc<str> = format!("exp-{round}").into();
        let hold = Arc::new(std::sync::RwLock::new(()));
        let held = hold.write().unwrap();
        let before = EXECUTIONS.load(SeqCst);
        let waits_before = store.stats().waits;
        let barrier = Arc::new(Barrier::new(CALLERS));
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (key, hold, barrier) = (key.clone(), hold.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    approve_expense(&key, 120, &hold)
                })
            })
            .collect();
        until_sync("15 duplicates wait", || {
            store.stats().waits == waits_before + CALLERS as u64 - 1
        });
        drop(held);
        let outcomes: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(
            EXECUTIONS.load(SeqCst),
            before + 1,
            "round {round}: one execution"
        );
        assert!(
            outcomes.iter().all(|o| *o == Ok((before + 1, 120))),
            "round {round}: {outcomes:?}"
        );
    }
}

// 10b. Duplicates racing the completion (the store makes the cell waiters wait on only when the
//      first of them arrives, and completion takes it out of the record): 8 threads × 300
//      rounds released by a barrier, a body that returns at once, so duplicates arrive before,
//      during and after it completes. Every round: one execution, 8 equal outcomes.
#[test]
fn duplicates_racing_the_completion_get_the_one_outcome() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    fn book_room(key: &str, nights: u64) -> Result<(usize, u64), ApiError> {
        Ok((EXECUTIONS.fetch_add(1, SeqCst) + 1, nights))
    }
    const CALLERS: usize = 8;
    for round in 0..300 {
        let key: Arc<str> = format!("room-{round}").into();
        let before = EXECUTIONS.load(SeqCst);
        let barrier = Arc::new(Barrier::new(CALLERS));
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (key, barrier) = (key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    book_room(&key, 3)
                })
            })
            .collect();
        let outcomes: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(
            EXECUTIONS.load(SeqCst),
            before + 1,
            "round {round}: one execution"
        );
        assert!(
            outcomes.iter().all(|o| *o == Ok((before + 1, 3))),
            "round {round}: {outcomes:?}"
        );
    }
    assert_eq!(book_room_idempotency_store().in_flight(), 0);
}

// 10c. The same race when the first execution fails (its `Err` is not stored: the key is
//      released and the waiters claim again): 8 threads × 300 rounds released by a barrier.
//      Every round: exactly two executions, the failed one's caller gets its `Err`, the 7
//      others the second execution's outcome.
#[test]
fn duplicates_racing_a_failed_execution_get_the_next_outcome() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    static ROUND_START: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    fn reserve_seat(key: &str, seat: u64) -> Result<(usize, u64), ApiError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        if n == ROUND_START.load(SeqCst) + 1 {
            return Err(ApiError::Failed(
                "the first attempt of a round fails".into(),
            ));
        }
        Ok((n, seat))
    }
    const CALLERS: usize = 8;
    for round in 0..300 {
        let key: Arc<str> = format!("seat-{round}").into();
        let before = EXECUTIONS.load(SeqCst);
        ROUND_START.store(before, SeqCst);
        let barrier = Arc::new(Barrier::new(CALLERS));
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (key, barrier) = (key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    reserve_seat(&key, 12)
                })
            })
            .collect();
        let outcomes: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(
            EXECUTIONS.load(SeqCst),
            before + 2,
            "round {round}: two executions"
        );
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        let served = outcomes
            .iter()
            .filter(|o| **o == Ok((before + 2, 12)))
            .count();
        assert_eq!(
            (failed, served),
            (1, CALLERS - 1),
            "round {round}: {outcomes:?}"
        );
    }
    assert_eq!(reserve_seat_idempotency_store().in_flight(), 0);
}

// 10d. Async duplicates racing the completion: 16 tasks × 200 rounds on a 2-worker runtime,
//      released by a barrier, a body that yields once. Every round: one execution, 16 equal
//      outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_duplicates_racing_the_completion_get_the_one_outcome() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    async fn ship_parcel(key: &str, grams: u64) -> Result<(usize, u64), ApiError> {
        tokio::task::yield_now().await;
        Ok((EXECUTIONS.fetch_add(1, SeqCst) + 1, grams))
    }
    const CALLERS: usize = 16;
    for round in 0..200 {
        let key: Arc<str> = format!("parcel-{round}").into();
        let before = EXECUTIONS.load(SeqCst);
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (key, barrier) = (key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    ship_parcel(&key, 900).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for caller in callers {
            outcomes.push(caller.await.unwrap());
        }
        assert_eq!(
            EXECUTIONS.load(SeqCst),
            before + 1,
            "round {round}: one execution"
        );
        assert!(
            outcomes.iter().all(|o| *o == Ok((before + 1, 900))),
            "round {round}: {outcomes:?}"
        );
    }
    assert_eq!(ship_parcel_idempotency_store().in_flight(), 0);
}

// Generic functions get one store per outcome type; methods can point `store` at a field.
#[test]
fn generic_functions_and_methods_with_their_own_store() {
    #[idempotent(key = key)]
    fn echo<T: Clone + std::hash::Hash + Send + Sync + 'static>(
        key: &str,
        value: T,
    ) -> Result<T, ApiError> {
        Ok(value)
    }
    assert_eq!(echo("e", 1_u8), Ok(1));
    assert_eq!(
        echo("e", "one".to_owned()),
        Ok("one".to_owned()),
        "another type, another store"
    );
    assert_eq!(echo("e", 2_u8), Err(conflict("e")));

    struct Payroll {
        runs: IdempotencyStore<u32>,
        executions: AtomicUsize,
    }
    impl Payroll {
        #[idempotent(key = key, store = self.runs, fingerprint = month)]
        fn run(&self, key: &str, month: u32, _note: &str) -> Result<u32, ApiError> {
            self.executions.fetch_add(1, SeqCst);
            Ok(month)
        }
    }
    let payroll = Payroll {
        runs: IdempotencyStore::new(),
        executions: AtomicUsize::new(0),
    };
    assert_eq!(payroll.run("p", 5, "first"), Ok(5));
    assert_eq!(
        payroll.run("p", 5, "a retry with another note"),
        Ok(5),
        "the note is not fingerprinted"
    );
    assert_eq!(payroll.run("p", 6, "first"), Err(conflict("p")));
    assert_eq!(payroll.executions.load(SeqCst), 1);
    assert_eq!(payroll.runs.len(), 1);
}

// Seed scenario (examples/workday_simulator.rs): an async HR simulator's "terminate" action,
// 10 concurrent requests with one idempotency key × 20 rounds, the database round trip held
// open until the 9 duplicates wait. Every round: 1 termination, 10 equal receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_hr_requests_execute_once() {
    struct Workday {
        terminations: AtomicUsize,
        database: Semaphore,
    }
    #[idempotent(key = key, skip(hr))]
    async fn terminate(hr: &Workday, key: &str, employee: u32) -> Result<(u32, usize), ApiError> {
        let record = hr.terminations.fetch_add(1, SeqCst) + 1;
        let _round_trip = hr.database.acquire().await.expect("database stays up");
        Ok((employee, record))
    }
    const REQUESTS: usize = 10;
    let store = terminate_idempotency_store();
    for round in 0..20 {
        let hr = Arc::new(Workday {
            terminations: AtomicUsize::new(0),
            database: Semaphore::new(0),
        });
        let key: Arc<str> = format!("terminate-17-{round}").into();
        let waits_before = store.stats().waits;
        let requests = released_together(REQUESTS, |_| {
            let (hr, key) = (hr.clone(), key.clone());
            async move { terminate(&hr, &key, 17).await }
        });
        until("9 duplicates wait", || {
            store.stats().waits == waits_before + REQUESTS as u64 - 1
        })
        .await;
        hr.database.add_permits(REQUESTS);
        for request in requests {
            assert_eq!(
                guarded("a request", request).await.unwrap(),
                Ok((17, 1)),
                "round {round}"
            );
        }
        assert_eq!(
            hr.terminations.load(SeqCst),
            1,
            "round {round}: one termination"
        );
    }
}
