//! The schedule API on PostgreSQL over real HTTP: the run's row and the idempotency record
//! commit in one transaction. Each test gets a fresh schema on 127.0.0.1:5432 (dropped at the
//! end); the crash drill runs in a child process (this test binary again) that aborts right
//! after its `INSERT`.

#[path = "../examples/schedule_api.rs"]
mod schedule_api;

use std::process::Command;
use std::sync::Arc;

use reqwest::StatusCode;
use schedule_api::db::Db;
use schedule_api::{App, ScheduleRequest, Tenant};
use sqlx::Executor;

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of this test's own, dropped when the value is.
struct Schema(String);

impl Schema {
    async fn new(name: &str) -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!("rf_api_{name}_{}_{nanos}", std::process::id());
        let admin = sqlx::PgPool::connect(PG).await.unwrap();
        admin
            .execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        admin.close().await;
        Schema(schema)
    }

    fn url(&self) -> String {
        format!("{PG}?options=-c%20search_path%3D{}", self.0)
    }

    async fn drop_it(self) {
        let admin = sqlx::PgPool::connect(PG).await.unwrap();
        admin
            .execute(format!("DROP SCHEMA {} CASCADE", self.0).as_str())
            .await
            .unwrap();
        admin.close().await;
    }
}

async fn serve(app: Arc<App>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, schedule_api::router(app))
            .await
            .unwrap()
    });
    format!("http://{address}")
}

fn ward(week: u32) -> ScheduleRequest {
    ScheduleRequest {
        team: "ward-3".to_owned(),
        week,
    }
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    key: &str,
) -> (StatusCode, String) {
    let response = client
        .post(format!("{base}/api/schedule/generate"))
        .header("Idempotency-Key", key)
        .header("X-Tenant", tenant)
        .json(&ward(48))
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

// 50 concurrent identical POSTs with one key: one row in schedule_runs, 50 equal bodies; a
// second tenant with the same key gets its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_insert_one_row_per_tenant() {
    const CALLERS: usize = 50;
    let schema = Schema::new("concurrent").await;
    let app = App::on_database(Db::connect(&schema.url(), false).await.unwrap());
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, base, barrier) = (client.clone(), base.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                post(&client, &base, "acme", "gen-1").await
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        bodies.push(body);
    }
    let db = app.db.as_ref().unwrap();
    assert_eq!(db.runs_of("acme").await, 1, "one schedule run row");
    assert!(bodies.iter().all(|b| b == &bodies[0]), "equal bodies");
    let (status, other) = post(&client, &base, "globex", "gen-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(other, bodies[0], "another tenant's run");
    assert_eq!(db.runs_of("globex").await, 1);
    db.pool.close().await;
    schema.drop_it().await;
}

const CHILD: &str = "SCHEDULE_API_DB_CHILD_URL";

/// The crash drill: a child process inserts its run and aborts before anything commits; the
/// retry executes once: exactly one row, and a second retry replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_insert_leaves_no_row_and_the_retry_executes_once() {
    if let Ok(url) = std::env::var(CHILD) {
        let db = Db::connect(&url, true).await.unwrap();
        let tenant = Tenant("acme".to_owned());
        let _ = schedule_api::db::generate_schedule_in_db(&db, &tenant, Some("crash-1"), &ward(48))
            .await;
        unreachable!("the drill aborts after the INSERT");
    }
    let schema = Schema::new("crash").await;
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_crash_after_the_insert_leaves_no_row_and_the_retry_executes_once",
            "--nocapture",
        ])
        .env(CHILD, schema.url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(
        !child.status.success()
            && stderr.contains("crash drill: aborting after inserting schedule run"),
        "the child must abort right after its INSERT: {}\n{stderr}",
        child.status
    );
    let app = App::on_database(Db::connect(&schema.url(), false).await.unwrap());
    let db = app.db.as_ref().unwrap();
    assert_eq!(
        db.runs_of("acme").await,
        0,
        "the aborted run rolled back with its claim"
    );
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let (first, body) = post(&client, &base, "acme", "crash-1").await;
    assert_eq!(first, StatusCode::OK, "{body}");
    let (again, replayed) = post(&client, &base, "acme", "crash-1").await;
    assert_eq!((again, &replayed), (StatusCode::OK, &body));
    assert_eq!(
        db.runs_of("acme").await,
        1,
        "exactly one run after the crash and two retries"
    );
    db.pool.close().await;
    schema.drop_it().await;
}
