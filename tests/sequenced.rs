//! `#[sequenced]`: one test per numbered point of the attribute's contract.
//!
//! Callers are released together with a `Barrier`; every round uses fresh keys, so rounds do
//! not see each other's numbers. Nothing here sleeps to synchronise: bodies that must stay
//! running while others queue block on a channel the test controls, and queue positions are
//! observed through `<fn>_sequence().waiting(&key)`.

use std::collections::HashMap;
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use futures::FutureExt;
use racefree::{sequenced, Seq, SequenceError};

#[path = "support/common.rs"]
mod common;

const ROUNDS: u64 = 5;

/// Blocks (without sleeping) until `key` has `n` callers queued behind its holder.
fn until_waiting<K: Eq + std::hash::Hash + Clone + Send + Sync + 'static>(
    handle: &racefree::SequenceHandle,
    key: &K,
    n: usize,
) {
    common::until_sync("callers queue", || handle.waiting(key) >= n);
}

// ---------------------------------------------------------------------------------------------
// 1. Mutual exclusion per key; different keys run in parallel.

static BALANCES: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);

fn balance(account: u64) -> u64 {
    BALANCES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&account)
        .copied()
        .unwrap_or(0)
}

fn set_balance(account: u64, value: u64) {
    BALANCES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(account, value);
}

/// An unlocked read-modify-write with a yield in the middle: loses updates unless serialized.
#[sequenced(key = account)]
async fn deposit(account: u64) {
    let read = balance(account);
    tokio::task::yield_now().await;
    set_balance(account, read + 1);
}

/// 1,000 tasks on a multi-threaded runtime, released by one barrier, each deposit 1 into the
/// same account; 5 rounds (a fresh account each). Every round ends with exactly 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_read_yield_write_loses_no_update() {
    for round in 0..ROUNDS {
        let account = 1_000 + round;
        let barrier = Arc::new(tokio::sync::Barrier::new(1_000));
        let tasks: Vec<_> = (0..1_000)
            .map(|_| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    deposit(account).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(balance(account), 1_000, "round {round}");
        assert_eq!(deposit_sequence().locked(), 0);
    }
}

#[sequenced(key = key)]
fn meet(key: u32, here: mpsc::Sender<u32>, other: &Mutex<mpsc::Receiver<u32>>) -> bool {
    here.send(key).unwrap();
    // Returns only once the body of the other key has started too: both run at once. The
    // timeout turns a failure into a failed assertion instead of a hung test.
    other
        .lock()
        .unwrap()
        .recv_timeout(Duration::from_secs(30))
        .is_ok()
}

/// Two threads call with different keys; each body waits inside for the other body to start.
/// 5 rounds; in every round both bodies must meet, which is impossible if keys were serialized.
#[test]
fn different_keys_run_in_parallel() {
    for round in 0..ROUNDS as u32 {
        let (a_tx, a_rx) = mpsc::channel();
        let (b_tx, b_rx) = mpsc::channel();
        let (a_rx, b_rx) = (Mutex::new(a_rx), Mutex::new(b_rx));
        let barrier = Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                meet(2 * round, a_tx, &b_rx)
            });
            let b = s.spawn(|| {
                barrier.wait();
                meet(2 * round + 1, b_tx, &a_rx)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(
            a && b,
            "round {round}: the two keys' bodies did not run at the same time"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. FIFO per key.

#[sequenced(key = key)]
fn take_turn(key: u64, who: usize, gate: Option<mpsc::Receiver<()>>, order: &Mutex<Vec<usize>>) {
    if let Some(gate) = gate {
        gate.recv().unwrap();
    }
    order.lock().unwrap().push(who);
}

/// A holder blocks in its body; 8 threads start waiting one after another (each starts only
/// once the previous one is seen in the queue); then the holder is let go. 10 rounds; in every
/// round the waiters ran in exactly the order they started waiting.
#[test]
fn waiters_acquire_in_arrival_order() {
    const WAITERS: usize = 8;
    for round in 0..10 {
        let key = 2_000 + round;
        let order = Mutex::new(Vec::new());
        let (open, gate) = mpsc::channel();
        std::thread::scope(|s| {
            let order = &order;
            let holder = s.spawn(move || take_turn(key, usize::MAX, Some(gate), order));
            // Waiters start only once the holder holds the key (its lock entry exists), and
            // each next one only once the previous one is seen in the queue.
            while take_turn_sequence().locked() == 0 {
                std::thread::yield_now();
            }
            let mut waiters = Vec::new();
            for who in 0..WAITERS {
                waiters.push(s.spawn(move || take_turn(key, who, None, order)));
                until_waiting(&take_turn_sequence(), &key, who + 1);
            }
            open.send(()).unwrap();
            holder.join().unwrap();
            waiters.into_iter().for_each(|w| w.join().unwrap());
        });
        let order = order.into_inner().unwrap();
        assert_eq!(order[0], usize::MAX, "round {round}: the holder ran first");
        assert_eq!(
            order[1..],
            (0..WAITERS).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Unique, contiguous numbers from `start`.

#[sequenced(key = key, start = 10)]
fn ten_up(key: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = key)]
async fn number(key: u64, seq: Seq) -> u64 {
    tokio::task::yield_now().await;
    seq.get()
}

#[test]
fn sequential_calls_count_up_from_start() {
    assert_eq!((ten_up(1), ten_up(1), ten_up(1)), (10, 11, 12));
    assert_eq!(ten_up(2), 10, "each key has its own sequence");
}

/// 100 tasks released by one barrier call with the same key; 5 rounds (fresh key each).
/// Every round the numbers handed out are exactly 1..=100.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_get_exactly_one_to_hundred() {
    for round in 0..ROUNDS {
        let key = 3_000 + round;
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    number(key).await
                })
            })
            .collect();
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, (1..=100).collect::<Vec<_>>(), "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Gap-free: only successes consume numbers.

#[derive(Debug, PartialEq)]
struct Rejected;

#[sequenced(key = key)]
async fn maybe_post(key: u64, fail: bool, seq: Seq) -> Result<u64, Rejected> {
    tokio::task::yield_now().await;
    if fail {
        Err(Rejected)
    } else {
        Ok(seq.get())
    }
}

/// 100 tasks released by one barrier, of which the 20 with `i % 5 == 0` fail; 5 rounds.
/// Every round the 80 successes got exactly 1..=80 and the key's next number is 81.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_consume_no_number() {
    for round in 0..ROUNDS {
        let key = 4_000 + round;
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    maybe_post(key, i % 5 == 0).await
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut failed = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(n) => got.push(n),
                Err(Rejected) => failed += 1,
            }
        }
        got.sort_unstable();
        assert_eq!(failed, 20, "round {round}");
        assert_eq!(got, (1..=80).collect::<Vec<_>>(), "round {round}");
        assert_eq!(maybe_post_sequence().next(&key), Some(81), "round {round}");
    }
}

#[sequenced(key = key)]
fn post_or_panic(key: u64, panic: bool, seq: Seq) -> u64 {
    assert!(!panic, "the body panics");
    seq.get()
}

#[test]
fn panic_consumes_no_number() {
    assert_eq!(post_or_panic(1, false), 1);
    assert!(catch_unwind(|| post_or_panic(1, true)).is_err());
    assert_eq!(
        post_or_panic(1, false),
        2,
        "the panicking call's number went to the next caller"
    );
    assert_eq!(
        post_or_panic_sequence().locked(),
        0,
        "the panic released the key"
    );
}

#[sequenced(key = key)]
async fn post_after(key: u64, started: Option<tokio::sync::oneshot::Sender<()>>, seq: Seq) -> u64 {
    if let Some(started) = started {
        started.send(()).unwrap();
        std::future::pending::<()>().await;
    }
    seq.get()
}

#[tokio::test]
async fn dropped_future_consumes_no_number() {
    assert_eq!(post_after(1, None).await, 1);
    let (started, body_running) = tokio::sync::oneshot::channel();
    let call = tokio::spawn(post_after(1, Some(started)));
    body_running.await.unwrap(); // its body holds number 2 now
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(
        post_after(1, None).await,
        2,
        "the dropped call's number went to the next caller"
    );
    assert_eq!(post_after_sequence().locked(), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Number order equals completion order.

#[sequenced(key = key)]
async fn record(key: u64, finished: Arc<Mutex<Vec<u64>>>, seq: Seq) {
    tokio::task::yield_now().await;
    finished.lock().unwrap().push(seq.get()); // the last thing the body does
}

/// 100 tasks released by one barrier; 5 rounds. Every round the bodies finished in number
/// order: the finish log is exactly 1, 2, ..., 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completion_order_is_number_order() {
    for round in 0..ROUNDS {
        let key = 5_000 + round;
        let finished = Arc::new(Mutex::new(Vec::new()));
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (barrier, finished) = (barrier.clone(), finished.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    record(key, finished).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            *finished.lock().unwrap(),
            (1..=100).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Lock entries vanish when idle (also after cancelled waiters); counters stay, and can be
//    read and reset.

#[sequenced(key = key)]
async fn hold(key: u64, until: Option<tokio::sync::oneshot::Receiver<()>>, seq: Seq) -> u64 {
    if let Some(until) = until {
        let _ = until.await;
    }
    seq.get()
}

/// 100,000 distinct keys, one call each; every 10th key also gets a waiter that queues behind
/// a holder and is then cancelled. Afterwards no lock entry is left, and every key kept its
/// counter (the cancelled waiters consumed nothing).
#[tokio::test]
async fn cancelled_waiter_leaves_no_entry() {
    const KEYS: u64 = 100_000;
    for key in 0..KEYS {
        if key % 10 == 0 {
            let (release, until) = tokio::sync::oneshot::channel();
            let mut holder = Box::pin(hold(key, Some(until)));
            assert!(
                (&mut holder).now_or_never().is_none(),
                "holds the key, parked in its body"
            );
            assert!(
                hold(key, None).now_or_never().is_none(),
                "queued behind the holder, then dropped"
            );
            release.send(()).unwrap();
            assert_eq!(holder.await, 1);
        } else {
            assert_eq!(hold(key, None).await, 1);
        }
    }
    let sequence = hold_sequence();
    assert_eq!(sequence.locked(), 0, "idle keys have no lock entry");
    assert_eq!(sequence.counters(), KEYS as usize, "counters are kept");
    assert!((0..KEYS).all(|key| sequence.next(&key) == Some(2)));
}

#[sequenced(key = shop.to_owned(), start = 100)]
fn order_no(shop: &str, seq: Seq) -> u64 {
    seq.get()
}

#[test]
fn counter_can_be_read_set_and_reset() {
    let sequence = order_no_sequence();
    let shop = "lisbon".to_owned();
    assert_eq!(sequence.next(&shop), None, "never called: `start` applies");
    assert_eq!((order_no("lisbon"), order_no("lisbon")), (100, 101));
    assert_eq!(sequence.next(&shop), Some(102));
    sequence.set_next(&shop, 500).unwrap();
    assert_eq!(order_no("lisbon"), 500);
    assert_eq!(sequence.reset(&shop).unwrap(), Some(501));
    assert_eq!(sequence.next(&shop), None);
    assert_eq!(
        order_no("lisbon"),
        100,
        "after a reset the key starts at `start` again"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. `timeout`: a typed error, and the waiter leaves the queue.

#[derive(Debug)]
enum PostError {
    Busy(SequenceError),
}

impl From<SequenceError> for PostError {
    fn from(error: SequenceError) -> Self {
        PostError::Busy(error)
    }
}

#[sequenced(key = key, timeout = "50ms")]
fn post_within(key: u64, gate: Option<mpsc::Receiver<()>>, seq: Seq) -> Result<u64, PostError> {
    if let Some(gate) = gate {
        gate.recv().unwrap();
    }
    Ok(seq.get())
}

#[test]
fn timeout_is_a_typed_error_and_leaves_the_queue() {
    let (open, gate) = mpsc::channel();
    let holder = std::thread::spawn(move || post_within(7, Some(gate)));
    // The holder is in its body, blocked on the gate, once its key shows up as locked.
    while post_within_sequence().locked() == 0 {
        std::thread::yield_now();
    }
    let error = post_within(7, None).unwrap_err();
    assert!(
        matches!(error, PostError::Busy(SequenceError::Timeout)),
        "{error:?}"
    );
    assert_eq!(
        post_within_sequence().waiting(&7_u64),
        0,
        "the timed-out waiter left the queue"
    );
    open.send(()).unwrap();
    assert_eq!(holder.join().unwrap().unwrap(), 1);
    assert_eq!(
        post_within(7, None).unwrap(),
        2,
        "the timed-out call consumed no number"
    );
    assert_eq!(post_within_sequence().locked(), 0);
}

// ---------------------------------------------------------------------------------------------
// 8. Sync and async functions, methods with `&self`.

struct Ledger {
    id: u64,
    entries: Mutex<Vec<u64>>,
}

impl Ledger {
    #[sequenced(key = self.id)]
    fn post(&self, seq: Seq) -> u64 {
        let n = seq.get();
        self.entries.lock().unwrap().push(n);
        n
    }

    #[sequenced(key = self.id)]
    async fn post_async(&self, amount: u64, seq: Seq) -> Result<(u64, u64), Rejected> {
        tokio::task::yield_now().await;
        self.entries.lock().unwrap().push(seq.get());
        Ok((seq.get(), amount))
    }
}

/// 8 threads released by one barrier post 25 entries each to one ledger through a sync
/// `&self` method; 5 rounds (a fresh ledger id each). Every round the ledger holds exactly
/// 1..=200 in order.
#[test]
fn sync_method_with_self() {
    for round in 0..ROUNDS {
        let ledger = Ledger {
            id: 8_000 + round,
            entries: Mutex::new(Vec::new()),
        };
        let barrier = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..25 {
                        ledger.post();
                    }
                });
            }
        });
        assert_eq!(
            *ledger.entries.lock().unwrap(),
            (1..=200).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

/// 50 tasks released by one barrier post through an async `&self` method; 5 rounds. Every
/// round the ledger holds exactly 1..=50 in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_method_with_self() {
    for round in 0..ROUNDS {
        let ledger = Arc::new(Ledger {
            id: 8_100 + round,
            entries: Mutex::new(Vec::new()),
        });
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|amount| {
                let (barrier, ledger) = (barrier.clone(), ledger.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    ledger.post_async(amount).await.unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            *ledger.entries.lock().unwrap(),
            (1..=50).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

static SINGLE: AtomicU64 = AtomicU64::new(0);

/// Without `key`, the function has one sequence for every caller.
#[sequenced]
fn next_global(seq: Seq) -> u64 {
    SINGLE.fetch_add(1, Ordering::SeqCst);
    u64::from(seq)
}

#[test]
fn without_key_one_sequence() {
    let numbers: Vec<u64> = (0..3).map(|_| next_global()).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(next_global_sequence().next(&()), Some(4));
    assert_eq!(format!("{}", Seq::new(7, 0)), "7");
}

// ---------------------------------------------------------------------------------------------
// 9. Re-entry is detected instead of deadlocking.

#[sequenced(key = key)]
fn nested(key: u64, inner: Option<u64>, seq: Seq) -> u64 {
    if let Some(inner) = inner {
        nested(inner, None);
    }
    seq.get()
}

#[test]
fn reentry_without_error_type_panics_with_the_reason() {
    let panic = catch_unwind(|| nested(1, Some(1))).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("re-entered"), "{message}");
    assert_eq!(
        nested_sequence().locked(),
        0,
        "the outer call released its key while unwinding"
    );
    assert_eq!(
        nested(2, Some(3)),
        1,
        "a different key inside the body is fine"
    );
}

#[sequenced(key = key, timeout = "10s")]
fn nested_typed(key: u64, inner: bool, seq: Seq) -> Result<u64, PostError> {
    if inner {
        nested_typed(key, false)?;
    }
    Ok(seq.get())
}

// The last number a key can hand out is `u64::MAX - 1`: the next call fails before its body
// runs (found in review: committing `u64::MAX` overflowed).
#[sequenced(key = key, start = u64::MAX - 1, timeout = "10s")]
fn near_the_end(key: u64, seq: Seq) -> Result<u64, PostError> {
    Ok(seq.get())
}

#[test]
fn numbers_end_before_u64_max() {
    assert_eq!(near_the_end(1).unwrap(), u64::MAX - 1);
    let error = near_the_end(1).unwrap_err();
    assert!(
        matches!(error, PostError::Busy(SequenceError::Exhausted)),
        "{error:?}"
    );
    assert_eq!(
        near_the_end_sequence().next(&1_u64),
        Some(u64::MAX),
        "nothing was committed"
    );
}

// `start` runs under the key's lock: a sync `start` that calls the function with the same key
// is re-entry too (found in review: it used to wait out the timeout instead).
#[sequenced(key = key, start = if outer { start_reenters(key, false)? } else { 1 }, timeout = "10s")]
fn start_reenters(key: u64, outer: bool, seq: Seq) -> Result<u64, PostError> {
    Ok(seq.get())
}

#[test]
fn reentry_from_start_returns_reentrant() {
    let error = start_reenters(1, true).unwrap_err();
    assert!(
        matches!(error, PostError::Busy(SequenceError::Reentrant)),
        "{error:?}"
    );
    assert_eq!(
        start_reenters(1, false).unwrap(),
        1,
        "the failed call consumed nothing"
    );
}

#[test]
fn reentry_with_error_type_returns_reentrant() {
    let error = nested_typed(1, true).unwrap_err();
    assert!(
        matches!(error, PostError::Busy(SequenceError::Reentrant)),
        "{error:?}"
    );
    assert_eq!(
        nested_typed(1, false).unwrap(),
        1,
        "the failed outer call consumed nothing"
    );
}

#[sequenced(key = key, timeout = "10s")]
async fn nested_async(key: u64, depth: u8, seq: Seq) -> Result<u64, PostError> {
    if depth > 0 {
        // Through `join!` inside the body: still the body's own future.
        let (inner, _) = tokio::join!(
            Box::pin(nested_async(key, depth - 1)),
            tokio::task::yield_now()
        );
        inner?;
    }
    Ok(seq.get())
}

#[tokio::test]
async fn reentry_in_async_body_returns_reentrant() {
    let error = nested_async(1, 1).await.unwrap_err();
    assert!(
        matches!(error, PostError::Busy(SequenceError::Reentrant)),
        "{error:?}"
    );
    // Two calls side by side in one task are not re-entry: the second queues.
    let (a, b) = tokio::join!(nested_async(2, 0), nested_async(2, 0));
    let mut both = [a.unwrap(), b.unwrap()];
    both.sort_unstable();
    assert_eq!(both, [1, 2]);
}

// ---------------------------------------------------------------------------------------------
// `start`: evaluated once per key, under the key's lock, with `?` and `.await`.

static START_EVALUATIONS: AtomicU64 = AtomicU64::new(0);

async fn max_stored(fail: bool) -> Result<u64, Rejected> {
    tokio::task::yield_now().await;
    START_EVALUATIONS.fetch_add(1, Ordering::SeqCst);
    if fail {
        Err(Rejected)
    } else {
        Ok(41)
    }
}

#[sequenced(key = key, start = max_stored(fail_start).await? + 1)]
async fn numbered_from_storage(key: u64, fail_start: bool, seq: Seq) -> Result<u64, Rejected> {
    Ok(seq.get())
}

#[tokio::test]
async fn start_runs_once_per_key_and_may_fail() {
    assert_eq!(
        numbered_from_storage(1, true).await,
        Err(Rejected),
        "`?` in start returns the error"
    );
    assert_eq!(
        numbered_from_storage_sequence().next(&1_u64),
        None,
        "a failed start consumes nothing"
    );
    assert_eq!(numbered_from_storage(1, false).await, Ok(42));
    assert_eq!(
        numbered_from_storage(1, true).await,
        Ok(43),
        "start is not evaluated again"
    );
    assert_eq!(START_EVALUATIONS.load(Ordering::SeqCst), 2);
    assert_eq!(numbered_from_storage_sequence().locked(), 0);
}

// ---------------------------------------------------------------------------------------------
// 8. The per-call answer (issue 13): `turn::track` tells a call that waited for its key from
//    one that found it free.

#[sequenced(key = key)]
fn turn_taker(key: u64, gate: Option<mpsc::Receiver<()>>, seq: Seq) -> u64 {
    if let Some(gate) = gate {
        gate.recv().unwrap();
    }
    seq.get()
}

/// 10 rounds, 2 callers on a fresh key each round: a holder parked in its body, and a second
/// caller that starts once the holder holds the key and is seen queued before the holder is let
/// go. Every round: the holder's turn is `AtOnce` and the second caller's `Waited`; their
/// numbers are 1 and 2; a third call afterwards, on the idle key, is `AtOnce` again.
#[test]
fn turn_tells_a_waiting_call_from_one_that_found_the_key_free() {
    for round in 0..10 {
        let key = 9_000 + round;
        let (open, gate) = mpsc::channel();
        std::thread::scope(|s| {
            let holder =
                s.spawn(move || racefree::turn::track_sync(|| turn_taker(key, Some(gate))));
            while turn_taker_sequence().locked() == 0 {
                std::thread::yield_now();
            }
            let waiter = s.spawn(move || racefree::turn::track_sync(|| turn_taker(key, None)));
            until_waiting(&turn_taker_sequence(), &key, 1);
            open.send(()).unwrap();
            let (first, holder_turn) = holder.join().unwrap();
            let (second, waiter_turn) = waiter.join().unwrap();
            assert_eq!((first, second), (1, 2), "round {round}");
            assert_eq!(holder_turn, racefree::Turn::AtOnce, "round {round}");
            assert_eq!(waiter_turn, racefree::Turn::Waited, "round {round}");
        });
        let (third, turn) = racefree::turn::track_sync(|| turn_taker(key, None));
        assert_eq!((third, turn), (3, racefree::Turn::AtOnce), "round {round}");
    }
}

#[sequenced(key = key)]
async fn hold_for_turns(
    key: u64,
    until: Option<tokio::sync::oneshot::Receiver<()>>,
    seq: Seq,
) -> u64 {
    if let Some(until) = until {
        let _ = until.await;
    }
    seq.get()
}

/// The same for async calls, on one thread: the holder is parked in its body, the second call
/// is polled once (queued), then both finish. 10 rounds; in every round `AtOnce` then `Waited`.
/// (A function of its own: `cancelled_waiter_leaves_no_entry`, running beside it, counts every
/// counter `hold` keeps.)
#[tokio::test]
async fn turn_tracks_async_calls_across_polls() {
    for round in 0..10 {
        let key = round;
        let (release, until) = tokio::sync::oneshot::channel();
        let mut holder = Box::pin(racefree::turn::track(hold_for_turns(key, Some(until))));
        assert!((&mut holder).now_or_never().is_none(), "holds the key");
        let mut waiter = Box::pin(racefree::turn::track(hold_for_turns(key, None)));
        assert!((&mut waiter).now_or_never().is_none(), "queued behind it");
        release.send(()).unwrap();
        assert_eq!(holder.await, (1, racefree::Turn::AtOnce), "round {round}");
        assert_eq!(waiter.await, (2, racefree::Turn::Waited), "round {round}");
    }
}
