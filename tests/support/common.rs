//! What the behaviour tests share: waiting for an observable condition (never a sleep as
//! synchronisation) that fails the test after 10 s instead of hanging, and a `tracing` layer
//! that records events. Included with `#[path = "support/common.rs"] mod common;`.

#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a test waits for something that must happen before it fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Yields the thread until `condition` holds.
pub fn until_sync(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::yield_now();
    }
}

/// Yields the task until `condition` holds.
pub async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// `future`'s output; fails the test if it does not finish within [`PATIENCE`].
pub async fn guarded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// A `tracing` layer that records every event as `"LEVEL target field=value …"`.
#[derive(Clone, Default)]
pub struct Messages(pub Arc<Mutex<Vec<String>>>);

impl Messages {
    /// The events recorded so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

struct Visit<'a>(&'a mut String);

impl tracing::field::Visit for Visit<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

/// Events as `"LEVEL target field=value …"`; spans as `"SPAN name field=value …"` when they
/// open and `"RECORD name field=value …"` when a field is recorded later.
impl<S> tracing_subscriber::Layer<S> for Messages
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = format!("SPAN {} ", attrs.metadata().name());
        attrs.record(&mut Visit(&mut line));
        self.0.lock().unwrap().push(line);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let name = ctx.span(id).map_or("?", |span| span.name());
        let mut line = format!("RECORD {name} ");
        values.record(&mut Visit(&mut line));
        self.0.lock().unwrap().push(line);
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut line = format!(
            "{} {} ",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut Visit(&mut line));
        self.0.lock().unwrap().push(line);
    }
}

/// Spawns `callers` tasks running `call(0..callers)`, released together by a barrier once all
/// are spawned; their handles, in order.
pub fn released_together<F>(
    callers: usize,
    call: impl Fn(usize) -> F,
) -> Vec<tokio::task::JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(callers));
    (0..callers)
        .map(|i| {
            let (barrier, call) = (barrier.clone(), call(i));
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect()
}
