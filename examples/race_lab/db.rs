//! The database the lab's database scenarios race against: a fresh SQLite file in a temp dir
//! (no server needed), or a fresh schema in the PostgreSQL of `--database-url` (dropped after
//! the scenario). One pool per scenario run, made inside that run's Tokio runtime.

use std::sync::OnceLock;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

/// Connections per scenario database.
const POOL_SIZE: u32 = 16;

/// `--database-url`: PostgreSQL instead of the default SQLite file.
static DATABASE_URL: OnceLock<String> = OnceLock::new();

/// Makes the database scenarios use this PostgreSQL URL (`postgres://...`).
pub fn use_database(url: String) {
    let _ = DATABASE_URL.set(url);
}

/// What the database scenarios ran on, for the table's footer.
pub fn describe() -> String {
    match DATABASE_URL.get() {
        Some(url) => format!("PostgreSQL ({})", url.split('@').next_back().unwrap_or(url)),
        None => "SQLite (a temp file per scenario)".to_owned(),
    }
}

/// One scenario's database: its pool, and what to clean up afterwards.
pub struct Db {
    /// A number no other database of this process has: the key of its one sequence.
    pub id: u64,
    pub pool: AnyPool,
    cleanup: Cleanup,
}

enum Cleanup {
    File(tempfile::TempDir),
    Schema { url: String, schema: String },
}

impl Db {
    /// A fresh, empty database for one scenario run, with `tables` created.
    pub async fn fresh(tables: &[&str]) -> Db {
        sqlx::any::install_default_drivers();
        let (pool, cleanup) = match DATABASE_URL.get() {
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("lab.db").display());
                let pool = AnyPoolOptions::new()
                    .max_connections(POOL_SIZE)
                    .acquire_timeout(Duration::from_secs(60))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL: readers never wait for the writer; writers queue on busy_timeout.
                            conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 30000;")
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
                    .expect("open the SQLite file");
                (pool, Cleanup::File(dir))
            }
            Some(url) => {
                let schema = format!("race_lab_{}_{}", std::process::id(), super::fresh());
                let admin = AnyPool::connect(url).await.expect("connect to PostgreSQL");
                admin
                    .execute(format!("CREATE SCHEMA {schema}").as_str())
                    .await
                    .expect("create the lab's schema");
                admin.close().await;
                let search_path = format!("SET search_path TO {schema}");
                let pool = AnyPoolOptions::new()
                    .max_connections(POOL_SIZE)
                    .acquire_timeout(Duration::from_secs(60))
                    .after_connect(move |conn, _| {
                        let search_path = search_path.clone();
                        Box::pin(async move {
                            conn.execute(search_path.as_str()).await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await
                    .expect("connect to PostgreSQL");
                (
                    pool,
                    Cleanup::Schema {
                        url: url.clone(),
                        schema,
                    },
                )
            }
        };
        for table in tables {
            pool.execute(*table).await.expect("create table");
        }
        // Open every connection now, so that no caller's first statement waits for a connect
        // (a PostgreSQL connect takes milliseconds and would stagger the released callers).
        let warm: Vec<_> = (0..POOL_SIZE).map(|_| pool.acquire()).collect();
        let warm = futures::future::join_all(warm).await;
        drop(warm);
        Db {
            id: super::fresh(),
            pool,
            cleanup,
        }
    }

    /// One `i64` from a query that returns one row and one column.
    pub async fn scalar(&self, sql: &str, binds: &[&str]) -> i64 {
        let mut query = sqlx::query(sql);
        for bind in binds {
            query = query.bind(*bind);
        }
        let row: AnyRow = query.fetch_one(&self.pool).await.expect("query");
        row.try_get::<i64, _>(0).expect("an integer")
    }

    /// Closes the pool and removes the file or drops the schema.
    pub async fn drop_all(self) {
        self.pool.close().await;
        match self.cleanup {
            Cleanup::File(dir) => drop(dir),
            Cleanup::Schema { url, schema } => {
                let admin = AnyPool::connect(&url).await.expect("connect to PostgreSQL");
                admin
                    .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
                    .await
                    .expect("drop the lab's schema");
                admin.close().await;
            }
        }
    }
}
