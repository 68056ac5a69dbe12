//! The race lab's scenarios: each classic race run twice on the same workload, once with the
//! naive code real applications ship and once with one racefree attribute. Shared by
//! `examples/race_lab/main.rs` (the table) and `tests/race_lab.rs` (asserts every racefree row).
//!
//! The database scenarios (schedule generation, event store, work orders, inventory, queue
//! reorder) run on a real SQL database (`db.rs`: a fresh SQLite file by default, a fresh
//! PostgreSQL schema with `--database-url`): the naive rows race against it with real
//! `SELECT MAX()+1`, read-modify-write and check-then-insert statements. The racefree rows
//! use racefree's SQL store of the same database (`SqlStore<Sqlite>` or `SqlStore<Postgres>`,
//! its tables made by `migrate()` in the fresh database) and write their effect through the
//! store's transaction (the attribute's `tx` parameter), so the idempotency record or the
//! consumed number commits in the same `COMMIT` as the effect. The scenarios are written once,
//! generic over the database (`db::Lab`). The naive versions
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

use racefree::sql::Tx;
use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq, SequenceError};

#[path = "db.rs"]
pub mod db;
use db::Bind::{Int, Text};
use db::{Db, Lab, Sql};

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

// ---------------------------------------------------------------------------------------------
// The database scenarios run on the database `--database-url` chose. Their racefree rows use
// racefree's SQL store of that database (`db.store`), and write their effect through the
// transaction the store opened (`tx`): the record or number commits with the effect.

/// What a database call of the lab fails with: the store, or one of its own statements.
#[derive(Debug)]
pub enum DbError {
    Idempotency(IdempotencyError),
    Sequence(SequenceError),
    Statement(sqlx::Error),
}

impl From<IdempotencyError> for DbError {
    fn from(error: IdempotencyError) -> Self {
        DbError::Idempotency(error)
    }
}

impl From<SequenceError> for DbError {
    fn from(error: SequenceError) -> Self {
        DbError::Sequence(error)
    }
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        DbError::Statement(error)
    }
}

impl DbError {
    /// A `UNIQUE` constraint refused the row.
    fn is_duplicate_key(&self) -> bool {
        matches!(self, DbError::Statement(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

/// The calls that failed, for a row's `observed` ("" when none did: every row's assertion
/// also requires that).
#[derive(Debug, Default)]
struct Failed(Vec<DbError>);

impl Failed {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            None => Ok(()),
            Some(first) => write!(f, ", failed calls: {} (first: {first:?})", self.0.len()),
        }
    }
}

/// The outputs of the calls that succeeded, and the errors of the others.
fn succeeded<T>(results: Vec<Result<T, DbError>>) -> (Vec<T>, Failed) {
    let mut failed = Failed::default();
    let outputs = results
        .into_iter()
        .filter_map(|result| result.map_err(|e| failed.0.push(e)).ok())
        .collect();
    (outputs, failed)
}

/// Runs `$scenario` (an `async fn` generic over [`Lab`], given the `Arc<Db<D>>` as `$db`) on a
/// fresh database of the kind `--database-url` chose.
macro_rules! on_chosen_database {
    ($tables:expr, |$db:ident| $scenario:expr) => {
        match db::Kind::chosen() {
            db::Kind::Sqlite => on_database::<sqlx::Sqlite, _, _>($tables, |$db| $scenario),
            db::Kind::Postgres => on_database::<sqlx::Postgres, _, _>($tables, |$db| $scenario),
        }
    };
}

/// Runs `scenario` on a fresh database of kind `D` with `tables` and the store's tables, then
/// removes the database.
fn on_database<D: Lab, R, F>(tables: &[&str], scenario: impl FnOnce(Arc<Db<D>>) -> F) -> R
where
    F: std::future::Future<Output = R>,
{
    use futures::FutureExt as _;
    runtime().block_on(async {
        let db = Arc::new(Db::<D>::fresh(tables).await);
        // A scenario that panics still removes its database (a schema on a shared server).
        let result = std::panic::AssertUnwindSafe(scenario(Arc::clone(&db)))
            .catch_unwind()
            .await;
        db.drop_all().await;
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl<D: Lab> Db<D> {
    /// Rows in `table`.
    async fn count(&self, table: &str) -> i64 {
        self.sql()
            .scalar(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .await
            .expect("count the rows")
    }
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
async fn create_schedule_run<D: Lab>(
    mut sql: Sql<'_, D>,
    key: &str,
    week: u32,
) -> Result<String, DbError> {
    io().await; // the solver
    sql.execute(
        "INSERT INTO schedule_runs (run_key, week) VALUES ($1, $2)",
        &[Text(key), Int(week.into())],
    )
    .await?;
    let n = sql
        .scalar("SELECT COUNT(*) FROM schedule_runs", &[])
        .await?;
    Ok(format!("schedule run #{n} for week {week}"))
}

/// The naive idempotency check against the database: SELECT the stored response, miss,
/// execute, INSERT the response.
async fn naive_generate_schedule<D: Lab>(
    db: &Db<D>,
    key: &str,
    week: u32,
) -> Result<String, DbError> {
    let stored = db
        .sql()
        .texts(
            "SELECT response FROM idempotency_records WHERE record_key = $1",
            &[Text(key)],
        )
        .await?;
    if let Some(response) = stored.into_iter().next() {
        return Ok(response);
    }
    let response = create_schedule_run(db.sql(), key, week).await?;
    db.sql()
        .execute(
            "INSERT INTO idempotency_records (record_key, response) VALUES ($1, $2)",
            &[Text(key), Text(&response)],
        )
        .await?;
    Ok(response)
}

/// The same run in the store's transaction: the run's row and the key's record commit together.
#[idempotent(key = key, store = db.store, skip(db))]
async fn generate_schedule<D: Lab>(
    db: &Db<D>,
    key: &str,
    week: u32,
    mut tx: Tx<'_, D>,
) -> Result<String, DbError> {
    create_schedule_run(Sql::of(&mut tx), key, week).await
}

fn schedule_generation(variant: Variant) -> (bool, String) {
    on_chosen_database!(SCHEDULE_TABLES, |db| generate_schedules(db, variant))
}

async fn generate_schedules<D: Lab>(db: Arc<Db<D>>, variant: Variant) -> (bool, String) {
    let key = format!("idem-{}", fresh());
    let outcomes = released(100, |_| {
        let (db, key) = (db.clone(), key.clone());
        async move {
            match variant {
                Variant::Naive => naive_generate_schedule(&db, &key, 48).await,
                Variant::Racefree => generate_schedule(&db, &key, 48).await,
            }
        }
    })
    .await;
    let (outcomes, failed) = succeeded(outcomes);
    let runs = db.count("schedule_runs").await;
    let distinct = outcomes.iter().collect::<HashSet<_>>().len();
    (
        runs == 1 && distinct == 1 && failed.is_empty(),
        format!("schedule_runs rows: {runs}, distinct outcomes: {distinct}{failed}"),
    )
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

async fn insert_event<D: Lab>(
    mut sql: Sql<'_, D>,
    aggregate: &str,
    seq: i64,
) -> Result<(), DbError> {
    sql.execute(
        "INSERT INTO events (aggregate, seq, body) VALUES ($1, $2, $3)",
        &[Text(aggregate), Int(seq), Text("{\"type\":\"ItemAdded\"}")],
    )
    .await?;
    Ok(())
}

async fn naive_append<D: Lab>(db: &Db<D>, aggregate: &str) -> Result<(), DbError> {
    let next = db
        .sql()
        .scalar(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE aggregate = $1",
            &[Text(aggregate)],
        )
        .await?;
    io().await; // building and serializing the event
    insert_event(db.sql(), aggregate, next).await
}

/// The number comes from the store's counter row, and is consumed by the `COMMIT` of the event.
#[sequenced(key = aggregate.to_owned(), store = db.store.sequence("events"))]
async fn append<D: Lab>(
    db: &Db<D>,
    aggregate: &str,
    seq: Seq,
    mut tx: Tx<'_, D>,
) -> Result<(), DbError> {
    io().await;
    insert_event(Sql::of(&mut tx), aggregate, seq.get() as i64).await
}

fn event_store(variant: Variant) -> (bool, String) {
    on_chosen_database!(EVENT_TABLES, |db| append_events(db, variant))
}

async fn append_events<D: Lab>(db: Arc<Db<D>>, variant: Variant) -> (bool, String) {
    let aggregate = format!("order-{}", fresh());
    let results = released(100, |_| {
        let (db, aggregate) = (db.clone(), aggregate.clone());
        async move {
            match variant {
                Variant::Naive => naive_append(&db, &aggregate).await,
                Variant::Racefree => append(&db, &aggregate).await,
            }
        }
    })
    .await;
    let (_, failed) = succeeded(results);
    let numbers = db
        .sql()
        .ints("SELECT seq FROM events ORDER BY seq", &[])
        .await
        .expect("read the events");
    let duplicates = numbers.len() - numbers.iter().collect::<HashSet<_>>().len();
    let exact = numbers == (1..=100).collect::<Vec<i64>>();
    (
        exact && failed.is_empty(),
        format!("duplicate numbers: {duplicates}{failed}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Work orders: numbers from SELECT MAX(no) + 1 into a table with a unique index.

const WORK_ORDER_TABLES: &[&str] = &["CREATE TABLE work_orders (no BIGINT NOT NULL UNIQUE)"];

async fn max_work_order<D: Lab>(db: &Db<D>) -> u64 {
    db.sql()
        .scalar("SELECT COALESCE(MAX(no), 0) FROM work_orders", &[])
        .await
        .expect("read the highest number") as u64
}

async fn insert_work_order<D: Lab>(mut sql: Sql<'_, D>, no: u64) -> Result<u64, DbError> {
    sql.execute(
        "INSERT INTO work_orders (no) VALUES ($1)",
        &[Int(no as i64)],
    )
    .await?;
    Ok(no)
}

async fn naive_work_order<D: Lab>(db: &Db<D>) -> Result<u64, DbError> {
    let no = max_work_order(db).await + 1;
    io().await;
    insert_work_order(db.sql(), no).await
}

// One sequence of the database's work-order numbers, starting after the highest number already
// in the table; a number is consumed by the `COMMIT` of its row.
#[sequenced(start = max_work_order(db).await + 1, store = db.store.sequence("work_order_no"))]
async fn create_work_order<D: Lab>(
    db: &Db<D>,
    seq: Seq,
    mut tx: Tx<'_, D>,
) -> Result<u64, DbError> {
    io().await;
    insert_work_order(Sql::of(&mut tx), seq.get()).await
}

fn work_orders(variant: Variant) -> (bool, String) {
    on_chosen_database!(WORK_ORDER_TABLES, |db| create_work_orders(db, variant))
}

async fn create_work_orders<D: Lab>(db: Arc<Db<D>>, variant: Variant) -> (bool, String) {
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
    let (_, failed) = succeeded(results);
    let duplicates = failed.0.iter().filter(|e| e.is_duplicate_key()).count();
    let others = Failed(
        failed
            .0
            .into_iter()
            .filter(|e| !e.is_duplicate_key())
            .collect(),
    );
    (
        duplicates == 0 && others.is_empty(),
        format!("duplicate-key failures: {duplicates}{others}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Inventory: 100 concurrent read-modify-write increments of one SKU's quantity.

const STOCK_TABLES: &[&str] = &["CREATE TABLE stock (sku TEXT PRIMARY KEY, qty BIGINT NOT NULL)"];

async fn read_modify_write<D: Lab>(
    mut sql: Sql<'_, D>,
    sku: &str,
    qty: i64,
) -> Result<(), DbError> {
    let current = sql
        .scalar("SELECT qty FROM stock WHERE sku = $1", &[Text(sku)])
        .await?;
    io().await;
    sql.execute(
        "UPDATE stock SET qty = $1 WHERE sku = $2",
        &[Int(current + qty), Text(sku)],
    )
    .await?;
    Ok(())
}

async fn naive_add_stock<D: Lab>(db: &Db<D>, sku: &str, qty: i64) -> Result<(), DbError> {
    read_modify_write(db.sql(), sku, qty).await
}

/// The same read-modify-write, one call per SKU at a time, in the transaction that holds the
/// SKU's counter row (the number itself is not needed: the turn is).
#[sequenced(key = sku.to_owned(), store = db.store.sequence("stock"))]
async fn add_stock<D: Lab>(
    db: &Db<D>,
    sku: &str,
    qty: i64,
    _turn: Seq,
    mut tx: Tx<'_, D>,
) -> Result<(), DbError> {
    read_modify_write(Sql::of(&mut tx), sku, qty).await
}

fn inventory(variant: Variant) -> (bool, String) {
    on_chosen_database!(STOCK_TABLES, |db| add_stocks(db, variant))
}

async fn add_stocks<D: Lab>(db: Arc<Db<D>>, variant: Variant) -> (bool, String) {
    let sku = format!("sku-{}", fresh());
    db.sql()
        .execute("INSERT INTO stock (sku, qty) VALUES ($1, 0)", &[Text(&sku)])
        .await
        .expect("seed the SKU");
    let results = released(100, |_| {
        let (db, sku) = (db.clone(), sku.clone());
        async move {
            match variant {
                Variant::Naive => naive_add_stock(&db, &sku, 1).await,
                Variant::Racefree => add_stock(&db, &sku, 1).await,
            }
        }
    })
    .await;
    let (_, failed) = succeeded(results);
    let qty = db
        .sql()
        .scalar("SELECT qty FROM stock WHERE sku = $1", &[Text(&sku)])
        .await
        .expect("read the quantity");
    (
        qty == 100 && failed.is_empty(),
        format!("stock: {qty}, lost updates: {}{failed}", 100 - qty),
    )
}

// ---------------------------------------------------------------------------------------------
// Queue reorder: two dispatchers reorder one queue at once ("move X to the front", "move p1 to
// the back"); each writes the positions that changed in its view. From a stale view, either
// write order leaves two items on one position.

const QUEUE_TABLES: &[&str] = &["CREATE TABLE queue (item TEXT PRIMARY KEY, pos BIGINT NOT NULL)"];
const QUEUE_ITEMS: [&str; 7] = ["p0", "p1", "X", "p3", "p4", "Y", "p6"];

async fn queue_order<D: Lab>(mut sql: Sql<'_, D>) -> Result<Vec<String>, DbError> {
    Ok(sql
        .texts("SELECT item FROM queue ORDER BY pos, item", &[])
        .await?)
}

fn moved(order: &[String], item: &str, to: usize) -> Vec<String> {
    let mut order = order.to_vec();
    let from = order.iter().position(|i| i == item).expect("item in queue");
    let item = order.remove(from);
    order.insert(to.min(order.len()), item);
    order
}

/// Writes the positions that differ between `before` and `after`.
async fn save_positions<D: Lab>(
    mut sql: Sql<'_, D>,
    before: &[String],
    after: &[String],
) -> Result<(), DbError> {
    for (pos, item) in after.iter().enumerate() {
        if before.get(pos) != Some(item) {
            sql.execute(
                "UPDATE queue SET pos = $1 WHERE item = $2",
                &[Int(pos as i64), Text(item)],
            )
            .await?;
        }
    }
    Ok(())
}

async fn naive_reorder<D: Lab>(db: &Db<D>, item: &str, to: usize) -> Result<(), DbError> {
    let before = queue_order(db.sql()).await?;
    let after = moved(&before, item, to);
    io().await;
    // The changes of one move commit together, as a dispatcher's save would.
    let mut tx = db.pool.begin().await?;
    save_positions(Sql::<D>::Tx(&mut tx), &before, &after).await?;
    tx.commit().await?;
    Ok(())
}

/// The same move, one at a time, read and written in the transaction that holds the queue's
/// counter row (the turn is what this needs, not the number).
#[sequenced(store = db.store.sequence("queue"))]
async fn reorder<D: Lab>(
    db: &Db<D>,
    item: &str,
    to: usize,
    _turn: Seq,
    mut tx: Tx<'_, D>,
) -> Result<(), DbError> {
    let before = queue_order(Sql::of(&mut tx)).await?;
    let after = moved(&before, item, to);
    io().await;
    save_positions(Sql::of(&mut tx), &before, &after).await
}

fn queue_reorder(variant: Variant) -> (bool, String) {
    on_chosen_database!(QUEUE_TABLES, |db| reorder_queue(db, variant))
}

async fn reorder_queue<D: Lab>(db: Arc<Db<D>>, variant: Variant) -> (bool, String) {
    for (pos, item) in QUEUE_ITEMS.iter().enumerate() {
        db.sql()
            .execute(
                "INSERT INTO queue (item, pos) VALUES ($1, $2)",
                &[Text(item), Int(pos as i64)],
            )
            .await
            .expect("seed the queue");
    }
    let moves = [("X", 0), ("p1", usize::MAX)];
    let results = released(2, |i| {
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
    let (_, failed) = succeeded(results);
    let positions = db
        .sql()
        .ints("SELECT pos FROM queue ORDER BY pos", &[])
        .await
        .expect("read the positions");
    let permutation = positions == (0..QUEUE_ITEMS.len() as i64).collect::<Vec<_>>();
    let observed = if permutation {
        "consistent order".to_owned()
    } else {
        let described = db
            .sql()
            .texts("SELECT item || '=' || pos FROM queue ORDER BY item", &[])
            .await
            .expect("read the positions");
        format!("conflicting positions: {}", described.join(" "))
    };
    (
        permutation && failed.is_empty(),
        format!("{observed}{failed}"),
    )
}
