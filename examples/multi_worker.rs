//! Four worker processes, one Redis: what an in-process store protects and what it cannot.
//!
//! ```text
//! cargo run --example multi_worker --features redis            # Redis at 127.0.0.1:6379
//! REDIS_URL=redis://127.0.0.1:6380/ cargo run --example multi_worker --features redis
//! ```
//!
//! The parent starts 4 copies of itself (gunicorn-style `workers = 4`); each runs 25 concurrent
//! callers of three functions, first with the in-process stores, then with the Redis store:
//! an idempotent payment (one key), an order number (one sequence), a cached rate (one cold
//! key). Workers meet at a barrier in Redis and count executions there (`INCR`), so the counts
//! cover all processes. In-process stores execute once *per process*; Redis, once in total.

use std::process::Command;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use racefree::redis::driver::AsyncCommands;
use racefree::redis::{CacheOptions, RedisIdempotencyStore, RedisKey, RedisStore};
use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq, SequenceError};

const WORKERS: usize = 4;
const CALLERS: usize = 25;

static URL: LazyLock<String> = LazyLock::new(|| {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
});
static REDIS: LazyLock<Arc<RedisStore>> = LazyLock::new(|| Arc::new(RedisStore::new(URL.clone())));
static RECEIPTS: LazyLock<RedisIdempotencyStore<String>> =
    LazyLock::new(|| RedisIdempotencyStore::shared(Arc::clone(&REDIS)));
/// This run's keys, shared by the parent and its workers (`RUN` in the workers' environment).
static RUN: OnceLock<String> = OnceLock::new();

fn run() -> &'static str {
    RUN.get().expect("set at start")
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug when a worker fails
struct AppError(String);

impl From<IdempotencyError> for AppError {
    fn from(e: IdempotencyError) -> Self {
        AppError(e.to_string())
    }
}

impl From<SequenceError> for AppError {
    fn from(e: SequenceError) -> Self {
        AppError(e.to_string())
    }
}

/// Counts one execution in Redis, visible to every process.
async fn executed(what: &str) -> i64 {
    let mut conn = REDIS.connection().await.expect("redis");
    conn.incr(format!("{}:{what}", run()), 1)
        .await
        .expect("INCR")
}

#[idempotent(key = key)]
async fn pay_in_process(key: &str, cents: u64) -> Result<String, AppError> {
    let n = executed("pay_in_process").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("payment #{n} of {cents}"))
}

#[idempotent(key = key, store = RECEIPTS)]
async fn pay_in_redis(key: &str, cents: u64) -> Result<String, AppError> {
    let n = executed("pay_in_redis").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("payment #{n} of {cents}"))
}

#[sequenced(key = shop.to_owned())]
async fn order_no_in_process(shop: &str, seq: Seq) -> Result<u64, AppError> {
    Ok(seq.get())
}

#[sequenced(key = shop, store = REDIS.sequence("multi_worker::order_no"))]
async fn order_no_in_redis(shop: &str, seq: Seq) -> Result<u64, AppError> {
    Ok(seq.get())
}

#[cached(key = currency.to_owned())]
async fn rate_in_process(currency: &str) -> f64 {
    executed("rate_in_process").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    1.08
}

async fn rate_in_redis(currency: &str) -> f64 {
    let key = RedisKey::new("multi_worker::rate", Some(run()), currency);
    REDIS
        .cache()
        .get_or_compute(&key, CacheOptions::new(Duration::from_secs(60)), || async {
            executed("rate_in_redis").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, String>(1.08)
        })
        .await
        .expect("rate")
}

/// One worker: wait for all workers, then 25 concurrent callers of every function.
async fn worker() {
    let mut conn = REDIS.connection().await.expect("redis");
    let ready = format!("{}:ready", run());
    let _: i64 = conn.incr(&ready, 1).await.unwrap();
    while conn.get::<_, i64>(&ready).await.unwrap() < WORKERS as i64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let key = format!("{}-order-17", run());
    let shop = format!("{}-shop", run());
    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (key, shop) = (key.clone(), shop.clone());
            tokio::spawn(async move {
                pay_in_process(&key, 1999).await.unwrap();
                pay_in_redis(&key, 1999).await.unwrap();
                let local = order_no_in_process(&shop).await.unwrap();
                let shared = order_no_in_redis(&shop).await.unwrap();
                rate_in_process("EUR").await;
                rate_in_redis("EUR").await;
                (local, shared)
            })
        })
        .collect();
    let mut conn = REDIS.connection().await.unwrap();
    for call in calls {
        let (local, shared) = call.await.unwrap();
        let _: i64 = conn
            .rpush(format!("{}:no_in_process", run()), local)
            .await
            .unwrap();
        let _: i64 = conn
            .rpush(format!("{}:no_in_redis", run()), shared)
            .await
            .unwrap();
    }
}

async fn distinct(list: &str) -> (usize, usize) {
    let mut conn = REDIS.connection().await.unwrap();
    let mut numbers: Vec<u64> = conn
        .lrange(format!("{}:{list}", run()), 0, -1)
        .await
        .unwrap();
    let all = numbers.len();
    numbers.sort_unstable();
    numbers.dedup();
    (all, numbers.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(run) = std::env::var("RUN") {
        RUN.get_or_init(|| run);
        return worker().await;
    }
    let this_run = RUN.get_or_init(|| format!("multi-worker-{}", std::process::id()));
    if let Err(e) = REDIS.connection().await {
        eprintln!(
            "multi_worker needs Redis at {} ({e}); start one with `bash .ci/redis.sh`",
            *URL
        );
        std::process::exit(1);
    }
    let children: Vec<_> = (0..WORKERS)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env("RUN", this_run)
                .spawn()
                .expect("spawn a worker")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a worker failed");
    }

    let count = |what: &'static str| async move {
        let mut conn = REDIS.connection().await.unwrap();
        conn.get::<_, Option<i64>>(format!("{}:{what}", run()))
            .await
            .unwrap()
            .unwrap_or(0)
    };
    let (local_all, local_distinct) = distinct("no_in_process").await;
    let (redis_all, redis_distinct) = distinct("no_in_redis").await;
    println!("{WORKERS} worker processes x {CALLERS} concurrent callers, one Redis");
    println!("{:<42} {:>12} {:>12}", "", "in-process", "Redis store");
    println!(
        "{:<42} {:>12} {:>12}",
        "#[idempotent] payment executions (want 1)",
        count("pay_in_process").await,
        count("pay_in_redis").await
    );
    println!(
        "{:<42} {:>12} {:>12}",
        "#[sequenced] distinct numbers of 100",
        format!("{local_distinct}/{local_all}"),
        format!("{redis_distinct}/{redis_all}")
    );
    println!(
        "{:<42} {:>12} {:>12}",
        "cached rate computations (want 1)",
        count("rate_in_process").await,
        count("rate_in_redis").await
    );
    let ok = count("pay_in_redis").await == 1
        && redis_distinct == 100
        && count("rate_in_redis").await == 1;
    println!(
        "Redis store: {}",
        if ok {
            "exactly once across processes"
        } else {
            "FAILED"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
