//! Why an `#[idempotent]` call did not run its body, in terms an HTTP API can answer with.

use std::fmt;

/// Why an idempotent call was refused. Each variant maps to the status code the IETF
/// Idempotency-Key draft (and Stripe) answer with: [`http_status`](Self::http_status).
///
/// An `#[idempotent]` function returns `Result<T, E>` with `E: From<IdempotencyError>`, so these
/// reach the caller through the function's own error type.
///
/// ```
/// use racefree_runtime::IdempotencyError;
///
/// let error = IdempotencyError::Conflict { key: "order-17".to_owned() };
/// assert_eq!(error.http_status(), 422);
/// assert_eq!(error.to_string(), "idempotency key `order-17` was already used with a different request");
/// assert_eq!(IdempotencyError::MissingKey.http_status(), 400);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The key was used before (or is in use right now) with a different request fingerprint.
    /// The body did not run and the stored outcome is untouched. HTTP 422.
    Conflict {
        /// The client's idempotency key.
        key: String,
    },
    /// A call with the same key and fingerprint is executing right now and the function rejects
    /// duplicates in flight (`in_flight = "reject"`), or waiting for it timed out. HTTP 409.
    InProgress {
        /// The client's idempotency key.
        key: String,
    },
    /// The function requires a key (`require_key`) and the call had none. HTTP 400.
    MissingKey,
    /// The idempotency store could not be reached or answered with an error; nothing ran.
    /// HTTP 503.
    StoreUnavailable {
        /// What the store reported.
        reason: String,
    },
}

impl IdempotencyError {
    /// The HTTP status an API should answer with: 422, 409, 400 or 503.
    pub fn http_status(&self) -> u16 {
        match self {
            IdempotencyError::Conflict { .. } => 422,
            IdempotencyError::InProgress { .. } => 409,
            IdempotencyError::MissingKey => 400,
            IdempotencyError::StoreUnavailable { .. } => 503,
        }
    }
}

impl fmt::Display for IdempotencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdempotencyError::Conflict { key } => {
                write!(
                    f,
                    "idempotency key `{key}` was already used with a different request"
                )
            }
            IdempotencyError::InProgress { key } => {
                write!(
                    f,
                    "a request with idempotency key `{key}` is still being processed"
                )
            }
            IdempotencyError::MissingKey => f.write_str("this request requires an idempotency key"),
            IdempotencyError::StoreUnavailable { reason } => {
                write!(f, "idempotency store unavailable: {reason}")
            }
        }
    }
}

impl std::error::Error for IdempotencyError {}
