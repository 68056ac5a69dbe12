//! The per-call answer of `#[cached]`: `served::track` / `track_sync` tell a hit from a wait
//! from an execution without changing how the function is called.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Mutex};

use racefree::{cached, served, Served};

#[path = "support/common.rs"]
mod common;
use common::until_sync;

#[test]
fn a_call_is_executed_then_hit_and_a_concurrent_caller_waited() {
    static GATE: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);
    #[cached]
    fn slow(key: u64) -> u64 {
        let gate = GATE.lock().unwrap().take();
        if let Some(gate) = gate {
            gate.recv().unwrap();
        }
        key * 2
    }
    let (open, gate) = mpsc::channel();
    *GATE.lock().unwrap() = Some(gate);
    let lead = std::thread::spawn(|| served::track_sync(|| slow(1)));
    until_sync("the lead runs", || slow_cache().in_flight() == 1);
    let waiter = std::thread::spawn(|| served::track_sync(|| slow(1)));
    until_sync("the waiter waits", || slow_cache().stats().coalesced == 1);
    open.send(()).unwrap();
    assert_eq!(lead.join().unwrap(), (2, Served::Executed));
    assert_eq!(waiter.join().unwrap(), (2, Served::Waited));
    assert_eq!(served::track_sync(|| slow(1)), (2, Served::Hit));
    // Outside a scope nothing is recorded, and the call is the same.
    assert_eq!(slow(1), 2);
    assert_eq!(served::track_sync(|| ()).1, Served::NotRecorded);
}

// The last call to finish wins: an outer call that executes reports `Executed` even though the
// inner call it made was a hit.
#[test]
fn a_nested_hit_does_not_hide_the_outer_execution() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached]
    fn inner(key: u64) -> u64 {
        key + 1
    }
    #[cached]
    fn outer(key: u64) -> Result<u64, String> {
        RUNS.fetch_add(1, SeqCst);
        Ok(inner(key) * 10)
    }
    inner(3);
    assert_eq!(served::track_sync(|| outer(3)), (Ok(40), Served::Executed));
    assert_eq!(served::track_sync(|| outer(3)), (Ok(40), Served::Hit));
    assert_eq!(RUNS.load(SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn async_calls_are_tracked_across_awaits() {
    #[cached]
    async fn load(key: u64) -> Option<u64> {
        tokio::task::yield_now().await;
        (key != 0).then_some(key)
    }
    assert_eq!(served::track(load(5)).await, (Some(5), Served::Executed));
    assert_eq!(served::track(load(5)).await, (Some(5), Served::Hit));
    // A `None` is not cached: executed every time.
    assert_eq!(served::track(load(0)).await, (None, Served::Executed));
    assert_eq!(served::track(load(0)).await, (None, Served::Executed));
}
