//! The database the lab's database scenarios race against: a fresh SQLite file in a temp dir
//! (no server needed), or a fresh schema in the PostgreSQL of `--database-url` (dropped after
//! the scenario, with everything in it). One pool per scenario run, made inside that run's
//! Tokio runtime, and racefree's SQL store on that pool, its tables created by `migrate()` in
//! the fresh database: the racefree rows' records and counters live beside the effects.
//!
//! The scenarios are written once, generic over [`Lab`] (`sqlx::Sqlite` or `sqlx::Postgres`);
//! their statements go through [`Sql`], autocommit on the pool or inside one transaction.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use racefree::sql::{Dialect, SqlStore, Tx};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, Executor, PgConnection, Pool, Postgres, Row, Sqlite};

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

/// Which database the scenarios run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    /// PostgreSQL if `--database-url` was given, SQLite otherwise.
    pub fn chosen() -> Kind {
        match DATABASE_URL.get() {
            Some(_) => Kind::Postgres,
            None => Kind::Sqlite,
        }
    }
}

/// A database the lab runs on: one of racefree's SQL dialects, whose connections run the
/// lab's [`Statements`], and which can make a fresh, empty database of its kind.
pub trait Lab: Dialect<Connection: Statements> {
    /// A fresh, empty database: its pool, and what removes it afterwards.
    fn create() -> impl Future<Output = (Pool<Self>, Cleanup)> + Send;
}

impl Lab for Sqlite {
    async fn create() -> (Pool<Sqlite>, Cleanup) {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("lab.db"))
            .create_if_missing(true)
            // WAL: readers never wait for the writer; writers queue on busy_timeout.
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options)
            .await
            .expect("open the SQLite file");
        (pool, Cleanup::File(dir))
    }
}

impl Lab for Postgres {
    async fn create() -> (Pool<Postgres>, Cleanup) {
        let url = DATABASE_URL.get().expect("--database-url").clone();
        let schema = format!("race_lab_{}_{}", std::process::id(), super::fresh());
        on_server(&url, &format!("CREATE SCHEMA {schema}")).await;
        let search_path = format!("SET search_path TO {schema}");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(60))
            .after_connect(move |conn, _| {
                let search_path = search_path.clone();
                Box::pin(async move {
                    Executor::execute(conn, search_path.as_str()).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .expect("connect to PostgreSQL");
        (pool, Cleanup::Schema { url, schema })
    }
}

/// Runs one statement on the server, outside any scenario's schema.
async fn on_server(url: &str, statement: &str) {
    let mut admin = PgConnection::connect(url)
        .await
        .expect("connect to PostgreSQL");
    Executor::execute(&mut admin, statement)
        .await
        .expect(statement);
    admin.close().await.expect("disconnect");
}

/// What removes a scenario's database.
pub enum Cleanup {
    /// The temp dir of the SQLite file: removed when dropped.
    File(tempfile::TempDir),
    Schema {
        url: String,
        schema: String,
    },
}

/// One scenario's database: its pool, racefree's store on that pool, and what to clean up.
pub struct Db<D: Lab> {
    pub pool: Pool<D>,
    /// The racefree rows' idempotency records and sequence counters, in this database.
    pub store: SqlStore<D>,
    cleanup: Cleanup,
}

impl<D: Lab> Db<D> {
    /// A fresh, empty database for one scenario run, with `tables` and the store's tables.
    pub async fn fresh(tables: &[&str]) -> Db<D> {
        let (pool, cleanup) = D::create().await;
        for table in tables {
            Sql::Pool(&pool)
                .execute(table, &[])
                .await
                .expect("create table");
        }
        let store = SqlStore::new(pool.clone());
        store.migrate().await.expect("create the store's tables");
        // Open every connection now, so that no caller's first statement waits for a connect
        // (a PostgreSQL connect takes milliseconds and would stagger the released callers).
        let warm: Vec<_> = (0..POOL_SIZE).map(|_| pool.acquire()).collect();
        let warm = futures::future::join_all(warm).await;
        drop(warm);
        Db {
            pool,
            store,
            cleanup,
        }
    }

    /// Statements in autocommit, each on whichever pooled connection is free.
    pub fn sql(&self) -> Sql<'_, D> {
        Sql::Pool(&self.pool)
    }

    /// Closes the pool and drops the schema (the store's tables with it); a SQLite file goes
    /// with its temp dir when the `Db` is dropped.
    pub async fn drop_all(&self) {
        self.pool.close().await;
        if let Cleanup::Schema { url, schema } = &self.cleanup {
            on_server(url, &format!("DROP SCHEMA {schema} CASCADE")).await;
        }
    }
}

/// A value for a `$n` placeholder.
#[derive(Debug, Clone, Copy)]
pub enum Bind<'a> {
    Text(&'a str),
    Int(i64),
}

/// Where a scenario's statements go: the same code runs in autocommit (the naive rows) or
/// inside one transaction, e.g. the one racefree's store opened (`Tx` derefs to its connection).
pub enum Sql<'a, D: Lab> {
    Pool(&'a Pool<D>),
    Tx(&'a mut D::Connection),
}

impl<'a, D: Lab> Sql<'a, D> {
    /// The statements of racefree's transaction (a `tx` parameter).
    pub fn of(tx: &'a mut Tx<'_, D>) -> Self {
        Sql::Tx(&mut **tx)
    }

    pub async fn execute(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<()> {
        match self {
            Sql::Pool(pool) => pool.acquire().await?.execute(sql, binds).await,
            Sql::Tx(conn) => conn.execute(sql, binds).await,
        }
    }

    /// The first column of every row, as integers.
    pub async fn ints(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<Vec<i64>> {
        match self {
            Sql::Pool(pool) => pool.acquire().await?.ints(sql, binds).await,
            Sql::Tx(conn) => conn.ints(sql, binds).await,
        }
    }

    /// The first column of every row, as text.
    pub async fn texts(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<Vec<String>> {
        match self {
            Sql::Pool(pool) => pool.acquire().await?.texts(sql, binds).await,
            Sql::Tx(conn) => conn.texts(sql, binds).await,
        }
    }

    /// The one integer of a query that returns one row and one column.
    pub async fn scalar(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<i64> {
        let ints = self.ints(sql, binds).await?;
        ints.first().copied().ok_or(sqlx::Error::RowNotFound)
    }
}

/// The statements the lab runs, on a connection of either database. One blanket impl, whose
/// bounds say what sqlx needs of a database to bind text and integers and decode them.
pub trait Statements: Send {
    fn execute(
        &mut self,
        sql: &str,
        binds: &[Bind<'_>],
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    fn ints(
        &mut self,
        sql: &str,
        binds: &[Bind<'_>],
    ) -> impl Future<Output = sqlx::Result<Vec<i64>>> + Send;

    fn texts(
        &mut self,
        sql: &str,
        binds: &[Bind<'_>],
    ) -> impl Future<Output = sqlx::Result<Vec<String>>> + Send;
}

impl<C, DB> Statements for C
where
    C: Connection<Database = DB>,
    DB: sqlx::Database,
    for<'c> &'c mut C: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn execute(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<()> {
        bound(sql, binds).execute(self).await.map(drop)
    }

    async fn ints(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<Vec<i64>> {
        let rows = bound(sql, binds).fetch_all(self).await?;
        rows.iter().map(|row| row.try_get::<i64, _>(0)).collect()
    }

    async fn texts(&mut self, sql: &str, binds: &[Bind<'_>]) -> sqlx::Result<Vec<String>> {
        let rows = bound(sql, binds).fetch_all(self).await?;
        rows.iter().map(|row| row.try_get::<String, _>(0)).collect()
    }
}

fn bound<'q, DB>(sql: &'q str, binds: &[Bind<'q>]) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    binds
        .iter()
        .fold(sqlx::query(sql), |query, bind| match *bind {
            Bind::Text(text) => query.bind(text),
            Bind::Int(int) => query.bind(int),
        })
}
