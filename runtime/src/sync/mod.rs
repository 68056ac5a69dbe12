//! Coordination pieces with no knowledge of any attribute: a one-shot [`flight`] a leader
//! completes and followers wait on, the per-key [`single_flight`] registry of them, per-key
//! FIFO [`keyed_locks`] with re-entry detection, the coarse [`clock`] TTLs read, and the rule
//! a [`blocking`] waiter follows inside an async runtime, the [`striped`] counter behind hit and
//! replay counts, and the per-thread tracking `scope` behind `replay` and `served`.
//!
//! Dependencies point one way: the attribute rooms (`cached`, `idempotent`, `sequenced`) use
//! these; nothing here imports from them.

pub mod blocking;
pub mod clock;
pub mod flight;
pub mod keyed_locks;
pub(crate) mod scope;
pub mod single_flight;
pub mod striped;

/// The default hasher of the registries and caches: `foldhash`'s quality variant, seeded per
/// process; a lookup hashes the key a few times per call, and SipHash would be most of the
/// call's cost. Not `foldhash::fast`: for sequential integer keys, some of its seeds cluster the
/// low bits, and `papaya` (the cache's table) then overflows its probe limit in a table less than
/// half full, answers by "growing" to the same size, overflows again and loops, allocating a
/// table per turn (seen as a hung, then OOM-killed, test: 1 run in about 300). The quality
/// variant's last multiply costs about a nanosecond per hash; see `tests/cached_alloc.rs`.
pub type RandomState = foldhash::quality::RandomState;

/// Runs a cleanup that calls the key's `Hash`/`Eq` (leaving a map) from a `Drop`: while the
/// thread unwinds, a panic in them is caught, because a second panic would abort the process.
pub(crate) fn cleanup(leave: impl FnOnce()) {
    if std::thread::panicking() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(leave));
    } else {
        leave();
    }
}

/// Leaves a map from a `Drop`, whatever the key's `Hash` and `Eq` do: `by_key` finds the entry
/// through the key; should they panic, `by_walk` finds it by identity, walking the map without
/// hashing or comparing a key, so the state is cleaned up all the same. The panic then goes on
/// to the caller through [`Left::resume`], once the caller has done what else it must (unless
/// the thread is already unwinding: a second panic would abort).
#[must_use = "a panic of the key's `Hash`/`Eq` must go on: call `resume`"]
pub(crate) fn leave(by_key: impl FnOnce(), by_walk: impl FnOnce()) -> Left {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(by_key)) {
        Ok(()) => Left(None),
        Err(panic) => {
            by_walk();
            Left(Some(panic))
        }
    }
}

/// What [`leave`] caught, to be resumed.
pub(crate) struct Left(Option<Box<dyn std::any::Any + Send>>);

impl Left {
    pub(crate) fn resume(self) {
        if let Some(panic) = self.0 {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}
