//! A registry of in-flight computations, one per key: the per-key lock of `#[cached]`.
//!
//! [`SingleFlight::join`] either makes the caller the key's [`Lead`] (it must compute, then
//! [`Lead::complete`] or drop the lead) or hands it the leader's [`Flight`] to wait on. The
//! registry holds an entry only while a key is being computed: the lead removes it when it
//! completes, fails, panics or is dropped with its future, and waiters hold only an `Arc` to the
//! flight, so a cancelled waiter leaves nothing in the registry.
//!
//! It promises that at most one lead per key exists at a time. It does not store results:
//! that is the cache's job, and the cache must be filled *before* the lead completes, so that
//! a caller arriving after the entry is gone finds the value (see `Cache::lookup_or_lead`).

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::blocking::Owner;
use super::flight::Flight;
use super::RandomState;

/// Keyed single-flight registry.
///
/// ```
/// use racefree_runtime::sync::single_flight::{Join, SingleFlight};
///
/// let flights = SingleFlight::<u64, String>::new();
/// let Join::Lead(lead) = flights.join(7) else { unreachable!() };
/// assert!(matches!(flights.join(7), Join::Follow(_)));   // a second caller would wait
/// lead.complete("seven".to_owned());
/// assert!(flights.is_empty());
/// ```
pub struct SingleFlight<K, V, S = RandomState> {
    flights: DashMap<K, Arc<Flight<V>>, S>,
}

/// The outcome of [`SingleFlight::join`].
pub enum Join<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    /// The caller computes; others wait for it.
    Lead(Lead<'a, K, V, S>),
    /// Somebody else computes; wait on this flight.
    Follow(Arc<Flight<V>>),
}

impl<K: Eq + Hash + Clone, V> SingleFlight<K, V> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::with_hasher(RandomState::default())
    }
}

impl<K: Eq + Hash + Clone, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Clone> SingleFlight<K, V, S> {
    /// An empty registry with the given hasher.
    pub fn with_hasher(hasher: S) -> Self {
        SingleFlight {
            flights: DashMap::with_hasher(hasher),
        }
    }

    /// Becomes the key's lead, or joins the flight already under way.
    pub fn join(&self, key: K) -> Join<'_, K, V, S> {
        self.join_as(key, Owner::unknown())
    }

    /// [`join`](Self::join), telling followers who the caller is if it leads (see
    /// [`Flight::wait_checked`]).
    pub fn join_as(&self, key: K, owner: Owner) -> Join<'_, K, V, S> {
        match self.flights.entry(key) {
            Entry::Occupied(entry) => Join::Follow(Arc::clone(entry.get())),
            Entry::Vacant(entry) => {
                // Cloned before the flight is registered: a panicking `Clone` leaves nothing.
                let key = entry.key().clone();
                let flight = Arc::new(Flight::owned_by(owner));
                entry.insert(Arc::clone(&flight));
                Join::Lead(Lead {
                    registry: self,
                    key,
                    flight: Some(flight),
                })
            }
        }
    }

    /// Keys being computed right now.
    pub fn len(&self) -> usize {
        self.flights.len()
    }

    /// `true` when nothing is being computed.
    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    fn land(&self, key: &K, flight: Arc<Flight<V>>, landing: Option<V>) {
        // Leave the registry first, then wake the followers: a caller that arrives in between
        // either finds the value in the cache (filled before `complete`) or becomes the next lead.
        let left = super::leave(
            || {
                self.flights
                    .remove_if(key, |_, current| Arc::ptr_eq(current, &flight));
            },
            || {
                self.flights
                    .retain(|_, current| !Arc::ptr_eq(current, &flight))
            },
        );
        flight.complete(landing);
        left.resume();
    }
}

/// The right and duty to compute one key. Dropping it without [`complete`](Lead::complete)
/// abandons the flight: its followers wake up and one of them becomes the next lead.
pub struct Lead<'a, K: Eq + Hash + Clone, V, S: BuildHasher + Clone = RandomState> {
    registry: &'a SingleFlight<K, V, S>,
    key: K,
    flight: Option<Arc<Flight<V>>>,
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Clone> Lead<'_, K, V, S> {
    /// The key this lead computes.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Hands `value` to every follower and leaves the registry.
    pub fn complete(mut self, value: V) {
        if let Some(flight) = self.flight.take() {
            self.registry.land(&self.key, flight, Some(value));
        }
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Clone> Drop for Lead<'_, K, V, S> {
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            self.registry.land(&self.key, flight, None);
        }
    }
}
