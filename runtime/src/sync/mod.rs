//! Coordination pieces with no knowledge of any attribute: a one-shot [`flight`] a leader
//! completes and followers wait on, the per-key [`single_flight`] registry of them, per-key
//! FIFO [`keyed_locks`] with re-entry detection, the coarse [`clock`] TTLs read, and the rule
//! a [`blocking`] waiter follows inside an async runtime.
//!
//! Dependencies point one way: the attribute rooms (`cached`, `idempotent`, `sequenced`) use
//! these; nothing here imports from them.

pub mod blocking;
pub mod clock;
pub mod flight;
pub mod keyed_locks;
pub mod single_flight;

/// The default hasher of the registries: `foldhash`, seeded per process; a lookup hashes the
/// key a few times per call, and SipHash would be most of the call's cost.
pub type RandomState = foldhash::fast::RandomState;

/// Runs a cleanup that calls the key's `Hash`/`Eq` (leaving a map) from a `Drop`: while the
/// thread unwinds, a panic in them is caught, because a second panic would abort the process.
pub(crate) fn cleanup(leave: impl FnOnce()) {
    if std::thread::panicking() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(leave));
    } else {
        leave();
    }
}
