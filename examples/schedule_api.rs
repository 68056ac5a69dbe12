//! An HTTP API guarded by `#[idempotent]`: `POST /api/schedule/generate` creates a schedule run
//! once per `Idempotency-Key`, however often and however concurrently the client retries.
//!
//! ```text
//! cargo run --example schedule_api --features axum
//! curl -i -X POST localhost:3000/api/schedule/generate -H 'Idempotency-Key: k1' \
//!      -H 'Content-Type: application/json' -d '{"team":"ward-3","week":48}'
//! ```
//! - keys belong to the caller: the tenant named by the `X-Tenant` header (standing in for real
//!   authentication; no header → one anonymous tenant). Two tenants that send the same key and
//!   body get two runs, and neither ever sees the other's outcome or a 422;
//! - the first request runs the generator; retries get the same body with
//!   `Idempotency-Replayed: true`;
//! - no key → 400; the same key with a different body → 422; while a publish with the same key
//!   is running, a duplicate → 409 with `Retry-After` (`/api/schedule/publish` rejects
//!   duplicates in flight instead of waiting for them);
//! - errors are `application/problem+json`.
//!
//! The handler and the attribute are all the application writes: the key extractor, the error
//! responses and the replay header come from `racefree::axum`.
//!
//! With the `postgres` feature and `DATABASE_URL` set, schedule runs are rows of a
//! `schedule_runs` table (with a `team` and a `tenant` column) that the guarded body writes in
//! the PostgreSQL idempotency store's transaction, so a run and its idempotency record commit
//! together (both tables are created at start-up). `SCHEDULE_API_CRASH_AFTER_INSERT=1` makes
//! the first generation abort the process right after it inserted its run (a crash drill: the
//! run rolls back with the claim, and the client's retry executes once).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/test \
//!     cargo run --example schedule_api --features axum,postgres
//! ```

#![allow(dead_code)]

#[cfg(feature = "postgres")]
#[path = "schedule_api/db.rs"]
pub mod db;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{middleware, Json, Router};
use racefree::axum::{mark_replays, Problem, ScopedKey};
use racefree::{idempotent, IdempotencyError};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ScheduleRequest {
    pub team: String,
    pub week: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRun {
    pub id: u64,
    pub team: String,
    pub week: u32,
    pub shifts: Vec<String>,
}

/// The application's state: a stand-in for the database the generator writes to, or (with
/// `postgres` and `DATABASE_URL`) the database itself.
pub struct App {
    /// Schedule runs created in memory (the effect that must happen once per key).
    pub runs_created: AtomicU64,
    /// Generators wait for a permit before writing: unlimited in the server, a gate in tests.
    pub gate: Semaphore,
    /// The PostgreSQL database, when there is one: runs are rows there instead.
    #[cfg(feature = "postgres")]
    pub db: Option<db::Db>,
}

impl App {
    pub fn new() -> Arc<App> {
        Arc::new(App {
            runs_created: AtomicU64::new(0),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            #[cfg(feature = "postgres")]
            db: None,
        })
    }

    /// An app whose runs are rows of `db`.
    #[cfg(feature = "postgres")]
    pub fn on_database(db: db::Db) -> Arc<App> {
        Arc::new(App {
            runs_created: AtomicU64::new(0),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            db: Some(db),
        })
    }

    /// An app whose generators wait until the test adds permits.
    pub fn gated() -> Arc<App> {
        Arc::new(App {
            runs_created: AtomicU64::new(0),
            gate: Semaphore::new(0),
            #[cfg(feature = "postgres")]
            db: None,
        })
    }

    async fn create_run(&self, request: &ScheduleRequest) -> ScheduleRun {
        let _permit = self.gate.acquire().await.expect("gate stays open");
        let id = self.runs_created.fetch_add(1, SeqCst) + 1;
        let shifts = shifts_of(request);
        ScheduleRun {
            id,
            team: request.team.clone(),
            week: request.week,
            shifts,
        }
    }
}

/// Who is calling: the `X-Tenant` header, standing in for the tenant a real service takes
/// from its authentication. Idempotency keys are scoped by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// The tenant of requests without an `X-Tenant` header.
pub const ANONYMOUS: &str = "anonymous";

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        let Some(value) = parts.headers.get("x-tenant") else {
            return Ok(Tenant(ANONYMOUS.to_owned()));
        };
        match value.to_str() {
            Ok(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Tenant(name.to_owned()))
            }
            _ => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "Invalid X-Tenant header",
                "the tenant must be visible ASCII",
            )),
        }
    }
}

/// The week's shifts, as the generator lays them out.
pub fn shifts_of(request: &ScheduleRequest) -> Vec<String> {
    (1..=7)
        .map(|day| format!("{} day {day} early/late/night", request.team))
        .collect()
}

/// A week that exists, or the error saying it does not.
pub fn check_week(request: &ScheduleRequest) -> Result<(), ApiError> {
    if request.week == 0 || request.week > 53 {
        return Err(ApiError::Invalid(format!(
            "week {} does not exist",
            request.week
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub enum ApiError {
    Idempotency(IdempotencyError),
    Invalid(String),
    /// The database failed; the run was not created (its transaction rolled back).
    Database(String),
}

impl From<IdempotencyError> for ApiError {
    fn from(error: IdempotencyError) -> Self {
        ApiError::Idempotency(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Idempotency(error) => error.into_response(),
            ApiError::Invalid(detail) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid schedule request",
                detail,
            )
            .into_response(),
            ApiError::Database(detail) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Database unavailable",
                detail,
            )
            .into_response(),
        }
    }
}

/// Generates the week's schedule: once per tenant and idempotency key, for 24 hours.
#[idempotent(key = key, scope = tenant, require_key, skip(app, tenant), ttl = "24h")]
pub async fn generate_schedule(
    app: &App,
    tenant: &Tenant,
    key: Option<&str>,
    request: &ScheduleRequest,
) -> Result<ScheduleRun, ApiError> {
    check_week(request)?;
    Ok(app.create_run(request).await)
}

/// Publishes a schedule: a duplicate arriving while the first is still running gets 409.
#[idempotent(key = key, scope = tenant, require_key, skip(app, tenant), in_flight = "reject")]
pub async fn publish_schedule(
    app: &App,
    tenant: &Tenant,
    key: Option<&str>,
    request: &ScheduleRequest,
) -> Result<ScheduleRun, ApiError> {
    Ok(app.create_run(request).await)
}

async fn generate(
    State(app): State<Arc<App>>,
    key: ScopedKey<Tenant>,
    Json(request): Json<ScheduleRequest>,
) -> Result<Json<ScheduleRun>, ApiError> {
    #[cfg(feature = "postgres")]
    if let Some(db) = &app.db {
        let run =
            db::generate_schedule_in_db(db, key.principal(), key.as_deref(), &request).await?;
        return Ok(Json(run));
    }
    Ok(Json(
        generate_schedule(&app, key.principal(), key.as_deref(), &request).await?,
    ))
}

async fn publish(
    State(app): State<Arc<App>>,
    key: ScopedKey<Tenant>,
    Json(request): Json<ScheduleRequest>,
) -> Result<Json<ScheduleRun>, ApiError> {
    Ok(Json(
        publish_schedule(&app, key.principal(), key.as_deref(), &request).await?,
    ))
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/schedule/generate", post(generate))
        .route("/api/schedule/publish", post(publish))
        .layer(middleware::from_fn(mark_replays))
        .with_state(app)
}

/// The in-memory app, or with `postgres` and `DATABASE_URL` the app on that database.
async fn app() -> Arc<App> {
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let crash = std::env::var("SCHEDULE_API_CRASH_AFTER_INSERT").is_ok_and(|v| v == "1");
        let db = db::Db::connect(&url, crash)
            .await
            .expect("connect to DATABASE_URL");
        println!("schedule runs and idempotency records in PostgreSQL");
        return App::on_database(db);
    }
    App::new()
}

#[tokio::main]
async fn main() {
    let address =
        std::env::var("SCHEDULE_API_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&address).await.expect("bind");
    println!("schedule API on http://{address}/api/schedule/generate");
    axum::serve(listener, router(app().await))
        .await
        .expect("serve");
}
