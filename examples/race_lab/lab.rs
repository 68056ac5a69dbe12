//! The race lab's scenarios: each classic race run twice on the same workload, once with the
//! naive code real applications ship and once with one racefree attribute. Shared by
//! `examples/race_lab/main.rs` (the table) and `tests/race_lab.rs` (asserts every racefree row).
//!
//! The database scenarios (schedule generation, event store, work orders, inventory, queue
//! reorder) run on a real SQL database (`db.rs`: a fresh SQLite file by default, a fresh
//! PostgreSQL schema with `--database-url`): the naive rows race against it with real
//! `SELECT MAX()+1`, read-modify-write and check-then-insert statements. The naive versions
//! also wait for simulated I/O (a few milliseconds of `sleep`, standing for the rest of the
//! request's work) between their read and their write, as real code does: that gap is where
//! the race lives, and it is wide enough that the naive rows fail on every run, also on a
//! 2-core machine. Every run uses fresh keys, so the lab can run many times in one process.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq};
use sqlx::Row as _;

#[path = "db.rs"]
pub mod db;
use db::Db;

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
    runtime().block_on(released(callers, call))
}

/// `callers` copies of `call` as tasks, released together by a barrier; their outputs.
async fn released<T, F>(callers: usize, call: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    {
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
    }
}

/// Runs `scenario` on a fresh database with `tables`, then removes the database.
fn on_database<R, F>(tables: &[&str], scenario: impl FnOnce(Arc<Db>) -> F) -> R
where
    F: std::future::Future<Output = R>,
{
    runtime().block_on(async {
        let db = Arc::new(Db::fresh(tables).await);
        let result = scenario(Arc::clone(&db)).await;
        if let Ok(db) = Arc::try_unwrap(db) {
            db.drop_all().await;
        }
        result
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

const SCHEDULE_TABLES: &[&str] = &[
    "CREATE TABLE schedule_runs (run_key TEXT NOT NULL, week BIGINT NOT NULL)",
    // What a hand-written idempotency cache keeps: the key and the response, checked first.
    "CREATE TABLE idempotency_records (record_key TEXT NOT NULL, response TEXT NOT NULL)",
];

/// The effect: the solver's run, inserted into `schedule_runs`.
async fn create_schedule_run(db: &Db, key: &str, week: u32) -> String {
    io().await; // the solver
    sqlx::query("INSERT INTO schedule_runs (run_key, week) VALUES ($1, $2)")
        .bind(key)
        .bind(i64::from(week))
        .execute(&db.pool)
        .await
        .expect("insert the run");
    let n = db.scalar("SELECT COUNT(*) FROM schedule_runs", &[]).await;
    format!("schedule run #{n} for week {week}")
}

/// The naive idempotency check against the database: SELECT the stored response, miss,
/// execute, INSERT the response.
async fn naive_generate_schedule(db: &Db, key: &str, week: u32) -> String {
    let stored = sqlx::query("SELECT response FROM idempotency_records WHERE record_key = $1")
        .bind(key)
        .fetch_optional(&db.pool)
        .await
        .expect("look the key up");
    if let Some(row) = stored {
        return row.get::<String, _>(0);
    }
    let response = create_schedule_run(db, key, week).await;
    sqlx::query("INSERT INTO idempotency_records (record_key, response) VALUES ($1, $2)")
        .bind(key)
        .bind(&response)
        .execute(&db.pool)
        .await
        .expect("store the response");
    response
}

#[idempotent(key = key, skip(db))]
async fn generate_schedule(db: &Db, key: &str, week: u32) -> Result<String, ApiError> {
    Ok(create_schedule_run(db, key, week).await)
}

fn schedule_generation(variant: Variant) -> (bool, String) {
    let key = format!("idem-{}", fresh());
    on_database(SCHEDULE_TABLES, |db| async move {
        let outcomes = released(100, |_| {
            let (db, key) = (db.clone(), key.clone());
            async move {
                match variant {
                    Variant::Naive => naive_generate_schedule(&db, &key, 48).await,
                    Variant::Racefree => generate_schedule(&db, &key, 48)
                        .await
                        .expect("no idempotency error"),
                }
            }
        })
        .await;
        let runs = db.scalar("SELECT COUNT(*) FROM schedule_runs", &[]).await;
        let distinct = outcomes.iter().collect::<HashSet<_>>().len();
        (
            runs == 1 && distinct == 1,
            format!("schedule_runs rows: {runs}, distinct outcomes: {distinct}"),
        )
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
// Event store: 100 concurrent appends to one aggregate, each taking the next sequence number
// with SELECT MAX(seq) + 1.

const EVENT_TABLES: &[&str] =
    &["CREATE TABLE events (aggregate TEXT NOT NULL, seq BIGINT NOT NULL, body TEXT NOT NULL)"];

async fn insert_event(db: &Db, aggregate: &str, seq: i64) {
    sqlx::query("INSERT INTO events (aggregate, seq, body) VALUES ($1, $2, $3)")
        .bind(aggregate)
        .bind(seq)
        .bind("{\"type\":\"ItemAdded\"}")
        .execute(&db.pool)
        .await
        .expect("append the event");
}

async fn naive_append(db: &Db, aggregate: &str) {
    let next = db
        .scalar(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE aggregate = $1",
            &[aggregate],
        )
        .await;
    io().await; // building and serializing the event
    insert_event(db, aggregate, next).await;
}

#[sequenced(key = aggregate.to_owned())]
async fn append(db: &Db, aggregate: &str, seq: Seq) {
    io().await;
    insert_event(db, aggregate, seq.get() as i64).await;
}

fn event_store(variant: Variant) -> (bool, String) {
    let aggregate = format!("order-{}", fresh());
    on_database(EVENT_TABLES, |db| async move {
        released(100, |_| {
            let (db, aggregate) = (db.clone(), aggregate.clone());
            async move {
                match variant {
                    Variant::Naive => naive_append(&db, &aggregate).await,
                    Variant::Racefree => append(&db, &aggregate).await,
                }
            }
        })
        .await;
        let numbers: Vec<i64> = sqlx::query("SELECT seq FROM events ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .expect("read the events")
            .iter()
            .map(|row| row.get::<i64, _>(0))
            .collect();
        let duplicates = numbers.len() - numbers.iter().collect::<HashSet<_>>().len();
        let exact = numbers == (1..=100).collect::<Vec<i64>>();
        (exact, format!("duplicate numbers: {duplicates}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Work orders: numbers from SELECT MAX(no) + 1 into a table with a unique index.

const WORK_ORDER_TABLES: &[&str] = &["CREATE TABLE work_orders (no BIGINT NOT NULL UNIQUE)"];

#[derive(Debug)]
pub struct DuplicateKey(String);

async fn max_work_order(db: &Db) -> u64 {
    db.scalar("SELECT COALESCE(MAX(no), 0) FROM work_orders", &[])
        .await as u64
}

async fn insert_work_order(db: &Db, no: u64) -> Result<u64, DuplicateKey> {
    sqlx::query("INSERT INTO work_orders (no) VALUES ($1)")
        .bind(no as i64)
        .execute(&db.pool)
        .await
        .map(|_| no)
        .map_err(|error| DuplicateKey(error.to_string()))
}

async fn naive_work_order(db: &Db) -> Result<u64, DuplicateKey> {
    let no = max_work_order(db).await + 1;
    io().await;
    insert_work_order(db, no).await
}

// One sequence per lab database, starting after the highest number already in the table.
#[sequenced(key = db.id, start = max_work_order(db).await + 1)]
async fn create_work_order(db: &Db, seq: Seq) -> Result<u64, DuplicateKey> {
    io().await;
    insert_work_order(db, seq.get()).await
}

fn work_orders(variant: Variant) -> (bool, String) {
    on_database(WORK_ORDER_TABLES, |db| async move {
        let results = released(100, |_| {
            let db = db.clone();
            async move {
                match variant {
                    Variant::Naive => naive_work_order(&db).await,
                    Variant::Racefree => create_work_order(&db).await,
                }
            }
        })
        .await;
        let failures = results.iter().filter(|r| r.is_err()).count();
        (failures == 0, format!("duplicate-key failures: {failures}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Inventory: 100 concurrent read-modify-write increments of one SKU's quantity.

const STOCK_TABLES: &[&str] = &["CREATE TABLE stock (sku TEXT PRIMARY KEY, qty BIGINT NOT NULL)"];

async fn read_modify_write(db: &Db, sku: &str, qty: i64) {
    let current = db
        .scalar("SELECT qty FROM stock WHERE sku = $1", &[sku])
        .await;
    io().await;
    sqlx::query("UPDATE stock SET qty = $1 WHERE sku = $2")
        .bind(current + qty)
        .bind(sku)
        .execute(&db.pool)
        .await
        .expect("write the quantity");
}

async fn naive_add_stock(db: &Db, sku: &str, qty: i64) {
    read_modify_write(db, sku, qty).await
}

#[sequenced(key = sku.to_owned())]
async fn add_stock(db: &Db, sku: &str, qty: i64) {
    read_modify_write(db, sku, qty).await
}

fn inventory(variant: Variant) -> (bool, String) {
    let sku = format!("sku-{}", fresh());
    on_database(STOCK_TABLES, |db| async move {
        sqlx::query("INSERT INTO stock (sku, qty) VALUES ($1, 0)")
            .bind(&sku)
            .execute(&db.pool)
            .await
            .expect("seed the SKU");
        released(100, |_| {
            let (db, sku) = (db.clone(), sku.clone());
            async move {
                match variant {
                    Variant::Naive => naive_add_stock(&db, &sku, 1).await,
                    Variant::Racefree => add_stock(&db, &sku, 1).await,
                }
            }
        })
        .await;
        let qty = db
            .scalar("SELECT qty FROM stock WHERE sku = $1", &[&sku])
            .await;
        (
            qty == 100,
            format!("stock: {qty}, lost updates: {}", 100 - qty),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Queue reorder: two dispatchers reorder one queue at once ("move X to the front", "move p1 to
// the back"); each writes the positions that changed in its view. From a stale view, either
// write order leaves two items on one position.

const QUEUE_TABLES: &[&str] = &["CREATE TABLE queue (item TEXT PRIMARY KEY, pos BIGINT NOT NULL)"];
const QUEUE_ITEMS: [&str; 7] = ["p0", "p1", "X", "p3", "p4", "Y", "p6"];

async fn queue_order(db: &Db) -> Vec<String> {
    sqlx::query("SELECT item FROM queue ORDER BY pos, item")
        .fetch_all(&db.pool)
        .await
        .expect("read the queue")
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect()
}

fn moved(order: &[String], item: &str, to: usize) -> Vec<String> {
    let mut order = order.to_vec();
    let from = order.iter().position(|i| i == item).expect("item in queue");
    let item = order.remove(from);
    order.insert(to.min(order.len()), item);
    order
}

async fn move_item(db: &Db, item: &str, to: usize) {
    let before = queue_order(db).await;
    let after = moved(&before, item, to);
    io().await;
    // The changes of one move commit together, as a dispatcher's save would.
    let mut tx = db.pool.begin().await.expect("begin");
    for (pos, item) in after.iter().enumerate() {
        if before.get(pos) != Some(item) {
            sqlx::query("UPDATE queue SET pos = $1 WHERE item = $2")
                .bind(pos as i64)
                .bind(item)
                .execute(&mut *tx)
                .await
                .expect("write a position");
        }
    }
    tx.commit().await.expect("commit the move");
}

async fn naive_reorder(db: &Db, item: &str, to: usize) {
    move_item(db, item, to).await
}

#[sequenced(key = db.id)]
async fn reorder(db: &Db, item: &str, to: usize) {
    move_item(db, item, to).await
}

fn queue_reorder(variant: Variant) -> (bool, String) {
    on_database(QUEUE_TABLES, |db| async move {
        for (pos, item) in QUEUE_ITEMS.iter().enumerate() {
            sqlx::query("INSERT INTO queue (item, pos) VALUES ($1, $2)")
                .bind(*item)
                .bind(pos as i64)
                .execute(&db.pool)
                .await
                .expect("seed the queue");
        }
        let moves = [("X", 0), ("p1", usize::MAX)];
        released(2, |i| {
            let db = db.clone();
            let (item, to) = moves[i];
            async move {
                match variant {
                    Variant::Naive => naive_reorder(&db, item, to).await,
                    Variant::Racefree => reorder(&db, item, to).await,
                }
            }
        })
        .await;
        let positions: Vec<(String, i64)> =
            sqlx::query("SELECT item, pos FROM queue ORDER BY item")
                .fetch_all(&db.pool)
                .await
                .expect("read the positions")
                .iter()
                .map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1)))
                .collect();
        let mut seen: Vec<i64> = positions.iter().map(|(_, pos)| *pos).collect();
        seen.sort_unstable();
        let ok = seen == (0..positions.len() as i64).collect::<Vec<_>>();
        let described: Vec<String> = positions
            .iter()
            .map(|(item, pos)| format!("{item}={pos}"))
            .collect();
        (
            ok,
            if ok {
                "consistent order".to_owned()
            } else {
                format!("conflicting positions: {}", described.join(" "))
            },
        )
    })
}
