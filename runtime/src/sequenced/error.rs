//! Why a `#[sequenced]` call could not get its key.

use std::fmt;

/// Why a sequenced call did not run its body.
///
/// A `#[sequenced]` function with `timeout = "..."` or `store = ...` returns these through its
/// own error type, so that type needs `From<SequenceError>`.
///
/// ```
/// use std::time::{Duration, Instant};
/// use racefree_runtime::{SequenceBackend, SequenceError, Sequencer};
///
/// let orders = Sequencer::new();
/// let _held = orders.acquire("stream-1", None).unwrap();
/// let deadline = Instant::now() + Duration::from_millis(10);
/// assert!(matches!(orders.acquire("stream-1", Some(deadline)), Err(SequenceError::Timeout)));
/// assert_eq!(orders.waiting(&"stream-1"), 0);           // the timed-out caller left the queue
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum SequenceError {
    /// The key stayed held longer than the function's `timeout`; the caller left the queue and
    /// consumed no number.
    Timeout,
    /// The call tried to take a key that the code calling it already holds (a sequenced body
    /// calling itself, directly or through other functions, with the same key). Waiting would
    /// never end, so the call fails instead.
    Reentrant,
    /// A blocking call would have waited for an async call of the same key that only its own
    /// thread can run (an async task of this thread's current-thread runtime): waiting would
    /// never end, so it failed instead and left the queue. Call it from async code (the
    /// `_async` forms, an `async fn`), from a multi-thread runtime, or from another thread.
    WouldDeadlock,
    /// The store lost the caller's lease on the key before the number could be committed (a
    /// distributed store whose lease expired): the number was not consumed.
    LeaseLost,
    /// The key's numbers are used up: the next one would be `u64::MAX`, after which nothing
    /// could be committed. The body did not run.
    Exhausted,
    /// The commit was sent but its answer was lost (a timeout or a broken connection after
    /// the retries): the number may or may not have been consumed, and the body's effect may
    /// or may not have committed. Check the effect before retrying.
    CommitUnknown(Box<dyn std::error::Error + Send + Sync>),
    /// The store failed before anything was consumed (e.g. it could not be reached): no number
    /// was used and nothing committed.
    Store(Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Display for SequenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SequenceError::Timeout => {
                f.write_str("timed out waiting for the key of a #[sequenced] call")
            }
            SequenceError::Reentrant => f.write_str(
                "a #[sequenced] call re-entered a key its own caller holds; waiting would deadlock",
            ),
            SequenceError::WouldDeadlock => f.write_str(
                "a blocking #[sequenced] call would wait for an async call of the same key on its own thread's current-thread runtime, which cannot run while it blocks",
            ),
            SequenceError::LeaseLost => f.write_str(
                "the lease on the key was lost before the sequence number was committed",
            ),
            SequenceError::Exhausted => f.write_str("the key's sequence numbers are used up"),
            SequenceError::CommitUnknown(e) => write!(
                f,
                "the sequence commit's outcome is unknown (the number may have been consumed): {e}"
            ),
            SequenceError::Store(e) => write!(f, "sequence store failed: {e}"),
        }
    }
}

impl std::error::Error for SequenceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SequenceError::Store(e) | SequenceError::CommitUnknown(e) => Some(&**e),
            _ => None,
        }
    }
}
