//! `#[sequenced]` emits debug-level `tracing` events (target `racefree`) when a caller
//! acquires a free key, waits, is handed the key, and commits its number, and one `sequenced`
//! span per call carries its `function` and `outcome`. In a test binary of its own: tracing
//! caches each callsite's interest process-wide.

use std::sync::mpsc;

use racefree::{sequenced, Seq};

#[path = "support/common.rs"]
mod common;

use common::Messages;

#[sequenced(key = key)]
fn traced(key: u8, gate: Option<mpsc::Receiver<()>>, seq: Seq) -> u64 {
    if let Some(gate) = gate {
        gate.recv().unwrap();
    }
    seq.get()
}

#[test]
fn tracing_events_for_acquire_wait_handoff_and_commit() {
    use tracing_subscriber::layer::SubscriberExt;
    let messages = Messages::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(messages.clone()))
        .unwrap();

    let (open, gate) = mpsc::channel();
    let holder = std::thread::spawn(move || traced(1, Some(gate)));
    while traced_sequence().locked() == 0 {
        std::thread::yield_now();
    }
    let waiter = std::thread::spawn(|| traced(1, None));
    while traced_sequence().waiting(&1_u8) == 0 {
        std::thread::yield_now();
    }
    open.send(()).unwrap();
    assert_eq!((holder.join().unwrap(), waiter.join().unwrap()), (1, 2));

    let lines = messages.0.lock().unwrap().clone();
    let has = |text: &str| {
        lines
            .iter()
            .any(|l| l.starts_with("DEBUG racefree") && l.contains(text))
    };
    for text in [
        "key free: acquired",
        "key held: waiting",
        "handed the key: acquired",
        "seq=1",
        "seq=2",
    ] {
        assert!(has(text), "no event with {text:?} in {lines:#?}");
    }
    // Two calls, two `sequenced` spans naming the function, both executed.
    let spans = lines
        .iter()
        .filter(|l| l.starts_with("SPAN sequenced function=\"sequenced_tracing::traced\""))
        .count();
    assert_eq!(spans, 2, "{lines:#?}");
    let executed = lines
        .iter()
        .filter(|l| l.starts_with("RECORD sequenced outcome=\"executed\""))
        .count();
    assert_eq!(executed, 2, "{lines:#?}");
}
