//! Three classic races of a workshop system, naive vs `#[sequenced]`, side by side:
//!
//! 1. Work-order numbers from `SELECT MAX(no) + 1`: concurrent requests compute the same number
//!    and the unique index rejects all but one (duplicate-key failures shown to staff).
//! 2. Inventory read-modify-write (`q = qty(sku); set_qty(sku, q + n)`): concurrent bookings
//!    overwrite each other (lost updates).
//! 3. Two dispatchers reorder the same job queue at once, each rewriting every job's position:
//!    their writes interleave into conflicting positions (two jobs at one place).
//!
//! Every storage call awaits (a database round trip), so the other tasks run meanwhile.
//!
//! `cargo run --release --example work_orders`

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use racefree::{sequenced, Seq};

const REQUESTS: usize = 100;
const REORDER_ROUNDS: usize = 200;

async fn round_trip() {
    tokio::task::yield_now().await;
}

#[derive(Debug)]
enum DbError {
    DuplicateKey(u64),
}

/// An in-memory database: work orders with a unique index on their number, stock levels, and
/// a job queue with a position per job.
#[derive(Default)]
struct Db {
    work_orders: Mutex<BTreeMap<u64, String>>,
    stock: Mutex<HashMap<String, i64>>,
    positions: Mutex<HashMap<&'static str, usize>>,
}

impl Db {
    async fn max_work_order_no(&self) -> Result<u64, DbError> {
        let max = self
            .work_orders
            .lock()
            .unwrap()
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0);
        round_trip().await;
        Ok(max)
    }

    async fn insert_work_order(&self, no: u64, title: &str) -> Result<(), DbError> {
        round_trip().await;
        let mut rows = self.work_orders.lock().unwrap();
        if rows.contains_key(&no) {
            return Err(DbError::DuplicateKey(no));
        }
        rows.insert(no, title.to_owned());
        Ok(())
    }

    async fn qty(&self, sku: &str) -> i64 {
        let q = self.stock.lock().unwrap().get(sku).copied().unwrap_or(0);
        round_trip().await;
        q
    }

    async fn set_qty(&self, sku: &str, q: i64) {
        round_trip().await;
        self.stock.lock().unwrap().insert(sku.to_owned(), q);
    }

    async fn queue_order(&self) -> Vec<&'static str> {
        let mut jobs: Vec<_> = self
            .positions
            .lock()
            .unwrap()
            .iter()
            .map(|(job, at)| (*at, *job))
            .collect();
        round_trip().await;
        jobs.sort_unstable();
        jobs.into_iter().map(|(_, job)| job).collect()
    }

    async fn set_position(&self, job: &'static str, at: usize) {
        round_trip().await;
        self.positions.lock().unwrap().insert(job, at);
    }
}

// 1. Work-order numbers --------------------------------------------------------------------

async fn create_work_order_naive(db: &Db, title: &str) -> Result<u64, DbError> {
    let no = db.max_work_order_no().await? + 1;
    db.insert_work_order(no, title).await?;
    Ok(no)
}

/// No key: one sequence for the function. `start` reads the table once, the first time.
#[sequenced(start = db.max_work_order_no().await? + 1)]
async fn create_work_order(db: &Db, title: &str, seq: Seq) -> Result<u64, DbError> {
    db.insert_work_order(seq.get(), title).await?;
    Ok(seq.get())
}

// 2. Inventory ---------------------------------------------------------------------------

async fn add_to_inventory_naive(db: &Db, sku: &str, qty: i64) {
    let q = db.qty(sku).await;
    db.set_qty(sku, q + qty).await
}

/// No `Seq`: plain per-key serialization.
#[sequenced(key = sku.to_owned())]
async fn add_to_inventory(db: &Db, sku: &str, qty: i64) {
    let q = db.qty(sku).await;
    db.set_qty(sku, q + qty).await
}

// 3. Queue reorder -------------------------------------------------------------------------

const JOBS: [&str; 6] = ["brakes", "tyres", "oil", "battery", "wipers", "lights"];

/// Moves `job` to the front, then rewrites every position.
async fn move_to_front_naive(db: &Db, job: &'static str) {
    let mut order = db.queue_order().await;
    order.retain(|j| *j != job);
    order.insert(0, job);
    for (at, job) in order.into_iter().enumerate() {
        db.set_position(job, at).await;
    }
}

#[sequenced(key = queue.to_owned())]
async fn move_to_front(db: &Db, queue: &str, job: &'static str) {
    move_to_front_naive(db, job).await
}

/// Positions are consistent when they are 0..n, each once.
fn consistent(db: &Db) -> bool {
    let positions = db.positions.lock().unwrap();
    let taken: HashSet<usize> = positions.values().copied().collect();
    taken.len() == JOBS.len() && taken.iter().all(|at| *at < JOBS.len())
}

fn fresh_queue() -> Arc<Db> {
    let db = Db::default();
    db.positions
        .lock()
        .unwrap()
        .extend(JOBS.iter().enumerate().map(|(at, job)| (*job, at)));
    Arc::new(db)
}

/// Starts `n` calls at once (released by one barrier) and collects their outputs.
async fn all_at_once<T, Fut>(n: usize, call: impl Fn(usize) -> Fut) -> Vec<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let call = call(i);
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

fn row(what: &str, naive: impl std::fmt::Display, sequenced: impl std::fmt::Display) {
    println!("{what:<44}{naive:>14}{sequenced:>16}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("{:<44}{:>14}{:>16}", "", "naive", "#[sequenced]");

    // 1. Work-order numbers.
    let failures = |outputs: &[Result<u64, DbError>]| {
        outputs
            .iter()
            .filter(|o| matches!(o, Err(DbError::DuplicateKey(_))))
            .count()
    };
    let naive_db = Arc::new(Db::default());
    let naive = all_at_once(REQUESTS, |i| {
        let db = naive_db.clone();
        async move { create_work_order_naive(&db, &format!("job {i}")).await }
    })
    .await;
    let db = Arc::new(Db::default());
    let sequenced = all_at_once(REQUESTS, |i| {
        let db = db.clone();
        async move { create_work_order(&db, &format!("job {i}")).await }
    })
    .await;
    row(
        &format!("work orders: duplicate-key failures of {REQUESTS}"),
        failures(&naive),
        failures(&sequenced),
    );
    if let Some(Err(DbError::DuplicateKey(no))) = naive.iter().find(|o| o.is_err()) {
        println!(
            "{:<44}{:>14}",
            "work orders: first naive failure",
            format!("dup key {no}")
        );
    }
    row(
        "work orders: created",
        naive_db.work_orders.lock().unwrap().len(),
        db.work_orders.lock().unwrap().len(),
    );

    // 2. Inventory: REQUESTS bookings of +1 each.
    let naive_db = Arc::new(Db::default());
    all_at_once(REQUESTS, |_| {
        let db = naive_db.clone();
        async move { add_to_inventory_naive(&db, "brake-pad", 1).await }
    })
    .await;
    let db = Arc::new(Db::default());
    all_at_once(REQUESTS, |_| {
        let db = db.clone();
        async move { add_to_inventory(&db, "brake-pad", 1).await }
    })
    .await;
    let (naive_q, sequenced_q) = (naive_db.qty("brake-pad").await, db.qty("brake-pad").await);
    row(
        &format!("inventory: quantity after {REQUESTS} x (+1)"),
        naive_q,
        sequenced_q,
    );
    row(
        "inventory: lost updates",
        REQUESTS as i64 - naive_q,
        REQUESTS as i64 - sequenced_q,
    );

    // 3. Two concurrent reorders of one queue, many rounds.
    let (mut naive_bad, mut sequenced_bad) = (0, 0);
    for _ in 0..REORDER_ROUNDS {
        let db = fresh_queue();
        all_at_once(2, |i| {
            let db = db.clone();
            async move { move_to_front_naive(&db, JOBS[4 + i]).await }
        })
        .await;
        naive_bad += usize::from(!consistent(&db));
        let db = fresh_queue();
        all_at_once(2, |i| {
            let db = db.clone();
            async move { move_to_front(&db, "bay-1", JOBS[4 + i]).await }
        })
        .await;
        sequenced_bad += usize::from(!consistent(&db));
    }
    row(
        &format!("queue: rounds with conflicting positions /{REORDER_ROUNDS}"),
        naive_bad,
        sequenced_bad,
    );

    assert_eq!(
        (failures(&sequenced), sequenced_q, sequenced_bad),
        (0, REQUESTS as i64, 0)
    );
}
