//! The one function-owned cell all three attributes use: a home for a function's own store
//! that a `static` can hold without naming the store's types.
//!
//! A `static` must name its type, but an attribute's user never spells the key or value type:
//! they are inferred where the function calls its store. So the generated `static` holds a
//! handle with a [`PerType`] inside, which creates the typed store on first use; a generic
//! function gets one store per concrete type under the same handle. The generated accessor
//! (`fn <name>_cache()` and its siblings) finds the same handle by the function's id in a
//! [`Registry`], because the macro cannot tell an associated function from a free one and so
//! cannot name a `static` next to the function.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Mutex, OnceLock};

type AnyRef = &'static (dyn Any + Send + Sync);

/// One value per concrete type `T`, created on first use and kept for the life of the process.
/// `D` is the type-erased view (a trait object) through which all of them are inspected.
///
/// Finding a type takes no lock and costs the same for every type: each value sits in a slot
/// picked by its `TypeId`'s own hash (a constant for each `T`, so the slot is known at compile
/// time), next to the slots of earlier types whose slot was taken. A walk past other types only
/// happens for slot collisions, or past [`SLOTS`] types (beyond those, values are found on the
/// append-only chain `each` also reads). Only creating a value takes the mutex, and only to
/// keep two threads from creating the same type twice.
pub(crate) struct PerType<D: ?Sized + 'static> {
    slots: [OnceLock<&'static Node<D>>; SLOTS],
    // Every value, in the order they were created.
    head: OnceLock<&'static Node<D>>,
    creating: Mutex<()>,
}

/// How many types are found in one step (a generic function has a handful of types).
const SLOTS: usize = 16;

struct Node<D: ?Sized + 'static> {
    type_id: TypeId,
    value: AnyRef,
    erased: &'static D,
    next: OnceLock<&'static Node<D>>,
}

// The slot a type's value is looked for first: its `TypeId` already is a hash.
#[inline]
fn slot_of<T: Any>() -> usize {
    struct Take(u64);
    impl std::hash::Hasher for Take {
        fn write(&mut self, bytes: &[u8]) {
            for &byte in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(byte);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 ^= n;
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }
    let mut take = Take(0);
    std::hash::Hash::hash(&TypeId::of::<T>(), &mut take);
    take.0 as usize % SLOTS
}

impl<D: ?Sized + 'static> PerType<D> {
    pub(crate) const fn new() -> Self {
        PerType {
            slots: [const { OnceLock::new() }; SLOTS],
            head: OnceLock::new(),
            creating: Mutex::new(()),
        }
    }

    /// The value for `T`, made by `create` (and seen through `erase`) on first use.
    #[inline]
    pub(crate) fn get_or_create<T: Any + Send + Sync>(
        &self,
        create: impl FnOnce() -> T,
        erase: impl FnOnce(&'static T) -> &'static D,
    ) -> &'static T {
        match self.find::<T>() {
            Some(value) => value,
            None => self.create(create, erase),
        }
    }

    /// The value for `T`, if one was created.
    #[inline]
    pub(crate) fn find<T: Any>(&self) -> Option<&'static T> {
        let first = slot_of::<T>();
        for step in 0..SLOTS {
            match self.slots[(first + step) % SLOTS].get() {
                Some(node) if node.type_id == TypeId::of::<T>() => {
                    return node.value.downcast_ref()
                }
                Some(_) => {}
                // Slots fill up in order from a type's first slot: `T` is in none further on.
                None => return None,
            }
        }
        self.find_on_chain()
    }

    // Past `SLOTS` types.
    #[cold]
    fn find_on_chain<T: Any>(&self) -> Option<&'static T> {
        let mut link = &self.head;
        while let Some(node) = link.get() {
            if node.type_id == TypeId::of::<T>() {
                return node.value.downcast_ref();
            }
            link = &node.next;
        }
        None
    }

    #[cold]
    fn create<T: Any + Send + Sync>(
        &self,
        create: impl FnOnce() -> T,
        erase: impl FnOnce(&'static T) -> &'static D,
    ) -> &'static T {
        let _creating = self
            .creating
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(value) = self.find::<T>() {
            return value;
        }
        // Leaked on purpose: the handle lives in a `static`, so what it holds lives as long.
        let value: &'static T = Box::leak(Box::new(create()));
        let node: &'static Node<D> = Box::leak(Box::new(Node {
            type_id: TypeId::of::<T>(),
            value,
            erased: erase(value),
            next: OnceLock::new(),
        }));
        let mut link = &self.head;
        while let Some(next) = link.get() {
            link = &next.next;
        }
        // Appends and slot fills happen only here, under the mutex: the tail is still empty,
        // and a free slot stays free until set here. The chain first, so that `each` lists
        // every value a lookup can find.
        let _ = link.set(node);
        let first = slot_of::<T>();
        if let Some(free) = (0..SLOTS)
            .map(|step| &self.slots[(first + step) % SLOTS])
            .find(|slot| slot.get().is_none())
        {
            let _ = free.set(node);
        }
        value
    }

    /// Every value so far, through the erased view, in the order they were created.
    pub(crate) fn each(&self) -> Vec<&'static D> {
        let mut all = Vec::new();
        let mut link = &self.head;
        while let Some(node) = link.get() {
            all.push(node.erased);
            link = &node.next;
        }
        all
    }
}

/// The process-wide map from a function's id to its handle.
pub struct Registry<H: 'static>(OnceLock<Mutex<HashMap<&'static str, &'static H>>>);

impl<H: 'static> Registry<H> {
    /// An empty registry, for a `static`.
    pub const fn new() -> Self {
        Registry(OnceLock::new())
    }

    /// The handle registered for `id`, made by `make` if there is none yet.
    fn get_or_register(&self, id: &'static str, make: impl FnOnce() -> H) -> &'static H {
        let mut registry = self
            .0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registry
            .entry(id)
            .or_insert_with(|| Box::leak(Box::new(make())))
    }
}

/// A function-owned home: the handle an attribute keeps a function's store in ([`CacheHandle`],
/// [`IdempotencyHandle`], [`SequenceHandle`]), found by the function's id.
///
/// [`CacheHandle`]: crate::CacheHandle
/// [`IdempotencyHandle`]: crate::IdempotencyHandle
/// [`SequenceHandle`]: crate::SequenceHandle
pub trait Home: Send + Sync + Sized + 'static {
    /// What the attribute's arguments configure (capacity, TTL, ...), fixed at compile time.
    type Config: Copy + Send + Sync + 'static;
    /// A new, empty home for the function `id`.
    fn open(id: &'static str, config: Self::Config) -> Self;
    /// The process-wide registry of this kind of home.
    fn registry() -> &'static Registry<Self>;
}

/// The `static` an expansion declares, in the function and in its accessor: finds the
/// function's home by id once, then is one atomic load away from it.
#[doc(hidden)]
pub struct FunctionCell<H: Home> {
    id: CellId,
    config: H::Config,
    home: OnceLock<&'static H>,
}

#[derive(Clone, Copy)]
enum CellId {
    Given(&'static str),
    /// Computed on first use: see [`function_name`].
    Computed(fn() -> &'static str),
}

impl<H: Home> FunctionCell<H> {
    /// A cell for the function `id`, configured by the attribute.
    #[doc(hidden)]
    pub const fn with_config(id: &'static str, config: H::Config) -> Self {
        FunctionCell {
            id: CellId::Given(id),
            config,
            home: OnceLock::new(),
        }
    }

    /// A cell for the function whose id `id` computes on first use: what expansions declare,
    /// because the id they need (with the `Self` type, from [`function_name`]) is not a
    /// constant.
    #[doc(hidden)]
    pub const fn with_id_fn(id: fn() -> &'static str, config: H::Config) -> Self {
        FunctionCell {
            id: CellId::Computed(id),
            config,
            home: OnceLock::new(),
        }
    }

    /// The function's home, registered on first use.
    #[doc(hidden)]
    #[inline]
    pub fn handle(&self) -> &'static H {
        self.home.get_or_init(|| {
            let id = match self.id {
                CellId::Given(id) => id,
                CellId::Computed(id) => id(),
            };
            H::registry().get_or_register(id, || H::open(id, self.config))
        })
    }
}

/// The path of an annotated function, read from inside it: `mark` is the
/// `core::any::type_name` of a marker type declared in a `fn` nested in the function (or in
/// its accessor), so it names the scope the compiler sees, `Self` type included, however the
/// function was written (by hand or by a `macro_rules!`, in an inherent or a trait impl):
///
/// ```text
/// app::Tri::scaled::__racefree_id::M               -> app::Tri::<name><suffix>
/// <app::Tri as app::Shape>::area::__racefree_id::M -> <app::Tri as app::Shape>::<name><suffix>
/// app::load::{{closure}}::__racefree_id::M         -> app::<name><suffix>  (an async fn)
/// ```
///
/// The last two segments (marker and its `fn`), any `{{...}}` segments, and the segment of
/// the function or accessor holding them are dropped; `name` and `suffix` are appended. Called
/// once per cell or path `static`, so the leaked text is bounded by the number of functions.
#[doc(hidden)]
pub fn function_name(mark: &'static str, name: &str, suffix: &str) -> &'static str {
    let text = match function_scope(mark) {
        "" => format!("{name}{suffix}"),
        scope => format!("{scope}::{name}{suffix}"),
    };
    Box::leak(text.into_boxed_str())
}

/// The scope part of [`function_name`], without allocating: `app::Tri`,
/// `<app::Tri as app::Shape>`, `app::Shape` (a trait's default method), `app::Gen<_>`.
#[doc(hidden)]
pub fn function_scope(mark: &'static str) -> &'static str {
    fn parent(path: &str) -> &str {
        path.rsplit_once("::").map_or("", |(parent, _)| parent)
    }
    // `{{closure}}` (an async fn's body) and any other compiler-made `{{...}}` segment.
    let mut scope = parent(parent(mark));
    while scope
        .rsplit("::")
        .next()
        .is_some_and(|last| last.starts_with("{{"))
    {
        scope = parent(scope);
    }
    parent(scope)
}

/// The `Self` type a method runs for, when its scope does not name it already: a trait's
/// default method (scope `app::Shape`) is one function for every implementor, and a method of
/// a generic impl (scope `app::Gen<_>`) one for every instantiation, so their own stores and
/// record keys are told apart by it. `None` for a method of an inherent or trait impl of one
/// type (scope `app::Tri` or `<app::Tri as app::Shape>`), whose path says it all.
#[doc(hidden)]
#[inline]
pub fn implementor(scope: &str, self_type: &'static str) -> Option<&'static str> {
    let named = scope == self_type
        || scope
            .strip_prefix('<')
            .and_then(|rest| rest.strip_prefix(self_type))
            .is_some_and(|rest| rest.starts_with(" as "));
    (!named).then_some(self_type)
}

/// A key given to a function handle's lookups (`<fn>_cache().invalidate(..)`,
/// `<fn>_sequence().next(..)`, ...): the key type the function builds, or a borrowed form of a
/// text key (`&str`, `str`, `&'static str` for a `String`, `Box<str>` or `Arc<str>` key), as
/// `HashMap::get` accepts `&str` for a `String` key.
///
/// A handle does not know its key type at compile time (the attribute never spells it), so a
/// key of another type is found out when the lookup runs: it panics, naming the key type the
/// function uses, instead of answering for a store that does not exist.
pub trait HandleKey {
    #[doc(hidden)]
    fn probe(&self) -> Probe<'_>;
}

impl<T: Any> HandleKey for T {
    fn probe(&self) -> Probe<'_> {
        Probe::Value(self, std::any::type_name::<T>())
    }
}

impl HandleKey for str {
    fn probe(&self) -> Probe<'_> {
        Probe::Text(self)
    }
}

/// A function's handle seen with its key type `K`, as the generated accessor returns it when
/// the key type can be read off the signature (`fn <name>_cache()`, `fn <name>_sequence()`):
/// its lookups accept the key type itself or, for a text key, `str` and `&'static str`, and any
/// other type is a compile error naming the key type. It derefs to the handle for everything
/// that takes no key (`len`, `stats`, `clear`, ...).
///
/// Where the macro cannot name the key type (`key = <expr>` other than an argument, a generic
/// function, an argument with a lifetime or `impl Trait` in its type), `K` is `dyn Any`: any
/// [`HandleKey`] is accepted and a wrong type is found out when the lookup runs (it panics
/// naming the function's key type).
pub struct Keyed<H: 'static, K: ?Sized + 'static> {
    handle: &'static H,
    key: PhantomData<fn(&K)>,
}

impl<H: 'static, K: ?Sized + 'static> Keyed<H, K> {
    #[doc(hidden)]
    #[inline]
    pub fn new(handle: &'static H) -> Self {
        Keyed {
            handle,
            key: PhantomData,
        }
    }

    /// The handle itself, without the key type.
    #[inline]
    pub fn handle(self) -> &'static H {
        self.handle
    }
}

impl<H: 'static, K: ?Sized + 'static> Clone for Keyed<H, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H: 'static, K: ?Sized + 'static> Copy for Keyed<H, K> {}

impl<H: 'static, K: ?Sized + 'static> std::ops::Deref for Keyed<H, K> {
    type Target = H;
    #[inline]
    fn deref(&self) -> &H {
        self.handle
    }
}

impl<H: std::fmt::Debug + 'static, K: ?Sized + 'static> std::fmt::Debug for Keyed<H, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.handle.fmt(f)
    }
}

/// A key a [`Keyed`] handle with keys `K` accepts: `K` itself, and for a text key (`String`,
/// `Box<str>`, `Arc<str>`) also `str` and `&'static str`. With `K = dyn Any` (a key type the
/// macro could not name) every [`HandleKey`] is accepted and checked when the lookup runs.
#[diagnostic::on_unimplemented(
    message = "this function's keys are `{K}`, not `{Self}`",
    label = "pass the key as the function builds it: a `{K}`",
    note = "a text key (`String`, `Box<str>`, `Arc<str>`) also accepts `&str`"
)]
pub trait KeyOf<K: ?Sized>: HandleKey {}

impl<K: Any> KeyOf<K> for K {}
impl KeyOf<String> for str {}
impl KeyOf<String> for &'static str {}
impl KeyOf<Box<str>> for str {}
impl KeyOf<Box<str>> for &'static str {}
impl KeyOf<std::sync::Arc<str>> for str {}
impl KeyOf<std::sync::Arc<str>> for &'static str {}
impl<Q: HandleKey + ?Sized> KeyOf<dyn Any> for Q {}

/// A key as a handle's type-erased stores see it.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum Probe<'a> {
    Value(&'a dyn Any, &'static str),
    Text(&'a str),
}

impl<'a> Probe<'a> {
    /// The key as a `K`, if it is one.
    pub(crate) fn value<K: Any>(self) -> Option<&'a K> {
        match self {
            Probe::Value(any, _) => any.downcast_ref(),
            Probe::Text(_) => None,
        }
    }

    /// The key as text, if it is a string of some kind.
    pub(crate) fn text(self) -> Option<&'a str> {
        match self {
            Probe::Text(text) => Some(text),
            Probe::Value(any, _) => {
                if let Some(text) = any.downcast_ref::<&'static str>() {
                    Some(text)
                } else if let Some(text) = any.downcast_ref::<String>() {
                    Some(text)
                } else if let Some(text) = any.downcast_ref::<Box<str>>() {
                    Some(text)
                } else if let Some(text) = any.downcast_ref::<std::sync::Arc<str>>() {
                    Some(text)
                } else {
                    None
                }
            }
        }
    }

    /// The key as an owned `K`: a copy of a `K`, or text made into a text key type (`String`,
    /// `Box<str>`, `Arc<str>`).
    pub(crate) fn to_key<K: Any + Clone>(self) -> Option<K> {
        if let Some(key) = self.value::<K>() {
            return Some(key.clone());
        }
        let text = self.text()?;
        let key: Box<dyn Any> = if TypeId::of::<K>() == TypeId::of::<String>() {
            Box::new(text.to_owned())
        } else if TypeId::of::<K>() == TypeId::of::<Box<str>>() {
            Box::new(Box::<str>::from(text))
        } else if TypeId::of::<K>() == TypeId::of::<std::sync::Arc<str>>() {
            Box::new(std::sync::Arc::<str>::from(text))
        } else {
            return None;
        };
        key.downcast().ok().map(|key| *key)
    }

    pub(crate) fn type_name(self) -> &'static str {
        match self {
            Probe::Value(_, name) => name,
            Probe::Text(_) => "str",
        }
    }
}

/// Asks each store (`ask` answers `None` for a key it cannot take) and returns the answers of
/// those that could; if stores exist and none can take the key, panics naming the key types
/// they use.
pub(crate) fn ask_stores<D: ?Sized, R>(
    function: &'static str,
    stores: &[&'static D],
    key: Probe<'_>,
    key_type: impl Fn(&D) -> &'static str,
    ask: impl Fn(&'static D) -> Option<R>,
) -> Vec<R> {
    let answers: Vec<R> = stores.iter().filter_map(|store| ask(*store)).collect();
    if answers.is_empty() && !stores.is_empty() {
        let used: Vec<&str> = stores.iter().map(|store| key_type(store)).collect();
        panic!(
            "{function}: no store keyed by `{}`: its keys are `{}`; pass the key as the function builds it (or `&str` for a text key)",
            key.type_name(),
            used.join("`, `")
        );
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::{function_name, implementor, PerType, SLOTS};

    // More types than slots, so that some collide and the last ones live on the chain only:
    // each is created once, found again as itself, and listed in creation order.
    #[test]
    fn every_type_is_found_past_collisions_and_past_the_slots() {
        struct Ty<const N: usize>;
        static TYPES: PerType<dyn std::any::Any + Send + Sync> = PerType::new();
        let mut created = Vec::new();
        macro_rules! each_type {
            ($($n:literal)*) => {$(
                let value = TYPES.get_or_create(|| (Ty::<$n>, $n as usize), |v| v);
                assert_eq!(value.1, $n);
                created.push(value as *const _ as *const ());
            )*};
        }
        each_type!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
        assert!(created.len() > SLOTS);
        macro_rules! found_again {
            ($($n:literal)*) => {$(
                let found = TYPES.find::<(Ty<$n>, usize)>().expect("created above");
                assert!(std::ptr::eq(found as *const _ as *const (), created[$n]));
            )*};
        }
        found_again!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
        assert!(TYPES.find::<(Ty<24>, usize)>().is_none());
        let listed: Vec<_> = TYPES
            .each()
            .into_iter()
            .map(|v| v.downcast_ref::<(Ty<0>, usize)>().is_some())
            .collect();
        assert_eq!(listed.len(), created.len());
        assert!(listed[0] && !listed[1..].iter().any(|&first| first));
    }

    #[test]
    fn function_name_keeps_the_self_type_and_drops_the_marker() {
        let cases = [
            ("app::Tri::scaled::__racefree_id::M", "app::Tri::scaled@1:2"),
            (
                "app::Tri::scaled_cache::__racefree_id::M",
                "app::Tri::scaled@1:2",
            ),
            (
                "<app::Tri as app::Shape>::scaled::__racefree_id::M",
                "<app::Tri as app::Shape>::scaled@1:2",
            ),
            (
                "app::Gen<_>::scaled::{{closure}}::__racefree_id::M",
                "app::Gen<_>::scaled@1:2",
            ),
            ("app::scaled::__racefree_id::M", "app::scaled@1:2"),
        ];
        for (mark, name) in cases {
            assert_eq!(function_name(mark, "scaled", "@1:2"), name, "{mark}");
        }
    }

    #[test]
    fn implementor_is_named_only_where_the_scope_does_not_name_it() {
        assert_eq!(implementor("app::Tri", "app::Tri"), None);
        assert_eq!(implementor("<app::Tri as app::Shape>", "app::Tri"), None);
        assert_eq!(implementor("app::Shape", "app::Tri"), Some("app::Tri"));
        assert_eq!(
            implementor("app::Gen<_>", "app::Gen<u8>"),
            Some("app::Gen<u8>")
        );
        assert_eq!(
            implementor("<app::Trip as app::Shape>", "app::Tri"),
            Some("app::Tri")
        );
    }
}
