//! The keyed lock registry under `#[sequenced]`, driven directly: the hand-off races that the
//! attribute's tests cannot aim at.

use futures::FutureExt;
use racefree::__private::SequenceBackend;
use racefree_runtime::{KeyedLocks, LockError, Sequencer};

/// A waiter is handed the lock by the release and dropped before it ever looks: it must pass
/// the lock on to the next waiter, and with none left the entry must go.
#[tokio::test]
async fn granted_then_cancelled_waiter_hands_the_lock_on() {
    let locks = KeyedLocks::new();
    let holder = locks
        .lock_async(1_u32, None)
        .now_or_never()
        .unwrap()
        .unwrap();
    let mut first = Box::pin(locks.lock_async(1, None));
    let mut second = Box::pin(locks.lock_async(1, None));
    assert!((&mut first).now_or_never().is_none());
    assert!((&mut second).now_or_never().is_none());
    assert_eq!(locks.waiting(&1), 2);
    drop(holder); // hands the lock to `first`
    assert_eq!(locks.waiting(&1), 1);
    drop(first); // `first` never woke up: it passes the lock to `second`
    let guard = second.await.unwrap();
    assert_eq!(locks.len(), 1);
    drop(guard);
    assert!(locks.is_empty(), "no waiter left: the entry is gone");
}

/// Same with no other waiter: the granted-then-dropped waiter frees the key.
#[tokio::test]
async fn granted_then_cancelled_last_waiter_frees_the_key() {
    let locks = KeyedLocks::new();
    let holder = locks.lock_async("k", None).now_or_never().unwrap().unwrap();
    let mut waiter = Box::pin(locks.lock_async("k", None));
    assert!((&mut waiter).now_or_never().is_none());
    drop(holder);
    drop(waiter);
    assert!(locks.is_empty());
    assert!(locks.try_lock("k").is_some());
}

/// A blocking waiter that times out leaves the queue; the holder's release then frees the key.
#[test]
fn timed_out_blocking_waiter_leaves_the_queue() {
    let locks = KeyedLocks::new();
    let holder = locks.lock(9_u8, None).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
    assert!(matches!(
        locks.lock(9, Some(deadline)),
        Err(LockError::Timeout)
    ));
    assert_eq!(locks.waiting(&9), 0);
    drop(holder);
    assert!(locks.is_empty());
}

/// Fencing tokens grow with every holding of a key, in the order the key was held.
#[test]
fn fence_grows_per_holding() {
    use racefree::__private::SequenceLease;
    let sequencer = Sequencer::new();
    let fences: Vec<u64> = (0..5)
        .map(|_| sequencer.acquire("k", None).unwrap().fence())
        .collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
}
