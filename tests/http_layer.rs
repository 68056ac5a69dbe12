//! The tower layer and the configurable headers (feature `tower`; the axum tests also need
//! `axum`): `ReplayLayer` on a bare `tower::service_fn` service marks replayed `#[idempotent]`
//! outcomes with the header it is given and nothing else, the key is read from the header the
//! layer names (and only from it), a malformed key is a 400 problem naming that header, a
//! request dropped mid-flight leaves its retry fresh, and 32 concurrent requests with one key
//! through the layer execute once. Bodies that must still be running while duplicates arrive
//! wait on a gate the test opens, never on a sleep.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::LazyLock;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use racefree::http::{IdempotencyKey, KeyHeader, Problem, ReplayLayer, ReplayedHeader};
use racefree::{idempotent, IdempotencyError};
use tokio::sync::Semaphore;
use tower::{service_fn, Layer, Service, ServiceExt};

#[path = "support/common.rs"]
mod common;

use common::{guarded, released_together, until};

const X_KEY: KeyHeader = KeyHeader::new(HeaderName::from_static("x-idempotency-key"));
const STRIPE_REPLAYED: ReplayedHeader = ReplayedHeader::new(
    HeaderName::from_static("idempotent-replayed"),
    HeaderValue::from_static("true"),
);

fn post(header: &str, key: &str, body: &str) -> Request<String> {
    Request::post("/orders")
        .header(header, key)
        .body(body.to_owned())
        .unwrap()
}

/// What a bare tower service does around an `#[idempotent]` function: read the key (a bad one
/// is answered with its problem), call, answer the outcome or the error's problem.
async fn answer<F>(
    request: Request<String>,
    call: impl FnOnce(Option<String>, String) -> F,
) -> Result<Response<String>, Infallible>
where
    F: Future<Output = Result<String, IdempotencyError>>,
{
    let key = match IdempotencyKey::of(&request) {
        Ok(IdempotencyKey(key)) => key,
        Err(problem) => return Ok(problem.into()),
    };
    Ok(match call(key, request.into_body()).await {
        Ok(body) => Response::new(body),
        Err(error) => Problem::from(error).into(),
    })
}

fn header<'r, B>(response: &'r Response<B>, name: &str) -> Option<&'r str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

#[tokio::test]
async fn a_replay_is_marked_with_the_configured_header_and_a_first_execution_is_not() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key.as_deref())]
    async fn place_order(key: Option<String>, item: String) -> Result<String, IdempotencyError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        Ok(format!("order {n}: {item}"))
    }
    let service = ReplayLayer::new()
        .replayed_header(STRIPE_REPLAYED)
        .layer(service_fn(|request| answer(request, place_order)));

    let first = service
        .clone()
        .oneshot(post("idempotency-key", "order-1", "desk"))
        .await
        .unwrap();
    let second = service
        .clone()
        .oneshot(post("idempotency-key", "order-1", "desk"))
        .await
        .unwrap();

    assert_eq!(EXECUTIONS.load(SeqCst), 1);
    assert_eq!(
        (first.body().as_str(), second.body().as_str()),
        ("order 1: desk", "order 1: desk")
    );
    assert_eq!(
        header(&first, "idempotent-replayed"),
        None,
        "first execution"
    );
    assert_eq!(header(&second, "idempotent-replayed"), Some("true"));
    for response in [&first, &second] {
        assert_eq!(
            header(response, "idempotency-replayed"),
            None,
            "default header"
        );
    }
}

// A service that does its work in `call` and returns a ready future (a sync handler behind
// `service_fn`) would escape a layer that tracked only the returned future.
#[tokio::test]
async fn a_service_answering_inside_call_is_marked_too() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key)]
    fn cancel_order(key: Option<&str>) -> Result<String, IdempotencyError> {
        EXECUTIONS.fetch_add(1, SeqCst);
        Ok("cancelled".to_owned())
    }
    let service = ReplayLayer::new().layer(service_fn(|request: Request<String>| {
        let answer = match IdempotencyKey::of(&request) {
            Ok(key) => match cancel_order(key.as_deref()) {
                Ok(body) => Response::new(body),
                Err(error) => Problem::from(error).into(),
            },
            Err(problem) => problem.into(),
        };
        std::future::ready(Ok::<_, Infallible>(answer))
    }));

    let first = service
        .clone()
        .oneshot(post("idempotency-key", "cancel-1", ""))
        .await
        .unwrap();
    let second = service
        .clone()
        .oneshot(post("idempotency-key", "cancel-1", ""))
        .await
        .unwrap();

    assert_eq!(EXECUTIONS.load(SeqCst), 1);
    assert_eq!(header(&first, "idempotency-replayed"), None);
    assert_eq!(header(&second, "idempotency-replayed"), Some("true"));
}

#[tokio::test]
async fn the_configured_key_header_is_read_and_the_default_one_ignored() {
    let echo = |request: Request<String>| async move {
        let key = IdempotencyKey::of(&request).unwrap();
        Ok::<_, Infallible>(Response::new(format!("{:?}", key.as_deref())))
    };
    let configured = ReplayLayer::new().key_header(X_KEY).layer(service_fn(echo));
    let default = ReplayLayer::new().layer(service_fn(echo));

    let mut seen = Vec::new();
    for (service, header_name) in [
        (&configured, "x-idempotency-key"),
        (&configured, "idempotency-key"),
        (&default, "x-idempotency-key"),
        (&default, "idempotency-key"),
    ] {
        let response = service
            .clone()
            .oneshot(post(header_name, "order-7", ""))
            .await
            .unwrap();
        seen.push(response.into_body());
    }
    assert_eq!(
        seen,
        [r#"Some("order-7")"#, "None", "None", r#"Some("order-7")"#],
        "configured layer: X-Idempotency-Key, Idempotency-Key; default layer: the same two"
    );
}

#[tokio::test]
async fn an_over_long_key_is_a_400_problem_naming_the_configured_header() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    #[idempotent(key = key.as_deref())]
    async fn place_order(key: Option<String>, item: String) -> Result<String, IdempotencyError> {
        EXECUTIONS.fetch_add(1, SeqCst);
        Ok(item)
    }
    let service = ReplayLayer::new()
        .key_header(X_KEY)
        .layer(service_fn(|request| answer(request, place_order)));

    let longest = service
        .clone()
        .oneshot(post("x-idempotency-key", &"k".repeat(255), "desk"))
        .await
        .unwrap();
    assert_eq!(longest.status(), StatusCode::OK, "255 bytes are accepted");
    let too_long = service
        .clone()
        .oneshot(post("x-idempotency-key", &"k".repeat(256), "desk"))
        .await
        .unwrap();

    assert_eq!(EXECUTIONS.load(SeqCst), 1, "the over-long key ran nothing");
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        header(&too_long, "content-type"),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = serde_json::from_str(too_long.body()).unwrap();
    assert_eq!(problem["status"], 400);
    assert_eq!(problem["title"], "Invalid X-Idempotency-Key header");
    assert_eq!(
        problem["detail"],
        "the X-Idempotency-Key header must be 1 to 255 visible ASCII characters; it has 256 bytes"
    );
}

// 32 concurrent requests with one key x 10 rounds (a new key each round), the body held on a
// gate until the 31 duplicates wait for it. Every round: 1 execution, 32 identical bodies, 31
// marked replayed and the one that executed not marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_requests_with_one_key_execute_once_and_mark_31_replays() {
    const CALLERS: usize = 32;
    const ROUNDS: usize = 10;
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    static GATE: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(0));
    #[idempotent(key = key.as_deref())]
    async fn place_order(key: Option<String>, item: String) -> Result<String, IdempotencyError> {
        GATE.acquire().await.unwrap().forget();
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        Ok(format!("order {n}: {item}"))
    }
    let service = ReplayLayer::new()
        .key_header(X_KEY)
        .replayed_header(STRIPE_REPLAYED)
        .layer(service_fn(|request| answer(request, place_order)));

    for round in 0..ROUNDS {
        let executions_before = EXECUTIONS.load(SeqCst);
        let waits_before = place_order_idempotency_store().stats().waits;
        let key = format!("order-round-{round}");
        let requests = released_together(CALLERS, |_| {
            let mut service = service.clone();
            let request = post("x-idempotency-key", &key, "desk");
            async move {
                let response = service.ready().await.unwrap().call(request).await.unwrap();
                let replayed = header(&response, "idempotent-replayed").map(str::to_owned);
                (replayed, response.into_body())
            }
        });
        until("31 duplicates wait for the first", || {
            place_order_idempotency_store().stats().waits - waits_before == CALLERS as u64 - 1
        })
        .await;
        GATE.add_permits(1);
        let mut responses = Vec::new();
        for request in requests {
            responses.push(guarded("a request", request).await.unwrap());
        }

        let executed = EXECUTIONS.load(SeqCst) - executions_before;
        let replayed = responses
            .iter()
            .filter(|(replayed, _)| replayed.as_deref() == Some("true"))
            .count();
        let unmarked = responses
            .iter()
            .filter(|(replayed, _)| replayed.is_none())
            .count();
        let expected_body = format!("order {}: desk", executions_before + 1);
        let same_body = responses.iter().all(|(_, body)| *body == expected_body);
        assert_eq!(
            (executed, replayed, unmarked, same_body),
            (1, CALLERS - 1, 1, true),
            "round {round}: executions, replayed, not marked, identical bodies"
        );
    }
}

// A client that hangs up mid-request drops the layer's future while the body runs: the key must
// not be left looking done (the retry would be marked a replay of nothing) or taken (the retry
// would wait forever). 1 caller x 1 round, the body held on a gate that is never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_mid_flight_leaves_the_retry_fresh_and_unmarked() {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    static FINISHED: AtomicUsize = AtomicUsize::new(0);
    static NEVER_OPENED: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(0));
    #[idempotent(key = key.as_deref())]
    async fn charge(key: Option<String>, item: String) -> Result<String, IdempotencyError> {
        if STARTED.fetch_add(1, SeqCst) == 0 {
            let _ = NEVER_OPENED.acquire().await;
        }
        let n = FINISHED.fetch_add(1, SeqCst) + 1;
        Ok(format!("charge {n}: {item}"))
    }
    let service = ReplayLayer::new()
        .replayed_header(STRIPE_REPLAYED)
        .layer(service_fn(|request| answer(request, charge)));

    let hung_up = tokio::spawn(service.clone().oneshot(post(
        "idempotency-key",
        "charge-1",
        "desk",
    )));
    until("the first request's body runs", || {
        STARTED.load(SeqCst) == 1
    })
    .await;
    hung_up.abort();
    assert!(hung_up.await.unwrap_err().is_cancelled());

    let retry = guarded(
        "the retry",
        service
            .clone()
            .oneshot(post("idempotency-key", "charge-1", "desk")),
    )
    .await
    .unwrap();
    let again = guarded(
        "a duplicate of the retry",
        service
            .clone()
            .oneshot(post("idempotency-key", "charge-1", "desk")),
    )
    .await
    .unwrap();

    assert_eq!((STARTED.load(SeqCst), FINISHED.load(SeqCst)), (2, 1));
    assert_eq!(retry.body(), "charge 1: desk");
    assert_eq!(
        header(&retry, "idempotent-replayed"),
        None,
        "the retry executed"
    );
    assert_eq!(again.body(), "charge 1: desk");
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
}

#[cfg(feature = "axum")]
mod axum_router {
    use super::*;

    use axum::body::Body;
    use axum::extract::FromRequestParts;
    use axum::http::request::Parts;
    use axum::routing::post as route_post;
    use axum::Router;
    use racefree::axum::ScopedKey;

    struct Tenant(String);

    impl std::fmt::Display for Tenant {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Tenant {
        type Rejection = StatusCode;
        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
            let tenant = parts
                .headers
                .get("x-tenant")
                .ok_or(StatusCode::UNAUTHORIZED)?;
            Ok(Tenant(tenant.to_str().unwrap().to_owned()))
        }
    }

    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

    #[idempotent(key = key, scope = tenant, require_key, skip(tenant))]
    async fn open_ticket(
        tenant: &Tenant,
        key: Option<&str>,
        title: String,
    ) -> Result<String, IdempotencyError> {
        let n = EXECUTIONS.fetch_add(1, SeqCst) + 1;
        Ok(format!("ticket {n} of {tenant}: {title}"))
    }

    async fn open(key: ScopedKey<Tenant>, title: String) -> Result<String, IdempotencyError> {
        open_ticket(key.principal(), key.as_deref(), title).await
    }

    async fn echo(key: IdempotencyKey) -> String {
        format!("{:?}", key.as_deref())
    }

    fn app() -> Router {
        Router::new()
            .route("/tickets", route_post(open))
            .route("/echo", route_post(echo))
            .layer(
                ReplayLayer::new()
                    .key_header(X_KEY)
                    .replayed_header(ReplayedHeader::new(
                        HeaderName::from_static("x-idempotency-replayed"),
                        HeaderValue::from_static("true"),
                    )),
            )
    }

    async fn send(path: &str, key_header: &str, key: &str) -> (StatusCode, Option<String>, String) {
        let request = Request::post(path)
            .header("x-tenant", "ward-3")
            .header(key_header, key)
            .body(Body::from("printer jam"))
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        let status = response.status();
        let replayed = header(&response, "x-idempotency-replayed").map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, replayed, String::from_utf8(body.to_vec()).unwrap())
    }

    // One test, because the counter is the function's: the steps share it, in order.
    #[tokio::test]
    async fn the_router_layer_configures_the_extractors_and_marks_replays() {
        let first = send("/tickets", "x-idempotency-key", "ticket-1").await;
        let second = send("/tickets", "x-idempotency-key", "ticket-1").await;
        assert_eq!(EXECUTIONS.load(SeqCst), 1);
        let body = "ticket 1 of ward-3: printer jam".to_owned();
        assert_eq!(first, (StatusCode::OK, None, body.clone()));
        assert_eq!(second, (StatusCode::OK, Some("true".to_owned()), body));

        // Under this layer the default header is not the key: the key is missing.
        let (status, _, problem) = send("/tickets", "idempotency-key", "ticket-2").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(problem.contains("Idempotency key required"), "{problem}");
        assert_eq!(EXECUTIONS.load(SeqCst), 1, "no key, no execution");

        let (status, _, problem) = send("/tickets", "x-idempotency-key", &"k".repeat(256)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let problem: serde_json::Value = serde_json::from_str(&problem).unwrap();
        assert_eq!(
            problem["detail"],
            "the X-Idempotency-Key header must be 1 to 255 visible ASCII characters; it has 256 bytes"
        );
        assert_eq!(EXECUTIONS.load(SeqCst), 1, "an over-long key, no execution");

        let (_, _, seen) = send("/echo", "x-idempotency-key", "echo-1").await;
        assert_eq!(seen, r#"Some("echo-1")"#, "IdempotencyKey reads it too");
    }
}
