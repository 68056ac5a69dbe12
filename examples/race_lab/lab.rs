//! The race lab's scenarios: each classic race run twice on the same workload, once with the
//! naive code real applications ship and once with one racefree attribute. Shared by
//! `examples/race_lab/main.rs` (the table) and `tests/race_lab.rs` (asserts every racefree row).
//!
//! The naive versions wait for simulated I/O (a few milliseconds of `sleep`, standing for a
//! database or an HTTP call) between their read and their write, as real code does: that gap is
//! where the race lives, and it is wide enough that the naive rows fail on every run, also on
//! a 2-core machine. Every run uses fresh keys, so the lab can run many times in one process.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq};

/// One side (naive or racefree) of one scenario.
#[derive(Debug, Clone)]
pub struct Side {
    /// Whether what must hold held.
    pub holds: bool,
    /// What was observed, e.g. "loads: 4".
    pub observed: String,
    pub elapsed: Duration,
}

/// One row of the lab's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub callers: usize,
    pub must_hold: &'static str,
    pub naive: Side,
    pub racefree: Side,
}

pub struct Scenario {
    pub name: &'static str,
    pub callers: usize,
    pub must_hold: &'static str,
    run: fn(Variant) -> (bool, String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Naive,
    Racefree,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "rule-loader",
        callers: 4,
        must_hold: "53 rule files loaded once",
        run: rule_loader,
    },
    Scenario {
        name: "hr-simulator",
        callers: 10,
        must_hold: "one termination executed",
        run: hr_simulator,
    },
    Scenario {
        name: "schedule-generation",
        callers: 100,
        must_hold: "one schedule run created",
        run: schedule_generation,
    },
    Scenario {
        name: "event-store",
        callers: 100,
        must_hold: "sequence numbers exactly 1..=100",
        run: event_store,
    },
    Scenario {
        name: "work-orders",
        callers: 100,
        must_hold: "no duplicate work-order number",
        run: work_orders,
    },
    Scenario {
        name: "inventory",
        callers: 100,
        must_hold: "no lost update (stock = 100)",
        run: inventory,
    },
    Scenario {
        name: "queue-reorder",
        callers: 2,
        must_hold: "positions stay a permutation",
        run: queue_reorder,
    },
];

impl Scenario {
    pub fn run(&self) -> Row {
        let side = |variant| {
            let start = Instant::now();
            let (holds, observed) = (self.run)(variant);
            Side {
                holds,
                observed,
                elapsed: start.elapsed(),
            }
        };
        Row {
            scenario: self.name,
            callers: self.callers,
            must_hold: self.must_hold,
            naive: side(Variant::Naive),
            racefree: side(Variant::Racefree),
        }
    }
}

/// A fresh number per call, so every run of a scenario uses keys nobody used before.
fn fresh() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, SeqCst)
}

/// Simulated I/O: the database round trip or HTTP call between a read and a write.
async fn io() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `callers` copies of `call` released at once, returns their outputs.
fn concurrently<T, F>(callers: usize, call: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    runtime().block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(callers));
        let tasks: Vec<_> = (0..callers)
            .map(|i| {
                let barrier = barrier.clone();
                let call = call(i);
                tokio::spawn(async move {
                    barrier.wait().await;
                    call.await
                })
            })
            .collect();
        let mut outputs = Vec::with_capacity(callers);
        for task in tasks {
            outputs.push(task.await.expect("caller task"));
        }
        outputs
    })
}

// ---------------------------------------------------------------------------------------------
// Rule loader: 4 worker threads ask for the rule set at start-up.

const RULE_FILES: usize = 53;
static RULE_FILE_READS: AtomicUsize = AtomicUsize::new(0);

fn read_rules(dir: &Path) -> Arc<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("rule dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let rules = files
        .iter()
        .map(|file| {
            RULE_FILE_READS.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_micros(200)); // the disk
            std::fs::read_to_string(file).expect("rule file")
        })
        .collect();
    Arc::new(rules)
}

fn naive_rules(memo: &Mutex<HashMap<PathBuf, Arc<Vec<String>>>>, dir: &Path) -> Arc<Vec<String>> {
    if let Some(rules) = memo.lock().unwrap().get(dir) {
        return rules.clone();
    }
    let rules = read_rules(dir);
    memo.lock().unwrap().insert(dir.to_owned(), rules.clone());
    rules
}

#[cached]
fn load_rules(dir: &Path) -> Arc<Vec<String>> {
    read_rules(dir)
}

fn rule_loader(variant: Variant) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "racefree-lab-rules-{}-{}",
        std::process::id(),
        fresh()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for i in 0..RULE_FILES {
        std::fs::write(
            dir.join(format!("rule_{i:02}.rule")),
            format!("rule_{i:02} = (a|b)*c"),
        )
        .expect("rule file");
    }
    let memo = Mutex::new(HashMap::new());
    let before = RULE_FILE_READS.load(SeqCst);
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                barrier.wait();
                let rules = match variant {
                    Variant::Naive => naive_rules(&memo, &dir),
                    Variant::Racefree => load_rules(&dir),
                };
                assert_eq!(rules.len(), RULE_FILES);
            });
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    let loads = (RULE_FILE_READS.load(SeqCst) - before) / RULE_FILES;
    (loads == 1, format!("loads: {loads}"))
}

// ---------------------------------------------------------------------------------------------
// Idempotent writes: an HR system's termination and a schedule generator, retried concurrently
// with one idempotency key.

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    Idempotency(IdempotencyError),
}

impl From<IdempotencyError> for ApiError {
    fn from(error: IdempotencyError) -> Self {
        ApiError::Idempotency(error)
    }
}

/// The naive idempotency cache: check for a stored outcome, miss, execute, store.
#[derive(Default)]
struct NaiveIdempotency(Mutex<HashMap<String, String>>);

impl NaiveIdempotency {
    async fn run<F: std::future::Future<Output = String>>(&self, key: &str, execute: F) -> String {
        if let Some(outcome) = self.0.lock().unwrap().get(key) {
            return outcome.clone();
        }
        let outcome = execute.await;
        self.0
            .lock()
            .unwrap()
            .insert(key.to_owned(), outcome.clone());
        outcome
    }
}

static TERMINATIONS: AtomicUsize = AtomicUsize::new(0);

async fn hr_terminate(employee: u32) -> String {
    io().await; // the HR system's API
    let n = TERMINATIONS.fetch_add(1, SeqCst) + 1;
    format!("termination #{n} of employee {employee}")
}

#[idempotent(key = key)]
async fn terminate_employee(key: &str, employee: u32) -> Result<String, ApiError> {
    Ok(hr_terminate(employee).await)
}

fn hr_simulator(variant: Variant) -> (bool, String) {
    idempotent_writes(variant, 10, &TERMINATIONS, |naive, key| async move {
        match naive {
            Some(naive) => naive.run(&key, hr_terminate(7)).await,
            None => terminate_employee(&key, 7)
                .await
                .expect("no idempotency error"),
        }
    })
}

static SCHEDULE_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn create_schedule_run(week: u32) -> String {
    io().await; // the solver and the INSERT
    let n = SCHEDULE_RUNS.fetch_add(1, SeqCst) + 1;
    format!("schedule run #{n} for week {week}")
}

#[idempotent(key = key)]
async fn generate_schedule(key: &str, week: u32) -> Result<String, ApiError> {
    Ok(create_schedule_run(week).await)
}

fn schedule_generation(variant: Variant) -> (bool, String) {
    idempotent_writes(variant, 100, &SCHEDULE_RUNS, |naive, key| async move {
        match naive {
            Some(naive) => naive.run(&key, create_schedule_run(48)).await,
            None => generate_schedule(&key, 48)
                .await
                .expect("no idempotency error"),
        }
    })
}

fn idempotent_writes<F>(
    variant: Variant,
    callers: usize,
    executions: &'static AtomicUsize,
    call: impl Fn(Option<Arc<NaiveIdempotency>>, String) -> F,
) -> (bool, String)
where
    F: std::future::Future<Output = String> + Send + 'static,
{
    let key = format!("idem-{}", fresh());
    let naive = (variant == Variant::Naive).then(|| Arc::new(NaiveIdempotency::default()));
    let before = executions.load(SeqCst);
    let outcomes = concurrently(callers, |_| call(naive.clone(), key.clone()));
    let runs = executions.load(SeqCst) - before;
    let distinct = outcomes.iter().collect::<HashSet<_>>().len();
    (
        runs == 1 && distinct == 1,
        format!("executions: {runs}, distinct outcomes: {distinct}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Event store: 100 concurrent appends to one aggregate, each taking the next sequence number.

#[derive(Default)]
pub struct EventLog {
    events: Mutex<Vec<(String, u64)>>,
}

impl EventLog {
    fn max_seq(&self, aggregate: &str) -> u64 {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == aggregate)
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(0)
    }
    fn insert(&self, aggregate: &str, seq: u64) {
        self.events
            .lock()
            .unwrap()
            .push((aggregate.to_owned(), seq));
    }
    fn numbers(&self) -> Vec<u64> {
        let mut numbers: Vec<u64> = self
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| *s)
            .collect();
        numbers.sort_unstable();
        numbers
    }
}

async fn naive_append(log: &EventLog, aggregate: &str) {
    let next = log.max_seq(aggregate) + 1;
    io().await; // building and serializing the event
    log.insert(aggregate, next);
}

#[sequenced(key = aggregate.to_owned())]
async fn append(log: &EventLog, aggregate: &str, seq: Seq) {
    io().await;
    log.insert(aggregate, seq.get());
}

fn event_store(variant: Variant) -> (bool, String) {
    let log = Arc::new(EventLog::default());
    let aggregate = format!("order-{}", fresh());
    concurrently(100, |_| {
        let (log, aggregate) = (log.clone(), aggregate.clone());
        async move {
            match variant {
                Variant::Naive => naive_append(&log, &aggregate).await,
                Variant::Racefree => append(&log, &aggregate).await,
            }
        }
    });
    let numbers = log.numbers();
    let duplicates = numbers.len() - numbers.iter().collect::<HashSet<_>>().len();
    let exact = numbers == (1..=100).collect::<Vec<u64>>();
    (exact, format!("duplicate numbers: {duplicates}"))
}

// ---------------------------------------------------------------------------------------------
// Work orders: numbers from SELECT MAX(no) + 1 into a table with a unique index.

pub struct WorkOrders {
    id: u64,
    numbers: Mutex<HashSet<u64>>,
}

#[derive(Debug)]
pub struct DuplicateKey(u64);

impl WorkOrders {
    fn new() -> Self {
        WorkOrders {
            id: fresh(),
            numbers: Mutex::new(HashSet::new()),
        }
    }
    fn max_no(&self) -> u64 {
        self.numbers
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
    fn insert(&self, no: u64) -> Result<u64, DuplicateKey> {
        if self.numbers.lock().unwrap().insert(no) {
            Ok(no)
        } else {
            Err(DuplicateKey(no))
        }
    }
}

async fn naive_work_order(table: &WorkOrders) -> Result<u64, DuplicateKey> {
    let no = table.max_no() + 1;
    io().await;
    table.insert(no)
}

#[sequenced(key = table.id, start = table.max_no() + 1)]
async fn create_work_order(table: &WorkOrders, seq: Seq) -> Result<u64, DuplicateKey> {
    io().await;
    table.insert(seq.get())
}

fn work_orders(variant: Variant) -> (bool, String) {
    let table = Arc::new(WorkOrders::new());
    let results = concurrently(100, |_| {
        let table = table.clone();
        async move {
            match variant {
                Variant::Naive => naive_work_order(&table).await,
                Variant::Racefree => create_work_order(&table).await,
            }
        }
    });
    let failures = results.iter().filter(|r| r.is_err()).count();
    (failures == 0, format!("duplicate-key failures: {failures}"))
}

// ---------------------------------------------------------------------------------------------
// Inventory: 100 concurrent read-modify-write increments of one SKU's quantity.

#[derive(Default)]
pub struct Stock(Mutex<HashMap<String, i64>>);

impl Stock {
    fn qty(&self, sku: &str) -> i64 {
        self.0.lock().unwrap().get(sku).copied().unwrap_or(0)
    }
    fn set_qty(&self, sku: &str, qty: i64) {
        self.0.lock().unwrap().insert(sku.to_owned(), qty);
    }
}

async fn naive_add_stock(stock: &Stock, sku: &str, qty: i64) {
    let current = stock.qty(sku);
    io().await;
    stock.set_qty(sku, current + qty);
}

#[sequenced(key = sku.to_owned())]
async fn add_stock(stock: &Stock, sku: &str, qty: i64) {
    let current = stock.qty(sku);
    io().await;
    stock.set_qty(sku, current + qty);
}

fn inventory(variant: Variant) -> (bool, String) {
    let stock = Arc::new(Stock::default());
    let sku = format!("sku-{}", fresh());
    concurrently(100, |_| {
        let (stock, sku) = (stock.clone(), sku.clone());
        async move {
            match variant {
                Variant::Naive => naive_add_stock(&stock, &sku, 1).await,
                Variant::Racefree => add_stock(&stock, &sku, 1).await,
            }
        }
    });
    let qty = stock.qty(&sku);
    (
        qty == 100,
        format!("stock: {qty}, lost updates: {}", 100 - qty),
    )
}

// ---------------------------------------------------------------------------------------------
// Queue reorder: two dispatchers reorder one queue at once ("move X to the front", "move p1 to
// the back"); each writes the positions that changed in its view. From a stale view, either
// write order leaves two items on one position.

pub struct Queue {
    id: u64,
    positions: Mutex<BTreeMap<&'static str, usize>>,
}

impl Queue {
    fn new() -> Self {
        let items = ["p0", "p1", "X", "p3", "p4", "Y", "p6"];
        Queue {
            id: fresh(),
            positions: Mutex::new(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (*item, i))
                    .collect(),
            ),
        }
    }
    fn order(&self) -> Vec<&'static str> {
        let positions = self.positions.lock().unwrap();
        let mut items: Vec<_> = positions.iter().map(|(item, pos)| (*pos, *item)).collect();
        items.sort();
        items.into_iter().map(|(_, item)| item).collect()
    }
    fn write_changes(&self, before: &[&'static str], after: &[&'static str]) {
        let mut positions = self.positions.lock().unwrap();
        for (pos, item) in after.iter().enumerate() {
            if before.get(pos) != Some(item) {
                positions.insert(item, pos);
            }
        }
    }
    fn is_permutation(&self) -> bool {
        let positions = self.positions.lock().unwrap();
        let mut seen: Vec<usize> = positions.values().copied().collect();
        seen.sort_unstable();
        seen == (0..positions.len()).collect::<Vec<_>>()
    }
}

fn moved(order: &[&'static str], item: &str, to: usize) -> Vec<&'static str> {
    let mut order = order.to_vec();
    let from = order
        .iter()
        .position(|i| *i == item)
        .expect("item in queue");
    let item = order.remove(from);
    order.insert(to.min(order.len()), item);
    order
}

async fn naive_reorder(queue: &Queue, item: &'static str, to: usize) {
    let before = queue.order();
    let after = moved(&before, item, to);
    io().await;
    queue.write_changes(&before, &after);
}

#[sequenced(key = queue.id)]
async fn reorder(queue: &Queue, item: &'static str, to: usize) {
    let before = queue.order();
    let after = moved(&before, item, to);
    io().await;
    queue.write_changes(&before, &after);
}

fn queue_reorder(variant: Variant) -> (bool, String) {
    let queue = Arc::new(Queue::new());
    let moves = [("X", 0), ("p1", usize::MAX)];
    concurrently(2, |i| {
        let queue = queue.clone();
        let (item, to) = moves[i];
        async move {
            match variant {
                Variant::Naive => naive_reorder(&queue, item, to).await,
                Variant::Racefree => reorder(&queue, item, to).await,
            }
        }
    });
    let ok = queue.is_permutation();
    let positions: Vec<String> = queue
        .positions
        .lock()
        .unwrap()
        .iter()
        .map(|(item, pos)| format!("{item}={pos}"))
        .collect();
    (
        ok,
        if ok {
            "consistent order".to_owned()
        } else {
            format!("conflicting positions: {}", positions.join(" "))
        },
    )
}
