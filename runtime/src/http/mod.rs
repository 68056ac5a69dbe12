//! axum integration (feature `axum`): what an HTTP API guarded by `#[idempotent]` needs around
//! the handler, so that users write the handler and the attribute, nothing else.
//!
//! - [`ScopedKey<P>`]: the `Idempotency-Key` header bound to the caller `P` (your own extractor
//!   for the authenticated user or tenant): pass `scope = key.principal()` and two callers who
//!   pick the same key get two records. **Use this one for any API with more than one client.**
//! - [`IdempotencyKey`]: the bare header (400 if malformed). Without a scope, keys are
//!   *global*: two clients sending the same key share one record, so the second one gets the
//!   first one's stored outcome (or a 422 that tells it the key is taken).
//! - `impl IntoResponse for IdempotencyError`: the IETF draft's status codes as
//!   `application/problem+json` (400 missing key, 409 in progress with `Retry-After`, 422 reuse
//!   with a different body, 503 store unavailable);
//! - [`mark_replays`]: middleware that answers `Idempotency-Replayed: true` when the handler's
//!   `#[idempotent]` call returned a stored outcome (it wraps the handler in
//!   [`replay::track`]).
//!
//! ```
//! use axum::extract::FromRequestParts;
//! use axum::http::{request::Parts, StatusCode};
//! use axum::{middleware, routing::post, Router};
//! use racefree_runtime::http::{mark_replays, ScopedKey};
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
//! let app: Router = Router::new().route("/orders", post(create)).layer(middleware::from_fn(mark_replays));
//! ```

use axum::extract::{FromRequestParts, Request};
use axum::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::idempotent::replay;
use crate::idempotent::IdempotencyError;

/// The request header carrying the client's idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header set on replayed outcomes.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");
/// The longest key accepted, in bytes (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;
/// What `Retry-After` says on a 409 for a request still in progress, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The request's `Idempotency-Key` header, if it has one.
///
/// A header that is empty, longer than [`MAX_KEY_LEN`] bytes or not visible ASCII is rejected
/// with a 400 problem response, so a key that reaches the function is always usable.
///
/// The key alone is global: every client that sends it shares its record. Bind it to the
/// caller with [`ScopedKey`] (or `scope = <the caller>` on the attribute).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl IdempotencyKey {
    /// The key as `Option<&str>`, the form `#[idempotent(key = ...)]` takes.
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(&IDEMPOTENCY_KEY) else {
            return Ok(IdempotencyKey(None));
        };
        let bad = |detail: String| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "Invalid Idempotency-Key header",
                detail,
            )
        };
        let key = value
            .to_str()
            .map_err(|_| bad("the key must be visible ASCII".to_owned()))?;
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(format!(
                "the key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
            )));
        }
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}

/// The longest principal accepted by [`ScopedKey`], in bytes (as `P` displays it).
pub const MAX_PRINCIPAL_LEN: usize = 255;

/// The request's `Idempotency-Key` header bound to the caller who sent it: `P` is the
/// application's own extractor for the authenticated user, account or tenant, and must
/// `Display` as a stable name of it.
///
/// Pass both to the attribute, `#[idempotent(key = key.as_deref(), scope = key.principal())]`:
/// records are then per caller, so a key another caller picked (by accident, or because it
/// showed up in a log) neither replays that caller's outcome nor answers 422. `P` runs first;
/// its rejection (say, 401) is the response when it fails. A principal longer than
/// [`MAX_PRINCIPAL_LEN`] bytes is a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedKey<P> {
    principal: P,
    key: Option<String>,
}

impl<P> ScopedKey<P> {
    /// The caller the key belongs to: the attribute's `scope`.
    pub fn principal(&self) -> &P {
        &self.principal
    }

    /// The key as `Option<&str>`, the form `#[idempotent(key = ...)]` takes.
    pub fn as_deref(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The principal and the key.
    pub fn into_parts(self) -> (P, Option<String>) {
        (self.principal, self.key)
    }
}

impl<S, P> FromRequestParts<S> for ScopedKey<P>
where
    S: Send + Sync,
    P: FromRequestParts<S> + std::fmt::Display + Send,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = P::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let len = principal.to_string().len();
        if len > MAX_PRINCIPAL_LEN {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "Caller name too long",
                format!(
                    "the caller is named in {len} bytes; at most {MAX_PRINCIPAL_LEN} are accepted"
                ),
            )
            .into_response());
        }
        let IdempotencyKey(key) = IdempotencyKey::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(ScopedKey { principal, key })
    }
}

/// An `application/problem+json` response (RFC 9457).
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem with this status, short title and detail.
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<&IdempotencyError> for Problem {
    fn from(error: &IdempotencyError) -> Self {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let title = match error {
            IdempotencyError::Conflict { .. } => "Idempotency key reused with a different request",
            IdempotencyError::InProgress { .. } => {
                "A request with this idempotency key is in progress"
            }
            IdempotencyError::MissingKey => "Idempotency-Key header required",
            IdempotencyError::KeyTooLong { .. } => "Idempotency key too long",
            IdempotencyError::OutcomeUnknown { .. } => "Outcome of this request is unknown",
            IdempotencyError::LeaseLost { .. } => "Request lost its claim on the idempotency key",
            IdempotencyError::OutcomeNotStored { .. } => {
                "Request executed, but its outcome cannot be replayed"
            }
            IdempotencyError::Undecodable { .. } => "Stored outcome cannot be decoded",
            IdempotencyError::Reentrant { .. } => "Idempotency key re-entered",
            IdempotencyError::WouldDeadlock { .. } => "Idempotent call would deadlock its runtime",
            _ => "Idempotency store unavailable",
        };
        let problem = Problem::new(status, title, error.to_string());
        match error {
            IdempotencyError::InProgress { .. } => problem.retry_after(RETRY_AFTER_SECS),
            _ => problem,
        }
    }
}

impl IntoResponse for IdempotencyError {
    fn into_response(self) -> Response {
        Problem::from(&self).into_response()
    }
}

/// Middleware: runs the handler in a replay-tracking scope and marks a response whose
/// `#[idempotent]` call returned a stored outcome with `Idempotency-Replayed: true`.
///
/// `Router::new().route(...).layer(axum::middleware::from_fn(mark_replays))`
pub async fn mark_replays(request: Request, next: Next) -> Response {
    let (mut response, replay) = replay::track(next.run(request)).await;
    if replay.is_replayed() {
        response
            .headers_mut()
            .insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}
