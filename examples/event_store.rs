//! The seed scenario of `#[sequenced]`: 100 concurrent appends to one aggregate of an event
//! store. The naive append reads the aggregate's last sequence number, awaits (the database
//! round trip), and writes `last + 1`: concurrent appends read the same `last` and write the
//! same number, which breaks event replay. `#[sequenced]` runs the appends of one aggregate one
//! at a time and hands each its number: exactly 1..=100.
//!
//! `cargo run --release --example event_store`

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use racefree::{sequenced, Seq};

const APPENDS: usize = 100;

#[derive(Debug, Clone)]
struct Event {
    kind: &'static str,
}

#[derive(Debug)]
struct StoreError;

/// An in-memory event log: `(aggregate, sequence number, event)` rows, no unique index (the
/// bug this example shows is the duplicates such an index would have to reject).
#[derive(Default)]
struct EventLog {
    rows: Mutex<HashMap<String, Vec<(u64, Event)>>>,
}

impl EventLog {
    async fn last_seq(&self, aggregate_id: &str) -> u64 {
        let last = self
            .rows
            .lock()
            .unwrap()
            .get(aggregate_id)
            .and_then(|rows| rows.iter().map(|r| r.0).max());
        tokio::task::yield_now().await; // the round trip: other appends run meanwhile
        last.unwrap_or(0)
    }

    async fn insert(&self, aggregate_id: &str, seq: u64, event: Event) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.rows
            .lock()
            .unwrap()
            .entry(aggregate_id.to_owned())
            .or_default()
            .push((seq, event));
        Ok(())
    }

    fn kinds(&self, aggregate_id: &str) -> usize {
        let rows = self.rows.lock().unwrap();
        rows.get(aggregate_id).map_or(0, |rows| {
            rows.iter().map(|r| r.1.kind).collect::<BTreeSet<_>>().len()
        })
    }

    fn numbers(&self, aggregate_id: &str) -> Vec<u64> {
        self.rows
            .lock()
            .unwrap()
            .get(aggregate_id)
            .map(|rows| rows.iter().map(|r| r.0).collect())
            .unwrap_or_default()
    }
}

/// Read the last number, then write the next one: two appends in flight get the same number.
async fn append_naive(log: &EventLog, aggregate_id: &str, event: Event) -> Result<(), StoreError> {
    let next = log.last_seq(aggregate_id).await + 1;
    log.insert(aggregate_id, next, event).await
}

/// The same append, one at a time per aggregate, with the number handed in.
#[sequenced(key = aggregate_id)]
async fn append(
    log: &EventLog,
    aggregate_id: &str,
    event: Event,
    seq: Seq,
) -> Result<(), StoreError> {
    log.insert(aggregate_id, seq.get(), event).await
}

/// Starts `APPENDS` appends at once (released by one barrier) and waits for all of them.
async fn run<F, Fut>(log: Arc<EventLog>, append: F)
where
    F: Fn(Arc<EventLog>, Event) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), StoreError>> + Send,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(APPENDS));
    let tasks: Vec<_> = (0..APPENDS)
        .map(|i| {
            let (barrier, log, append) = (barrier.clone(), log.clone(), append.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                append(
                    log,
                    Event {
                        kind: if i % 2 == 0 {
                            "ItemAdded"
                        } else {
                            "ItemRemoved"
                        },
                    },
                )
                .await
                .unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

struct Report {
    appended: usize,
    distinct: usize,
    duplicated: usize,
    contiguous: bool,
}

fn report(numbers: &[u64]) -> Report {
    let distinct: BTreeSet<u64> = numbers.iter().copied().collect();
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    Report {
        appended: numbers.len(),
        distinct: distinct.len(),
        duplicated: numbers.len() - distinct.len(),
        contiguous: sorted == (1..=numbers.len() as u64).collect::<Vec<_>>(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let naive_log = Arc::new(EventLog::default());
    run(naive_log.clone(), |log: Arc<EventLog>, event| async move {
        append_naive(&log, "cart-42", event).await
    })
    .await;
    let sequenced_log = Arc::new(EventLog::default());
    run(
        sequenced_log.clone(),
        |log: Arc<EventLog>, event| async move { append(&log, "cart-42", event).await },
    )
    .await;

    let (naive, sequenced) = (
        report(&naive_log.numbers("cart-42")),
        report(&sequenced_log.numbers("cart-42")),
    );
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!("{APPENDS} concurrent appends to aggregate cart-42\n");
    println!(
        "{:<28}{:>22}{:>16}",
        "", "naive (read +1, write)", "#[sequenced]"
    );
    println!(
        "{:<28}{:>22}{:>16}",
        "events appended", naive.appended, sequenced.appended
    );
    println!(
        "{:<28}{:>22}{:>16}",
        "distinct sequence numbers", naive.distinct, sequenced.distinct
    );
    println!(
        "{:<28}{:>22}{:>16}",
        "events with a reused number", naive.duplicated, sequenced.duplicated
    );
    println!(
        "{:<28}{:>22}{:>16}",
        "numbers are exactly 1..=100",
        yes_no(naive.contiguous),
        yes_no(sequenced.contiguous)
    );
    println!(
        "{:<28}{:>22}{:>16}",
        "event kinds",
        naive_log.kinds("cart-42"),
        sequenced_log.kinds("cart-42")
    );
    let sample: Vec<u64> = naive_log.numbers("cart-42").into_iter().take(12).collect();
    println!("\nfirst naive numbers in write order: {sample:?}");
    assert!(sequenced.contiguous && sequenced.duplicated == 0);
}
