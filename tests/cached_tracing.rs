//! `#[cached]` emits debug-level `tracing` events (target `racefree`) for execute and coalesce.
//! In a test binary of its own: tracing caches each callsite's interest process-wide, and a
//! callsite first hit by a parallel test without a subscriber could hide the events.

use std::sync::Mutex;

use racefree::cached;

#[path = "support/common.rs"]
mod common;

use common::Messages;

#[test]
fn tracing_events_for_execute_and_coalesce() {
    use tracing_subscriber::layer::SubscriberExt;
    static GATE: Mutex<()> = Mutex::new(());
    #[cached]
    fn traced(key: u8) -> u8 {
        let _g = GATE.lock().unwrap();
        key
    }
    let messages = Messages::default();
    let subscriber = tracing_subscriber::registry().with(messages.clone());
    let dispatch = tracing::Dispatch::new(subscriber);
    let held = GATE.lock().unwrap();
    let leader = {
        let d = dispatch.clone();
        std::thread::spawn(move || tracing::dispatcher::with_default(&d, || traced(1)))
    };
    common::until_sync("leader computes", || traced_cache().stats().executions == 1);
    let follower = {
        let d = dispatch.clone();
        std::thread::spawn(move || tracing::dispatcher::with_default(&d, || traced(1)))
    };
    common::until_sync("follower waits", || traced_cache().stats().coalesced == 1);
    drop(held);
    assert_eq!((leader.join().unwrap(), follower.join().unwrap()), (1, 1));
    let messages = messages.0.lock().unwrap().clone();
    assert!(
        messages.iter().any(|m| m.starts_with("DEBUG racefree")
            && m.contains("executing")
            && m.contains("outcome=\"executed\"")
            && m.contains("function=\"cached_tracing::")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("DEBUG racefree")
            && m.contains("waiting")
            && m.contains("outcome=\"waited\"")),
        "{messages:?}"
    );
}
