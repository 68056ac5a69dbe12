//! HTTP around `#[idempotent]` (feature `tower`; feature `axum` adds the axum pieces): what an
//! API guarded by the attribute needs around its handler, so that users write the handler and
//! the attribute, nothing else.
//!
//! - [`ReplayLayer`]: a tower layer for any `http::Request`/`http::Response` service (hyper,
//!   tonic, tower-http stacks, axum). It runs each call in a [`replay::track`] scope and marks
//!   the response of a replayed outcome with a [`ReplayedHeader`] (`Idempotency-Replayed: true`
//!   unless configured: Stripe's `Idempotent-Replayed`, `X-Idempotency-Replayed`, …). It also
//!   tells the extractors below it which [`KeyHeader`] carries the key (`Idempotency-Key`
//!   unless configured: `X-Idempotency-Key`, …), through the request's extensions (why, and
//!   what it costs: [`KeyHeader`]).
//! - [`IdempotencyKey`]: the key header of a request (400 if malformed), read with
//!   [`IdempotencyKey::of`] or, in axum, as an extractor. Without a scope, keys are *global*:
//!   two clients sending the same key share one record, so the second one gets the first one's
//!   stored outcome (or a 422 that tells it the key is taken).
//! - `ScopedKey<P>` (axum): the key bound to the caller `P` (your own extractor for the
//!   authenticated user or tenant): pass `scope = key.principal()` and two callers who pick the
//!   same key get two records. **Use this one for any API with more than one client.**
//! - [`Problem`]: `application/problem+json`, with the IETF draft's status code for every
//!   [`IdempotencyError`] (400 missing key, 409 in progress with `Retry-After`, 422 reuse with a
//!   different body, 503 store unavailable); `IdempotencyError` and `Problem` are axum
//!   `IntoResponse`.
//! - `mark_replays` (axum): the same marking as an axum `from_fn` middleware, default headers
//!   only.
//!
//! What is promised: a response is marked exactly when the last `#[idempotent]` call to finish
//! inside the service's `call` and its future returned a stored outcome (the rules of
//! [`replay`]); a fresh execution, a call refused with an error, and a response made without
//! any `#[idempotent]` call are not marked. What is not: work the service hands to a spawned
//! task is outside the scope, so its replays do not mark the response; and a route the layer
//! does not wrap reads the default key header.
//!
//! # Outside axum: a plain tower service
//!
//! The handler reads the key with [`IdempotencyKey::of`], answers a malformed one with its
//! [`Problem`], and calls the `#[idempotent]` function; the layer does the rest. (The
//! `record` call below stands in for what an `#[idempotent]` function does when it returns a
//! stored outcome: this crate's examples cannot use the attribute itself.)
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{HeaderName, HeaderValue, Request, Response};
//! use racefree_runtime::http::{IdempotencyKey, KeyHeader, ReplayLayer, ReplayedHeader};
//! use racefree_runtime::replay::{self, Replay};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! async fn create_order(request: Request<String>) -> Result<Response<String>, Infallible> {
//!     let key = match IdempotencyKey::of(&request) {
//!         Ok(key) => key,
//!         Err(problem) => return Ok(problem.into()),
//!     };
//!     // An `#[idempotent(key = key.as_deref())]` call that finds the key's outcome stored:
//!     replay::record(Replay::Replayed);
//!     Ok(Response::new(format!("order for key {:?}", key.as_deref())))
//! }
//!
//! let service = ReplayLayer::new()
//!     .key_header(KeyHeader::new(HeaderName::from_static("x-idempotency-key")))
//!     .replayed_header(ReplayedHeader::new(
//!         HeaderName::from_static("idempotent-replayed"),
//!         HeaderValue::from_static("true"),
//!     ))
//!     .layer(service_fn(create_order));
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let request = Request::post("/orders")
//!     .header("x-idempotency-key", "order-17")
//!     .body(String::new())
//!     .unwrap();
//! let response = service.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.headers()["idempotent-replayed"], "true");
//! assert_eq!(response.body(), r#"order for key Some("order-17")"#);
//!
//! let too_long = "k".repeat(300);
//! let request = Request::post("/orders").header("x-idempotency-key", too_long).body(String::new()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 400);
//! assert!(response.body().contains("the X-Idempotency-Key header must be 1 to 255"));
//! # });
//! ```
//!
//! # In axum
//!
//! The same layer on the router (after the last `route`: `Router::layer` wraps only the routes
//! added before it); the extractors read the configured key header. `mark_replays` remains
//! for routers that keep the default headers.
//!
#![cfg_attr(feature = "axum", doc = "```")]
#![cfg_attr(not(feature = "axum"), doc = "```ignore")]
//! use axum::extract::FromRequestParts;
//! use axum::http::{request::Parts, HeaderName, StatusCode};
//! use axum::{routing::post, Router};
//! use racefree_runtime::http::{KeyHeader, ReplayLayer, ScopedKey};
//!
//! /// The application's own authentication, standing in here for a real one.
//! #[derive(Debug)]
//! struct Account(String);
//!
//! impl std::fmt::Display for Account {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) }
//! }
//!
//! impl<S: Send + Sync> FromRequestParts<S> for Account {
//!     type Rejection = StatusCode;
//!     async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
//!         let token = parts.headers.get("authorization").ok_or(StatusCode::UNAUTHORIZED)?;
//!         Ok(Account(token.to_str().map_err(|_| StatusCode::UNAUTHORIZED)?.to_owned()))
//!     }
//! }
//!
//! // #[idempotent(key = key.as_deref(), scope = key.principal())] on the function it calls
//! async fn create(key: ScopedKey<Account>) -> String {
//!     format!("key {:?} of {}", key.as_deref(), key.principal())
//! }
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(create))
//!     .layer(ReplayLayer::new().key_header(KeyHeader::new(HeaderName::from_static("x-idempotency-key"))));
//!
//! // Or, with the default headers, the middleware:
//! let app: Router = Router::new()
//!     .route("/orders", post(create))
//!     .layer(axum::middleware::from_fn(racefree_runtime::http::mark_replays));
//! ```
//!
//! [`replay::track`]: crate::replay::track
//! [`replay`]: crate::replay
//! [`IdempotencyError`]: crate::IdempotencyError

mod extract;
mod layer;
mod problem;

pub use extract::{IdempotencyKey, KeyHeader, IDEMPOTENCY_KEY, MAX_KEY_LEN};
#[cfg(feature = "axum")]
pub use extract::{ScopedKey, MAX_PRINCIPAL_LEN};
pub use layer::{ReplayFuture, ReplayLayer, ReplayService, ReplayedHeader, IDEMPOTENCY_REPLAYED};
pub use problem::{Problem, RETRY_AFTER_SECS};

#[cfg(feature = "axum")]
use crate::idempotent::replay::Replay;

/// axum middleware: runs the handler in a replay-tracking scope and marks a response whose
/// `#[idempotent]` call returned a stored outcome with `Idempotency-Replayed: true`; the same
/// code as [`ReplayLayer::new()`], which configures the headers.
///
/// `Router::new().route(...).layer(axum::middleware::from_fn(mark_replays))`
#[cfg(feature = "axum")]
pub async fn mark_replays(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (mut response, replay) = layer::Tracked::new(next.run(request), Replay::NotRecorded).await;
    ReplayedHeader::default().mark(&mut response, replay);
    response
}
