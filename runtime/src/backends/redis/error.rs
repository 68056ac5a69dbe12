//! The one error type of the Redis store, and the mapping from the driver's errors to it.
//!
//! Every way Redis can fail us ends in a [`RedisStoreError`] variant: the store never panics on
//! a Redis failure, never waits without a bound (every command runs under a deadline), and never
//! answers "not claimed" when it does not know, so a failure cannot turn into a silent second
//! execution.

use std::fmt;
use std::time::Duration;

/// Why the Redis store could not do what was asked.
///
/// ```
/// use racefree_runtime::redis::RedisStoreError;
///
/// let err = RedisStoreError::Undecodable { key: "rf:{f|k}:idem".into(), reason: "not JSON".into() };
/// assert!(err.to_string().contains("rf:{f|k}:idem"));
/// assert!(!err.is_retryable());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// Redis could not be reached or the connection broke (refused, reset, killed, DNS).
    Unavailable {
        /// What the driver said.
        source: redis::RedisError,
    },
    /// Redis did not answer within the store's deadline.
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
    /// A record under `key` is not a record this version understands (foreign data, another
    /// envelope version, or a value that no longer deserializes into the function's type).
    Undecodable {
        /// The Redis key holding the record.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The caller no longer holds the lease it is acting under: it expired (the process was
    /// paused or cut off longer than the lease) and somebody else may have taken over. The
    /// write was rejected; nothing was stored or committed.
    LeaseLost {
        /// The Redis key of the lease.
        key: String,
    },
    /// Redis answered with an error (a script error, a cluster misconfiguration, a wrong type).
    Command {
        /// What the driver said.
        source: redis::RedisError,
    },
    /// The outcome could not be serialized into the envelope.
    Serialize {
        /// What serde said.
        reason: String,
    },
    /// A write was sent, and re-sent, but no answer came back (deadline passed, connection
    /// lost), and reading the record afterwards could not decide whether it landed. It may
    /// have landed, or may still land. Never retried as if nothing happened.
    OutcomeUnknown {
        /// The Redis key written.
        key: String,
        /// The last failure seen.
        source: Box<RedisStoreError>,
    },
    /// The body finished but its outcome cannot be stored (not encodable, or larger than the
    /// server accepts). The key is marked "done, outcome not stored": later calls get this
    /// error too, and the body is not run again while the record lives.
    OutcomeNotStored {
        /// The Redis key of the record.
        key: String,
        /// Why the outcome could not be stored.
        reason: String,
    },
    /// The server may evict keys: `maxmemory-policy` is not `noeviction` (or could not be
    /// read). An evicted claim, lock or counter would silently void exactly-once and gap-free
    /// numbering, so the store refuses to run. Set `maxmemory-policy noeviction`, or opt out
    /// with `RedisStore::accept_eviction()` / `StoreOptions::accept_eviction`.
    EvictionPolicy {
        /// The policy the server reported, or why it is unknown.
        policy: String,
    },
    /// A write reached the primary but not the store's `Durability` level (`WAIT`/`WAITAOF`
    /// counted fewer replicas or fsyncs) within its timeout.
    NotDurable {
        /// The level asked for.
        wanted: super::Durability,
        /// Whether the primary fsynced it.
        local: bool,
        /// How many replicas acknowledged (or fsynced) it.
        replicas: u32,
    },
    /// The store's options ask for something this deployment cannot do.
    Unsupported {
        /// What.
        what: String,
    },
    /// The server lost its data since this process first used it (restarted without
    /// persistence, flushed, or the epoch key was evicted): the store-wide epoch key is gone
    /// or changed. Sequences refuse to hand out numbers, which could repeat earlier ones,
    /// until the application calls `RedisStore::accept_data_loss()`.
    DataLost {
        /// The epoch key.
        key: String,
        /// The epoch this process saw first.
        expected: String,
        /// What the server holds now (`None`: nothing).
        found: Option<String>,
    },
}

impl RedisStoreError {
    /// `true` for failures where sending the same token-checked command again is safe and may
    /// succeed (connection lost, deadline passed).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RedisStoreError::Unavailable { .. } | RedisStoreError::Timeout { .. }
        )
    }
}

impl fmt::Display for RedisStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisStoreError::Unavailable { source } => write!(f, "redis unavailable: {source}"),
            RedisStoreError::Timeout { after } => {
                write!(f, "redis did not answer within {after:?}")
            }
            RedisStoreError::Undecodable { key, reason } => {
                write!(f, "undecodable record at redis key `{key}`: {reason}")
            }
            RedisStoreError::LeaseLost { key } => {
                write!(
                    f,
                    "lease on redis key `{key}` was lost; the write was rejected"
                )
            }
            RedisStoreError::Command { source } => write!(f, "redis command failed: {source}"),
            RedisStoreError::Serialize { reason } => {
                write!(f, "cannot serialize outcome: {reason}")
            }
            RedisStoreError::OutcomeUnknown { key, source } => write!(
                f,
                "write to redis key `{key}` was sent but its outcome is unknown: {source}"
            ),
            RedisStoreError::OutcomeNotStored { key, reason } => write!(
                f,
                "outcome for redis key `{key}` cannot be stored: {reason}; the key is done without an outcome"
            ),
            RedisStoreError::EvictionPolicy { policy } => write!(
                f,
                "redis maxmemory-policy is `{policy}`: keys may be evicted, voiding the store's guarantees; \
                 set `maxmemory-policy noeviction` or opt out with `RedisStore::accept_eviction()`"
            ),
            RedisStoreError::NotDurable {
                wanted,
                local,
                replicas,
            } => write!(
                f,
                "write not durable as asked ({wanted:?}): fsynced locally: {local}, replicas: {replicas}"
            ),
            RedisStoreError::Unsupported { what } => write!(f, "not supported: {what}"),
            RedisStoreError::DataLost {
                key,
                expected,
                found,
            } => write!(
                f,
                "redis lost its data: epoch key `{key}` was `{expected}`, now {}; sequences refuse \
                 until `RedisStore::accept_data_loss()`",
                found.as_deref().map_or("missing".to_owned(), |e| format!("`{e}`"))
            ),
        }
    }
}

impl std::error::Error for RedisStoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisStoreError::Unavailable { source } | RedisStoreError::Command { source } => {
                Some(source)
            }
            RedisStoreError::OutcomeUnknown { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

impl From<redis::RedisError> for RedisStoreError {
    fn from(err: redis::RedisError) -> Self {
        if err.is_timeout() {
            // The driver's own response timeout; our deadline is reported by `Store::run`.
            RedisStoreError::Timeout {
                after: Duration::ZERO,
            }
        } else if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_unrecoverable_error()
            || err.is_cluster_error()
        {
            RedisStoreError::Unavailable { source: err }
        } else {
            RedisStoreError::Command { source: err }
        }
    }
}
