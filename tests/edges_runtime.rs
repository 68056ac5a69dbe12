//! The runtime at its edges (issue 9): keys whose `Clone`, `Hash` or `Eq` panic, blocking calls
//! inside async runtimes, re-entry, capacity and TTL precision, handle lookups by borrowed and
//! wrong keys, the bound of the in-process idempotency store. Each test is named after what
//! broke.

use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use racefree::__private::{SequenceBackend, SequenceLease};
use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq, SequenceError};
use racefree_runtime::idempotent::call::{begin, begin_blocking, Begin, Call, Policy};
use racefree_runtime::idempotent::{IdempotencyConfig, DEFAULT_CAPACITY};
use racefree_runtime::sync::clock;
use racefree_runtime::{Cache, Fingerprint, IdempotencyStore, KeyedLocks, Lookup, Sequencer};

#[path = "support/common.rs"]
mod common;

// ---------------------------------------------------------------------------------------------
// 4. Keys whose `Clone`, `Hash` or `Eq` panic
// ---------------------------------------------------------------------------------------------

/// A key whose `Clone`, `Hash` or `Eq` panics the next `n` times once armed with `n`. Each test
/// has its own faults.
#[derive(Debug)]
struct Fragile {
    id: u32,
    faults: &'static Faults,
}

#[derive(Debug, Default)]
struct Faults {
    clone: Fault,
    hash: Fault,
    eq: Fault,
}

#[derive(Debug, Default)]
struct Fault(AtomicUsize);

impl Fault {
    fn arm(&self, times: usize) {
        self.0.store(times, SeqCst);
    }

    fn fires(&self) -> bool {
        self.0
            .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
            .is_ok()
    }
}

impl Faults {
    const fn new() -> Faults {
        Faults {
            clone: Fault(AtomicUsize::new(0)),
            hash: Fault(AtomicUsize::new(0)),
            eq: Fault(AtomicUsize::new(0)),
        }
    }
}

impl Clone for Fragile {
    fn clone(&self) -> Self {
        if self.faults.clone.fires() {
            panic!("clone fails");
        }
        Fragile {
            id: self.id,
            faults: self.faults,
        }
    }
}

impl Hash for Fragile {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.faults.hash.fires() {
            panic!("hash fails");
        }
        self.id.hash(state);
    }
}

impl PartialEq for Fragile {
    fn eq(&self, other: &Self) -> bool {
        if self.faults.eq.fires() {
            panic!("eq fails");
        }
        self.id == other.id
    }
}

impl Eq for Fragile {}

fn panics<R>(f: impl FnOnce() -> R) -> bool {
    catch_unwind(AssertUnwindSafe(f)).is_err()
}

/// Issue 9.4: the waiter was queued before the key was cloned, so a `Clone` that panicked
/// while the caller queued left a waiter nobody would ever take out: the key stayed locked.
/// For each of `Clone`, `Hash`, `Eq`, sync and async: the queued caller's panic leaves the
/// queue empty, the holder's release frees the key, and the key works again.
#[test]
fn a_key_whose_clone_hash_or_eq_panics_while_queueing_leaves_no_orphan_waiter() {
    static FAULTS: Faults = Faults::new();
    let key = || Fragile {
        id: 7,
        faults: &FAULTS,
    };
    let locks: KeyedLocks<Fragile> = KeyedLocks::new();
    for fault in [&FAULTS.clone, &FAULTS.hash, &FAULTS.eq] {
        for asynchronous in [false, true] {
            let holder = locks.lock(key(), None).unwrap();
            fault.arm(1);
            let deadline = Some(Instant::now() + common::PATIENCE);
            let queued = match asynchronous {
                false => panics(|| locks.lock(key(), deadline).map(drop)),
                true => panics(|| {
                    futures::executor::block_on(locks.lock_async(key(), deadline)).map(drop)
                }),
            };
            assert!(queued, "the fault fired while the caller queued");
            assert_eq!(locks.waiting(&key()), 0, "no orphan waiter");
            drop(holder);
            assert!(locks.is_empty(), "the release freed the key");
            assert!(locks.try_lock(key()).is_some(), "the key is usable");
            assert!(locks.is_empty());
        }
    }
}

/// Issue 9.4, on the way out: a key whose `Hash` or `Eq` panics when its holder lets go, or
/// when a queued caller gives up, could not be found to be released. The entry is now found by
/// identity and the key handed on (the panic still reaches the caller): for each fault, the
/// queued waiter gets the key, a timed-out waiter leaves the queue, and the registry empties.
#[test]
fn a_key_whose_hash_or_eq_panics_on_the_way_out_is_still_handed_on() {
    static FAULTS: Faults = Faults::new();
    let key = || Fragile {
        id: 3,
        faults: &FAULTS,
    };
    let locks: KeyedLocks<Fragile> = KeyedLocks::new();
    let locks = &locks;
    for fault in [&FAULTS.hash, &FAULTS.eq] {
        let holder = locks.lock(key(), None).unwrap();
        std::thread::scope(|scope| {
            // With a deadline, so that a key never handed on fails the test instead of hanging it.
            let deadline = Some(Instant::now() + common::PATIENCE);
            let waiter = scope.spawn(move || locks.lock(key(), deadline).map(drop));
            common::until_sync("the waiter queues", || locks.waiting(&key()) == 1);
            fault.arm(1);
            assert!(
                panics(move || drop(holder)),
                "the release's panic reaches the holder"
            );
            assert_eq!(
                waiter.join().unwrap(),
                Ok(()),
                "the waiter was handed the key"
            );
        });
        assert!(locks.is_empty());

        // A queued caller times out, then fails twice to leave by key (its last look, then
        // its drop): it leaves by identity.
        let holder = locks.lock(key(), None).unwrap();
        std::thread::scope(|scope| {
            // Long enough that the fault is armed before it passes, on a loaded machine too.
            let deadline = Instant::now() + Duration::from_secs(1);
            let waiter =
                scope.spawn(move || panics(|| locks.lock(key(), Some(deadline)).map(drop)));
            common::until_sync("the waiter queues", || locks.waiting(&key()) == 1);
            fault.arm(2);
            assert!(
                waiter.join().unwrap(),
                "the fault reached the timed-out caller"
            );
        });
        fault.arm(0);
        assert_eq!(
            locks.waiting(&key()),
            0,
            "the timed-out waiter left the queue"
        );
        drop(holder);
        assert!(locks.is_empty());
    }

    // A `#[cached]` flight whose lead lets go with a panicking `Hash`: its follower wakes.
    let flights = racefree_runtime::sync::single_flight::SingleFlight::<Fragile, u32>::new();
    let racefree_runtime::sync::single_flight::Join::Lead(lead) = flights.join(key()) else {
        panic!("first")
    };
    let racefree_runtime::sync::single_flight::Join::Follow(flight) = flights.join(key()) else {
        panic!("second")
    };
    FAULTS.hash.arm(1);
    assert!(panics(move || drop(lead)));
    assert_eq!(flight.landing(), Some(&None), "the follower was woken");
    assert!(flights.is_empty());
}

/// Issue 9.4, through the sequencer the attribute uses: a queued caller whose key panics
/// consumes no number and blocks nobody; the numbers stay contiguous.
#[test]
fn a_sequencer_key_that_panics_while_queued_leaves_the_sequence_intact() {
    static FAULTS: Faults = Faults::new();
    let key = || Fragile {
        id: 1,
        faults: &FAULTS,
    };
    let sequencer: Sequencer<Fragile> = Sequencer::new();
    let mut lease = sequencer.acquire(key(), None).unwrap();
    FAULTS.clone.arm(1);
    assert!(panics(|| sequencer.acquire(key(), None).map(drop)));
    let n = lease.next().unwrap().unwrap_or(1);
    lease.commit(n).unwrap();
    let mut lease = sequencer.acquire(key(), None).unwrap();
    assert_eq!(lease.next().unwrap(), Some(2));
    drop(lease);
    assert!(sequencer.is_idle());
}

/// Issue 9.4 in the flight and store paths of `#[cached]`: a follower whose key's `Clone`
/// panics as it joins leaves nothing; a lead whose key's `Clone` panics as it stores its value
/// releases its follower, which computes instead; the key works after. 50 rounds, 1 lead and 1
/// follower thread each: every round ends with no flight left and the key cached.
#[test]
fn a_cache_key_that_panics_in_the_flight_or_store_path_releases_its_waiters() {
    static FAULTS: Faults = Faults::new();
    for round in 0..50u32 {
        let key = move || Fragile {
            id: round,
            faults: &FAULTS,
        };
        let cache: Cache<Fragile, u32> = Cache::builder().capacity(8).build();
        let Lookup::Lead(lead) = cache.lookup_or_lead(key()) else {
            panic!("cold key")
        };
        // A follower whose key cannot be cloned fails alone.
        FAULTS.clone.arm(1);
        assert!(panics(|| drop(cache.lookup_or_lead(key()))));
        assert_eq!(
            cache.in_flight(),
            1,
            "round {round}: only the lead's flight"
        );

        std::thread::scope(|scope| {
            let follower = scope.spawn(|| match cache.lookup_or_lead(key()) {
                Lookup::Hit(value) => value,
                Lookup::Lead(lead) => {
                    lead.complete(round + 1);
                    round + 1
                }
            });
            common::until_sync("the follower waits", || cache.stats().coalesced == 1);
            // The lead's store clones the key: it panics, and the follower takes over.
            FAULTS.clone.arm(1);
            assert!(panics(move || lead.complete(round)));
            assert_eq!(follower.join().unwrap(), round + 1, "round {round}");
        });
        assert_eq!(cache.in_flight(), 0, "round {round}");
        assert_eq!(
            cache.get(&key()),
            Some(round + 1),
            "round {round}: the key works"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Capacity and TTL
// ---------------------------------------------------------------------------------------------

/// Issue 9.6: with every resident hit since the CLOCK hand's last pass, the hand cleared them
/// all and came round to the key just inserted, evicting it: a new key recomputed on every
/// call. 200 rounds of "fill, hit everything, insert a new key": the new key is there, and a
/// second call of it is a hit.
#[test]
fn capacity_never_evicts_the_entry_it_is_inserting() {
    let cache: Cache<u64, u64> = Cache::builder().capacity(4).build();
    for round in 0..200u64 {
        for resident in 0..4 {
            cache.get_with(round * 10 + resident, || resident);
        }
        for resident in 0..4 {
            cache.get(&(round * 10 + resident));
        }
        let fresh = round * 10 + 9;
        let executions = cache.stats().executions;
        cache.get_with(fresh, || 99);
        assert_eq!(
            cache.get(&fresh),
            Some(99),
            "round {round}: the new key stayed"
        );
        cache.get_with(fresh, || unreachable!("round {round}: recomputed"));
        assert_eq!(cache.stats().executions, executions + 1);
        assert!(cache.len() <= 4, "round {round}: {} entries", cache.len());
    }
}

/// Issue 9.6: `clear()` emptied the map, then the ring, without the ring's lock around both:
/// an insert in between left an entry the ring never saw, never evicted, beyond the capacity.
/// 4 inserting threads x 2000 inserts against a clearing thread, 20 rounds: every entry is in
/// the ring, and later inserts bring the cache back to its capacity.
#[test]
fn clear_racing_inserts_leaves_no_entry_outside_the_ring() {
    for round in 0..20u64 {
        let cache: Cache<u64, u64> = Cache::builder().capacity(64).build();
        let start = Barrier::new(5);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (cache, start) = (&cache, &start);
                scope.spawn(move || {
                    start.wait();
                    for i in 0..2000 {
                        cache.insert(t * 1_000_000 + i, i);
                    }
                });
            }
            start.wait();
            for _ in 0..200 {
                cache.clear();
                std::thread::yield_now();
            }
        });
        assert!(
            cache.ring_covers_entries(),
            "round {round}: an entry escaped the ring"
        );
        for i in 0..1000 {
            cache.insert(10_000_000 + i, i);
        }
        assert!(cache.len() <= 64, "round {round}: {} entries", cache.len());
    }
}

/// How far the coarse clock trails the precise one now. Beyond [`clock::margin`] (the
/// virtual CPU was descheduled past a kernel tick), a TTL check may run late: `sync::clock`
/// documents it.
fn coarse_lag() -> u64 {
    let coarse = clock::now_nanos();
    clock::precise_nanos().saturating_sub(coarse)
}

/// Issue 9.6: the deadline was taken from the coarse clock, which trails by up to a tick, so an
/// entry could expire up to a tick early (or, checked coarsely, live a tick long). 20 rounds of
/// a 20 ms TTL read in a tight loop: every read that found the entry started before the TTL
/// had passed since the insert ended, and every read that missed it ended after the TTL had
/// passed since the insert began. The one excuse is the documented one (`sync::clock`): a read
/// while the coarse clock trailed by more than its margin (a descheduled virtual CPU), measured
/// on both sides of the read; each such read is printed.
#[test]
fn an_entry_is_never_returned_after_its_ttl_and_never_dropped_before() {
    let ttl = Duration::from_millis(20);
    println!("coarse clock tick: {} ns", clock::tick_nanos());
    for round in 0..20u32 {
        let cache: Cache<u32, u32> = Cache::builder().ttl(ttl).build();
        let inserting = Instant::now();
        cache.insert(round, round);
        let inserted = Instant::now();
        loop {
            let lag_before = coarse_lag();
            let before = Instant::now();
            let found = cache.get(&round);
            let after = Instant::now();
            let lagging = lag_before.max(coarse_lag()) > clock::margin();
            match found {
                Some(_) if lagging && before.duration_since(inserted) >= ttl => {
                    println!("round {round}: returned late while the coarse clock trailed");
                }
                Some(_) => assert!(
                    before.duration_since(inserted) < ttl,
                    "round {round}: returned {:?} after the insert",
                    before.duration_since(inserted)
                ),
                None => {
                    assert!(
                        after.duration_since(inserting) >= ttl,
                        "round {round}: dropped {:?} after the insert",
                        after.duration_since(inserting)
                    );
                    break;
                }
            }
        }
    }
}

/// Issue 9.6, in the in-process idempotency store, which read the same coarse clock: an
/// outcome was replayed until `ttl` had passed and never after, and not given up before.
/// 20 rounds of a 20 ms TTL claimed in a tight loop; a late replay is excused only while the
/// coarse clock was measured trailing by more than its margin, as above.
#[test]
fn an_idempotency_outcome_is_replayed_until_its_ttl_and_never_after() {
    use racefree_runtime::idempotent::Claim;
    let ttl = Duration::from_millis(20);
    for round in 0..20u64 {
        let store: IdempotencyStore<u64> = IdempotencyStore::new();
        let Claim::Execute(lease) = claim(&store, "k") else {
            panic!("fresh key")
        };
        let completing = Instant::now();
        store.complete_lease(lease, &round, ttl);
        let completed = Instant::now();
        loop {
            let lag_before = coarse_lag();
            let before = Instant::now();
            let found = claim(&store, "k");
            let after = Instant::now();
            let lagging = lag_before.max(coarse_lag()) > clock::margin();
            match found {
                Claim::Replay(_) if lagging && before.duration_since(completed) >= ttl => {
                    println!("round {round}: replayed late while the coarse clock trailed");
                }
                Claim::Replay(_) => assert!(
                    before.duration_since(completed) < ttl,
                    "round {round}: replayed {:?} after completing",
                    before.duration_since(completed)
                ),
                Claim::Execute(_) => {
                    assert!(
                        after.duration_since(completing) >= ttl,
                        "round {round}: expired {:?} after completing",
                        after.duration_since(completing)
                    );
                    break;
                }
                Claim::InFlight(_) => panic!("round {round}: nobody executes"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Blocking calls inside async runtimes; #[idempotent] re-entry
// ---------------------------------------------------------------------------------------------

/// Runs `test` on a thread of its own and fails if it does not finish within
/// [`common::PATIENCE`]: the regressions the tests below guard against are deadlocks, and a
/// deadlock must fail its test, not hang the suite.
fn deadlock_guard(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(common::PATIENCE) {
        Ok(()) => runner.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(runner.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("deadlocked: still running after {:?}", common::PATIENCE)
        }
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Issue 9.5: `reset`/`set_next` only blocked: from async code, while an async call of the
/// same current-thread runtime held the key, they waited for a holder that could never run.
/// Now the blocking form fails at once with `WouldDeadlock` (leaving no trace in the queue),
/// and the async forms wait for the holder and then act.
#[test]
fn blocking_reset_while_an_async_call_holds_the_key_fails_instead_of_deadlocking() {
    #[sequenced(key = desk)]
    async fn serve(desk: u8, seq: Seq, release: tokio::sync::oneshot::Receiver<()>) -> u64 {
        let _ = release.await;
        seq.get()
    }

    deadlock_guard(move || {
        current_thread().block_on(async {
            let sequence = serve_sequence();
            let (release, held) = tokio::sync::oneshot::channel();
            let holder = tokio::spawn(serve(1, held));
            common::until("the call holds desk 1", || sequence.locked() == 1).await;

            assert!(matches!(
                sequence.reset(&1_u8),
                Err(SequenceError::WouldDeadlock)
            ));
            assert!(matches!(
                sequence.set_next(&1_u8, 10),
                Err(SequenceError::WouldDeadlock)
            ));
            assert_eq!(
                sequence.waiting(&1_u8),
                0,
                "the refused calls left the queue"
            );

            let set = tokio::spawn(sequence.set_next_async(&1_u8, 10));
            common::until("set_next_async waits for the holder", || {
                sequence.waiting(&1_u8) == 1
            })
            .await;
            release.send(()).unwrap();
            assert_eq!(common::guarded("the holder", holder).await.unwrap(), 1);
            common::guarded("set_next_async", set)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sequence.next(&1_u8), Some(10));
            assert_eq!(
                common::guarded("reset_async", sequence.reset_async(&1_u8))
                    .await
                    .unwrap(),
                Some(10)
            );
            assert_eq!(sequence.locked(), 0);
        });
    });
}

/// Issue 9.5: a sync caller finding its key computed by an async call of its own thread's
/// current-thread runtime blocked that thread, and with it the leader, forever. Now it panics
/// with the reason; the leader then finishes and the sync caller's next call hits.
#[test]
fn a_sync_cached_waiter_on_an_async_leader_of_its_own_runtime_panics_with_the_reason() {
    static SHARED: std::sync::LazyLock<Cache<u8, u64>> = std::sync::LazyLock::new(Cache::new);
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cached(store = SHARED, skip(gate))]
    async fn load(key: u8, gate: Arc<tokio::sync::Notify>) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        gate.notified().await;
        u64::from(key) * 10
    }

    #[cached(store = SHARED)]
    fn load_now(key: u8) -> u64 {
        RUNS.fetch_add(1, SeqCst);
        u64::from(key) * 10
    }

    deadlock_guard(move || {
        current_thread().block_on(async {
            let gate = Arc::new(tokio::sync::Notify::new());
            let leader = tokio::spawn(load(4, Arc::clone(&gate)));
            common::until("the async call leads", || SHARED.in_flight() == 1).await;

            let waited = catch_unwind(|| load_now(4)).expect_err("refused, not blocked");
            let reason = waited.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(reason.contains("only this thread can run"), "{reason}");

            gate.notify_one();
            assert_eq!(common::guarded("the leader", leader).await.unwrap(), 40);
            assert_eq!(load_now(4), 40, "a hit now");
            assert_eq!(RUNS.load(SeqCst), 1);
        });
    });
}

/// Issue 9.5, on a multi-thread runtime with one worker: a sync waiter on the worker blocked
/// the only thread its async leader could run on. It now waits inside `block_in_place`, so
/// the leader runs elsewhere and both get the value. 20 rounds, 1 leader + 1 sync waiter each.
#[test]
fn a_sync_waiter_on_a_multi_thread_worker_lets_its_async_leader_run() {
    deadlock_guard(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        for round in 0..20u32 {
            let cache: &'static Cache<u32, u32> = Box::leak(Box::new(Cache::new()));
            runtime.block_on(async {
                let (go, wait_for_go) = tokio::sync::oneshot::channel::<()>();
                let leader = tokio::spawn(async move {
                    match cache.lookup_or_lead_async(round).await {
                        Lookup::Lead(lead) => {
                            let _ = wait_for_go.await;
                            lead.complete(round + 1);
                            "led"
                        }
                        Lookup::Hit(_) => "hit",
                    }
                });
                common::until("the leader leads", || cache.in_flight() == 1).await;
                let waiter = tokio::spawn(async move {
                    // Wakes the leader on this very worker, then blocks the worker.
                    go.send(()).unwrap();
                    match cache.lookup_or_lead(round) {
                        Lookup::Hit(value) => value,
                        Lookup::Lead(_) => unreachable!("round {round}: the leader holds the key"),
                    }
                });
                let value = common::guarded("the sync waiter", waiter).await.unwrap();
                assert_eq!(value, round + 1, "round {round}");
                assert_eq!(common::guarded("the leader", leader).await.unwrap(), "led");
            });
        }
    });
}

/// Issue 9.5, the case `block_in_place` cannot save: on a multi-thread runtime, the future of
/// `block_on` itself leads a key and then calls a sync lookup of it. That future cannot move
/// to another worker, so the sync call panics with the reason instead of hanging.
#[test]
fn a_sync_waiter_on_its_own_block_on_future_panics_even_on_a_multi_thread_runtime() {
    deadlock_guard(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let cache: Cache<u8, u8> = Cache::new();
        runtime.block_on(async {
            let Lookup::Lead(lead) = cache.lookup_or_lead_async(1).await else {
                panic!("cold key")
            };
            let waited = catch_unwind(AssertUnwindSafe(|| drop(cache.lookup_or_lead(1))));
            let reason = panic_message(waited.expect_err("refused, not blocked"));
            assert!(reason.contains("only this thread can run"), "{reason}");
            lead.complete(2);
        });
        assert_eq!(cache.get(&1), Some(2));
    });
}

/// Issue 9.5: an `#[idempotent]` body calling its function with its own key waited for
/// itself forever. Now the inner call is refused with `Reentrant`, the outer call gets that
/// error back, and the key is free afterwards.
#[test]
fn an_idempotent_call_reentering_its_own_key_is_refused_as_reentrant() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[idempotent(key = key, skip(nested))]
    fn pay(key: &str, nested: bool) -> Result<u32, IdempotencyError> {
        RUNS.fetch_add(1, SeqCst);
        if nested {
            return pay(key, false).map(|n| n + 1);
        }
        Ok(1)
    }

    deadlock_guard(move || {
        assert_eq!(
            pay("order-1", true),
            Err(IdempotencyError::Reentrant {
                key: "order-1".to_owned()
            })
        );
        assert_eq!(RUNS.load(SeqCst), 1, "the inner call did not run");
        assert_eq!(pay_idempotency_store().in_flight(), 0);
        assert_eq!(pay("order-1", false), Ok(1), "the key is free");
        assert_eq!(pay("order-2", false), Ok(1), "another key is not affected");
    });
}

/// Issue 9.5, the async protocol: an execution's body run `within` it refuses a call with its
/// own key (`Reentrant`) instead of awaiting itself, while a call with another key, and the
/// same key once the execution is over, run.
#[test]
fn an_async_execution_refuses_its_own_key_from_within_its_body() {
    let store: IdempotencyStore<u32> = IdempotencyStore::new();
    let call = |key: &str| {
        Call::new(
            "edges::charge",
            None,
            key,
            Fingerprint(1),
            Policy::new(Duration::from_secs(60)),
        )
    };
    current_thread().block_on(async {
        let Begin::Execute(outer) = begin(&store, call("k")).await else {
            panic!("fresh key")
        };
        let inner = outer
            .within(async {
                let same = match begin(&store, call("k")).await {
                    Begin::Refuse(error) => Some(error),
                    _ => None,
                };
                let other = matches!(begin(&store, call("other")).await, Begin::Execute(_));
                (same, other)
            })
            .await;
        assert_eq!(
            inner,
            (
                Some(IdempotencyError::Reentrant {
                    key: "k".to_owned()
                }),
                true
            )
        );
        outer.complete(&5).await;
        assert!(matches!(begin(&store, call("k")).await, Begin::Replay(5)));
    });
}

/// Issue 9.5: a sync duplicate of a call that an async task of its own current-thread runtime
/// executes waited for it forever. Now it is refused with `WouldDeadlock`, nothing ran, and
/// the async owner completes.
#[test]
fn a_sync_idempotent_duplicate_of_an_async_owner_on_its_runtime_is_refused() {
    let store: IdempotencyStore<u32> = IdempotencyStore::new();
    let call = || {
        Call::new(
            "edges::book",
            None,
            "k",
            Fingerprint(1),
            Policy::new(Duration::from_secs(60)),
        )
    };
    deadlock_guard(move || {
        current_thread().block_on(async {
            let Begin::Execute(owner) = begin(&store, call()).await else {
                panic!("fresh key")
            };
            match begin_blocking(&store, call()) {
                Begin::Refuse(error) => {
                    assert_eq!(
                        error,
                        IdempotencyError::WouldDeadlock {
                            key: "k".to_owned()
                        }
                    )
                }
                _ => panic!("the duplicate must be refused"),
            }
            owner.complete(&3).await;
            assert!(matches!(begin_blocking(&store, call()), Begin::Replay(3)));
            assert_eq!(store.stats().executions, 1);
        });
    });
}

// ---------------------------------------------------------------------------------------------
// 7. Re-entry detection without false positives
// ---------------------------------------------------------------------------------------------

/// Issue 9.7: a sync body (running under its key's holder) that drove a current-thread runtime
/// polling *another* caller of the same key made that caller look re-entrant: it failed with
/// `Reentrant` instead of queueing. It now queues, and gets the key when the body is done; a
/// call made by the body itself through the runtime is still re-entry.
#[test]
#[allow(clippy::async_yields_async)] // the body hands the other caller's task out, unfinished
fn a_task_polled_by_a_sync_body_driving_a_runtime_is_not_taken_for_reentry() {
    let sequencer: &'static Sequencer<u8> = Box::leak(Box::new(Sequencer::new()));
    let runtime = current_thread();
    let mut lease = sequencer.acquire(3, None).unwrap();
    let other = {
        // The sync body, as generated code runs it: under the lease's holder.
        let _body = lease.holder().enter();
        runtime.block_on(async {
            let other = tokio::spawn(async move {
                let mut lease = sequencer.acquire_async(3, None).await?;
                let n = lease.next_async().await?.unwrap_or(1);
                lease.commit_async(n).await?;
                Ok::<u64, SequenceError>(n)
            });
            common::until("the other caller queues", || sequencer.waiting(&3) == 1).await;
            let own = sequencer.acquire_async(3, None).await.map(drop);
            assert!(
                matches!(own, Err(SequenceError::Reentrant)),
                "the body's own call"
            );
            other
        })
    };
    let n = lease.next().unwrap().unwrap_or(1);
    lease.commit(n).unwrap();
    let second = runtime.block_on(other).unwrap();
    assert_eq!(
        second.unwrap(),
        2,
        "the other caller queued and got the next number"
    );
    assert!(sequencer.is_idle());
}

// ---------------------------------------------------------------------------------------------
// 8. Handle lookups: borrowed keys work, wrong keys are loud, every type hits fast
// ---------------------------------------------------------------------------------------------

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Issue 9.8: `<fn>_sequence().next(&"porto")` on a `String` key made a fresh sequencer for
/// `&str` keys and answered `None`. Borrowed forms of a text key now find the function's
/// sequencer. A key of another type does not compile through the typed accessor
/// (`tests/ui/sequenced-handle-wrong-key-type.rs`); through the untyped handle (`.handle()`,
/// which is what a key type the macro cannot name gives) it panics naming the key type
/// instead of answering for a sequencer that does not exist (and makes none).
#[test]
fn sequence_handle_lookups_take_a_borrowed_key_and_refuse_a_wrong_one() {
    #[sequenced(key = city)]
    fn work_order(city: &str, seq: Seq) -> u64 {
        seq.get()
    }

    work_order("porto");
    work_order("porto");
    let sequence = work_order_sequence();
    assert_eq!(sequence.next(&"porto"), Some(3));
    assert_eq!(sequence.next("porto"), Some(3));
    assert_eq!(sequence.next(&"porto".to_owned()), Some(3));
    assert_eq!(sequence.next("lisbon"), None);
    assert_eq!(sequence.waiting("porto"), 0);

    let wrong = catch_unwind(AssertUnwindSafe(|| sequence.handle().next(&7_u32)))
        .expect_err("a wrong key type is loud");
    let message = panic_message(wrong);
    assert!(
        message.contains("u32") && message.contains("String"),
        "{message}"
    );
    assert_eq!(sequence.counters(), 1, "no new sequencer");

    sequence.set_next(&"porto", 10).unwrap();
    assert_eq!(work_order("porto"), 10);
    assert_eq!(sequence.reset("porto").unwrap(), Some(11));
    assert_eq!(work_order("porto"), 1);
}

/// Issue 9.8: `<fn>_cache().invalidate(&"a")` on a `String` key downcast `&dyn Any` to the
/// wrong type and answered `false`; `CacheHandle::typed` finds the cache without making one. A
/// wrong key type does not compile through the typed accessor
/// (`tests/ui/cached-handle-wrong-key-type.rs`) and panics through the untyped handle.
#[test]
fn cache_handle_invalidates_by_a_borrowed_key_and_refuses_a_wrong_one() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cached]
    fn shout(word: String) -> String {
        RUNS.fetch_add(1, SeqCst);
        word.to_uppercase()
    }

    shout("a".to_owned());
    let cache = shout_cache();
    assert!(cache.invalidate(&"a"), "found by `&&str`");
    shout("a".to_owned());
    assert!(cache.invalidate("a"), "found by `&str`");
    assert!(!cache.invalidate("a"), "already gone");
    assert_eq!(RUNS.load(SeqCst), 2);

    let wrong = catch_unwind(AssertUnwindSafe(|| cache.handle().invalidate(&1_u8)))
        .expect_err("a wrong key type is loud");
    assert!(panic_message(wrong).contains("u8"));
    assert!(cache.typed::<String, String>().is_some());
    assert!(
        cache.typed::<u8, String>().is_none(),
        "no cache made by looking"
    );
}

#[cached]
fn describe<T: std::fmt::Debug + Clone + Eq + Hash + Send + Sync + 'static>(value: T) -> String {
    format!("{value:?}")
}

/// Issue 9.8: a generic function's second concrete type found its cache through the handle's
/// write lock on every hit. Every type now hits through the lock-free chain: both types hit,
/// each with its own cache. (`hit_timings_of_the_first_and_second_type` prints ns per hit.)
#[test]
fn every_concrete_type_of_a_generic_function_hits_its_own_cache() {
    for _ in 0..3 {
        assert_eq!(describe(1_u8), "1");
        assert_eq!(describe("x".to_owned()), "\"x\"");
        assert_eq!(describe((1_u16, 2_u16)), "(1, 2)");
    }
    let stats = describe_cache().stats();
    assert_eq!((stats.executions, stats.hits), (3, 6));
}

#[cached]
fn timed<T: Copy + Eq + Hash + Send + Sync + 'static>(value: T) -> T {
    value
}

/// Prints ns per hit of a generic `#[cached]` function's first and second concrete types, on
/// 1 and 4 threads. `cargo test --release --test edges_runtime -- --ignored --nocapture
/// hit_timings`.
#[test]
#[ignore = "a timing, not a check: run by hand"]
fn hit_timings_of_the_first_and_second_type() {
    const HITS: u32 = 2_000_000;
    fn per_hit<T: Copy + Eq + Hash + Send + Sync + 'static>(value: T, threads: usize) -> f64 {
        timed(value);
        let start = Barrier::new(threads);
        let elapsed = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        let began = Instant::now();
                        for _ in 0..HITS {
                            std::hint::black_box(timed(std::hint::black_box(value)));
                        }
                        began.elapsed()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .max()
                .unwrap()
        });
        elapsed.as_nanos() as f64 / f64::from(HITS)
    }
    for threads in [1, 4] {
        let first = per_hit(1_u64, threads);
        let second = per_hit(1_u32, threads);
        println!(
            "{threads} thread(s): first type {first:.1} ns/hit, second type {second:.1} ns/hit"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. The in-process idempotency store is bounded
// ---------------------------------------------------------------------------------------------

fn claim(
    store: &IdempotencyStore<u64>,
    key: &str,
) -> racefree_runtime::idempotent::StoreClaim<u64> {
    store
        .claim_now(
            &racefree_runtime::idempotent::RecordKey::new("f", None, key),
            Fingerprint(1),
        )
        .unwrap()
}

/// Issue 9.9: the in-process store had no bound: a stream of unique keys grew it for a whole
/// `ttl` (952 MB after 1.17 M requests to the schedule API). It now holds at most
/// `DEFAULT_CAPACITY` outcomes unless told otherwise, evicts the oldest completed ones first,
/// counts them, and never evicts a record in flight.
#[test]
fn the_in_process_idempotency_store_is_bounded_by_default_and_never_evicts_in_flight() {
    use racefree_runtime::idempotent::Claim;
    assert_eq!(
        IdempotencyStore::<u64>::new().config().capacity,
        Some(DEFAULT_CAPACITY)
    );
    assert_eq!(IdempotencyConfig::new().capacity, Some(DEFAULT_CAPACITY));

    let store: IdempotencyStore<u64> = IdempotencyStore::builder().capacity(100).build();
    let Claim::Execute(running) = claim(&store, "in-flight") else {
        panic!("fresh key")
    };
    for n in 0..1000u64 {
        let Claim::Execute(lease) = claim(&store, &n.to_string()) else {
            panic!("fresh key")
        };
        store.complete_lease(lease, &n, Duration::from_secs(3600));
        assert!(store.len() <= 101, "{} records after {n}", store.len());
    }
    assert_eq!(store.stats().evictions, 900);
    assert!(
        matches!(claim(&store, "in-flight"), Claim::InFlight(_)),
        "never evicted"
    );
    assert!(
        matches!(claim(&store, "999"), Claim::Replay(999)),
        "the newest stay"
    );
    assert!(
        matches!(claim(&store, "0"), Claim::Execute(_)),
        "the oldest went first"
    );
    store.complete_lease(running, &7, Duration::from_secs(3600));
    assert!(matches!(claim(&store, "in-flight"), Claim::Replay(7)));
}

/// Issue 9.9: expired records were purged by a periodic full scan of the map on the hot path.
/// Now each store removes the expired records at the front of its list: a stream of 50 000
/// unique keys with a 1 ms TTL (1 µs apart, so 1000 live) never holds more than the live ones
/// plus one call's purge, and nothing expired is ever replayed.
#[test]
fn expired_idempotency_records_are_purged_as_outcomes_are_stored_without_a_scan() {
    use racefree_runtime::idempotent::Claim;
    let (builder, clock) = IdempotencyStore::builder().unbounded().manual_clock();
    let store: IdempotencyStore<u64> = builder.build();
    let mut largest = 0;
    for n in 0..50_000u64 {
        let Claim::Execute(lease) = claim(&store, &n.to_string()) else {
            panic!("fresh key")
        };
        store.complete_lease(lease, &n, Duration::from_millis(1));
        clock.advance(Duration::from_micros(1));
        largest = largest.max(store.len());
    }
    assert!(largest <= 1001, "grew to {largest}");
    assert!(
        matches!(claim(&store, "0"), Claim::Execute(_)),
        "expired: executes again"
    );
    assert_eq!(store.stats().evictions, 0, "expiry is not eviction");
}

/// Issue 9.9: a full store says so, but not once per eviction: 900 evictions in a burst give
/// one `warn` (target `racefree`, with the count and the capacity), and the store counts all.
#[test]
fn a_full_idempotency_store_warns_once_per_interval_not_per_eviction() {
    use racefree_runtime::idempotent::Claim;
    use tracing_subscriber::layer::SubscriberExt;
    let messages = common::Messages::default();
    let subscriber = tracing_subscriber::registry().with(messages.clone());
    tracing::subscriber::with_default(subscriber, || {
        let store: IdempotencyStore<u64> = IdempotencyStore::builder()
            .capacity(100)
            .name("edges::full")
            .build();
        for n in 0..1000u64 {
            let Claim::Execute(lease) = claim(&store, &n.to_string()) else {
                panic!("fresh key")
            };
            store.complete_lease(lease, &n, Duration::from_secs(3600));
        }
        assert_eq!(store.stats().evictions, 900);
    });
    let warnings: Vec<String> = messages
        .lines()
        .into_iter()
        .filter(|line| line.starts_with("WARN racefree ") && line.contains("edges::full"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("capacity=100") && warnings[0].contains("evictions=1"),
        "{}",
        warnings[0]
    );
}

/// An async `#[idempotent]` body that calls its own function with its own key gets
/// `Reentrant` at once, instead of waiting for itself forever.
#[racefree::idempotent(key = key)]
async fn charge_twice(key: &str, depth: u32) -> Result<String, racefree::IdempotencyError> {
    if depth == 0 {
        // Boxed: an async fn cannot await itself directly.
        let inner: std::pin::Pin<Box<dyn std::future::Future<Output = _> + '_>> =
            Box::pin(charge_twice(key, 1));
        return match inner.await {
            Err(racefree::IdempotencyError::Reentrant { key }) => Ok(format!("refused {key}")),
            other => Ok(format!("unexpected: {other:?}")),
        };
    }
    Ok("inner ran".to_owned())
}

#[tokio::test]
async fn an_async_idempotent_body_reentering_its_own_key_is_refused_as_reentrant() {
    let outcome = tokio::time::timeout(Duration::from_secs(10), charge_twice("k-reenter", 0))
        .await
        .expect("re-entry must not wait for itself");
    assert_eq!(outcome.unwrap(), "refused k-reenter");
}
