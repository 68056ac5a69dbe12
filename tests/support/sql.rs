//! The databases the SQL store tests run against: a fresh PostgreSQL schema (dropped when the
//! test ends, however it ends) on the machine's server, or a fresh SQLite file in a temp dir;
//! the tables the tests count effects in; and child processes sharing the database.
//! Included with `#[macro_use] #[path = "support/sql.rs"] mod sql;`; a suite's per-database
//! module starts with `sql_env!(...)`.

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

/// Trigger functions that make a store's own statement fail the way a loaded or contended
/// server does (create them in a test's schema, then attach them to the store's tables):
/// `rf_slow` outlasts any short `statement_timeout` (SQLSTATE 57014), `rf_serialization_failure`
/// raises SQLSTATE 40001, as a serializable transaction that lost a conflict does, and counts
/// its raises in the sequence `rf_conflicts` (not rolled back with them).
pub const PG_FAULTS: &str = "\
    CREATE FUNCTION rf_slow() RETURNS trigger LANGUAGE plpgsql AS \
      $$ BEGIN PERFORM pg_sleep(3); RETURN NEW; END $$; \
    CREATE SEQUENCE rf_conflicts; \
    CREATE FUNCTION rf_serialization_failure() RETURNS trigger LANGUAGE plpgsql AS \
      $$ BEGIN PERFORM nextval('rf_conflicts'); \
         RAISE EXCEPTION 'injected conflict' USING ERRCODE = 'serialization_failure'; END $$;";

/// The store's pool and the side channel's (the same pool on PostgreSQL).
#[cfg(feature = "postgres")]
pub async fn pg_pools(db: &TestDb) -> (sqlx::PgPool, sqlx::PgPool) {
    let pool = db.pg_pool(8).await;
    (pool.clone(), pool)
}

/// The store's pool and the side channel's: a second file, so a body can write to it outside
/// its own transaction (which holds the database's write lock).
#[cfg(feature = "sqlite")]
pub async fn sqlite_pools(db: &TestDb) -> (sqlx::SqlitePool, sqlx::SqlitePool) {
    (
        db.sqlite_pool(8, Duration::from_secs(20)).await,
        db.sqlite_side_pool().await,
    )
}

/// [`pg_pools`] with a store pool of one connection, so every call reuses the connection the
/// call before it left behind.
#[cfg(feature = "postgres")]
#[allow(dead_code)]
pub async fn pg_pool_of_one(db: &TestDb) -> (sqlx::PgPool, sqlx::PgPool) {
    (db.pg_pool(1).await, db.pg_pool(2).await)
}

/// [`sqlite_pools`] with a store pool of one connection.
#[cfg(feature = "sqlite")]
#[allow(dead_code)]
pub async fn sqlite_pool_of_one(db: &TestDb) -> (sqlx::SqlitePool, sqlx::SqlitePool) {
    (
        db.sqlite_pool(1, Duration::from_secs(20)).await,
        db.sqlite_side_pool().await,
    )
}

/// What every suite module needs on its database (`$Database` under cargo feature
/// `$feature`, pools from `$pools`): `Store`, `Env` (the store, its pool for effects, the side
/// channel for executions, outcomes and arrivals), `open`, `setup` (the store's and the
/// tests' tables on a fresh database), `count` and `arrive` (the cross-process barrier).
macro_rules! sql_env {
    ($feature:literal, $Database:ty, $pools:path) => {
        pub type Store = racefree::sql::SqlStore<$Database>;

        pub struct Env {
            pub store: Store,
            pub pool: sqlx::Pool<$Database>,
            pub side: sqlx::Pool<$Database>,
        }

        impl Env {
            /// The same database and side channel, with the store on `pool` (another size,
            /// other session settings).
            #[allow(dead_code)]
            pub fn with_store_on(&self, pool: sqlx::Pool<$Database>) -> Env {
                Env {
                    store: Store::new(pool),
                    pool: self.pool.clone(),
                    side: self.side.clone(),
                }
            }

            #[allow(dead_code)]
            pub async fn close(&self) {
                self.pool.close().await;
                self.side.close().await;
            }
        }

        pub async fn open(db: &crate::sql::TestDb) -> Env {
            let (pool, side) = $pools(db).await;
            Env {
                store: Store::new(pool.clone()),
                pool,
                side,
            }
        }

        pub async fn setup(db: &crate::sql::TestDb) -> Env {
            let env = open(db).await;
            env.store.migrate().await.unwrap();
            for table in crate::sql::TEST_TABLES {
                sqlx::query(table).execute(&env.pool).await.unwrap();
                if $feature == "sqlite" {
                    sqlx::query(table).execute(&env.side).await.unwrap();
                }
            }
            env
        }

        /// Rows of `table` for `key`.
        #[allow(dead_code)]
        pub async fn count(pool: &sqlx::Pool<$Database>, table: &str, key: &str) -> i64 {
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE key = $1"))
                .bind(key)
                .fetch_one(pool)
                .await
                .unwrap()
        }

        /// Waits until `n` participants arrived at `point` (the cross-process barrier; polled,
        /// as processes share nothing else).
        pub async fn arrive(pool: &sqlx::Pool<$Database>, point: &str, who: &str, n: i64) {
            sqlx::query("INSERT INTO arrivals (point, who) VALUES ($1, $2)")
                .bind(point)
                .bind(who)
                .execute(pool)
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let here: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM arrivals WHERE point = $1")
                        .bind(point)
                        .fetch_one(pool)
                        .await
                        .unwrap();
                if here >= n {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "barrier {point} never reached {n}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
}

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
        self.pg_pool_with(max, "").await
    }

    /// [`pg_pool`](Self::pg_pool) whose connections also run `settings` (e.g.
    /// `SET statement_timeout = '300ms'`) when they connect.
    #[cfg(feature = "postgres")]
    pub async fn pg_pool_with(&self, max: u32, settings: &str) -> sqlx::PgPool {
        let session = format!("SET search_path TO {}; {settings}", self.place);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(20))
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    // A simple query: it may hold several statements.
                    sqlx::Executor::execute(conn, session.as_str())
                        .await
                        .map(drop)
                })
            })
            .connect(PG_URL)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (user postgres, db test) must be running")
    }

    /// A pool on the schema through `url` (e.g. a proxy in front of the server), with at most
    /// `max` connections and `acquire` as its `acquire_timeout`.
    #[cfg(feature = "postgres")]
    #[allow(dead_code)]
    pub async fn pg_pool_via(&self, url: &str, max: u32, acquire: Duration) -> sqlx::PgPool {
        let schema = self.place.clone();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire)
            .after_connect(move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::query(&format!("SET search_path TO {schema}"))
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(url)
            .await
            .expect("PostgreSQL behind the given URL")
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

/// A PostgreSQL cluster of this test's own (initdb in a temp dir, a free port, trust auth),
/// for faults that must not touch the shared server: restarts. Stopped (immediately) when
/// dropped.
pub struct PrivatePg {
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
    options: String,
    /// Root may not run PostgreSQL: then every command runs as the `postgres` user.
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

/// Where the private clusters' binaries are (Debian's PostgreSQL 15 layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl PrivatePg {
    /// A running private cluster, or `None` (with a message saying why) when the PostgreSQL
    /// server binaries are not installed.
    pub fn start() -> Option<PrivatePg> {
        let bin = std::path::PathBuf::from(PG_BIN);
        if !bin.join("initdb").exists() || !bin.join("pg_ctl").exists() {
            eprintln!(
                "SKIPPED: no {PG_BIN}/initdb or pg_ctl: a private PostgreSQL cluster cannot be started"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:", dir.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(
                status.success(),
                "chown the private cluster's dir to postgres"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        let pg = PrivatePg {
            bin,
            data,
            port,
            options,
            as_postgres,
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.pg_ctl("start");
        Some(pg)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast: every backend is terminated, open transactions roll back) and
    /// starts it again on the same port; returns once it accepts connections.
    pub fn restart(&self) {
        self.pg_ctl("stop");
        self.pg_ctl("start");
    }

    fn pg_ctl(&self, action: &str) {
        let log = self.data.with_file_name("server.log");
        let data = self.data.to_str().unwrap();
        let mut args = vec!["-D", data, "-w", "-t", "60", "-m", "fast"];
        if action == "start" {
            args.extend(["-l", log.to_str().unwrap(), "-o", &self.options]);
        }
        args.push(action);
        self.run("pg_ctl", &args);
    }

    /// `program` of the cluster's binaries, as the user that may run it.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
