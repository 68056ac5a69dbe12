//! Telling a replayed outcome from a fresh one, without changing how the function is called.
//!
//! An `#[idempotent]` function returns what it always returned; an HTTP layer that wants to
//! answer `Idempotency-Replayed: true` wraps the handler in a tracking scope instead:
//!
//! - [`track`] runs a future and returns `(output, Replay)`;
//! - [`track_sync`] does the same for a closure.
//!
//! Every `#[idempotent]` call reports into the innermost active scope of the current thread
//! (for [`track`], the scope is active exactly while its future is being polled, so it follows
//! the task across threads, and tasks spawned from it are not in it): [`Replay::Fresh`] when its
//! body ran, [`Replay::Replayed`] when it returned a stored outcome (including the outcome of a
//! duplicate it waited for). Calls refused with an error report nothing.
//!
//! **The last call to finish wins.** For nested calls that is the outermost one (it finishes
//! after everything it called), which is the one a handler cares about: a fresh handler that
//! replays an inner call is still fresh, and a replayed handler ran nothing inside. For calls
//! made one after the other inside one scope it is the last of them. Without a scope, reporting
//! costs one thread-local read.
//!
//! ```
//! use racefree_runtime::replay::{self, Replay};
//!
//! let (value, replay) = replay::track_sync(|| {
//!     replay::record(Replay::Replayed);     // what an #[idempotent] call does on a replay
//!     7
//! });
//! assert_eq!((value, replay), (7, Replay::Replayed));
//! assert!(replay.is_replayed());
//! ```

use std::cell::Cell;
use std::future::Future;
use std::thread::LocalKey;

use crate::sync::scope::{self, Tracked};

/// What the idempotent calls inside a tracking scope did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Replay {
    /// No `#[idempotent]` call finished inside the scope.
    #[default]
    NotRecorded,
    /// The (last) idempotent call ran its body.
    Fresh,
    /// The (last) idempotent call returned a stored outcome without running its body.
    Replayed,
}

impl Replay {
    /// `true` for [`Replay::Replayed`]: answer with `Idempotency-Replayed: true`.
    pub fn is_replayed(self) -> bool {
        self == Replay::Replayed
    }
}

thread_local! {
    // `None`: no scope is active on this thread.
    static CURRENT: Cell<Option<Replay>> = const { Cell::new(None) };
}

impl Tracked for Replay {
    fn slot() -> &'static LocalKey<Cell<Option<Replay>>> {
        &CURRENT
    }
}

/// Reports what an idempotent call did to the innermost active scope, if any.
#[inline]
pub fn record(value: Replay) {
    scope::record(value)
}

/// Runs `f` in a new tracking scope; returns its value and what the idempotent calls in it did.
///
/// ```
/// use racefree_runtime::replay::{track_sync, Replay};
///
/// let (_, replay) = track_sync(|| ());
/// assert_eq!(replay, Replay::NotRecorded);
/// ```
pub fn track_sync<R>(f: impl FnOnce() -> R) -> (R, Replay) {
    scope::track_sync(f)
}

/// Runs `future` in a new tracking scope; resolves to its output and what the idempotent calls
/// in it did. The scope is entered on every poll, so it works on any executor and across
/// threads; futures spawned from inside are not tracked by it.
///
/// ```
/// use racefree_runtime::replay::{self, Replay};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let (value, replay) = replay::track(async {
///     replay::record(Replay::Fresh);
///     "done"
/// }).await;
/// assert_eq!((value, replay), ("done", Replay::Fresh));
/// # });
/// ```
pub async fn track<F: Future>(future: F) -> (F::Output, Replay) {
    scope::track(future).await
}
