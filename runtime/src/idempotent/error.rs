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
    /// The body ran, but whether its outcome was recorded (and, for a SQL store, whether its
    /// transaction committed) is unknown: the connection broke after the final write was sent.
    /// A retry with the same key replays the outcome if it was recorded; never assume either
    /// way. HTTP 500.
    OutcomeUnknown {
        /// The client's idempotency key.
        key: String,
        /// What the store reported.
        reason: String,
    },
    /// This caller's claim on the key ran out (its lease expired while the body ran, e.g. the
    /// process froze) and another caller may have taken the key over: this call's outcome was
    /// not recorded and must not be reported as the key's result. HTTP 500.
    LeaseLost {
        /// The client's idempotency key.
        key: String,
    },
    /// The body ran and finished, but its outcome cannot be stored: too large for the store,
    /// not encodable, or encoded to JSON that does not decode back into its type (a NaN float,
    /// which serde_json writes as `null`), so that no replay could return it. With Redis the
    /// key is done: later calls get this error instead of executing again. With a SQL store the
    /// body's effect rolled back with it, and the key is free. HTTP 500.
    OutcomeNotStored {
        /// The client's idempotency key.
        key: String,
        /// Why the outcome could not be stored.
        reason: String,
    },
    /// The stored record for the key cannot be decoded (written by an incompatible version, or
    /// for another outcome type). Nothing ran: a record that exists is never re-executed.
    /// HTTP 500.
    Undecodable {
        /// The client's idempotency key.
        key: String,
        /// What failed to decode.
        reason: String,
    },
    /// The call re-entered a key that the code calling it is executing (an `#[idempotent]`
    /// body calling itself with its own key): waiting would never end. HTTP 500.
    Reentrant {
        /// The client's idempotency key.
        key: String,
    },
    /// A sync call found its key being executed by an async call that only its own thread can
    /// run (an async task of this thread's current-thread runtime): blocking would wait
    /// forever, so it was refused. Nothing ran. Make the caller async, or call it from a
    /// multi-thread runtime or another thread. HTTP 500.
    WouldDeadlock {
        /// The client's idempotency key.
        key: String,
    },
    /// Two `#[idempotent]` functions that share a store also share their record path (same
    /// module, `Self` type and name, e.g. same-named functions in sibling blocks of one
    /// function) and have no `scope`: their records would mix, so the second one to run is
    /// refused. Nothing ran. Give each a distinct `scope = "..."`. HTTP 500.
    SharedRecords {
        /// The record path both functions have.
        path: String,
        /// Where the function that ran first is defined (`file:line:column`).
        first: String,
        /// Where this function is defined.
        second: String,
    },
    /// The key or scope is longer than the store accepts. Nothing ran. HTTP 400.
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most bytes accepted.
        max: usize,
    },
}

impl IdempotencyError {
    /// The HTTP status an API should answer with: 422, 409, 400, 503 or 500.
    pub fn http_status(&self) -> u16 {
        match self {
            IdempotencyError::Conflict { .. } => 422,
            IdempotencyError::InProgress { .. } => 409,
            IdempotencyError::MissingKey | IdempotencyError::KeyTooLong { .. } => 400,
            IdempotencyError::StoreUnavailable { .. } => 503,
            IdempotencyError::OutcomeUnknown { .. }
            | IdempotencyError::LeaseLost { .. }
            | IdempotencyError::OutcomeNotStored { .. }
            | IdempotencyError::Undecodable { .. }
            | IdempotencyError::Reentrant { .. }
            | IdempotencyError::WouldDeadlock { .. }
            | IdempotencyError::SharedRecords { .. } => 500,
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
            IdempotencyError::OutcomeUnknown { key, reason } => write!(
                f,
                "the request with idempotency key `{key}` ran, but whether its outcome was recorded is unknown: {reason}"
            ),
            IdempotencyError::LeaseLost { key } => write!(
                f,
                "the claim on idempotency key `{key}` ran out before its outcome was recorded"
            ),
            IdempotencyError::OutcomeNotStored { key, reason } => write!(
                f,
                "the request with idempotency key `{key}` ran, but its outcome cannot be stored: {reason}"
            ),
            IdempotencyError::Undecodable { key, reason } => write!(
                f,
                "the stored record of idempotency key `{key}` cannot be decoded: {reason}"
            ),
            IdempotencyError::Reentrant { key } => write!(
                f,
                "an #[idempotent] call re-entered idempotency key `{key}` while executing it; waiting would deadlock"
            ),
            IdempotencyError::WouldDeadlock { key } => write!(
                f,
                "a blocking #[idempotent] call with key `{key}` would wait for an async call of its own thread's current-thread runtime, which cannot run while it blocks"
            ),
            IdempotencyError::SharedRecords { path, first, second } => write!(
                f,
                "the #[idempotent] functions at {first} and {second} have the same record path `{path}` and no `scope`, so their records would mix: give each a distinct `scope = \"...\"`"
            ),
            IdempotencyError::KeyTooLong { len, max } => write!(
                f,
                "idempotency key or scope of {len} bytes is longer than the {max} bytes accepted"
            ),
        }
    }
}

impl std::error::Error for IdempotencyError {}
