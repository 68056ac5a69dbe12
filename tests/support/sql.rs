//! The databases the SQL store tests run against: a fresh PostgreSQL schema (dropped when the
//! test ends, however it ends) on the machine's server, or a fresh SQLite file in a temp dir;
//! the tables the tests count effects in; and child processes sharing the database.
//! Included with `#[path = "support/sql.rs"] mod sql;`.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The server the tests use (`.ci/` makes sure it runs).
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The tables a test counts in, the same SQL on both databases. `executions` is written
/// outside the store's transaction (autocommit), so it counts every run of a body, including
/// runs whose effect rolled back; `effects` is written inside it.
pub const TEST_TABLES: &[&str] = &[
    "CREATE TABLE effects (key TEXT NOT NULL, who TEXT NOT NULL)",
    "CREATE TABLE executions (key TEXT NOT NULL, who TEXT NOT NULL)",
    "CREATE TABLE outcomes (key TEXT NOT NULL, outcome TEXT NOT NULL)",
    "CREATE TABLE numbered (key TEXT NOT NULL, number BIGINT NOT NULL, who TEXT NOT NULL, UNIQUE (key, number))",
    "CREATE TABLE arrivals (point TEXT NOT NULL, who TEXT NOT NULL)",
];

/// A name no other test or earlier run uses.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("rf_{name}_{}_{nanos}", std::process::id())
}

/// Where one test's data lives; children find it through [`TestDb::env`] / [`TestDb::from_env`].
pub struct TestDb {
    /// `pg` or `sqlite`.
    pub kind: &'static str,
    /// The PostgreSQL schema, or the SQLite file.
    pub place: String,
    owner: bool,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A new schema on the machine's PostgreSQL, dropped when this value is dropped.
    pub fn pg(name: &str) -> TestDb {
        let schema = unique(name);
        pg_admin(&format!("CREATE SCHEMA {schema}"));
        TestDb {
            kind: "pg",
            place: schema,
            owner: true,
            _dir: None,
        }
    }

    /// A new SQLite file in a temp dir, removed when this value is dropped.
    pub fn sqlite(_name: &str) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("test.db").to_str().unwrap().to_owned();
        TestDb {
            kind: "sqlite",
            place: file,
            owner: true,
            _dir: Some(dir),
        }
    }

    /// What a child needs to open the same database.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RF_SQL_DB", self.kind.to_owned()),
            ("RF_SQL_PLACE", self.place.clone()),
        ]
    }

    /// The parent's database, in a child.
    pub fn from_env() -> TestDb {
        let kind = match std::env::var("RF_SQL_DB").unwrap().as_str() {
            "pg" => "pg",
            _ => "sqlite",
        };
        TestDb {
            kind,
            place: std::env::var("RF_SQL_PLACE").unwrap(),
            owner: false,
            _dir: None,
        }
    }

    /// A pool on the schema (every connection's `search_path` is set to it).
    #[cfg(feature = "postgres")]
    pub async fn pg_pool(&self, max: u32) -> sqlx::PgPool {
        let schema = self.place.clone();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(20))
            .after_connect(move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::query(&format!("SET search_path TO {schema}"))
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(PG_URL)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (user postgres, db test) must be running")
    }

    /// A pool on the file: WAL (several processes share it), `busy_timeout` as given.
    #[cfg(feature = "sqlite")]
    pub async fn sqlite_pool(&self, max: u32, busy: Duration) -> sqlx::SqlitePool {
        sqlite_pool_on(&self.place, max, busy).await
    }

    /// A pool on a second file beside the database: the tests' side channel. (A body that
    /// writes to its own SQLite file outside the store's transaction would wait for the write
    /// lock its own transaction holds.)
    #[cfg(feature = "sqlite")]
    pub async fn sqlite_side_pool(&self) -> sqlx::SqlitePool {
        sqlite_pool_on(&format!("{}.side", self.place), 4, Duration::from_secs(30)).await
    }
}

#[cfg(feature = "sqlite")]
async fn sqlite_pool_on(file: &str, max: u32, busy: Duration) -> sqlx::SqlitePool {
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(busy);
        sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(options)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.owner && self.kind == "pg" {
            pg_admin(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.place));
        }
    }
}

/// Runs one statement on the server with `psql`-free plumbing: its own thread and runtime,
/// so it works from `Drop` and from inside a test's runtime alike.
#[cfg(feature = "postgres")]
pub fn pg_admin(sql: &str) {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(PG_URL).await.expect(
                    "PostgreSQL at 127.0.0.1:5432 (user postgres, db test) must be running",
                );
                sqlx::query(&sql).execute(&mut conn).await.unwrap();
            })
    })
    .join()
    .unwrap();
}

#[cfg(not(feature = "postgres"))]
pub fn pg_admin(_: &str) {
    unreachable!("PostgreSQL tests need the `postgres` feature")
}

/// Children of this test binary running `entry` (a test that does nothing unless
/// `RF_SQL_MODE` is set) in `mode` on `db`.
pub fn spawn_child(
    entry: &str,
    db: &TestDb,
    mode: &str,
    worker: usize,
    extra: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([entry, "--exact", "--nocapture", "--test-threads", "1"])
        .env("RF_SQL_MODE", mode)
        .env("RF_SQL_WORKER", worker.to_string());
    for (k, v) in db.env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // A child's own libtest summary would read like ours: keep its stdout out of the log.
    cmd.stdout(Stdio::null())
        .spawn()
        .expect("re-run the test binary as a child")
}

/// Waits (bounded) for every child; `true` for each that exited successfully.
pub fn wait_children(children: Vec<Child>) -> Vec<bool> {
    let deadline = Instant::now() + Duration::from_secs(120);
    children
        .into_iter()
        .map(|mut child| loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a child process hung");
            }
            std::thread::sleep(Duration::from_millis(10));
        })
        .collect()
}

/// The child's role and number, if this process is a child.
pub fn child_role() -> Option<(String, usize)> {
    let mode = std::env::var("RF_SQL_MODE").ok()?;
    let worker = std::env::var("RF_SQL_WORKER").map_or(0, |w| w.parse().unwrap());
    Some((mode, worker))
}

/// A multi-threaded runtime for children.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
