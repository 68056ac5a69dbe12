//! What a blocking wait does inside an async runtime: the rule every sync waiter follows.
//!
//! A sync caller (a sync `#[cached]` function waiting for the caller computing its key, a sync
//! `#[sequenced]` call queued for its key, a sync `#[idempotent]` duplicate) blocks its thread.
//! That is only safe if whoever it waits for can run meanwhile. So whoever takes a key records
//! an [`Owner`]: the thread it took it on and whether it is an async task. Before blocking, a
//! waiter calls [`wait`]:
//! - if an owner is **async code of this very thread** that cannot move to another (a task of
//!   a current-thread runtime or a `LocalSet`, the future of a `block_on`, anything outside a
//!   multi-thread Tokio runtime's tasks), it can only run once this thread stops blocking: the wait would never end (or only
//!   at its deadline, in vain), so it fails at once with [`WouldDeadlock`], and the caller
//!   turns that into its typed error (or a panic that says why, where the function has no
//!   error type). The same for an owner that is this thread's own sync code, unless the wait
//!   has a deadline (it then times out as asked);
//! - on a worker of a multi-thread runtime, it blocks inside `tokio::task::block_in_place`, so
//!   the worker's other tasks (the owner among them, if it was queued here) move to another
//!   thread instead of stalling;
//! - anywhere else it simply blocks.
//!
//! It does not see further than one step: a sync waiter blocked on a sync owner of another
//! thread, which itself waits for an async task of the first thread, still deadlocks (use a
//! `timeout`).

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Who holds a key or computes a value, as far as a blocking waiter needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    // 0: unknown (never matches a thread).
    thread: usize,
    asynchronous: bool,
    // Polled as a Tokio task (which a multi-thread runtime can move to another worker), not as
    // the future of a `block_on`, which stays on its thread.
    in_task: bool,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static THREAD: Cell<usize> = const { Cell::new(0) };
}

/// A number for the current thread, unique for the life of the process.
#[inline]
fn this_thread() -> usize {
    THREAD.with(|id| match id.get() {
        0 => {
            let fresh = NEXT_THREAD.fetch_add(1, Relaxed);
            id.set(fresh);
            fresh
        }
        known => known,
    })
}

impl Owner {
    /// The calling code, which is an async task if `asynchronous`.
    #[inline]
    pub fn here(asynchronous: bool) -> Owner {
        Owner {
            thread: this_thread(),
            asynchronous,
            in_task: asynchronous && tokio::task::try_id().is_some(),
        }
    }

    /// An owner nothing is known about: waiting for it never fails.
    pub const fn unknown() -> Owner {
        Owner {
            thread: 0,
            asynchronous: false,
            in_task: false,
        }
    }

    /// `true` if it is an async task that runs on the calling thread.
    fn is_async_task_here(self) -> bool {
        self.asynchronous && self.thread != 0 && self.thread == this_thread()
    }

    /// `true` if it is the calling thread's own sync code (a thread waiting for itself).
    fn is_this_thread_blocking(self) -> bool {
        !self.asynchronous && self.thread != 0 && self.thread == this_thread()
    }
}

/// A blocking wait refused because it could never end: what it waits for can only run on the
/// thread that would block.
///
/// ```
/// use racefree_runtime::sync::blocking::{self, Owner, WouldDeadlock};
///
/// // An async task of this thread holds the key; outside a multi-thread runtime, blocking
/// // this thread would stop that task for good.
/// let owner = Owner::here(true);
/// assert_eq!(blocking::wait(&[owner], false, || unreachable!()), Err::<(), _>(WouldDeadlock));
/// // Another thread's work can be waited for.
/// let other = std::thread::spawn(|| Owner::here(true)).join().unwrap();
/// assert_eq!(blocking::wait(&[other], false, || 7), Ok(7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WouldDeadlock;

impl fmt::Display for WouldDeadlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a blocking call would wait for work that only this thread can run (a task of this \
             thread's current-thread runtime, the future of its `block_on`, or this thread \
             itself): make the caller async, or call it from a multi-thread runtime's task or \
             another thread",
        )
    }
}

impl std::error::Error for WouldDeadlock {}

/// Runs `wait`, a blocking wait for work that `owners` do, if that can end (see the module
/// docs); on a multi-thread runtime's worker, inside `block_in_place`. `bounded`: the wait has
/// a deadline, so a thread waiting for its own sync code only times out (and is let do so).
pub fn wait<R>(
    owners: &[Owner],
    bounded: bool,
    wait: impl FnOnce() -> R,
) -> Result<R, WouldDeadlock> {
    let flavor = tokio::runtime::Handle::try_current()
        .ok()
        .map(|handle| handle.runtime_flavor());
    let multi_thread = flavor == Some(tokio::runtime::RuntimeFlavor::MultiThread);
    // On a multi-thread runtime, `block_in_place` lets the worker's tasks move on; the future
    // of a `block_on` on this thread cannot move.
    let stuck_here =
        |owner: &Owner| owner.is_async_task_here() && (!multi_thread || !owner.in_task);
    if (!bounded && owners.iter().any(|owner| owner.is_this_thread_blocking()))
        || owners.iter().any(stuck_here)
    {
        return Err(WouldDeadlock);
    }
    if multi_thread {
        Ok(tokio::task::block_in_place(wait))
    } else {
        Ok(wait())
    }
}
