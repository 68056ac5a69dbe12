//! The schedule API over real HTTP on 127.0.0.1 with a real client (reqwest): the IETF
//! Idempotency-Key draft's behaviour end to end. Every test uses its own keys.

#[path = "../examples/schedule_api.rs"]
mod schedule_api;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use reqwest::StatusCode;
use schedule_api::{generate_schedule_idempotency_store, App, ScheduleRequest, ScheduleRun};

#[path = "support/common.rs"]
mod common;

use common::until;

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

fn fresh_key(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, SeqCst)
    )
}

fn ward(week: u32) -> ScheduleRequest {
    ScheduleRequest {
        team: "ward-3".to_owned(),
        week,
    }
}

// 100 concurrent identical POSTs with one key, the generator held until all 99 duplicates are
// waiting for it: 1 schedule run, 100 identical bodies, 99 of them flagged replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_identical_posts_create_one_run() {
    const CALLERS: usize = 100;
    let app = App::gated();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("generate");
    let waits_before = generate_schedule_idempotency_store().stats().waits;
    let requests: Vec<_> = (0..CALLERS)
        .map(|_| {
            let request = client
                .post(format!("{base}/api/schedule/generate"))
                .header("Idempotency-Key", &key)
                .json(&ward(48));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                let replayed = response
                    .headers()
                    .get("idempotency-replayed")
                    .map(|v| v.to_str().unwrap().to_owned());
                (response.status(), replayed, response.text().await.unwrap())
            })
        })
        .collect();
    until("99 duplicates wait for the first", || {
        generate_schedule_idempotency_store().stats().waits - waits_before == 99
    })
    .await;
    app.gate.add_permits(1);
    let mut responses = Vec::new();
    for request in requests {
        responses.push(request.await.unwrap());
    }
    assert_eq!(app.runs_created.load(SeqCst), 1, "schedule runs created");
    assert!(responses
        .iter()
        .all(|(status, _, _)| *status == StatusCode::OK));
    let first_body = &responses[0].2;
    assert!(
        responses.iter().all(|(_, _, body)| body == first_body),
        "bodies differ"
    );
    let run: ScheduleRun = serde_json::from_str(first_body).unwrap();
    assert_eq!((run.id, run.week), (1, 48));
    let replayed = responses
        .iter()
        .filter(|(_, flag, _)| flag.as_deref() == Some("true"))
        .count();
    assert_eq!(replayed, CALLERS - 1, "replayed responses");
}

// A retry after completion replays; a fresh key executes again.
#[tokio::test]
async fn a_retry_after_completion_is_replayed() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("retry");
    let post = || {
        client
            .post(format!("{base}/api/schedule/generate"))
            .header("Idempotency-Key", &key)
            .json(&ward(12))
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        first.headers().get("idempotency-replayed").is_none(),
        "the first response is not a replay"
    );
    let first = first.text().await.unwrap();
    let retry = post().await.unwrap();
    assert_eq!(retry.headers().get("idempotency-replayed").unwrap(), "true");
    assert_eq!(retry.text().await.unwrap(), first);
    assert_eq!(app.runs_created.load(SeqCst), 1);
}

// No key on a route that requires one → 400 problem+json, nothing runs.
#[tokio::test]
async fn missing_key_is_400() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let response = reqwest::Client::new()
        .post(format!("{base}/api/schedule/generate"))
        .json(&ward(3))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 400);
    assert_eq!(app.runs_created.load(SeqCst), 0);
}

// A malformed key (over 255 bytes) → 400 before anything runs.
#[tokio::test]
async fn oversized_key_is_400() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let response = reqwest::Client::new()
        .post(format!("{base}/api/schedule/generate"))
        .header("Idempotency-Key", "k".repeat(256))
        .json(&ward(3))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.runs_created.load(SeqCst), 0);
}

// The same key with a different body → 422; the stored outcome still replays.
#[tokio::test]
async fn same_key_different_body_is_422() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("conflict");
    let post = |week| {
        client
            .post(format!("{base}/api/schedule/generate"))
            .header("Idempotency-Key", &key)
            .json(&ward(week))
            .send()
    };
    let first = post(20).await.unwrap().text().await.unwrap();
    let conflict = post(21).await.unwrap();
    assert_eq!(conflict.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    let again = post(20).await.unwrap();
    assert_eq!(again.headers()["idempotency-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first);
    assert_eq!(app.runs_created.load(SeqCst), 1);
}

// While a publish with key K runs, a duplicate → 409 with Retry-After; the first completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_in_reject_mode_is_409() {
    let app = App::gated();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("publish");
    let post = || {
        client
            .post(format!("{base}/api/schedule/publish"))
            .header("Idempotency-Key", &key)
            .json(&ward(30))
            .send()
    };
    let first = tokio::spawn(post());
    until("the first publish runs", || {
        schedule_api::publish_schedule_idempotency_store().in_flight() == 1
    })
    .await;
    let duplicate = post().await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(duplicate.headers()["retry-after"], "1");
    assert_eq!(
        duplicate.headers()["content-type"],
        "application/problem+json"
    );
    app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(app.runs_created.load(SeqCst), 1);
}

/// One POST to the generator as `tenant` (no `X-Tenant` header for `None`).
async fn generate_as(
    client: &reqwest::Client,
    base: &str,
    tenant: Option<&str>,
    key: &str,
    week: u32,
) -> (StatusCode, bool, String) {
    let mut request = client
        .post(format!("{base}/api/schedule/generate"))
        .header("Idempotency-Key", key)
        .json(&ward(week));
    if let Some(tenant) = tenant {
        request = request.header("X-Tenant", tenant);
    }
    let response = request.send().await.unwrap();
    let replayed = response.headers().get("idempotency-replayed").is_some();
    (response.status(), replayed, response.text().await.unwrap())
}

// Two tenants, one key, one body: two runs, and each tenant's retry replays its own run only.
#[tokio::test]
async fn two_tenants_with_one_key_get_two_runs_and_replay_only_their_own() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("shared");
    let (status_a, replayed_a, run_a) = generate_as(&client, &base, Some("acme"), &key, 40).await;
    let (status_b, replayed_b, run_b) = generate_as(&client, &base, Some("globex"), &key, 40).await;
    assert_eq!((status_a, status_b), (StatusCode::OK, StatusCode::OK));
    assert!(
        !replayed_a && !replayed_b,
        "each tenant's first request executes"
    );
    assert_eq!(app.runs_created.load(SeqCst), 2, "one run per tenant");
    assert_ne!(run_a, run_b, "globex must not receive acme's run");
    let (_, again_a, replay_a) = generate_as(&client, &base, Some("acme"), &key, 40).await;
    let (_, again_b, replay_b) = generate_as(&client, &base, Some("globex"), &key, 40).await;
    assert!(again_a && again_b, "retries replay");
    assert_eq!(
        (replay_a, replay_b),
        (run_a, run_b),
        "each replays its own run"
    );
    assert_eq!(app.runs_created.load(SeqCst), 2);
}

// The same key with different bodies across tenants is no conflict: no 422 tells one tenant
// that another uses the key.
#[tokio::test]
async fn another_tenants_key_with_another_body_is_not_a_conflict() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let key = fresh_key("probe");
    let (first, _, _) = generate_as(&client, &base, Some("acme"), &key, 7).await;
    let (second, replayed, _) = generate_as(&client, &base, Some("mallory"), &key, 8).await;
    let (anonymous, _, _) = generate_as(&client, &base, None, &key, 9).await;
    assert_eq!(
        (first, second, anonymous),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK)
    );
    assert!(!replayed);
    assert_eq!(app.runs_created.load(SeqCst), 3);
}

// A tenant name over the bound is refused with 400 before anything runs.
#[tokio::test]
async fn oversized_tenant_is_400() {
    let app = App::new();
    let base = serve(app.clone()).await;
    let client = reqwest::Client::new();
    let tenant = "t".repeat(racefree::axum::MAX_PRINCIPAL_LEN + 1);
    let (status, _, body) = generate_as(&client, &base, Some(&tenant), &fresh_key("long"), 5).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(app.runs_created.load(SeqCst), 0);
}
