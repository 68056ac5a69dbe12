//! The SQL stores against the bare transaction doing the same work, in one run, on PostgreSQL
//! (a fresh schema on 127.0.0.1:5432, dropped at the end) and SQLite (a temp file):
//!
//! - `#[idempotent]` first execution (claim, the effect `INSERT` in the store's transaction,
//!   outcome, `COMMIT`) vs a bare transaction with the same `INSERT` (target ≤ 1.3×);
//! - a replay vs a bare primary-key `SELECT` of the same record (target ≤ 1.2×), by the
//!   store that completed the key (it reads first) and, not a target, by a store that never
//!   saw it (another process's retry: on PostgreSQL it claims first, and the refused claim
//!   sends it to the record; SQLite reads every key first);
//! - a `#[sequenced]` insert (counter row bumped in the transaction, the effect `INSERT`,
//!   `COMMIT`) vs a bare transaction with the same `INSERT` (target ≤ 1.3×), and vs
//!   `nextval()` + `INSERT` (PostgreSQL's sequence, which leaves gaps on rollback).
//!
//! The calls go through the stores' public protocol (`IdempotencyBackend`, `SequenceBackend`),
//! which is what the attributes expand to. Round trips per call on PostgreSQL are counted by a
//! loopback proxy between the pool and the server (one round trip = the client writing after
//! it last heard from the server) and written as figures: the mean of 20 calls after 20
//! warm-up calls (statements prepared, as in a running service), each call including the ping
//! sqlx sends when its connection goes back to the pool. Counts do not depend on the machine's
//! load; the timings do.
//!
//! Criterion times one contender after the other; on a machine shared with other work the
//! same comparisons are also paired call by call (`paired!`) and their median ratios written as
//! figures (`sql/<db> paired ratio`): those are the ratios to read there.
//!
//! `cargo bench --bench sql --features postgres,sqlite`

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use racefree::idempotency::{Claim, RecordKey};
use racefree::sql::{PgStore, SqlStore, SqliteStore};
use racefree::{Fingerprint, IdempotencyBackend, SequenceBackend, SequenceLease};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Executor, PgPool, SqlitePool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const TTL: Duration = Duration::from_secs(3600);
const TABLES: &[&str] = &[
    "CREATE TABLE bench_effects (key TEXT NOT NULL, amount BIGINT NOT NULL)",
    "CREATE TABLE bench_numbered (key TEXT NOT NULL, number BIGINT NOT NULL, UNIQUE (key, number))",
    "CREATE TABLE bench_records (key TEXT PRIMARY KEY, outcome TEXT NOT NULL)",
];

fn fresh(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Relaxed)
    )
}

/// Counts round trips through a loopback proxy: a client write after a server answer starts a
/// new round trip.
#[derive(Default)]
struct RoundTrips(AtomicU64);

async fn proxy(counter: Arc<RoundTrips>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                // Set by the server's answer, cleared by the next client write that it counts.
                let answered = Arc::new(std::sync::atomic::AtomicBool::new(true));
                let up_answered = Arc::clone(&answered);
                let up = async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if up_answered.swap(false, Relaxed) {
                            counter.0.fetch_add(1, Relaxed);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        answered.store(true, Relaxed);
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

struct Pg {
    pool: PgPool,
    store: PgStore,
    schema: String,
    round_trips: Arc<RoundTrips>,
}

async fn pg() -> Pg {
    let schema = fresh("rf_bench").replace('-', "_");
    let admin = PgPool::connect(PG_URL)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    admin
        .execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    admin.close().await;
    let round_trips = Arc::new(RoundTrips::default());
    let port = proxy(Arc::clone(&round_trips)).await;
    let search_path = format!("SET search_path TO {schema}");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            let search_path = search_path.clone();
            Box::pin(async move {
                conn.execute(search_path.as_str()).await?;
                Ok(())
            })
        })
        .connect(&format!("postgres://postgres@127.0.0.1:{port}/test"))
        .await
        .unwrap();
    for table in TABLES {
        pool.execute(*table).await.unwrap();
    }
    pool.execute("CREATE SEQUENCE bench_seq").await.unwrap();
    let store = PgStore::new(pool.clone());
    store.migrate().await.unwrap();
    Pg {
        pool,
        store,
        schema,
        round_trips,
    }
}

async fn drop_pg(pg: Pg) {
    pg.pool.close().await;
    let admin = PgPool::connect(PG_URL).await.unwrap();
    admin
        .execute(format!("DROP SCHEMA {} CASCADE", pg.schema).as_str())
        .await
        .unwrap();
    admin.close().await;
}

async fn sqlite(dir: &tempfile::TempDir) -> (SqlitePool, SqliteStore) {
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("bench.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    for table in TABLES {
        pool.execute(*table).await.unwrap();
    }
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    (pool, store)
}

/// One `#[idempotent]` first execution: claim, the effect on the store's transaction, commit.
macro_rules! first_execution {
    ($store:expr, $key:expr) => {{
        let key = RecordKey::new("bench::charge", None, &$key);
        let fingerprint = Fingerprint::of(&("alice", 1999_u64));
        let Ok(Claim::Execute(mut lease)) =
            IdempotencyBackend::<String>::claim($store, &key, fingerprint).await
        else {
            panic!("a fresh key executes")
        };
        sqlx::query("INSERT INTO bench_effects (key, amount) VALUES ($1, $2)")
            .bind(&$key)
            .bind(1999_i64)
            .execute(lease.connection())
            .await
            .unwrap();
        IdempotencyBackend::<String>::complete($store, lease, &"receipt".to_owned(), TTL)
            .await
            .unwrap();
    }};
}

macro_rules! bare_transaction {
    ($pool:expr, $key:expr) => {{
        let mut tx = $pool.begin().await.unwrap();
        sqlx::query("INSERT INTO bench_effects (key, amount) VALUES ($1, $2)")
            .bind(&$key)
            .bind(1999_i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }};
}

macro_rules! replay {
    ($store:expr, $key:expr) => {{
        let key = RecordKey::new("bench::charge", None, $key);
        let fingerprint = Fingerprint::of(&("alice", 1999_u64));
        match IdempotencyBackend::<String>::claim($store, &key, fingerprint).await {
            Ok(Claim::Replay(outcome)) => outcome,
            _ => panic!("a completed key replays"),
        }
    }};
}

macro_rules! bare_select {
    ($pool:expr, $key:expr) => {{
        let outcome: String =
            sqlx::query_scalar("SELECT outcome FROM bench_records WHERE key = $1")
                .bind($key)
                .fetch_one($pool)
                .await
                .unwrap();
        outcome
    }};
}

macro_rules! sequenced_insert {
    ($store:expr, $key:expr) => {{
        let sequence = $store.sequence("bench::invoice");
        let mut lease = sequence.acquire_async($key.to_owned(), None).await.unwrap();
        let number = lease.next_async().await.unwrap().unwrap_or(1);
        sqlx::query("INSERT INTO bench_numbered (key, number) VALUES ($1, $2)")
            .bind($key)
            .bind(number as i64)
            .execute(lease.connection())
            .await
            .unwrap();
        lease.commit_async(number).await.unwrap();
    }};
}

macro_rules! bare_numbered_insert {
    ($pool:expr, $key:expr, $number:expr) => {{
        let mut tx = $pool.begin().await.unwrap();
        sqlx::query("INSERT INTO bench_numbered (key, number) VALUES ($1, $2)")
            .bind($key)
            .bind($number)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }};
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Pairs per paired ratio.
const PAIRED_ROUNDS: usize = 300;

/// Times `$bare` and `$ours` alternately, one call each per round, the order flipping every
/// round, and records the ratio of their median times as a figure. Criterion times one
/// contender after the other, seconds apart: on a machine shared with other work (a commit's
/// `fsync` waits behind every other writer's) that compares two different loads. Paired calls
/// see the same load, so their ratio is the comparison that holds up there.
macro_rules! paired {
    ($rt:expr, $group:expr, $name:expr, bare: $bare:expr, ours: $ours:expr) => {{
        let (mut bare, mut ours) = (Vec::new(), Vec::new());
        $rt.block_on(async {
            for round in 0..PAIRED_ROUNDS {
                if round % 2 == 0 {
                    let started = std::time::Instant::now();
                    $bare;
                    bare.push(started.elapsed());
                }
                let started = std::time::Instant::now();
                $ours;
                ours.push(started.elapsed());
                if round % 2 == 1 {
                    let started = std::time::Instant::now();
                    $bare;
                    bare.push(started.elapsed());
                }
            }
        });
        bare.sort();
        ours.sort();
        let (bare, ours) = (bare[bare.len() / 2], ours[ours.len() / 2]);
        support::figure($group, $name, ours.as_secs_f64() / bare.as_secs_f64(), "x");
    }};
}

/// The three comparisons on one database: `$db` names it in the group names; `$pool` and
/// `$store` are its pool and store, `$replayed` a key completed before (and its bare twin in
/// `bench_records`). PostgreSQL also gets `nextval()` + `INSERT` in the numbered group.
macro_rules! comparisons {
    ($c:expr, $rt:expr, $db:literal, $pool:expr, $store:expr, $replayed:expr) => {{
        let (rt, pool, store, replayed) = ($rt, $pool, $store, $replayed);
        let mut group = $c.benchmark_group(concat!("sql/", $db, " first execution"));
        group.bench_function("bare transaction with the INSERT", |b| {
            b.to_async(rt)
                .iter(|| async { bare_transaction!(pool, fresh("bare")) })
        });
        group.bench_function("racefree #[idempotent] first execution", |b| {
            b.to_async(rt)
                .iter(|| async { first_execution!(store, fresh("first")) })
        });
        group.finish();

        let mut group = $c.benchmark_group(concat!("sql/", $db, " replay"));
        group.bench_function("bare primary-key SELECT", |b| {
            b.to_async(rt)
                .iter(|| async { bare_select!(pool, replayed) })
        });
        group.bench_function("racefree #[idempotent] replay", |b| {
            b.to_async(rt).iter(|| async { replay!(store, replayed) })
        });
        group.finish();

        let mut group = $c.benchmark_group(concat!("sql/", $db, " numbered insert"));
        let bare_numbers = AtomicU64::new(0);
        group.bench_function("bare transaction with the INSERT", |b| {
            b.to_async(rt).iter(|| async {
                bare_numbered_insert!(
                    pool,
                    "bare-customer",
                    bare_numbers.fetch_add(1, Relaxed) as i64
                )
            })
        });
        if $db == "postgres" {
            group.bench_function("nextval() + INSERT (gaps on rollback)", |b| {
                b.to_async(rt).iter(|| async {
                    let mut tx = pool.begin().await.unwrap();
                    let number: i64 = sqlx::query_scalar("SELECT nextval('bench_seq')")
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                    sqlx::query(
                        "INSERT INTO bench_numbered (key, number) VALUES ('nextval-customer', $1)",
                    )
                    .bind(number)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    tx.commit().await.unwrap();
                })
            });
        }
        group.bench_function("racefree #[sequenced] insert", |b| {
            b.to_async(rt)
                .iter(|| async { sequenced_insert!(store, "racefree-customer") })
        });
        group.finish();

        // The same comparisons paired call by call (see `paired!`): the ratios to read on a
        // machine that other work shares.
        let paired = concat!("sql/", $db, " paired ratio (median of racefree / bare)");
        paired!(rt, paired, "#[idempotent] first execution vs bare transaction",
            bare: bare_transaction!(pool, fresh("paired-bare")),
            ours: first_execution!(store, fresh("paired-first")));
        paired!(rt, paired, "#[idempotent] replay vs bare primary-key SELECT",
            bare: bare_select!(pool, replayed),
            ours: replay!(store, replayed));
        // Not a target: what a replay costs where the key is new to the store (another
        // process's retry; a store made per call, which costs microseconds). On PostgreSQL two
        // round trips more (the refused claim, then the read); SQLite reads every key first.
        paired!(rt, paired, "#[idempotent] replay, key new to the store, vs bare primary-key SELECT",
            bare: bare_select!(pool, replayed),
            ours: replay!(&SqlStore::new(pool.clone()), replayed));
        paired!(rt, paired, "#[sequenced] insert vs bare transaction",
            bare: bare_numbered_insert!(pool, "paired-bare", bare_numbers.fetch_add(1, Relaxed) as i64),
            ours: sequenced_insert!(store, "paired-customer"));
    }};
}

/// Calls per round-trip count (after as many warm-up calls, so every pooled connection has
/// prepared the statements, as in a running service).
const COUNTED_CALLS: u64 = 20;

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let pg = rt.block_on(pg());
    let (pool, store) = (&pg.pool, &pg.store);

    // Round trips per call, counted before the timings. sqlx pings a connection when it goes
    // back to the pool, in the background: waiting until every connection is idle again
    // counts that ping in the call that caused it (polled: sqlx signals nothing).
    let settle = || {
        rt.block_on(async {
            while pool.num_idle() < pool.size() as usize {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let count = |what: &str, call: &dyn Fn()| {
        for _ in 0..COUNTED_CALLS {
            call();
            settle();
        }
        let before = pg.round_trips.0.load(Relaxed);
        for _ in 0..COUNTED_CALLS {
            call();
            settle();
        }
        let trips = (pg.round_trips.0.load(Relaxed) - before) as f64 / COUNTED_CALLS as f64;
        support::figure("sql/postgres round trips", what, trips, "per call");
    };
    let replayed = fresh("replayed");
    rt.block_on(async {
        first_execution!(store, replayed.clone());
        sqlx::query("INSERT INTO bench_records (key, outcome) VALUES ($1, 'receipt')")
            .bind(&replayed)
            .execute(pool)
            .await
            .unwrap();
    });
    count("bare transaction INSERT", &|| {
        rt.block_on(async { bare_transaction!(pool, fresh("rt")) })
    });
    count("#[idempotent] first execution", &|| {
        rt.block_on(async { first_execution!(store, fresh("rt")) })
    });
    count("bare primary-key SELECT", &|| {
        rt.block_on(async { bare_select!(pool, &replayed) });
    });
    count("#[idempotent] replay", &|| {
        rt.block_on(async { replay!(store, &replayed) });
    });
    // A retry that lands on a process that never saw its key: a store of its own each time.
    count("#[idempotent] replay, key new to the store", &|| {
        rt.block_on(async { replay!(&PgStore::new(pool.clone()), &replayed) });
    });
    let numbers = AtomicU64::new(1_000_000);
    count("bare transaction numbered INSERT", &|| {
        let number = numbers.fetch_add(1, Relaxed) as i64;
        rt.block_on(async { bare_numbered_insert!(pool, "rt-bare", number) })
    });
    count("#[sequenced] insert", &|| {
        rt.block_on(async { sequenced_insert!(store, "rt-customer") })
    });

    comparisons!(c, &rt, "postgres", pool, store, &replayed);
    rt.block_on(drop_pg(pg));
}

fn sqlite_benches(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (pool, store) = rt.block_on(sqlite(&dir));
    let (pool, store) = (&pool, &store);
    let replayed = fresh("replayed");
    rt.block_on(async {
        first_execution!(store, replayed.clone());
        sqlx::query("INSERT INTO bench_records (key, outcome) VALUES ($1, 'receipt')")
            .bind(&replayed)
            .execute(pool)
            .await
            .unwrap();
    });
    comparisons!(c, &rt, "sqlite", pool, store, &replayed);
    rt.block_on(pool.close());
}

criterion_group! { name = benches; config = support::criterion(); targets = postgres, sqlite_benches }
criterion_main!(benches);
