//! `application/problem+json` responses (RFC 9457), and the IETF Idempotency-Key draft's status
//! code for each [`IdempotencyError`]. Plain `http` types: a tower service turns a [`Problem`]
//! into its own `http::Response<B>` with `.into()`; with feature `axum` it is also `IntoResponse`.

use std::borrow::Cow;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::idempotent::IdempotencyError;

/// What `Retry-After` says on a 409 for a request still in progress, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An `application/problem+json` response (RFC 9457).
///
/// Any response body that can be made from a `String` takes it, so a tower service without
/// axum answers with one as easily as an axum handler does:
///
/// ```
/// use http::{Response, StatusCode};
/// use racefree_runtime::http::Problem;
///
/// let problem = Problem::new(StatusCode::BAD_REQUEST, "Invalid order", "the order has no items");
/// let response: Response<String> = problem.into();
/// assert_eq!(response.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
/// assert_eq!(body["detail"], "the order has no items");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    title: Cow<'static, str>,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem with this status, short title and detail.
    pub fn new(
        status: StatusCode,
        title: impl Into<Cow<'static, str>>,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            title: title.into(),
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

    /// The short, human-readable summary: the same for every occurrence of this kind of problem.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// What went wrong with this request.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn body(&self) -> String {
        serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        })
        .to_string()
    }
}

impl<B: From<String>> From<Problem> for Response<B> {
    fn from(problem: Problem) -> Self {
        let mut response = Response::new(B::from(problem.body()));
        *response.status_mut() = problem.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = problem.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<&IdempotencyError> for Problem {
    fn from(error: &IdempotencyError) -> Self {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Titles name no header: the error does not know which one the API reads its key from
        // (see `KeyHeader`), and a title naming the wrong one would send clients astray.
        let title = match error {
            IdempotencyError::Conflict { .. } => "Idempotency key reused with a different request",
            IdempotencyError::InProgress { .. } => {
                "A request with this idempotency key is in progress"
            }
            IdempotencyError::MissingKey => "Idempotency key required",
            IdempotencyError::KeyTooLong { .. } => "Idempotency key too long",
            IdempotencyError::OutcomeUnknown { .. } => "Outcome of this request is unknown",
            IdempotencyError::LeaseLost { .. } => "Request lost its claim on the idempotency key",
            IdempotencyError::OutcomeNotStored { .. } => {
                "Request executed, but its outcome cannot be replayed"
            }
            IdempotencyError::Undecodable { .. } => "Stored outcome cannot be decoded",
            IdempotencyError::Reentrant { .. } => "Idempotency key re-entered",
            IdempotencyError::WouldDeadlock { .. } => "Idempotent call would deadlock its runtime",
            IdempotencyError::SharedRecords { .. } => "Idempotent functions share their records",
            _ => "Idempotency store unavailable",
        };
        let problem = Problem::new(status, title, error.to_string());
        match error {
            IdempotencyError::InProgress { .. } => problem.retry_after(RETRY_AFTER_SECS),
            _ => problem,
        }
    }
}

impl From<IdempotencyError> for Problem {
    fn from(error: IdempotencyError) -> Self {
        Problem::from(&error)
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        self.into()
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for IdempotencyError {
    fn into_response(self) -> axum::response::Response {
        Problem::from(&self).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_in_progress_is_told_when_to_retry() {
        let key = "k".to_owned();
        let response: Response<String> = Problem::from(IdempotencyError::InProgress { key }).into();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
