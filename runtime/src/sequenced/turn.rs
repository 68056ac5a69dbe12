//! Telling a `#[sequenced]` call that waited for its key from one that found it free, without
//! changing how the function is called: the per-call answer beside [`replay`](crate::replay)
//! (`#[idempotent]`) and [`served`](crate::served) (`#[cached]`).
//!
//! - [`track`] runs a future and returns `(output, Turn)`;
//! - [`track_sync`] does the same for a closure.
//!
//! Every `#[sequenced]` call that gets its key reports into the innermost active scope of the
//! current thread (for [`track`], while its future is being polled): [`Turn::AtOnce`] when the
//! key was free, [`Turn::Waited`] when it queued behind another call holding it (in this
//! process, or with the Redis store in another one), [`Turn::Unknown`] when the store cannot
//! tell (the SQL stores: the wait happens inside the database, on the counter row's lock).
//! Calls refused before they got the key (timeout, re-entry, the store's error) report
//! nothing. The last call to get its key wins. Without a scope, reporting costs one
//! thread-local read.
//!
//! ```
//! use racefree_runtime::turn::{self, Turn};
//!
//! let ((), turn) = turn::track_sync(|| ());
//! assert_eq!(turn, Turn::NotRecorded);
//! ```

use std::cell::Cell;
use std::future::Future;
use std::thread::LocalKey;

use crate::sync::scope::{self, Tracked};

/// How the (last) `#[sequenced]` call inside a tracking scope got its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Turn {
    /// No `#[sequenced]` call got its key inside the scope.
    #[default]
    NotRecorded,
    /// The key was free: the call ran at once.
    AtOnce,
    /// Another call held the key: this one waited for it.
    Waited,
    /// The store cannot tell (SQL: the wait, if any, happened on the database's row lock).
    Unknown,
}

impl Turn {
    /// What a lease's [`waited`](crate::SequenceLease::waited) says.
    pub(crate) fn of(waited: Option<bool>) -> Turn {
        match waited {
            Some(false) => Turn::AtOnce,
            Some(true) => Turn::Waited,
            None => Turn::Unknown,
        }
    }
}

thread_local! {
    // `None`: no scope is active on this thread.
    static CURRENT: Cell<Option<Turn>> = const { Cell::new(None) };
}

impl Tracked for Turn {
    fn slot() -> &'static LocalKey<Cell<Option<Turn>>> {
        &CURRENT
    }
}

/// Reports how a sequenced call got its key to the innermost active scope, if any.
#[inline]
pub(crate) fn record(value: Turn) {
    scope::record(value)
}

/// Runs `f` in a new tracking scope; returns its value and how the `#[sequenced]` calls in it
/// got their keys.
///
/// ```
/// use racefree_runtime::turn::{track_sync, Turn};
/// use racefree_runtime::{SequenceBackend, Sequencer};
///
/// let invoices: Sequencer<&str> = Sequencer::new();
/// let (lease, turn) = track_sync(|| invoices.acquire("acme", None));
/// assert!(lease.is_ok());
/// // A bare `acquire` is not a `#[sequenced]` call: only the attribute reports.
/// assert_eq!(turn, Turn::NotRecorded);
/// ```
pub fn track_sync<R>(f: impl FnOnce() -> R) -> (R, Turn) {
    scope::track_sync(f)
}

/// Runs `future` in a new tracking scope; resolves to its output and how the `#[sequenced]`
/// calls in it got their keys. The scope is entered on every poll, so it works on any
/// executor and across threads; futures spawned from inside are not tracked by it.
pub async fn track<F: Future>(future: F) -> (F::Output, Turn) {
    scope::track(future).await
}
