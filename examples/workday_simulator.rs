//! An HR system's write API under a retry storm: 10 concurrent requests carrying the same
//! idempotency key (a client that timed out and retried, a load balancer that replayed, a user
//! who double-clicked), first against a hand-written idempotency cache, then with
//! `#[idempotent]`.
//!
//! ```text
//! cargo run --example workday_simulator
//! ```
//!
//! The hand-written cache does what many services do: look the key up, and on a miss execute,
//! then store the response. Between the look-up and the store the action awaits the HR
//! system's database, as real I/O does, and every duplicate that arrives in that window
//! executes too: 10 requests, 10 terminations. With `#[idempotent]` the first request claims
//! the key atomically, the other nine wait for its outcome: 1 execution, 10 equal responses,
//! nine of them flagged as replays (`Idempotency-Replayed: true`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use racefree::{idempotent, replay, IdempotencyError};

/// The simulated HR system: every write action counts as one execution and gets a record id.
#[derive(Default)]
struct Workday {
    executions: AtomicU64,
    next_record: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Action {
    Update {
        employee: u32,
        field: &'static str,
        value: String,
    },
    Terminate {
        employee: u32,
        reason: &'static str,
    },
    RequestLeave {
        employee: u32,
        days: u32,
    },
    Approve {
        request: u64,
    },
    Cancel {
        request: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Receipt {
    record: u64,
    action: String,
}

#[derive(Debug)]
enum ApiError {
    Idempotency(IdempotencyError),
}

impl From<IdempotencyError> for ApiError {
    fn from(error: IdempotencyError) -> Self {
        ApiError::Idempotency(error)
    }
}

impl Workday {
    /// The write itself: a round trip to the database, then a new record.
    async fn perform(&self, action: &Action) -> Receipt {
        tokio::time::sleep(Duration::from_millis(20)).await; // the database round trip
        self.executions.fetch_add(1, SeqCst);
        let record = self.next_record.fetch_add(1, SeqCst) + 1;
        Receipt {
            record,
            action: format!("{action:?}"),
        }
    }
}

/// The hand-written idempotency cache: check, then act, then store.
#[derive(Default)]
struct NaiveIdempotency {
    responses: Mutex<HashMap<String, Receipt>>,
}

impl NaiveIdempotency {
    async fn handle(&self, hr: &Workday, key: &str, action: &Action) -> Result<Receipt, ApiError> {
        if let Some(stored) = self.responses.lock().unwrap().get(key) {
            return Ok(stored.clone());
        }
        // The lock is not held across the I/O (it cannot be, and should not be): the window in
        // which every retry also sees "not stored yet".
        let receipt = hr.perform(action).await;
        self.responses
            .lock()
            .unwrap()
            .insert(key.to_owned(), receipt.clone());
        Ok(receipt)
    }
}

/// The same endpoint with `#[idempotent]`: one execution per key; duplicates wait and replay.
#[idempotent(key = key, ttl = "24h", skip(hr))]
async fn handle(hr: &Workday, key: &str, action: &Action) -> Result<Receipt, ApiError> {
    Ok(hr.perform(action).await)
}

const REQUESTS: usize = 10;

async fn storm<F, Fut>(name: &str, action: Action, send: F) -> u64
where
    F: Fn(Arc<Workday>, Action) -> Fut,
    Fut: std::future::Future<Output = (Result<Receipt, ApiError>, bool)> + Send + 'static,
{
    let hr = Arc::new(Workday::default());
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (barrier, request) = (barrier.clone(), send(hr.clone(), action.clone()));
            tokio::spawn(async move {
                barrier.wait().await;
                request.await
            })
        })
        .collect();
    let mut records = Vec::new();
    let mut replayed = 0;
    for request in requests {
        let (receipt, was_replayed) = request.await.expect("request task");
        match receipt {
            Ok(receipt) => records.push(receipt.record),
            Err(ApiError::Idempotency(error)) => {
                panic!("refused with HTTP {}: {error}", error.http_status())
            }
        }
        replayed += usize::from(was_replayed);
    }
    records.sort_unstable();
    records.dedup();
    let executions = hr.executions.load(SeqCst);
    println!(
        "{name:<14} {REQUESTS} concurrent requests, same key: {executions:>2} execution(s), record ids {records:?}, {replayed} flagged replayed"
    );
    executions
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let actions = [
        (
            "update",
            Action::Update {
                employee: 17,
                field: "address",
                value: "1 Main St".to_owned(),
            },
        ),
        (
            "terminate",
            Action::Terminate {
                employee: 17,
                reason: "resigned",
            },
        ),
        (
            "request leave",
            Action::RequestLeave {
                employee: 23,
                days: 5,
            },
        ),
        ("approve", Action::Approve { request: 901 }),
        ("cancel", Action::Cancel { request: 902 }),
    ];
    let (mut naive_total, mut idempotent_total) = (0, 0);
    for (i, (label, action)) in actions.into_iter().enumerate() {
        println!("-- {label}");
        let naive = Arc::new(NaiveIdempotency::default());
        let key = format!("retry-storm-{i}");
        naive_total += storm("naive cache", action.clone(), |hr, action| {
            let (naive, key) = (naive.clone(), key.clone());
            async move { (naive.handle(&hr, &key, &action).await, false) }
        })
        .await;
        idempotent_total += storm("#[idempotent]", action, |hr, action| {
            let key = key.clone();
            async move {
                let (receipt, flag) = replay::track(handle(&hr, &key, &action)).await;
                (receipt, flag.is_replayed())
            }
        })
        .await;
    }
    println!("total executions for 5 actions x {REQUESTS} duplicates: naive {naive_total}, #[idempotent] {idempotent_total}");
    assert_eq!(
        idempotent_total, 5,
        "#[idempotent] executes each action once"
    );
}
