//! A one-shot cell that one leader completes and any number of followers wait on.
//!
//! This is the rendezvous at the heart of single flight: the leader runs the computation,
//! followers block (sync) or await (async) until the leader [`complete`](Flight::complete)s
//! the cell with a value or abandons it (error, panic, cancelled future). The cell is built
//! from `std::sync::OnceLock` (publication) and `event_listener::Event` (wake-up); it holds no
//! lock while anybody waits, so a dropped waiter leaves nothing behind.

use std::sync::OnceLock;
use std::time::Instant;

use event_listener::{Event, EventListener, Listener};

use super::blocking::{self, Owner, WouldDeadlock};

/// What a follower sees when the leader is done: `Some(value)` if the leader produced a value to
/// share, `None` if it gave up (its call failed, panicked or was cancelled).
pub type Landing<T> = Option<T>;

/// A one-shot, many-reader completion cell.
///
/// ```
/// use std::sync::Arc;
/// use racefree_runtime::sync::flight::Flight;
///
/// let flight = Arc::new(Flight::new());
/// let waiter = { let f = flight.clone(); std::thread::spawn(move || f.wait().clone()) };
/// flight.complete(Some(42));
/// assert_eq!(waiter.join().unwrap(), Some(42));
/// ```
#[derive(Debug)]
pub struct Flight<T> {
    landing: OnceLock<Landing<T>>,
    landed: Event,
    owner: Owner,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Flight<T> {
    /// A cell nobody has completed yet, by a leader nothing is known about.
    pub fn new() -> Self {
        Self::owned_by(Owner::unknown())
    }

    /// A cell `owner` will complete: [`wait_checked`](Flight::wait_checked) refuses to block
    /// on it where that would never end.
    pub fn owned_by(owner: Owner) -> Self {
        Flight {
            landing: OnceLock::new(),
            landed: Event::new(),
            owner,
        }
    }

    /// Who completes this cell.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// [`wait`](Flight::wait) by the rule of [`blocking`]: fails at once if the leader is an
    /// async task only this thread could run, waits in `block_in_place` on a multi-thread
    /// runtime's worker.
    pub fn wait_checked(&self) -> Result<&Landing<T>, WouldDeadlock> {
        if let Some(landing) = self.landing.get() {
            return Ok(landing);
        }
        blocking::wait(&[self.owner], false, || self.wait())
    }

    /// [`wait_deadline`](Flight::wait_deadline) by the rule of [`blocking`].
    pub fn wait_deadline_checked(
        &self,
        deadline: Instant,
    ) -> Result<Option<&Landing<T>>, WouldDeadlock> {
        if let Some(landing) = self.landing.get() {
            return Ok(Some(landing));
        }
        blocking::wait(&[self.owner], true, || self.wait_deadline(deadline))
    }

    /// Publishes the landing and wakes every waiter. Only the first call has an effect.
    pub fn complete(&self, landing: Landing<T>) {
        let _ = self.landing.set(landing);
        self.landed.notify(usize::MAX);
    }

    /// The landing, if the leader is done.
    pub fn landing(&self) -> Option<&Landing<T>> {
        self.landing.get()
    }

    /// Blocks the current thread until the leader is done.
    pub fn wait(&self) -> &Landing<T> {
        loop {
            match self.landed_or_listen() {
                Ok(landing) => return landing,
                Err(listener) => listener.wait(),
            }
        }
    }

    /// Blocks the current thread until the leader is done or `deadline` passes.
    pub fn wait_deadline(&self, deadline: Instant) -> Option<&Landing<T>> {
        loop {
            match self.landed_or_listen() {
                Ok(landing) => return Some(landing),
                Err(listener) => {
                    if listener.wait_deadline(deadline).is_none() {
                        return self.landing.get();
                    }
                }
            }
        }
    }

    /// Waits asynchronously until the leader is done. Dropping the future leaves no trace.
    pub async fn wait_async(&self) -> &Landing<T> {
        loop {
            match self.landed_or_listen() {
                Ok(landing) => return landing,
                Err(listener) => listener.await,
            }
        }
    }

    // Registering the listener before the second look closes the window in which the leader
    // could complete between our first look and the registration.
    fn landed_or_listen(&self) -> Result<&Landing<T>, EventListener> {
        if let Some(landing) = self.landing.get() {
            return Ok(landing);
        }
        let listener = self.landed.listen();
        match self.landing.get() {
            Some(landing) => Ok(landing),
            None => Err(listener),
        }
    }
}
