//! `#[idempotent]` emits debug-level `tracing` events (target `racefree`) when a call executes,
//! replays, conflicts and waits for a duplicate in flight, each with its `function` and
//! `outcome`. In a test binary of its own: tracing
//! caches each callsite's interest process-wide.

use racefree::{idempotent, IdempotencyError};

#[path = "support/common.rs"]
mod common;

use common::Messages;

#[idempotent(key = key, skip(gate))]
async fn traced(key: &str, n: u32, gate: &tokio::sync::Semaphore) -> Result<u32, IdempotencyError> {
    let _open = gate.acquire().await.expect("gate stays open");
    Ok(n)
}

#[tokio::test]
async fn tracing_events_for_execute_wait_replay_and_conflict() {
    use tracing_subscriber::layer::SubscriberExt;
    let messages = Messages::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(messages.clone()))
        .unwrap();

    let gate = tokio::sync::Semaphore::new(0);
    let owner = traced("k", 1, &gate);
    let duplicate = traced("k", 1, &gate);
    let mut owner = std::pin::pin!(owner);
    let mut duplicate = std::pin::pin!(duplicate);
    assert!(futures::poll!(owner.as_mut()).is_pending());
    assert!(
        futures::poll!(duplicate.as_mut()).is_pending(),
        "the duplicate waits"
    );
    gate.add_permits(1);
    assert_eq!((owner.await, duplicate.await), (Ok(1), Ok(1)));
    assert_eq!(traced("k", 1, &gate).await, Ok(1));
    assert_eq!(
        traced("k", 2, &gate).await,
        Err(IdempotencyError::Conflict {
            key: "k".to_owned()
        })
    );

    let lines = messages.0.lock().unwrap().clone();
    let ours: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("DEBUG racefree ") && l.contains("key=\"k\""))
        .collect();
    for (expected, outcome) in [
        ("executing", "executed"),
        ("waiting", "waited"),
        ("replaying", "replayed"),
        ("conflict", "conflict"),
    ] {
        assert!(
            ours.iter()
                .any(|l| l.contains(expected) && l.contains(&format!("outcome=\"{outcome}\""))),
            "no `{expected}` event with outcome {outcome:?} in {ours:#?}"
        );
    }
    assert!(
        ours.iter()
            .all(|l| l.contains("function=\"idempotent_tracing::traced\"")),
        "{ours:#?}"
    );

    // Four calls, four `idempotent` spans naming the function; their outcomes as recorded.
    let spans = lines
        .iter()
        .filter(|l| {
            l.starts_with("SPAN idempotent ")
                && l.contains("function=\"idempotent_tracing::traced\"")
        })
        .count();
    assert_eq!(spans, 4, "{lines:#?}");
    let recorded = |field: &str| {
        lines
            .iter()
            .filter(|l| l.starts_with("RECORD idempotent ") && l.contains(field))
            .count()
    };
    assert_eq!(recorded("outcome=\"executed\""), 1, "{lines:#?}");
    assert_eq!(recorded("outcome=\"replayed\""), 2, "{lines:#?}");
    assert_eq!(recorded("outcome=\"conflict\""), 1, "{lines:#?}");
    assert_eq!(recorded("waited=true"), 1, "{lines:#?}");
}
