//! The schedule API on PostgreSQL (feature `postgres`, `DATABASE_URL` set): schedule runs are
//! rows of `schedule_runs`, written by the guarded body **in the idempotency store's
//! transaction**, so the run and its idempotency record commit together or not at all. A crash
//! right after the `INSERT` (the `SCHEDULE_API_CRASH_AFTER_INSERT=1` drill), a client that
//! gives up mid-request or a failing body leaves neither, and the retry executes once.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use racefree::idempotent;
use racefree::sql::{PgStore, PgTx};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::{ApiError, ScheduleRequest, ScheduleRun, Tenant};

/// The application's database: its pool, and the idempotency store on the same pool.
pub struct Db {
    pub pool: PgPool,
    pub store: PgStore,
    /// The crash drill: the next generation aborts the process right after its `INSERT`.
    crash_after_insert: AtomicBool,
}

/// The application's own table; `team` and `tenant` are what a schedule run belongs to.
const SCHEDULE_RUNS: &str = "CREATE TABLE IF NOT EXISTS schedule_runs (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    team TEXT NOT NULL,
    week INTEGER NOT NULL,
    shifts TEXT NOT NULL
)";

impl Db {
    /// Connects to `url`, creates `schedule_runs` and the store's tables if absent.
    pub async fn connect(url: &str, crash_after_insert: bool) -> Result<Db, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        sqlx::query(SCHEDULE_RUNS).execute(&pool).await?;
        let store = PgStore::new(pool.clone());
        store.migrate().await?;
        Ok(Db {
            pool,
            store,
            crash_after_insert: AtomicBool::new(crash_after_insert),
        })
    }

    /// Schedule runs of `tenant` in the table.
    pub async fn runs_of(&self, tenant: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM schedule_runs WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }
}

fn database(error: sqlx::Error) -> ApiError {
    ApiError::Database(error.to_string())
}

/// Generates the week's schedule once per tenant and key: the run's row and the idempotency
/// record commit in one transaction (`tx`, supplied by the attribute).
#[idempotent(key = key, scope = tenant, require_key, store = db.store, skip(db, tenant), ttl = "24h")]
pub async fn generate_schedule_in_db(
    db: &Db,
    tenant: &Tenant,
    key: Option<&str>,
    request: &ScheduleRequest,
    mut tx: PgTx<'_>,
) -> Result<ScheduleRun, ApiError> {
    super::check_week(request)?;
    let shifts = super::shifts_of(request);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO schedule_runs (tenant, team, week, shifts) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(&tenant.0)
    .bind(&request.team)
    .bind(request.week as i32)
    .bind(shifts.join("; "))
    .fetch_one(&mut *tx)
    .await
    .map_err(database)?;
    if db.crash_after_insert.swap(false, SeqCst) {
        eprintln!("crash drill: aborting after inserting schedule run {id}");
        std::process::abort();
    }
    Ok(ScheduleRun {
        id: id as u64,
        team: request.team.clone(),
        week: request.week,
        shifts,
    })
}
