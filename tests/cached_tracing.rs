//! `#[cached]` emits debug-level `tracing` events (target `racefree`) for execute and coalesce.
//! In a test binary of its own: tracing caches each callsite's interest process-wide, and a
//! callsite first hit by a parallel test without a subscriber could hide the events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use racefree::cached;

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn tracing_events_for_execute_and_coalesce() {
    use tracing_subscriber::layer::SubscriberExt;
    #[derive(Clone, Default)]
    struct Messages(Arc<Mutex<Vec<String>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Messages {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Visit<'a>(&'a mut String);
            impl tracing::field::Visit for Visit<'_> {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push_str(&format!("{}={:?} ", field.name(), value));
                }
            }
            let mut line = format!(
                "{} {} ",
                event.metadata().level(),
                event.metadata().target()
            );
            event.record(&mut Visit(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }
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
    wait_until("leader computes", || traced_cache().stats().executions == 1);
    let follower = {
        let d = dispatch.clone();
        std::thread::spawn(move || tracing::dispatcher::with_default(&d, || traced(1)))
    };
    wait_until("follower waits", || traced_cache().stats().coalesced == 1);
    drop(held);
    assert_eq!((leader.join().unwrap(), follower.join().unwrap()), (1, 1));
    let messages = messages.0.lock().unwrap().clone();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("DEBUG racefree") && m.contains("executing")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("DEBUG racefree") && m.contains("waiting")),
        "{messages:?}"
    );
}
