//! A per-thread tracking scope: code run inside [`track_sync`] or [`track`] reports a value
//! with [`record`], and the scope returns the last value reported while it was active. Used by
//! `replay` (was this `#[idempotent]` call replayed?) and `served` (how was this `#[cached]`
//! call answered?), each with its own thread-local slot.
//!
//! Outside a scope, [`record`] is one read of a `const` thread-local and a branch. Scopes nest:
//! entering one saves the outer scope's state and leaving it (panics included) puts it back,
//! so an inner scope's reports never reach the outer one. [`track`] enters the scope on every
//! poll, so it follows the future across threads; futures spawned from inside are not in it.

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread::LocalKey;

/// A value a tracking scope collects; `Default` is "nothing reported". `slot` is its own
/// thread-local, `None` when no scope is active on the thread.
pub(crate) trait Tracked: Copy + Default + 'static {
    fn slot() -> &'static LocalKey<Cell<Option<Self>>>;
}

/// Scopes active right now, on any thread and of any kind. While none is (the common case),
/// [`record`] is one relaxed load of a line nobody writes, and never touches the thread-local
/// (measured: reading it cost ~10 ns of an 80 ns `#[sequenced]` call).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Reports `value` to the innermost active scope, if any.
#[inline]
pub(crate) fn record<T: Tracked>(value: T) {
    if ACTIVE.load(Relaxed) == 0 {
        return;
    }
    T::slot().with(|current| {
        if current.get().is_some() {
            current.set(Some(value));
        }
    });
}

/// An active scope on this thread; puts the outer scope back when it ends, panics included.
struct Entered<T: Tracked> {
    outer: Option<T>,
}

impl<T: Tracked> Entered<T> {
    fn enter(state: T) -> Entered<T> {
        ACTIVE.fetch_add(1, Relaxed);
        Entered {
            outer: T::slot().with(|current| current.replace(Some(state))),
        }
    }

    fn leave(self) -> T {
        T::slot().with(|current| current.get()).unwrap_or_default()
    }
}

impl<T: Tracked> Drop for Entered<T> {
    fn drop(&mut self) {
        T::slot().with(|current| current.set(self.outer));
        ACTIVE.fetch_sub(1, Relaxed);
    }
}

/// Runs `f` in a new scope; returns its value and the last value reported in it.
pub(crate) fn track_sync<T: Tracked, R>(f: impl FnOnce() -> R) -> (R, T) {
    let scope = Entered::enter(T::default());
    let output = f();
    (output, scope.leave())
}

/// Runs `future` in a new scope, entered on every poll; resolves to its output and the last
/// value reported in it.
pub(crate) async fn track<T: Tracked, F: Future>(future: F) -> (F::Output, T) {
    let mut future = pin!(future);
    let mut state = T::default();
    let output = std::future::poll_fn(|cx| {
        let scope = Entered::enter(state);
        let poll = future.as_mut().poll(cx);
        state = scope.leave();
        poll
    })
    .await;
    (output, state)
}

/// The scope's contract, checked once for each kind that uses it (`replay`, `served`, `turn`):
/// `first` and `second` are two values of the kind other than the default.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Replay, Served, Turn};

    fn nested_scopes_do_not_leak_into_each_other<T: Tracked + PartialEq + std::fmt::Debug>(
        first: T,
        second: T,
    ) {
        let (((), inner), outer) = track_sync(|| {
            record(first);
            track_sync(|| record(second))
        });
        assert_eq!((inner, outer), (second, first));
    }

    fn recording_outside_a_scope_is_a_no_op<T: Tracked + PartialEq + std::fmt::Debug>(value: T) {
        record(value);
        assert_eq!(track_sync::<T, ()>(|| ()).1, T::default());
    }

    fn a_panicking_scope_restores_the_outer_one<T: Tracked + PartialEq + std::fmt::Debug>(
        value: T,
    ) {
        let ((), outer) = track_sync::<T, ()>(|| {
            let _ = std::panic::catch_unwind(|| track_sync::<T, ()>(|| panic!("inside")));
            record(value);
        });
        assert_eq!(outer, value);
    }

    /// A scope active on one thread (so `record` looks at thread-locals everywhere) does not
    /// take reports from another thread.
    fn a_scope_on_another_thread_takes_nothing<T>(value: T)
    where
        T: Tracked + PartialEq + std::fmt::Debug + Send,
    {
        let (entered, inside) = std::sync::mpsc::channel();
        let (release, done) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            track_sync::<T, ()>(|| {
                entered.send(()).unwrap();
                done.recv().unwrap();
            })
            .1
        });
        inside.recv().unwrap();
        record(value);
        release.send(()).unwrap();
        assert_eq!(other.join().unwrap(), T::default());
    }

    fn contract<T>(first: T, second: T)
    where
        T: Tracked + PartialEq + std::fmt::Debug + Send,
    {
        nested_scopes_do_not_leak_into_each_other(first, second);
        recording_outside_a_scope_is_a_no_op(first);
        a_panicking_scope_restores_the_outer_one(first);
        a_scope_on_another_thread_takes_nothing(first);
    }

    #[test]
    fn replay_scopes_keep_the_contract() {
        contract(Replay::Fresh, Replay::Replayed);
    }

    #[test]
    fn served_scopes_keep_the_contract() {
        contract(Served::Executed, Served::Hit);
    }

    #[test]
    fn turn_scopes_keep_the_contract() {
        contract(Turn::Waited, Turn::AtOnce);
    }
}
