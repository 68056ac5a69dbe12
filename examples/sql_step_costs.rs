//! Where a first execution's time goes on the SQL stores, beside the bare transaction: the
//! probes behind the README's "What bounds the first-execution ratio". Each contender runs
//! in turn within every round, so all of them see the same load; medians are printed.
//!
//! - `postgres [off|on]`: on one connection to 127.0.0.1:5432 (a schema of its own, dropped
//!   at the end), with the session's `synchronous_commit` as given (`off`: only the
//!   statements' work shows, not the WAL flush), the bare `BEGIN` / `INSERT` / `COMMIT`
//!   against the statements a first execution sends, spelled as racefree sent them before
//!   stop 24 (values hex-decoded, a proof statement in the claim) and as stop 24 sent them
//!   (stop 26 made the outcome an `INSERT … ON CONFLICT DO UPDATE`, and stop 27 its
//!   `COMMIT; BEGIN` a `COMMIT AND CHAIN`).
//! - `sqlite`: on a temp file, the bare transaction against the same transaction with the
//!   idempotency record's `INSERT` added (the floor of any claim that writes its record in
//!   the transaction), with a `SELECT 1` added instead (what one more statement costs, each
//!   a hand-off to the connection's thread in sqlx), and against a whole `#[idempotent]`
//!   first execution.
//!
//! - `sequenced`: on 127.0.0.1:5432 (a schema of its own, dropped at the end; the session's
//!   default `synchronous_commit`), the bare transaction with a numbered `INSERT` against a
//!   `#[sequenced]` holding spelled three ways, which differ only in how the commit checks
//!   the holding: by a `SELECT` of the mark the bump set (before stop 27), by the `RELEASE`
//!   of a savepoint sent with `BEGIN` (stop 27 on), and not at all (the floor).
//!
//! ```text
//! cargo run --release --features postgres,sqlite --example sql_step_costs -- postgres off
//! cargo run --release --features postgres,sqlite --example sql_step_costs -- sqlite
//! cargo run --release --features postgres,sqlite --example sql_step_costs -- sequenced
//! ```

use std::time::{Duration, Instant};

use racefree::idempotency::{Claim, RecordKey};
use racefree::sql::SqliteStore;
use racefree::{Fingerprint, IdempotencyBackend};
use sqlx::{Connection, Executor, PgConnection};

const ROUNDS: usize = 3000;

fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e6
}

fn report(names: &[&str], times: &mut [Vec<Duration>]) {
    let bare = median(&mut times[0]);
    for (name, times) in names.iter().zip(times.iter_mut()) {
        let t = median(times);
        println!("{name:45} {t:7.0} µs  {:.2}×", t / bare);
    }
}

/// `value` as the store wrote it before stop 24.
fn hex(value: &str) -> String {
    let digits: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    format!("convert_from(decode('{digits}', 'hex'), 'UTF8')")
}

/// `value` as the store writes it since stop 24 (values without `$rf`).
fn dollar(value: &str) -> String {
    format!("$rf${value}$rf$")
}

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of the probe's own on 127.0.0.1:5432, and the connection that drops it.
struct Scratch {
    admin: PgConnection,
    schema: String,
}

impl Scratch {
    async fn create(prefix: &str) -> Scratch {
        let mut admin = PgConnection::connect(URL)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432");
        let schema = format!("{prefix}_{}", std::process::id());
        admin
            .execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        Scratch { admin, schema }
    }

    async fn drop_schema(mut self) {
        let drop = format!("DROP SCHEMA {} CASCADE", self.schema);
        self.admin.execute(drop.as_str()).await.unwrap();
    }
}

async fn postgres(sync: &str) {
    let scratch = Scratch::create("rf_step_costs").await;
    let schema = &scratch.schema;
    // One connection, in the schema, with the session's `synchronous_commit` as asked.
    let session = format!("SET search_path TO {schema}; SET synchronous_commit = {sync}");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let session = session.clone();
            Box::pin(async move { conn.execute(session.as_str()).await.map(drop) })
        })
        .connect(URL)
        .await
        .unwrap();
    racefree::sql::PgStore::new(pool.clone())
        .migrate()
        .await
        .unwrap();
    let mut pooled = pool.acquire().await.unwrap();
    let c: &mut PgConnection = &mut pooled;
    c.execute("CREATE TABLE effects (key TEXT NOT NULL, amount BIGINT NOT NULL)")
        .await
        .unwrap();
    // The claim and outcome statements, as `PREPARE`d by the store.
    c.execute(
        "PREPARE claim(text, text, bigint) AS \
         WITH lock AS (SELECT pg_try_advisory_xact_lock($3) AS held) \
         INSERT INTO racefree_idempotency (key, fingerprint, expires_at) \
         SELECT $1, $2, CASE WHEN held THEN 'infinity'::timestamptz END FROM lock",
    )
    .await
    .unwrap();
    c.execute(
        "PREPARE outcome(text, text, float8) AS \
         UPDATE racefree_idempotency SET outcome = $2::jsonb, \
         expires_at = clock_timestamp() + $3 * interval '1 millisecond' \
         WHERE key = $1 AND outcome IS NULL AND expires_at = 'infinity'",
    )
    .await
    .unwrap();
    let fingerprint = "0123456789abcdef0123456789abcdef";
    let outcome = r#"{"v":1,"value":"receipt"}"#;
    let names = [
        "bare transaction",
        "before stop 24 (hex, proof statement)",
        "without the proof statement",
        "and dollar-quoted (stop 24)",
    ];
    let mut times = vec![Vec::new(); names.len()];
    let mut n = 0_i64;
    for round in 0..ROUNDS {
        for turn in 0..names.len() {
            let which = (turn + round) % names.len();
            n += 1;
            let key = format!("bench::charge//k-{n}");
            let quote = if which == 3 { dollar } else { hex };
            let (claim, commit) = match which {
                0 => ("BEGIN".to_owned(), "COMMIT".to_owned()),
                _ => {
                    let proof = if which == 1 {
                        "; EXECUTE outcome(NULL, NULL, NULL)"
                    } else {
                        ""
                    };
                    (
                        format!(
                            "BEGIN; EXECUTE claim({}, {}, '{n}'){proof}",
                            quote(&key),
                            quote(fingerprint)
                        ),
                        format!(
                            "EXECUTE outcome({}, {}, '3600000'); COMMIT; BEGIN",
                            quote(&key),
                            quote(outcome)
                        ),
                    )
                }
            };
            let started = Instant::now();
            c.execute(claim.as_str()).await.unwrap();
            sqlx::query("INSERT INTO effects (key, amount) VALUES ($1, $2)")
                .bind(&key)
                .bind(1999_i64)
                .execute(&mut *c)
                .await
                .unwrap();
            c.execute(commit.as_str()).await.unwrap();
            times[which].push(started.elapsed());
            if which > 0 {
                // The empty transaction after `COMMIT` (sqlx ends it when the connection goes
                // back to its pool, off the call's time).
                c.execute("ROLLBACK").await.unwrap();
            }
        }
    }
    println!("PostgreSQL, synchronous_commit = {sync}, {ROUNDS} rounds:");
    report(&names, &mut times);
    drop(pooled);
    pool.close().await;
    scratch.drop_schema().await;
}

async fn sequenced() {
    let scratch = Scratch::create("rf_step_costs_seq").await;
    let mut c = PgConnection::connect(URL).await.unwrap();
    c.execute(format!("SET search_path TO {}", scratch.schema).as_str())
        .await
        .unwrap();
    c.execute(
        "CREATE TABLE counters (name text NOT NULL, key text NOT NULL, next bigint, \
         holdings bigint NOT NULL, PRIMARY KEY (name, key)); \
         CREATE TABLE numbered (key text NOT NULL, number bigint NOT NULL, UNIQUE (key, number))",
    )
    .await
    .unwrap();
    let names = [
        "bare transaction",
        "holding, SELECT of the mark (before stop 27)",
        "holding, RELEASE of a savepoint (stop 27)",
        "holding, no check (the floor)",
    ];
    let mut times = vec![Vec::new(); names.len()];
    let mut bare_number = 0_i64;
    for round in 0..ROUNDS {
        for turn in 0..names.len() {
            let which = (turn + round) % names.len();
            let key = format!("k{which}");
            let started = Instant::now();
            if which == 0 {
                bare_number += 1;
                c.execute("BEGIN").await.unwrap();
                sqlx::query("INSERT INTO numbered (key, number) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(bare_number)
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.execute("COMMIT").await.unwrap();
                times[which].push(started.elapsed());
                continue;
            }
            let begin = if which == 2 {
                "BEGIN; SAVEPOINT racefree_holding"
            } else {
                "BEGIN"
            };
            c.execute(begin).await.unwrap();
            // The bump as the store sends it, the mark in its `RETURNING`.
            let (number, _): (Option<i64>, String) = sqlx::query_as(
                "INSERT INTO counters AS s (name, key, next, holdings) VALUES ('n', $1, NULL, 1) \
                 ON CONFLICT (name, key) DO UPDATE SET next = s.next + 1, holdings = s.holdings + 1 \
                 RETURNING next - 1, set_config('racefree.holding', 'held', true)",
            )
            .bind(&key)
            .fetch_one(&mut c)
            .await
            .unwrap();
            let number = number.unwrap_or(1);
            sqlx::query("INSERT INTO numbered (key, number) VALUES ($1, $2)")
                .bind(&key)
                .bind(number)
                .execute(&mut c)
                .await
                .unwrap();
            if number == 1 {
                sqlx::query("UPDATE counters SET next = 2 WHERE name = 'n' AND key = $1")
                    .bind(&key)
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            let commit = match which {
                1 => {
                    "SELECT CASE current_setting('racefree.holding', true) WHEN 'held' THEN 1 \
                      ELSE ('no holding: ' || coalesce(current_setting('racefree.holding', true), \
                      'unset'))::int END; COMMIT AND CHAIN"
                }
                2 => "RELEASE racefree_holding; COMMIT AND CHAIN",
                _ => "COMMIT AND CHAIN",
            };
            c.execute(commit).await.unwrap();
            times[which].push(started.elapsed());
            // The chained empty transaction (sqlx ends it with the connection's next
            // statement, off the call's time).
            c.execute("ROLLBACK").await.unwrap();
        }
    }
    println!("PostgreSQL #[sequenced] commit checks, {ROUNDS} rounds:");
    report(&names, &mut times);
    c.close().await.unwrap();
    scratch.drop_schema().await;
}

async fn sqlite() {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("costs.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    pool.execute("CREATE TABLE effects (key TEXT NOT NULL, amount BIGINT NOT NULL)")
        .await
        .unwrap();
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let names = [
        "bare transaction",
        "bare transaction + the record's INSERT",
        "bare transaction + SELECT 1",
        "#[idempotent] first execution",
    ];
    let rounds = ROUNDS / 5;
    let mut times = vec![Vec::new(); names.len()];
    let mut n = 0;
    for round in 0..rounds {
        for turn in 0..names.len() {
            let which = (turn + round) % names.len();
            n += 1;
            let key = format!("k-{n}");
            let insert = sqlx::query("INSERT INTO effects (key, amount) VALUES ($1, $2)")
                .bind(key.clone())
                .bind(1999_i64);
            let started = Instant::now();
            if which < 3 {
                let mut tx = pool.begin().await.unwrap();
                insert.execute(&mut *tx).await.unwrap();
                if which == 2 {
                    // A statement that writes and reads nothing: what a statement costs.
                    sqlx::query("SELECT 1").fetch_one(&mut *tx).await.unwrap();
                }
                if which == 1 {
                    sqlx::query(
                        "INSERT INTO racefree_idempotency \
                         (key, fingerprint, outcome, created_at, expires_at) \
                         VALUES ($1, 'fingerprint', 'outcome', 0, 9999999999999)",
                    )
                    .bind(&key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            } else {
                let record = RecordKey::new("bench::charge", None, &key);
                let fingerprint = Fingerprint::of(&1_u64);
                let Ok(Claim::Execute(mut lease)) =
                    IdempotencyBackend::<String>::claim(&store, &record, fingerprint).await
                else {
                    panic!("a fresh key executes")
                };
                insert.execute(lease.connection()).await.unwrap();
                let outcome = "receipt".to_owned();
                IdempotencyBackend::<String>::complete(
                    &store,
                    lease,
                    &outcome,
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
            }
            times[which].push(started.elapsed());
        }
    }
    println!("SQLite (WAL), {rounds} rounds:");
    report(&names, &mut times);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("postgres") => postgres(args.next().as_deref().unwrap_or("off")).await,
        Some("sqlite") => sqlite().await,
        Some("sequenced") => sequenced().await,
        _ => eprintln!("usage: sql_step_costs postgres [off|on] | sqlite | sequenced"),
    }
}
